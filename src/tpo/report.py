"""Renders batch outputs as one self-contained HTML report: reward curves, run comparisons and every trajectory.

The page needs no network: the charts are SVG drawn here, the styles and the script are
inlined from ``report_assets/``, and a Content-Security-Policy allows nothing but those two
(by hash) and inline images. The prompts' data travels as JSON inside a
``<script type="application/json">`` element, with ``<``, ``>`` and ``&`` escaped so no
answer can close it, and the script renders it with ``textContent`` only, building a
prompt's trajectory when it is first opened, so a report of thousands of prompts opens fast.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .evaluate import Interval, Run, RunSummary, compare_runs, load_run, summarize_run, unique_labels
from .result import TPOResult, dumps_json

__all__ = ["build_report", "write_report"]

#: Okabe-Ito colours (distinguishable with colour-blindness), yellow left out for contrast.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


def write_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Read batch outputs and write the HTML report to ``out``; return its path."""
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"give one label per output: {len(labels)} label(s) for {len(paths)} output(s)")
    runs = [load_run(p, label=labels[i] if labels else None) for i, p in enumerate(paths)]
    text = build_report(runs, title=title)
    out_path = Path(out)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # A label or file name with an undecodable byte is shown escaped rather than failing the write.
        out_path.write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise ConfigError(f"cannot write {out_path}: {e.strerror or e}") from e
    return out_path


def build_report(runs: Sequence[Run], *, title: str | None = None, generated_at: str | None = None) -> str:
    """The report for ``runs`` as one HTML document."""
    if not runs:
        raise ConfigError("a report needs at least one run")
    runs = unique_labels(runs)
    summaries = [summarize_run(r) for r in runs]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(runs))]
    title = title or ("TPO report: " + ", ".join(r.label for r in runs))
    when = generated_at or _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    versions = sorted({r.tpo_version for run in runs for r in run.results if r.tpo_version})
    body = "\n".join([
        f"<header><h1>{_e(title)}</h1><p class=\"meta\">Generated {_e(when)}"
        f"{' by tpo ' + _e(', '.join(versions)) if versions else ''} from {len(runs)} run(s).</p></header>",
        _runs_section(summaries, colors),
        _curves_section(summaries, colors),
        _comparison_section(runs, summaries, colors) if len(runs) > 1 else "",
        _prompts_section(),
    ])
    css = _asset("report.css")
    js = _asset("report.js")
    data = _embed_json(_data(runs, colors))
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src '{_sha256(css)}'; script-src '{_sha256(js)}'; base-uri 'none'; form-action 'none'"
    )
    parts = {"TITLE": _e(title), "CSP": _e(csp), "CSS": css, "BODY": body, "DATA": data, "JS": js}
    # One pass over the template only: inserted text (answers!) is never scanned for markers.
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], _asset("report.html"))


