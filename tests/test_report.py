"""``tpo report`` without a browser: one self-contained file, escaping, the embedded data, the charts, the command.

The page in a real browser (console, search, scripts that must not run) is
``test_report_browser.py``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tpo
from tpo import ConfigError, GenerationRequest
from tpo.analysis.evaluate import load_run, summarize_run
from tpo.analysis.report import build_report, write_report
from tpo.cli import cli
from tpo.testing import FunctionReward, ScriptedPolicy, default_reply

EVIL = "<script>alert(1)</script><img src=x onerror=alert(2)> </script><!-- {{JS}} & &amp;"


def reply(request: GenerationRequest) -> list[str]:
    out = default_reply(request)
    if request.prompt_id == "evil" and request.purpose == "sample":
        out[0] = EVIL
    return out


def reward(messages: Any, answer: str) -> float:
    return (zlib.crc32(answer.encode()) % 100) / 100 + (1.0 if "Improved" in answer else 0.0)


def run_file(path: Path, n: int = 4, **options: Any) -> Path:
    prompts = [tpo.Prompt.of(f"Question {i}", id=f"q{i}") for i in range(n)]
    prompts.append(tpo.Prompt.of("Say </script><b>hi</b>", id="evil"))
    with path.open("w", encoding="utf-8") as f:
        for result in tpo.optimize_many(
            prompts, policy=ScriptedPolicy(reply), reward=FunctionReward(reward), **options
        ):
            f.write(result.to_json() + "\n")
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [run_file(tmp_path / "tpo.jsonl", width=3, depth=2), run_file(tmp_path / "bon.jsonl", mode="bon", width=9)]


def scripts(page: str) -> list[tuple[str, str]]:
    return re.findall(r"<script([^>]*)>(.*?)</script>", page, re.DOTALL)


def embedded_data(page: str) -> Any:
    (data,) = [body for attrs, body in scripts(page) if 'type="application/json"' in attrs]
    return json.loads(data)


# --------------------------------------------------------------------------- self-contained and safe


def test_the_page_is_one_file_that_needs_no_network(two_runs: list[Path]) -> None:
    page = build_report([load_run(p) for p in two_runs])

    # Nothing is fetched: no external script, stylesheet, image or font (in the markup, outside the data).
    markup = re.sub(r'(<script type="application/json"[^>]*>).*?(</script>)', r"\1\2", page, flags=re.DOTALL)
    targets = re.findall(r"""\b(?:src|href)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)""", markup, re.IGNORECASE)
    assert targets and all(t.strip("\"'").startswith(("data:", "#")) for t in targets), targets
    assert "@import" not in page and "url(" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}
    # Exactly two scripts: the data (not executed) and the renderer.
    assert [attrs.strip() for attrs, _ in scripts(page)] == ['type="application/json" id="tpo-data"', ""]


def test_the_content_security_policy_allows_only_the_inlined_script_and_style(two_runs: list[Path]) -> None:
    page = build_report([load_run(two_runs[0])])
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))  # type: ignore[union-attr]

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    (style,) = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    ((_, js),) = [s for s in scripts(page) if "application/json" not in s[0]]
    assert "default-src 'none'" in csp
    assert f"script-src {digest(js)}" in csp
    assert f"style-src {digest(style)}" in csp


def test_answers_cannot_break_out_of_the_page(two_runs: list[Path]) -> None:
    page = build_report([load_run(p) for p in two_runs])

    # The answer's markup never appears raw: every "<" of the data is escaped in the JSON.
    assert "<script>alert(1)" not in page
    assert "<img" not in page
    data_text = next(body for attrs, body in scripts(page) if "application/json" in attrs)
    assert "<" not in data_text and ">" not in data_text and "&" not in data_text
    # ... and it reads back exactly, template markers and all (they are not expanded twice).
    data = embedded_data(page)
    evil = next(p for p in data["prompts"] if p["id"] == "evil")
    texts = [c[1] for run in evil["r"] for c in run["c"]]
    assert EVIL in texts
    assert evil["m"] == [["user", "Say </script><b>hi</b>"]]


def test_text_that_utf8_cannot_hold_still_makes_a_page(tmp_path: Path) -> None:
    odd = "half an emoji \ud83d and a NUL \x00"
    path = tmp_path / "odd.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in tpo.optimize_many(
            [tpo.Prompt.of("Q", id="o")],
            policy=ScriptedPolicy(lambda req: [odd] * req.n),
            reward=FunctionReward(lambda m, a: 1.0),
            mode="bon",
            width=2,
        ):
            f.write(r.to_json() + "\n")
    out = write_report([path], tmp_path / "odd.html")
    data = embedded_data(out.read_text(encoding="utf-8"))
    assert data["prompts"][0]["r"][0]["c"][0][1] == odd


def test_labels_and_titles_are_escaped(tmp_path: Path) -> None:
    path = run_file(tmp_path / "r.jsonl", n=1, width=2, depth=1)
    page = build_report([load_run(path, label="<b>bold</b> & co")], title="<i>my</i> report")
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    assert "<title>&lt;i&gt;my&lt;/i&gt; report</title>" in page


# --------------------------------------------------------------------------- content


def test_the_data_holds_every_trajectory(two_runs: list[Path]) -> None:
    runs = [load_run(p) for p in two_runs]
    data = embedded_data(build_report(runs))

    assert [r["label"] for r in data["runs"]] == ["TPO D2-N3", "BoN-9"]
    assert [p["id"] for p in data["prompts"]] == ["evil", "q0", "q1", "q2", "q3"]  # natural order
    result = next(r for r in runs[0].results if r.prompt_id == "q1")
    entry = next(p for p in data["prompts"] if p["id"] == "q1")["r"][0]
    assert entry["st"] == "complete" and entry["sc"] == result.score and entry["best"] == result.best_id
    assert [c[0] for c in entry["c"]] == [c.id for c in result.candidates]
    assert [c[4] for c in entry["c"]] == [c.parent_id for c in result.candidates]  # lineage
    assert [(s["n"], s["k"], s["ch"], s["rj"]) for s in entry["s"]] == [
        (s.step, s.kind, s.chosen_id, s.rejected_id) for s in result.steps
    ]
    assert entry["s"][1]["cr"] == result.steps[1].critique and entry["s"][1]["fb"] == result.steps[1].feedback
    initial = max(c.score for c in result.candidates if c.step == 0 and c.score is not None)
    assert entry["g"] == pytest.approx(result.score - initial)  # type: ignore[operator]


def test_curves_are_drawn_from_the_step_statistics(two_runs: list[Path]) -> None:
    runs = [load_run(p) for p in two_runs]
    page = build_report(runs)

    for chart in ("chart-mean", "chart-best", "chart-std", "chart-budget"):
        assert f'id="{chart}"' in page
    mean_chart = re.search(r'<svg class="chart" id="chart-mean".*?</svg>', page, re.DOTALL).group(0)  # type: ignore[union-attr]
    paths = re.findall(r'<path class="series" d="([^"]+)"', mean_chart)
    assert len(paths) == 2
    assert paths[0].count("L") == 2  # TPO: steps 0, 1, 2
    assert paths[1].count("L") == 0  # BoN: step 0 only
    assert mean_chart.count('class="band"') == 1
    # The numbers table under the charts shows the same statistics as `tpo eval`.
    steps = summarize_run(runs[0]).steps
    assert f"<td>{steps[2].mean:.3f}</td>" in page and f"<td>{steps[2].best_so_far:.3f}</td>" in page
    # Two runs over the same prompts: a width/depth section and the paired table.
    assert "Width and depth" in page and "TPO D2-N3 vs BoN-9" in page


def test_one_run_has_no_comparison_section(two_runs: list[Path]) -> None:
    page = build_report([load_run(two_runs[0])])
    assert 'id="compare"' not in page and 'id="chart-mean"' in page


def test_a_run_without_scores_still_renders(tmp_path: Path) -> None:
    path = tmp_path / "failed.jsonl"
    prompts = [tpo.Prompt.of("Q", id="x")]
    with path.open("w", encoding="utf-8") as f:
        for r in tpo.optimize_many(
            prompts, policy=ScriptedPolicy(), reward=FunctionReward(lambda m, a: 1 / 0), width=2
        ):
            f.write(r.to_json() + "\n")
    page = build_report([load_run(path)])
    assert "No scored answers to draw" in page
    assert embedded_data(page)["prompts"][0]["r"][0]["st"] == "failed"


def test_a_thousand_prompts_embed_compactly(tmp_path: Path) -> None:
    path = run_file(tmp_path / "big.jsonl", n=1000, width=2, depth=1)
    page = build_report([load_run(path)])
    assert len(embedded_data(page)["prompts"]) == 1001
    # The trajectories are data for the script, not pre-rendered markup.
    assert page.count("<details") < 10
    assert len(page) < 3_000_000


# --------------------------------------------------------------------------- the command


def test_report_command_writes_the_file(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "report.html"
    res = CliRunner().invoke(
        cli, ["report", *map(str, two_runs), "-o", str(out), "--label", "TPO", "--label", "BoN", "--title", "Sweep"]
    )
    assert res.exit_code == 0, res.output
    assert f"Wrote {out}" in res.output
    page = out.read_text(encoding="utf-8")
    assert "<title>Sweep</title>" in page
    assert [r["label"] for r in embedded_data(page)["runs"]] == ["TPO", "BoN"]

    res = CliRunner().invoke(cli, ["report", str(two_runs[0]), "-o", str(out), "--label", "a", "--label", "b"])
    assert res.exit_code == 2 and "one label per output" in res.output


def test_write_report_needs_a_run_and_a_writable_place(two_runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one run"):
        build_report([])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        write_report(two_runs, blocker / "report.html")
