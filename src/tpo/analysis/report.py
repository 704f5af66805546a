"""Renders batch outputs as one self-contained HTML report: reward curves, run comparisons and every trajectory.

Its sections, in order: the runs; reward by step; width and depth (for more than one run);
reward against compute, when the runs report their cost (best-of-n curves from a best-of-N
run, each TPO or revision run as a point, and the comparisons at matched cost, from
``compute.py``); the verdicts of a held-out judge, when ``tpo judge`` files are given
(``judge.py``); and every prompt's trajectory.

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
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..result import TPOResult, dumps_json
from .compute import MatchedComparison, matched_compute
from .evaluate import (
    Interval,
    Run,
    RunSummary,
    _method_name,
    compare_runs,
    load_run,
    summarize_run,
    unique_labels,
)
from .judge import JudgeSummary, read_verdicts, summarize_verdicts

__all__ = ["build_report", "write_report"]

#: Okabe-Ito colours (distinguishable with colour-blindness), yellow left out for contrast.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


def write_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    judgements: Sequence[str | Path] = (),
) -> Path:
    """Read batch outputs (and ``tpo judge`` verdict files) and write the HTML report to ``out``; return its path."""
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"give one label per output: {len(labels)} label(s) for {len(paths)} output(s)")
    runs = [load_run(p, label=labels[i] if labels else None) for i, p in enumerate(paths)]
    judged = []
    for path in judgements:
        verdicts, warnings = read_verdicts(path)
        judged.append(summarize_verdicts(verdicts, path=str(path), warnings=warnings))
    text = build_report(runs, title=title, judgements=judged)
    out_path = Path(out)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # A label or file name with an undecodable byte is shown escaped rather than failing the write.
        out_path.write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise ConfigError(f"cannot write {out_path}: {e.strerror or e}") from e
    return out_path


def build_report(
    runs: Sequence[Run],
    *,
    title: str | None = None,
    generated_at: str | None = None,
    judgements: Sequence[JudgeSummary] = (),
) -> str:
    """The report for ``runs`` (and the statistics of ``tpo judge`` verdicts, beside them) as one HTML document."""
    if not runs:
        raise ConfigError("a report needs at least one run")
    runs = unique_labels(runs)
    summaries = [summarize_run(r) for r in runs]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(runs))]
    title = title or ("TPO report: " + ", ".join(r.label for r in runs))
    when = generated_at or _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    versions = sorted({r.tpo_version for run in runs for r in run.results if r.tpo_version})
    body = "\n".join(
        [
            f'<header><h1>{_e(title)}</h1><p class="meta">Generated {_e(when)}'
            f"{' by tpo ' + _e(', '.join(versions)) if versions else ''} from {len(runs)} run(s).</p></header>",
            _runs_section(summaries, colors),
            _curves_section(summaries, colors),
            _comparison_section(runs, summaries, colors) if len(runs) > 1 else "",
            _compute_section(runs, summaries, colors),
            _judge_section(judgements),
            _prompts_section(),
        ]
    )
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
    text = resources.files("tpo.analysis").joinpath("report_assets").joinpath(name).read_text(encoding="utf-8")
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
            entry = prompts.setdefault(
                r.prompt_id,
                {
                    "id": r.prompt_id,
                    "m": [[m.get("role"), m.get("content")] for m in r.messages],
                    "r": [None] * len(runs),
                },
            )
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
        "u": [
            u.policy_calls,
            u.sequences,
            u.prompt_tokens,
            u.completion_tokens,
            u.reward_calls,
            round(u.wall_time_s, 3),
        ],
        "c": [
            [c.id, c.text, _finite(c.score), c.step, c.parent_id, c.origin, c.score_error, c.finish_reason]
            for c in r.candidates
        ],
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
    head = (
        "run",
        "method",
        "N",
        "D",
        "prompts",
        "complete",
        "failed",
        "final score",
        "best initial sample",
        "gain",
        "tokens / prompt",
        "answers scored / prompt",
        "policy",
        "reward",
        "file",
    )
    rows = []
    for s, c in zip(summaries, colors, strict=True):
        std = f" ± {_fmt(s.final_score_std)}" if s.final_score_std is not None else ""
        gain = "–" if s.gain.mean is None else f"{s.gain.mean:+.3f}"
        cells = [
            f"{_swatch(c)} {_e(s.label)}",
            _e(s.mode or "–"),
            _e(s.width if s.width is not None else "–"),
            _e(s.depth if s.depth is not None else "–"),
            str(s.prompts),
            str(s.complete),
            f'<span class="{"bad" if s.failures.failed_prompts else ""}">{s.failures.failed_prompts}</span>',
            f"{_fmt(s.final_score.mean)}{std}",
            _fmt(s.initial_best.mean),
            gain,
            _fmt(s.costs.tokens.mean, 0),
            _fmt(s.costs.answers_scored.mean, 1),
            _e(s.policy or "–"),
            _e(s.reward or "–"),
            f'<span class="path" title="{_e(s.path)}">{_e(Path(s.path).name)}</span>',
        ]
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    failures = []
    for s in summaries:
        f = s.failures
        notes = [
            (f.failed_prompts, "failed prompts"),
            (f.score_failures, "answers not scored"),
            (f.extraction_fallbacks, "rewrites without answer tags"),
            (f.revision_fallbacks, "steps fell back to revision"),
            (f.truncated_steps, "steps shortened to fit the context window"),
        ]
        shown = ", ".join(f"{n} {what}" for n, what in notes if n)
        if shown:
            failures.append(f"<li><b>{_e(s.label)}</b>: {_e(shown)}</li>")
        failures.extend(f"<li><b>{_e(s.label)}</b>: {_e(w)}</li>" for w in s.warnings)
    return (
        '<section id="runs"><h2>Runs</h2><div class="scroll"><table class="grid"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        + (f'<ul class="notes">{"".join(failures)}</ul>' if failures else "")
        + "</section>"
    )


def _curves_section(summaries: Sequence[RunSummary], colors: Sequence[str]) -> str:
    mean_series, best_series, std_series = [], [], []
    for s, c in zip(summaries, colors, strict=True):
        pts = [(st.step, st.mean) for st in s.steps if st.mean is not None]
        band = [
            (st.step, st.mean - st.std, st.mean + st.std)
            for st in s.steps
            if st.mean is not None and st.std is not None
        ]
        mean_series.append(_Series(s.label, c, pts, band))
        best_series.append(
            _Series(s.label, c, [(st.step, st.best_so_far) for st in s.steps if st.best_so_far is not None])
        )
        std_series.append(_Series(s.label, c, [(st.step, st.std) for st in s.steps if st.std is not None]))
    charts = [
        _line_chart(
            mean_series,
            title="Reward of each step's answers (mean ± std)",
            x_label="step",
            y_label="reward",
            css_id="chart-mean",
        ),
        _line_chart(
            best_series, title="Best reward so far", x_label="step", y_label="reward", dashed=True, css_id="chart-best"
        ),
        _line_chart(
            std_series,
            title="Spread of each step's answers (std)",
            x_label="step",
            y_label="std of reward",
            css_id="chart-std",
        ),
    ]
    legend = "".join(
        f'<span class="legend-item">{_swatch(c)} {_e(s.label)}</span>' for s, c in zip(summaries, colors, strict=True)
    )
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
    scatter = _scatter_chart(
        points,
        title="Final reward against answers scored",
        x_label="answers scored per prompt",
        y_label="mean final reward (95% CI)",
        css_id="chart-budget",
    )
    ordered = sorted(
        zip(summaries, colors, strict=True), key=lambda sc: (str(sc[0].mode), sc[0].width or 0, sc[0].depth or 0)
    )
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
        if comp_rows
        else ""
    )
    return (
        '<section id="compare"><h2>Width and depth</h2>'
        f'<div class="charts">{scatter}{_grid_charts(summaries)}</div>'
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
    dashed: bool = False
    #: A secondary line: thinner, smaller dots, left out of the legend.
    thin: bool = False


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


_SI = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _tick(value: float, decimals: int, ticks: Sequence[float]) -> str:
    """A tick's text: fixed decimals, or for axes that reach 100,000 an SI prefix (``2.5T`` FLOPs)."""
    top = max((abs(t) for t in ticks), default=0.0)
    if top < 1e5:
        return f"{value:.{decimals}f}"
    scale, prefix = next((s, p) for s, p in _SI if top >= s)
    step = min((abs(b - a) for a, b in itertools.pairwise(ticks)), default=scale) / scale
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value / scale:.{digits}f}{prefix}" if value else "0"