def _asset(name: str) -> str:
    text = resources.files("tpo").joinpath("report_assets").joinpath(name).read_text(encoding="utf-8")
    if name.endswith((".js", ".css")) and re.search(r"</(script|style)", text, re.IGNORECASE):
        raise RuntimeError(f"report asset {name} would close its own element")
    return text


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _embed_json(data: Any) -> str:
    """JSON that is safe between ``<script type="application/json">`` tags."""
    text = dumps_json(data, compact=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------- data for the script


def _data(runs: Sequence[Run], colors: Sequence[str]) -> dict[str, Any]:
    prompts: dict[str, dict[str, Any]] = {}
    for k, run in enumerate(runs):
        for r in run.results:
            entry = prompts.setdefault(r.prompt_id, {"id": r.prompt_id, "m": [[m.get("role"), m.get("content")] for m in r.messages], "r": [None] * len(runs)})
            entry["r"][k] = _run_entry(r)
    ordered = sorted(prompts.values(), key=lambda p: _natural_key(p["id"]))
    return {
        "runs": [{"label": r.label, "color": c} for r, c in zip(runs, colors, strict=True)],
        "prompts": ordered,
    }


def _run_entry(r: TPOResult) -> dict[str, Any]:
    initial = [c.score for c in r.candidates if c.step == 0 and c.score is not None]
    gain = r.score - max(initial) if initial and r.score is not None else None
    u = r.usage
    return {
        "st": r.status,
        "err": r.error,
        "sc": _finite(r.score),
        "g": _finite(gain),
        "best": r.best_id,
        "stop": r.stopped_early,
        "u": [u.policy_calls, u.sequences, u.prompt_tokens, u.completion_tokens, u.reward_calls, round(u.wall_time_s, 3)],
        "c": [[c.id, c.text, _finite(c.score), c.step, c.parent_id, c.origin, c.score_error, c.finish_reason] for c in r.candidates],
        "s": [
            {
                "n": s.step,
                "k": s.kind,
                "ids": list(s.candidate_ids),
                "ch": s.chosen_id,
                "rj": s.rejected_id,
                "fr": s.fallback_to_revision,
                "cr": s.critique,
                "fb": s.feedback,
                "ex": dict(s.extraction),
                "fl": list(s.failures),
                "tr": list(s.truncated),
                "b": _finite(s.best_score),
            }
            for s in r.steps
        ],
    }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _natural_key(text: str) -> list[tuple[int, Any]]:
    # "p2" before "p10"; numbers and text never compared with each other.
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


# ---------------------------------------------------------------------------------- sections


def _swatch(color: str) -> str:
    return f'<svg class="swatch" width="12" height="12" aria-hidden="true"><rect width="12" height="12" rx="2" fill="{color}"/></svg>'


def _runs_section(summaries: Sequence[RunSummary], colors: Sequence[str]) -> str:
    head = ("run", "method", "N", "D", "prompts", "complete", "failed", "final score", "best initial sample", "gain",
            "tokens / prompt", "answers scored / prompt", "policy", "reward", "file")
    rows = []
    for s, c in zip(summaries, colors, strict=True):
        std = f" ± {_fmt(s.final_score_std)}" if s.final_score_std is not None else ""
        gain = "–" if s.gain.mean is None else f"{s.gain.mean:+.3f}"
        cells = [
            f"{_swatch(c)} {_e(s.label)}", _e(s.mode or "–"), _e(s.width if s.width is not None else "–"),
            _e(s.depth if s.depth is not None else "–"), str(s.prompts), str(s.complete),
            f'<span class="{"bad" if s.failures.failed_prompts else ""}">{s.failures.failed_prompts}</span>',
            f"{_fmt(s.final_score.mean)}{std}", _fmt(s.initial_best.mean), gain,
            _fmt(s.costs.tokens.mean, 0), _fmt(s.costs.answers_scored.mean, 1),
            _e(s.policy or "–"), _e(s.reward or "–"), f'<span class="path" title="{_e(s.path)}">{_e(Path(s.path).name)}</span>',
        ]
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    failures = []
    for s in summaries:
        f = s.failures
        notes = [(f.failed_prompts, "failed prompts"), (f.score_failures, "answers not scored"),
                 (f.extraction_fallbacks, "rewrites without answer tags"), (f.revision_fallbacks, "steps fell back to revision"),
                 (f.truncated_steps, "steps shortened to fit the context window")]
        shown = ", ".join(f"{n} {what}" for n, what in notes if n)
        if shown:
            failures.append(f"<li><b>{_e(s.label)}</b>: {_e(shown)}</li>")
        failures.extend(f"<li><b>{_e(s.label)}</b>: {_e(w)}</li>" for w in s.warnings)
    return (
        '<section id="runs"><h2>Runs</h2><div class="scroll"><table class="grid"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
        + (f'<ul class="notes">{"".join(failures)}</ul>' if failures else "")
        + "</section>"
    )


def _curves_section(summaries: Sequence[RunSummary], colors: Sequence[str]) -> str:
    mean_series, best_series, std_series = [], [], []
    for s, c in zip(summaries, colors, strict=True):
        pts = [(st.step, st.mean) for st in s.steps if st.mean is not None]
        band = [(st.step, st.mean - st.std, st.mean + st.std) for st in s.steps if st.mean is not None and st.std is not None]
        mean_series.append(_Series(s.label, c, pts, band))
        best_series.append(_Series(s.label, c, [(st.step, st.best_so_far) for st in s.steps if st.best_so_far is not None]))
        std_series.append(_Series(s.label, c, [(st.step, st.std) for st in s.steps if st.std is not None]))
    charts = [
        _line_chart(mean_series, title="Reward of each step's answers (mean ± std)", x_label="step", y_label="reward",
                    css_id="chart-mean"),
        _line_chart(best_series, title="Best reward so far", x_label="step", y_label="reward", dashed=True,
                    css_id="chart-best"),
        _line_chart(std_series, title="Spread of each step's answers (std)", x_label="step", y_label="std of reward",
                    css_id="chart-std"),
    ]
    legend = "".join(f'<span class="legend-item">{_swatch(c)} {_e(s.label)}</span>' for s, c in zip(summaries, colors, strict=True))
    table_rows = []
    for s in summaries:
        for st in s.steps:
            table_rows.append(
                f"<tr><td>{_e(s.label)}</td><td>{st.step}</td><td>{st.prompts}</td><td>{st.answers}</td>"
                f"<td>{_fmt(st.mean)}</td><td>{_fmt(st.std)}</td><td>{_fmt(st.between_prompt_std)}</td>"
                f"<td>{_fmt(st.best_so_far)}</td></tr>"
            )
    return (
        '<section id="curves"><h2>Reward by step</h2>'
        f'<p class="legend">{legend}</p>'
        f'<div class="charts">{"".join(charts)}</div>'
        '<p class="explain">Step 0 holds the initial samples; each later step the rewrites. For every prompt, the mean '
        "and the standard deviation are taken over the answers that step produced, then averaged over prompts "
        "(the band is mean ± that std). Best so far: the highest reward among a prompt's answers up to that step. "
        "Only finished prompts are counted.</p>"
        '<details class="table-toggle"><summary>Numbers</summary><div class="scroll"><table class="grid"><thead><tr>'
        "<th>run</th><th>step</th><th>prompts</th><th>answers</th><th>mean</th><th>std</th><th>std between prompts</th>"
        "<th>best so far</th></tr></thead><tbody>" + "".join(table_rows) + "</tbody></table></div></details></section>"
    )


def _comparison_section(runs: Sequence[Run], summaries: Sequence[RunSummary], colors: Sequence[str]) -> str:
    points = []
    for s, c in zip(summaries, colors, strict=True):
        if s.costs.answers_scored.mean is None or s.final_score.mean is None:
            continue
        std, n = s.final_score_std, s.final_score.n
        half = 1.96 * std / math.sqrt(n) if std is not None and n > 1 else 0.0
        points.append(_Point(s.label, c, s.costs.answers_scored.mean, s.final_score.mean, half))
    scatter = _scatter_chart(points, title="Final reward against answers scored",
                             x_label="answers scored per prompt", y_label="mean final reward (95% CI)", css_id="chart-budget")
    ordered = sorted(zip(summaries, colors, strict=True), key=lambda sc: (str(sc[0].mode), sc[0].width or 0, sc[0].depth or 0))
    rows = "".join(
        f"<tr><td>{_swatch(c)} {_e(s.label)}</td><td>{_e(s.mode or '–')}</td><td>{_e(s.width if s.width is not None else '–')}</td>"
        f"<td>{_e(s.depth if s.depth is not None else '–')}</td><td>{_fmt(s.costs.answers_scored.mean, 1)}</td>"
        f"<td>{_fmt(s.costs.tokens.mean, 0)}</td><td>{_fmt(s.final_score.mean)}</td><td>{_fmt(s.initial_best.mean)}</td>"
        f"<td>{_fmt(s.steps[-1].best_so_far) if s.steps else '–'}</td></tr>"
        for s, c in ordered
    )
    base = runs[0]
    comp_rows = []
    for other in runs[1:]:
        cmp = compare_runs(base, other)
        if not cmp.paired:
            continue
        comp_rows.append(
            f"<tr><td>{_e(cmp.a)} vs {_e(cmp.b)}</td><td>{cmp.paired}</td>"
            f"<td>{cmp.wins} · {_rate(cmp.win_rate, cmp.win_interval)}</td>"
            f"<td>{cmp.ties} · {_rate(cmp.tie_rate, cmp.tie_interval)}</td>"
            f"<td>{cmp.losses} · {_rate(cmp.loss_rate, cmp.loss_interval)}</td>"
            f"<td>{'–' if cmp.mean_difference is None else f'{cmp.mean_difference:+.3f}'}"
            f"{_interval(cmp.mean_difference_interval)}</td></tr>"
        )
    comparisons = (
        '<h3>Paired by prompt</h3><div class="scroll"><table class="grid"><thead><tr><th>A vs B</th><th>pairs</th>'
        "<th>A wins</th><th>ties</th><th>B wins</th><th>mean reward A − B</th></tr></thead>"
        f"<tbody>{''.join(comp_rows)}</tbody></table></div>"
        '<p class="explain">Prompts finished in both runs, matched by id; a tie is an exactly equal final reward. '
        "95% intervals: Wilson for the rates, a seeded bootstrap for the mean difference. "
        "<code>tpo eval</code> gives the same with a tie margin of your choice.</p>"
        if comp_rows else ""
    )
    return (
        '<section id="compare"><h2>Width and depth</h2>'
        f'<div class="charts">{scatter}</div>'
        '<div class="scroll"><table class="grid"><thead><tr><th>run</th><th>method</th><th>N (width)</th><th>D (depth)</th>'
        "<th>answers scored / prompt</th><th>tokens / prompt</th><th>final reward</th><th>best initial sample</th>"
        f"<th>best so far at last step</th></tr></thead><tbody>{rows}</tbody></table></div>{comparisons}</section>"
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _rate(x: float | None, iv: Interval | None) -> str:
    return _pct(x) + (f' <span class="ci">[{_pct(iv.low)}, {_pct(iv.high)}]</span>' if iv else "")


def _interval(iv: Interval | None) -> str:
    return f' <span class="ci">[{iv.low:+.3f}, {iv.high:+.3f}]</span>' if iv else ""


def _prompts_section() -> str:
    return (
        '<section id="prompts"><h2>Prompts</h2>'
        '<div class="controls">'
        '<input type="search" id="search" placeholder="Search by prompt id or text (press /)" aria-label="Search prompts" autocomplete="off">'
        '<label><input type="checkbox" id="only-failed"> only failed</label>'
        '<label>sort <select id="sort"><option value="id">by id</option><option value="score-desc">final reward, high first</option>'
        '<option value="score-asc">final reward, low first</option><option value="gain-desc">gain over initial samples</option>'
        "</select></label>"
        '<span id="count" aria-live="polite"></span></div>'
        '<p class="explain">Open a prompt to see its trajectory: every answer with its reward and the answer it was '
        "rewritten from, the chosen and rejected answers of each step, the critique (textual loss) and the feedback "
        "(textual gradient), and what went wrong.</p>"
        '<div id="list"><noscript>The prompt list needs JavaScript.</noscript></div></section>'
    )


# ---------------------------------------------------------------------------------- SVG charts


@dataclass
class _Series:
    label: str
    color: str
    points: Sequence[tuple[float, float]]
    band: Sequence[tuple[float, float, float]] | None = None


@dataclass
class _Point:
    label: str
    color: str
    x: float
    y: float
    half_ci: float


_W, _H = 440, 280
_ML, _MR, _MT, _MB = 58, 16, 34, 44


def _ticks(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float], int]:
    """A padded domain with round tick values, and the decimals to print them with."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = round((end - start) / step)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if step / mag == 2.5 else 0)
    return start, end, [start + i * step for i in range(n + 1)], decimals


def _frame(title: str, x_label: str, y_label: str, css_id: str, xs: tuple[float, float, list[float], int],
           ys: tuple[float, float, list[float], int]) -> tuple[list[str], Any, Any]:
    x0, x1, xt, xd = xs
    y0, y1, yt, yd = ys
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def sx(x: float) -> float:
        return _ML + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return _MT + ph - (y - y0) / (y1 - y0) * ph

    out = [
        f'<svg class="chart" id="{css_id}" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>',
        f'<text class="chart-title" x="{_ML}" y="18">{_e(title)}</text>',
    ]
    for t in yt:
        y = sy(t)
        out.append(f'<line class="gridline" x1="{_ML}" x2="{_W - _MR}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.{yd}f}</text>')
    for t in xt:
        x = sx(t)
        out.append(f'<line class="tickmark" x1="{x:.1f}" x2="{x:.1f}" y1="{_MT + ph}" y2="{_MT + ph + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{_MT + ph + 17}" text-anchor="middle">{t:.{xd}f}</text>')
    out.append(f'<line class="axis" x1="{_ML}" x2="{_W - _MR}" y1="{_MT + ph}" y2="{_MT + ph}"/>')
    out.append(f'<line class="axis" x1="{_ML}" x2="{_ML}" y1="{_MT}" y2="{_MT + ph}"/>')
    out.append(f'<text class="axis-label" x="{_ML + pw / 2:.1f}" y="{_H - 6}" text-anchor="middle">{_e(x_label)}</text>')
    out.append(f'<text class="axis-label" transform="translate(14 {_MT + ph / 2:.1f}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    return out, sx, sy


def _line_chart(series: Sequence[_Series], *, title: str, x_label: str, y_label: str, css_id: str, dashed: bool = False) -> str:
    xs_all = [x for s in series for x, _ in s.points]
    ys_all = [y for s in series for _, y in s.points] + [v for s in series for _, lo, hi in (s.band or []) for v in (lo, hi)]
    if not xs_all:
        return f'<div class="chart empty" id="{css_id}"><b>{_e(title)}</b><p>No scored answers to draw.</p></div>'
    x_dom = (min(xs_all), max(xs_all))
    if x_dom[1] - x_dom[0] < 1:
        x_dom = (x_dom[0] - 0.5, x_dom[1] + 0.5)
    # Steps are whole numbers: one tick per step.
    xs = (x_dom[0], x_dom[1], [float(i) for i in range(math.ceil(x_dom[0]), math.floor(x_dom[1]) + 1)], 0)
    ys = _ticks(min(ys_all), max(ys_all))
    out, sx, sy = _frame(title, x_label, y_label, css_id, xs, ys)
    for s in series:
        if s.band and len(s.band) > 1:
            upper = " ".join(f"{sx(x):.1f},{sy(hi):.1f}" for x, _, hi in s.band)
            lower = " ".join(f"{sx(x):.1f},{sy(lo):.1f}" for x, lo, _ in reversed(s.band))
            out.append(f'<polygon class="band" points="{upper} {lower}" fill="{s.color}"/>')
        elif s.band:
            x, lo, hi = s.band[0]
            out.append(f'<line class="whisker" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" stroke="{s.color}"/>')
    for s in series:
        if not s.points:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(s.points))
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<path class="series" d="{d}" stroke="{s.color}"{dash}><title>{_e(s.label)}</title></path>')
        for x, y in s.points:
            out.append(
                f'<circle class="dot" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{s.color}">'
                f"<title>{_e(s.label)} · step {x:g}: {y:.4g}</title></circle>"
            )
    out.append("</svg>")
    return "".join(out)


def _scatter_chart(points: Sequence[_Point], *, title: str, x_label: str, y_label: str, css_id: str) -> str:
    if not points:
        return f'<div class="chart empty" id="{css_id}"><b>{_e(title)}</b><p>No finished runs to compare.</p></div>'
    xs = _ticks(min(p.x for p in points) * 0.9, max(p.x for p in points) * 1.1)
    ys = _ticks(min(p.y - p.half_ci for p in points), max(p.y + p.half_ci for p in points))
    out, sx, sy = _frame(title, x_label, y_label, css_id, xs, ys)
    placed: list[tuple[float, float, float]] = []
    for p in sorted(points, key=lambda p: -p.y):
        x, y = sx(p.x), sy(p.y)
        if p.half_ci > 0:
            out.append(f'<line class="whisker" x1="{x:.1f}" x2="{x:.1f}" y1="{sy(p.y - p.half_ci):.1f}" '
                       f'y2="{sy(p.y + p.half_ci):.1f}" stroke="{p.color}"/>')
        out.append(f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{p.color}">'
                   f"<title>{_e(p.label)}: {p.y:.4g} at {p.x:.3g} answers per prompt</title></circle>")
        anchor = "end" if x > _W * 0.7 else "start"
        dx = -8 if anchor == "end" else 8
        # Move a label down until it clears those already placed (about 6.5 px a character).
        width = 6.5 * len(p.label)
        left = x + dx - (width if anchor == "end" else 0)
        ly = y - 6
        while any(abs(ly - py) < 12 and left < pl + pw and pl < left + width for pl, py, pw in placed):
            ly += 12
        placed.append((left, ly, width))
        out.append(f'<text class="point-label" x="{x + dx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{_e(p.label)}</text>')
    out.append("</svg>")
    return "".join(out)