def _frame(
    title: str,
    x_label: str,
    y_label: str,
    css_id: str,
    xs: tuple[float, float, list[float], int],
    ys: tuple[float, float, list[float], int],
) -> tuple[list[str], Any, Any]:
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
        out.append(f'<text class="tick" x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick(t, yd, yt)}</text>')
    for t in xt:
        x = sx(t)
        out.append(f'<line class="tickmark" x1="{x:.1f}" x2="{x:.1f}" y1="{_MT + ph}" y2="{_MT + ph + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{_MT + ph + 17}" text-anchor="middle">{_tick(t, xd, xt)}</text>')
    out.append(f'<line class="axis" x1="{_ML}" x2="{_W - _MR}" y1="{_MT + ph}" y2="{_MT + ph}"/>')
    out.append(f'<line class="axis" x1="{_ML}" x2="{_ML}" y1="{_MT}" y2="{_MT + ph}"/>')
    out.append(
        f'<text class="axis-label" x="{_ML + pw / 2:.1f}" y="{_H - 6}" text-anchor="middle">{_e(x_label)}</text>'
    )
    out.append(
        f'<text class="axis-label" transform="translate(14 {_MT + ph / 2:.1f}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>'
    )
    return out, sx, sy


def _line_chart(
    series: Sequence[_Series], *, title: str, x_label: str, y_label: str, css_id: str, dashed: bool = False
) -> str:
    xs_all = [x for s in series for x, _ in s.points]
    ys_all = [y for s in series for _, y in s.points] + [
        v for s in series for _, lo, hi in (s.band or []) for v in (lo, hi)
    ]
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
            out.append(
                f'<line class="whisker" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" stroke="{s.color}"/>'
            )
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
            out.append(
                f'<line class="whisker" x1="{x:.1f}" x2="{x:.1f}" y1="{sy(p.y - p.half_ci):.1f}" '
                f'y2="{sy(p.y + p.half_ci):.1f}" stroke="{p.color}"/>'
            )
        out.append(
            f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{p.color}">'
            f"<title>{_e(p.label)}: {p.y:.4g} at {p.x:.3g} answers per prompt</title></circle>"
        )
        out.append(_point_label(placed, x, y, p.label, 6))
    out.append("</svg>")
    return "".join(out)


def _point_label(placed: list[tuple[float, float, float]], x: float, y: float, label: str, lift: float) -> str:
    """The label of a point drawn at ``(x, y)``, ``lift`` px above it, moved down clear of the labels in ``placed``.

    Appends the label's box (left, baseline, width) to ``placed``.
    """
    anchor = "end" if x > _W * 0.7 else "start"
    dx = -8 if anchor == "end" else 8
    # Move a label down until it clears those already placed (about 6.5 px a character).
    width = 6.5 * len(label)
    left = x + dx - (width if anchor == "end" else 0)
    ly = y - lift
    while any(abs(ly - py) < 12 and left < pl + pw and pl < left + width for pl, py, pw in placed):
        ly += 12
    placed.append((left, ly, width))
    return f'<text class="point-label" x="{x + dx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{_e(label)}</text>'


# ---------------------------------------------------------------------------------- the paper's analyses


def _group_label(mode: str | None, key: str) -> str:
    return f"{_method_name(mode)} {key}".strip()


def _grid_charts(summaries: Sequence[RunSummary]) -> str:
    """For a sweep: final reward against width (a line per method and depth) and against depth (per method and width)."""
    done = [s for s in summaries if s.final_score.mean is not None and s.width is not None]
    charts = []
    if len({s.width for s in done}) > 1:
        by_width: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for s in done:
            by_width.setdefault((str(s.mode), s.depth or 0), []).append(
                (float(s.width or 0), s.final_score.mean or 0.0)
            )
        series = [
            _Series(_group_label(mode, "" if mode == "bon" else f"D{depth}"), PALETTE[i % len(PALETTE)], sorted(points))
            for i, ((mode, depth), points) in enumerate(sorted(by_width.items()))
        ]
        charts.append(
            _xy_chart(
                series,
                title="Final reward against width",
                x_label="width N (answers per step)",
                y_label="mean final reward",
                css_id="chart-width",
                whole_x=True,
            )
        )
    stepped = [s for s in done if s.mode != "bon" and s.depth is not None]
    if len({s.depth for s in stepped}) > 1:
        by_depth: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for s in stepped:
            by_depth.setdefault((str(s.mode), s.width or 0), []).append(
                (float(s.depth or 0), s.final_score.mean or 0.0)
            )
        series = [
            _Series(_group_label(mode, f"N{width}"), PALETTE[i % len(PALETTE)], sorted(points))
            for i, ((mode, width), points) in enumerate(sorted(by_depth.items()))
        ]
        charts.append(
            _xy_chart(
                series,
                title="Final reward against depth",
                x_label="depth D (improvement steps)",
                y_label="mean final reward",
                css_id="chart-depth",
                whole_x=True,
            )
        )
    return "".join(charts)


def _compute_section(runs: Sequence[Run], summaries: Sequence[RunSummary], colors: Sequence[str]) -> str:
    """Reward against cumulative compute: best-of-n as curves, each TPO or revision configuration as a point."""
    have = [
        (s, c)
        for s, c in zip(summaries, colors, strict=True)
        if any(p.reward is not None and p.generated_tokens for p in s.compute)
    ]
    if not have:
        return ""
    charts = [
        _compute_chart(
            have,
            "generated_tokens",
            title="Reward against generated tokens",
            x_label="generated tokens per prompt (cumulative)",
            css_id="chart-compute",
        )
    ]
    if all(p.flops is not None for s, _ in have for p in s.compute if p.reward is not None):
        charts.append(
            _compute_chart(
                have,
                "flops",
                title="Reward against inference FLOPs",
                x_label="estimated FLOPs per prompt (cumulative)",
                css_id="chart-flops",
            )
        )
        flops_note = ""
    else:
        flops_note = (
            " FLOPs are drawn when every run knows its models' sizes (<code>--policy-params</code>, or a "
            "backend that reports its parameter count)."
        )
    matched = matched_compute(runs)
    return (
        '<section id="compute"><h2>Reward against compute</h2>'
        f'<div class="charts">{"".join(charts)}</div>'
        '<p class="explain">Best-of-n lines are the exact expected best reward of n samples drawn from each prompt\'s '
        "samples of a best-of-N run, for every n up to N; each TPO or revision configuration is a point at its final "
        "step (the dashed line joins its earlier steps: the best reward found so far against the work done so far). "
        f"Means over finished prompts.{flops_note}</p>" + _matched_table(matched) + "</section>"
    )


def _compute_chart(have: Sequence[tuple[RunSummary, str]], axis: str, *, title: str, x_label: str, css_id: str) -> str:
    series, points = [], []
    for s, color in have:
        pts = [
            (float(getattr(p, axis)), float(p.reward))
            for p in s.compute
            if p.reward is not None and getattr(p, axis) is not None
        ]
        if not pts:
            continue
        if s.mode == "bon":
            series.append(_Series(s.label, color, pts))
        else:
            series.append(_Series(s.label, color, pts, dashed=True, thin=True))
            points.append(_Point(s.label, color, pts[-1][0], pts[-1][1], 0.0))
    return _xy_chart(series, points, title=title, x_label=x_label, y_label="mean best reward", css_id=css_id)


def _matched_table(matched: Sequence[MatchedComparison]) -> str:
    if not matched:
        return ""
    unit = "generated tokens" if matched[0].basis == "completion_tokens" else "answers generated"
    rows = "".join(
        f"<tr><td>{_e(m.run)}</td><td>{_fmt(m.run_cost, 0)}</td><td>BoN-{m.n}{' (N too small)' if m.best_of_too_small else ''}"
        f"</td><td>{_fmt(m.best_of_cost, 0)}</td><td>{m.paired}</td><td>{_fmt(m.run_reward)}</td><td>{_fmt(m.best_of_reward)}</td>"
        f"<td>{'–' if m.mean_difference is None else f'{m.mean_difference:+.3f}'}{_interval(m.mean_difference_interval)}</td>"
        f"<td>{_rate(m.win_rate_ties_half, m.win_rate_ties_half_interval)}</td></tr>"
        for m in matched
    )
    return (
        f'<h3>At matched cost</h3><div class="scroll"><table class="grid" id="matched"><thead><tr><th>run</th>'
        f"<th>{unit} / prompt</th><th>best-of-n</th><th>its {unit}</th><th>pairs</th><th>reward</th>"
        "<th>best-of-n reward</th><th>run − best-of-n</th><th>win rate (ties ½)</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
        f'<p class="explain">Each run against the best-of-n (from {_e(matched[0].best_of_run)}) of nearest {unit} per '
        "prompt, paired by prompt: the mean reward difference, and the win rate counting ties as half, where each "
        "prompt counts its exact chance of beating a random n of its samples. 95% bootstrap intervals over prompts.</p>"
    )


def _judge_section(judgements: Sequence[JudgeSummary]) -> str:
    if not judgements:
        return ""
    rows = []
    for j in judgements:
        failed = f'<span class="bad">{j.failed}</span>' if j.failed else "0"
        rows.append(
            f"<tr><td>{_e(j.a)} vs {_e(j.b)}</td><td>{_e(j.judge or '–')}</td><td>{j.judged}</td>"
            f"<td>{j.wins} · {_rate(j.win_rate, j.win_interval)}</td><td>{j.ties} · {_rate(j.tie_rate, j.tie_interval)}</td>"
            f"<td>{j.losses} · {_rate(j.loss_rate, j.loss_interval)}</td>"
            f"<td>{_rate(j.win_rate_ties_half, j.win_rate_ties_half_interval)}</td>"
            f"<td>{_rate(j.lc_win_rate, j.lc_win_rate_interval)}</td>"
            f"<td>{_rate(j.position_bias_rate, j.position_bias_interval)}</td><td>{failed}</td>"
            f'<td><span class="path" title="{_e(j.path or "")}">{_e(Path(j.path).name if j.path else "–")}</span></td></tr>'
        )
    notes = "".join(f"<li>{_e(w)}</li>" for j in judgements for w in j.warnings)
    return (
        '<section id="judge"><h2>Judged by a held-out model</h2>'
        f'<div class="charts">{_judge_chart(judgements)}</div>'
        '<div class="scroll"><table class="grid"><thead><tr><th>A vs B</th><th>judge</th><th>prompts</th><th>A wins</th>'
        "<th>ties</th><th>B wins</th><th>A's win rate (ties ½)</th><th>length-controlled</th><th>position bias</th>"
        f"<th>not judged</th><th>file</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
        + '<p class="explain">The judge compared the two final answers of every prompt twice, once in each order; the same '
        "answer preferred both times wins, anything else is a tie. Position bias: the share of prompts where the judge "
        "chose the same position both times. Length-controlled: the win rate a logistic regression of the verdicts on "
        "the answers' length difference predicts at equal length. 95% intervals: Wilson for the counts, a seeded "
        "bootstrap for ties as half, Wald for the length-controlled rate.</p></section>"
    )


_BAR_COLORS = {"win": "#0072B2", "tie": "#B8C0C8", "loss": "#D55E00"}


def _judge_chart(judgements: Sequence[JudgeSummary]) -> str:
    """One bar per judging: A's wins, the ties and B's wins, with A's win rate (ties ½) and the length-controlled rate."""
    row_h, top, left, right = 34, 34, 170, 20
    height = top + row_h * len(judgements) + 40
    width = 520
    plot_w = width - left - right

    def sx(x: float) -> float:
        return left + x * plot_w

    out = [
        f'<svg class="chart" id="chart-judge" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Judge verdicts" xmlns="http://www.w3.org/2000/svg"><title>Judge verdicts</title>',
        f'<text class="chart-title" x="{left}" y="18">Judge verdicts: A wins · ties · B wins</text>',
    ]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        cls = "axis" if t == 0.5 else "gridline"
        out.append(
            f'<line class="{cls}" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top - 4}" '
            f'y2="{top + row_h * len(judgements)}"/>'
        )
        out.append(
            f'<text class="tick" x="{sx(t):.1f}" y="{top + row_h * len(judgements) + 16}" '
            f'text-anchor="middle">{100 * t:.0f}%</text>'
        )
    for i, j in enumerate(judgements):
        y = top + i * row_h + 6
        h = row_h - 14
        label = f"{j.a} vs {j.b}"
        out.append(
            f'<text class="point-label" x="{left - 8}" y="{y + h / 2 + 4:.1f}" text-anchor="end">'
            f"<title>{_e(label)}</title>{_e(label if len(label) <= 26 else label[:25] + '…')}</text>"
        )
        x = 0.0
        for kind, rate in (("win", j.win_rate), ("tie", j.tie_rate), ("loss", j.loss_rate)):
            if not rate:
                continue
            out.append(
                f'<rect class="bar bar-{kind}" x="{sx(x):.1f}" y="{y}" width="{rate * plot_w:.1f}" height="{h}" '
                f'fill="{_BAR_COLORS[kind]}"><title>{_e(label)}: {kind} {100 * rate:.1f}%</title></rect>'
            )
            x += rate
        cy = y + h / 2
        iv = j.win_rate_ties_half_interval
        if iv is not None:
            out.append(
                f'<line class="whisker judge-ci" x1="{sx(iv.low):.1f}" x2="{sx(iv.high):.1f}" y1="{cy:.1f}" '
                f'y2="{cy:.1f}" stroke="#000000"/>'
            )
        if j.win_rate_ties_half is not None:
            xm = sx(j.win_rate_ties_half)
            out.append(
                f'<path class="judge-mark" d="M{xm:.1f},{cy - 6:.1f}l6,6l-6,6l-6,-6z" fill="#000000">'
                f"<title>{_e(label)}: A's win rate, ties as half {100 * j.win_rate_ties_half:.1f}%</title></path>"
            )
        if j.lc_win_rate is not None:
            out.append(
                f'<circle class="judge-lc" cx="{sx(j.lc_win_rate):.1f}" cy="{cy:.1f}" r="5" fill="none" '
                f'stroke="#000000"><title>{_e(label)}: length-controlled {100 * j.lc_win_rate:.1f}%</title></circle>'
            )
    out.append(
        f'<text class="axis-label" x="{left}" y="{height - 6}">◆ win rate, ties ½ (95% CI) · ○ length-controlled</text>'
    )
    out.append("</svg>")
    return "".join(out)


def _xy_chart(
    series: Sequence[_Series],
    points: Sequence[_Point] = (),
    *,
    title: str,
    x_label: str,
    y_label: str,
    css_id: str,
    whole_x: bool = False,
) -> str:
    """Lines (with dots) and labelled points on linear axes with round ticks (whole numbers on x with ``whole_x``)."""
    xs_all = [x for s in series for x, _ in s.points] + [p.x for p in points]
    ys_all = [y for s in series for _, y in s.points] + [p.y for p in points]
    if not xs_all:
        return f'<div class="chart empty" id="{css_id}"><b>{_e(title)}</b><p>Nothing to draw.</p></div>'
    x_ticks = _ticks(min(xs_all), max(xs_all))
    if whole_x and x_ticks[3] > 0:  # a step below 1: one tick per whole number instead
        lo, hi = (
            math.floor(min(xs_all)) - (max(xs_all) == min(xs_all)),
            math.ceil(max(xs_all)) + (max(xs_all) == min(xs_all)),
        )
        x_ticks = (float(lo), float(hi), [float(i) for i in range(lo, hi + 1)], 0)
    out, sx, sy = _frame(title, x_label, y_label, css_id, x_ticks, _ticks(min(ys_all), max(ys_all)))
    for s in series:
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(s.points))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        thin = ' stroke-width="1.4"' if s.thin else ""
        if len(s.points) > 1:
            out.append(
                f'<path class="series" d="{d}" stroke="{s.color}"{dash}{thin}><title>{_e(s.label)}</title></path>'
            )
        for x, y in s.points:
            out.append(
                f'<circle class="dot" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{2.5 if s.thin else 3.5}" '
                f'fill="{s.color}"><title>{_e(s.label)}: {y:.4g} at {x:.4g}</title></circle>'
            )
    # The legend of the lines, bottom right (rising curves leave it empty), each name on a white backing.
    legend = [s for s in series if not s.thin]
    for k, s in enumerate(legend):
        y = _H - _MB - 6 - 13 * (len(legend) - 1 - k)
        width = 6.5 * len(s.label) + 4
        out.append(
            f'<rect class="legend-back" x="{_W - _MR - 2 - width:.1f}" y="{y - 10}" width="{width:.1f}" height="12" '
            f'fill="#ffffff" fill-opacity="0.85"/>'
        )
        out.append(
            f'<text class="point-label legend-label" x="{_W - _MR - 4}" y="{y}" text-anchor="end" '
            f'fill="{s.color}">{_e(s.label)}</text>'
        )
    placed: list[tuple[float, float, float]] = []
    for p in sorted(points, key=lambda p: -p.y):
        x, y = sx(p.x), sy(p.y)
        out.append(
            f'<circle class="dot point" cx="{x:.1f}" cy="{y:.1f}" r="5.5" fill="{p.color}">'
            f"<title>{_e(p.label)}: {p.y:.4g} at {p.x:.4g}</title></circle>"
        )
        out.append(_point_label(placed, x, y, p.label, 7))
    out.append("</svg>")
    return "".join(out)
