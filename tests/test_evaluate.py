"""``tpo eval`` and ``tpo.analysis.evaluate``: step curves, best so far, costs, failures, paired comparisons, math accuracy.

The runs are real: ``tpo.optimize_many`` with a scripted policy whose answers carry their
own reward (``score=N``), so every expected number below can be worked out by hand.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tpo
from tpo import BackendError, GenerationRequest, InputError
from tpo.analysis.evaluate import (
    Run,
    compare_runs,
    evaluate,
    load_run,
    math_accuracy,
    read_results,
    run_label,
    summarize_run,
    wilson_interval,
)
from tpo.cli import cli
from tpo.testing import FunctionReward, ScriptedPolicy

TAG = tpo.DEFAULT_PROMPTS.tag

# The answers each prompt gets, by step: step 0 are the samples, later steps the rewrites.
# Prompt "a" rewrites its best answer into an exact copy of a step-0 answer at step 2 (a repeat).
SCRIPT: dict[str, list[list[str]]] = {
    "a": [
        ["a0 score=1", "a1 score=2", "a2 score=3"],
        ["a3 score=4", "a4 score=5", "a5 score=6"],
        ["a2 score=3", "a6 score=8", "a7 score=9"],
    ],
    "b": [
        ["b0 score=0", "b1 score=0.0", "b2 score=3"],
        ["b3 score=2", "b4 score=2.0", "b5 score=2.00"],
        ["b6 score=1", "b7 score=1.0", "b8 score=1.00"],
    ],
    "c": [["c0 score=5", "c1 score=6", "c2 score=7"]],  # its backend fails at step 1
}


def scripted_reply(request: GenerationRequest) -> list[str]:
    if request.purpose == "loss":
        return [f"critique of {request.prompt_id} at step {request.step}"]
    if request.purpose == "gradient":
        return [f"feedback for {request.prompt_id} at step {request.step}"]
    if request.prompt_id == "c" and request.step >= 1:
        raise BackendError("server returned 503")
    texts = SCRIPT[request.prompt_id][request.step][: request.n]
    if request.purpose == "update":
        return [f"<{TAG}>{t}</{TAG}>" for t in texts]
    return texts


def score_in_text(messages: Any, answer: str) -> float:
    m = re.search(r"score=(-?[\d.]+)", answer)
    if m is None:
        raise ValueError(f"no score in {answer!r}")
    return float(m.group(1))


def write_run(
    path: Path, prompts: Sequence[Any], reply: Any = scripted_reply, reward: Any = score_in_text, **options: Any
) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for result in tpo.optimize_many(
            list(prompts), policy=ScriptedPolicy(reply), reward=FunctionReward(reward), **options
        ):
            f.write(result.to_json() + "\n")
    return path


@pytest.fixture
def tpo_run(tmp_path: Path) -> Run:
    prompts = [tpo.Prompt.of(f"Question {pid}", id=pid) for pid in ("a", "b", "c")]
    return load_run(write_run(tmp_path / "tpo.jsonl", prompts, width=3, depth=2))


# --------------------------------------------------------------------------- curves


def test_step_mean_and_std_are_per_prompt_then_averaged(tpo_run: Run) -> None:
    s = summarize_run(tpo_run)

    assert [st.step for st in s.steps] == [0, 1, 2]
    # "c" failed at step 1, so only "a" and "b" count, at every step.
    assert [st.prompts for st in s.steps] == [2, 2, 2]
    assert [st.answers for st in s.steps] == [6, 6, 6]  # a's repeat at step 2 counts again
    sd = math.sqrt
    expected = [
        # a: [1, 2, 3], b: [0, 0, 3]
        ((2 + 1) / 2, (sd(2 / 3) + sd(2)) / 2, 3.0),
        # a: [4, 5, 6], b: [2, 2, 2]
        ((5 + 2) / 2, (sd(2 / 3) + 0) / 2, (6 + 3) / 2),
        # a: [3 (the repeat of a2), 8, 9], b: [1, 1, 1]
        ((20 / 3 + 1) / 2, (sd(62 / 9) + 0) / 2, (9 + 3) / 2),
    ]
    for st, (mean, std, best) in zip(s.steps, expected, strict=True):
        assert st.mean == pytest.approx(mean)
        assert st.std == pytest.approx(std)
        assert st.best_so_far == pytest.approx(best)
    # Between prompts: the sample std of the two per-prompt means.
    assert s.steps[0].between_prompt_std == pytest.approx(sd(((2 - 1.5) ** 2 + (1 - 1.5) ** 2) / 1))

    assert (s.prompts, s.complete) == (3, 2)
    assert s.final_score.mean == pytest.approx((9 + 3) / 2)
    assert s.initial_best.mean == pytest.approx(3.0)
    assert s.gain.mean == pytest.approx((6 + 0) / 2)
    assert s.label == "TPO D2-N3" and (s.mode, s.width, s.depth) == ("tpo", 3, 2)


def test_best_so_far_carries_an_early_stop_forward(tmp_path: Path) -> None:
    script = {"a": SCRIPT["a"], "d": [["d0 score=10", "d1 score=0", "d2 score=1"]]}

    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose in ("loss", "gradient"):
            return ["text"]
        texts = script[request.prompt_id][request.step]
        return [f"<{TAG}>{t}</{TAG}>" for t in texts] if request.purpose == "update" else texts

    prompts = [tpo.Prompt.of("Q", id=pid) for pid in ("a", "d")]
    run = load_run(write_run(tmp_path / "es.jsonl", prompts, reply, width=3, depth=2, early_stop_score=10))
    steps = summarize_run(run).steps

    assert [st.prompts for st in steps] == [2, 1, 1]  # "d" stopped after its samples
    assert steps[1].mean == pytest.approx(5.0)  # "a" alone
    # "d" keeps its 10 at steps 1 and 2.
    assert [st.best_so_far_prompts for st in steps] == [2, 2, 2]
    assert [st.best_so_far for st in steps] == pytest.approx([(3 + 10) / 2, (6 + 10) / 2, (9 + 10) / 2])


def test_costs_and_failures_count_every_prompt(tpo_run: Run) -> None:
    s = summarize_run(tpo_run)
    by_id = {r.prompt_id: r for r in tpo_run.results}

    calls = sorted(r.usage.policy_calls for r in tpo_run.results)
    assert calls == [3, 7, 7]  # c: samples, critique, feedback, then its rewrite failed; a, b: 1 + 2 * 3
    assert s.costs.policy_calls.mean == pytest.approx(17 / 3)
    assert s.costs.policy_calls.median == 7
    assert s.costs.policy_calls.total == 17
    tokens = sorted(r.usage.prompt_tokens + r.usage.completion_tokens for r in tpo_run.results)
    assert s.costs.tokens.p90 == pytest.approx(tokens[1] + 0.8 * (tokens[2] - tokens[1]))  # linear interpolation
    assert s.costs.answers_scored.total == sum(r.usage.reward_calls for r in tpo_run.results)

    assert s.failures.failed_prompts == 1
    assert s.failures.errors == {by_id["c"].error: 1}
    assert "503" in str(by_id["c"].error)


def test_failures_count_unscored_answers_and_fallbacks(tmp_path: Path) -> None:
    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose in ("loss", "gradient"):
            return ["text"]
        if request.purpose == "update":
            # One rewrite without closing tag, one that the reward cannot score.
            return [f"<{TAG}>e3 score=5", f"<{TAG}>e4 no score</{TAG}>"]
        return ["e0 score=1", "e1 score=2"]

    run = load_run(write_run(tmp_path / "f.jsonl", [tpo.Prompt.of("Q", id="e")], reply, width=2, depth=1))
    f = summarize_run(run).failures

    assert f.failed_prompts == 0
    assert f.score_failures == 1
    assert f.extraction_fallbacks == 1
    assert f.step_failures >= 1


def test_label_names_the_method_as_the_paper_does(tmp_path: Path) -> None:
    prompts = [tpo.Prompt.of("Q", id="a")]
    bon = load_run(write_run(tmp_path / "bon.jsonl", prompts, mode="bon", width=3))
    rev = load_run(write_run(tmp_path / "rev.jsonl", prompts, mode="revision", width=3, depth=1))

    assert (bon.label, rev.label) == ("BoN-3", "Revision D1-N3")
    assert run_label(list(bon.results)) == "BoN-3"
    assert load_run(tmp_path / "bon.jsonl", label="mine").label == "mine"
    steps = summarize_run(bon).steps
    assert len(steps) == 1 and steps[0].mean == pytest.approx(2.0)


# --------------------------------------------------------------------------- reading


def test_read_results_names_the_file_and_line_of_a_bad_line(tpo_run: Run, tmp_path: Path) -> None:
    lines = Path(tpo_run.path).read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"

    bad.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON"):
        read_results(bad)

    bad.write_text(lines[0] + "\n" + json.dumps({"hello": 1}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not a tpo result"):
        read_results(bad)

    other = json.loads(lines[0]) | {"schema_version": 99}
    bad.write_text(json.dumps(other) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:1: .*schema_version 99"):
        read_results(bad)

    bad.write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_results(bad)

    bad.write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no results"):
        read_results(bad)

    with pytest.raises(InputError, match="cannot be read"):
        read_results(tmp_path / "missing.jsonl")


def test_read_results_skips_a_torn_last_line_and_keeps_the_later_duplicate(tpo_run: Run, tmp_path: Path) -> None:
    lines = Path(tpo_run.path).read_text(encoding="utf-8").splitlines()
    path = tmp_path / "torn.jsonl"
    # A run killed mid-write leaves half a line with no newline at the end.
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2], encoding="utf-8")
    results, warnings = read_results(path)
    assert [r.prompt_id for r in results] == [json.loads(x)["prompt_id"] for x in lines[:2]]
    assert len(warnings) == 1 and "torn.jsonl:4: the last line is incomplete" in warnings[0]

    changed = json.loads(lines[0]) | {"score": 123.0}
    path.write_text(lines[0] + "\n" + json.dumps(changed) + "\n", encoding="utf-8")
    results, warnings = read_results(path)
    assert len(results) == 1 and results[0].score == 123.0
    assert "appears again" in warnings[0]


# --------------------------------------------------------------------------- paired comparison


def bon_run(tmp_path: Path, name: str, scores: dict[str, float]) -> Run:
    """A best-of-1 run whose final reward per prompt is exactly ``scores[id]``."""
    prompts = [tpo.Prompt.of("Q", id=pid) for pid in scores]

    def reply(request: GenerationRequest) -> list[str]:
        return [f"{name} {request.prompt_id} score={scores[request.prompt_id]}"]

    return load_run(write_run(tmp_path / f"{name}.jsonl", prompts, reply, mode="bon", width=1), label=name)


def test_paired_comparison_counts_wins_ties_and_losses_by_prompt_id(tmp_path: Path) -> None:
    a = bon_run(tmp_path, "A", {"p1": 1, "p2": 2, "p3": 3, "p4": 4, "p5": 5, "only-a": 1})
    b = bon_run(tmp_path, "B", {"p1": 1, "p2": 3, "p3": 2, "p4": 4.05, "p5": 5, "only-b": 1})

    exact = compare_runs(a, b)
    assert (exact.paired, exact.only_a, exact.only_b, exact.unfinished) == (5, 1, 1, 0)
    assert (exact.wins, exact.ties, exact.losses) == (1, 2, 2)
    assert exact.win_rate == pytest.approx(0.2)
    assert exact.win_rate_ties_half == pytest.approx((1 + 2 / 2) / 5)
    assert exact.mean_difference == pytest.approx((0 - 1 + 1 - 0.05 + 0) / 5)

    loose = compare_runs(a, b, tie_eps=0.1)  # |4 - 4.05| is now a tie
    assert (loose.wins, loose.ties, loose.losses) == (1, 3, 1)

    swapped = compare_runs(b, a)
    assert (swapped.wins, swapped.ties, swapped.losses) == (2, 2, 1)
    assert exact.mean_difference is not None
    assert swapped.mean_difference == pytest.approx(-exact.mean_difference)


def test_comparison_intervals_are_wilson_and_a_seeded_bootstrap(tmp_path: Path) -> None:
    a = bon_run(tmp_path, "A", {f"p{i}": float(i % 3) for i in range(30)})
    b = bon_run(tmp_path, "B", {f"p{i}": 1.0 for i in range(30)})
    c = compare_runs(a, b, bootstrap_samples=500, seed=7)

    assert (c.wins, c.ties, c.losses) == (10, 10, 10)
    assert c.win_interval == wilson_interval(10, 30)
    assert c.win_interval is not None and c.win_interval.low < 1 / 3 < c.win_interval.high
    assert c.mean_difference_interval is not None and c.win_rate_ties_half_interval is not None
    assert c.mean_difference_interval.low < 0 < c.mean_difference_interval.high
    assert c.win_rate_ties_half_interval.low < 0.5 < c.win_rate_ties_half_interval.high
    # The same seed gives the same interval; another seed a different one.
    assert compare_runs(a, b, bootstrap_samples=500, seed=7).mean_difference_interval == c.mean_difference_interval
    assert compare_runs(a, b, bootstrap_samples=500, seed=8).mean_difference_interval != c.mean_difference_interval


def test_wilson_interval_matches_known_values() -> None:
    none = wilson_interval(0, 10)
    every = wilson_interval(10, 10)
    assert none is not None and every is not None
    assert none.low == 0.0 and none.high == pytest.approx(0.2775, abs=1e-4)
    assert every.low == pytest.approx(0.7225, abs=1e-4) and every.high == 1.0
    half = wilson_interval(50, 100)
    assert half is not None
    assert [half.low, half.high] == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_failed_prompts_are_not_paired(tpo_run: Run, tmp_path: Path) -> None:
    other = bon_run(tmp_path, "B", {"a": 1, "b": 5, "c": 0})
    c = compare_runs(tpo_run, other)
    # "c" failed in the TPO run (though its samples were scored): not a pair.
    assert (c.paired, c.unfinished, c.wins, c.losses) == (2, 1, 1, 1)


def test_evaluate_compares_the_first_run_with_each_other_or_every_pair(tmp_path: Path) -> None:
    runs = [bon_run(tmp_path, n, {"p1": v, "p2": v}) for n, v in (("A", 1), ("B", 2), ("C", 3))]
    first = evaluate(runs)
    assert [(c.a, c.b) for c in first.comparisons] == [("A", "B"), ("A", "C")]
    every = evaluate(runs, all_pairs=True)
    assert [(c.a, c.b) for c in every.comparisons] == [("A", "B"), ("A", "C"), ("B", "C")]
    # Runs without a prompt in common are not compared.
    disjoint = bon_run(tmp_path, "D", {"zz": 1})
    assert evaluate([runs[0], disjoint]).comparisons == ()


def test_same_labels_are_told_apart_by_file(tmp_path: Path) -> None:
    prompts = [tpo.Prompt.of("Q", id="a")]
    one = load_run(write_run(tmp_path / "one.jsonl", prompts, mode="bon", width=2))
    two = load_run(write_run(tmp_path / "two.jsonl", prompts, mode="bon", width=2))
    labels = [r.label for r in evaluate([one, two]).runs]
    assert labels == ["BoN-2 (one)", "BoN-2 (two)"]


# --------------------------------------------------------------------------- math


def test_math_accuracy_checks_final_answers_with_math_verify(tmp_path: Path) -> None:
    answers = {
        "m1": "score=1: after the steps, the answer is $\\boxed{42}$.",
        "m2": "score=1: so we get 0.5 in the end.",
        "m3": "score=1: it is $8$.",
        "m4": "score=1: no reference for this one.",
        "m5": "This answer will not be scored.",
    }
    refs = {"m1": "42", "m2": "\\frac{1}{2}", "m3": "7", "m5": "3"}
    prompts = [tpo.Prompt.of("Q", id=pid, metadata={"answer": refs[pid]} if pid in refs else {}) for pid in answers]
    run = load_run(write_run(tmp_path / "m.jsonl", prompts, lambda r: [answers[r.prompt_id]], mode="bon", width=1))
    m = math_accuracy(run.results, reference_field="answer")

    assert (m.checked, m.correct, m.no_answer, m.missing_reference) == (4, 2, 1, 1)  # m5 failed: wrong
    assert m.accuracy == pytest.approx(0.5)
    assert m.interval == wilson_interval(2, 4)
    assert summarize_run(run, reference_field="answer").math == m
    assert summarize_run(run).math is None

    other_field = math_accuracy(run.results, reference_field="solution")
    assert (other_field.checked, other_field.accuracy, other_field.missing_reference) == (0, None, 5)

    # From code already inside an event loop (a notebook), it still works.
    async def inside_a_loop() -> Any:
        return math_accuracy(run.results, reference_field="answer")

    assert asyncio.run(inside_a_loop()) == m


def test_math_accuracy_counts_a_failed_check_of_an_answer_as_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tpo.rewards.verifier import MathReward
    from tpo.types import Score

    answers = {
        "m1": "score=1: the answer is $\\boxed{42}$.",
        "m2": "score=1: the answer is $\\boxed{7}$.",
        "m3": "score=1: an answer whose check runs out of time.",
        "m4": "score=1: an answer whose check raises.",
        "m5": "score=1: the reference of this one is words, not math.",
    }
    refs = {"m1": "42", "m2": "7", "m3": "3", "m4": "4", "m5": "a banana"}
    prompts = [tpo.Prompt.of("Q", id=pid, metadata={"answer": refs[pid]}) for pid in answers]
    run = load_run(write_run(tmp_path / "m.jsonl", prompts, lambda r: [answers[r.prompt_id]], mode="bon", width=1))
    real_check = MathReward._check

    def slow_or_broken(self: MathReward, request: Any, alarms: bool) -> Score:
        if "out of time" in request.answer:
            return Score.failed(f"checking the answer to prompt {request.prompt_id!r} took longer than 5 s")
        if "raises" in request.answer:
            raise RecursionError("maximum recursion depth exceeded while comparing")
        return real_check(self, request, alarms)  # type: ignore[no-any-return]

    monkeypatch.setattr(MathReward, "_check", slow_or_broken)
    m = math_accuracy(run.results, reference_field="answer")
    # m3 and m4 have usable references: their answers could not be confirmed, so they are wrong, not dropped.
    assert (m.checked, m.correct, m.check_failures, m.no_answer, m.missing_reference) == (4, 2, 2, 0, 1)
    assert m.accuracy == pytest.approx(0.5) and m.interval == wilson_interval(2, 4)


# --------------------------------------------------------------------------- the command


def test_eval_command_prints_tables_and_writes_json(tpo_run: Run, tmp_path: Path) -> None:
    other = bon_run(tmp_path, "B", {"a": 1, "b": 5, "c": 0})
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        cli,
        ["eval", tpo_run.path, other.path, "--label", "TPO", "--label", "BoN", "--json", str(out), "--tie-eps", "0.5"],
    )

    assert res.exit_code == 0, res.output
    for text in ("Runs", "TPO: reward per step", "TPO: cost per prompt", "Paired comparison", "1 failed prompt"):
        assert text in res.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["schema_version"] == 1
    assert [r["label"] for r in data["runs"]] == ["TPO", "BoN"]
    assert data["runs"][0]["steps"][2]["best_so_far"] == pytest.approx(6.0)
    assert data["runs"][0]["failures"]["failed_prompts"] == 1
    comparison = data["comparisons"][0]
    assert (comparison["a"], comparison["b"], comparison["wins"], comparison["losses"]) == ("TPO", "BoN", 1, 1)
    assert comparison["tie_eps"] == 0.5
    assert set(comparison["win_interval"]) == {"low", "high"}


def test_eval_command_json_to_stdout_and_its_errors(tpo_run: Run, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["eval", tpo_run.path, "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["runs"][0]["label"] == "TPO D2-N3"

    res = CliRunner().invoke(cli, ["eval", tpo_run.path, "--label", "x", "--label", "y"])
    assert res.exit_code == 2 and "one --label per output" in res.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n", encoding="utf-8")
    res = CliRunner().invoke(cli, ["eval", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:1: not a tpo result" in res.output


#: A label too long for an 80-column table.
LONG_LABEL = "TPO D2-N5 on Llama-3.1-70B-Instruct judged by Skywork-Reward-V2-Llama-3.1-8B, seed 0, temperature 0.7"


def test_eval_tables_are_not_cut_at_80_columns_when_piped(tpo_run: Run, tmp_path: Path) -> None:
    other = bon_run(tmp_path, "B", {"a": 1, "b": 5, "c": 0})
    # CliRunner's standard output is not a terminal, as in `tpo eval ... > summary.txt` or `| less -S`.
    res = CliRunner().invoke(cli, ["eval", tpo_run.path, other.path, "--label", LONG_LABEL, "--label", "BoN"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(LONG_LABEL in line for line in lines)  # whole, on one line
    assert any(f"{LONG_LABEL} vs BoN" in line for line in lines)
    assert "…" not in res.output and max(map(len, lines)) > 80
    # Each table still takes only the width it needs: the cost table stays narrow.
    cost_title = next(i for i, line in enumerate(lines) if line.startswith("BoN: cost per prompt"))
    assert len(lines[cost_title + 1].rstrip()) < 80


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="opens a pseudo-terminal")
def test_eval_tables_fit_the_terminal_on_a_terminal(tpo_run: Run) -> None:
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "80", "LINES": "50", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tpo.cli import main; main()", "eval", tpo_run.path, "--label", LONG_LABEL],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    chunks = []
    try:
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    except OSError:  # the terminal closes with the process
        pass
    finally:
        os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8"))
    lines = text.replace("\r\n", "\n").splitlines()
    assert max(map(len, lines)) <= 80 and "Runs" in text
    assert not any(LONG_LABEL in line for line in lines)  # wrapped to fit, as rich lays tables out on a terminal


def test_labels_and_errors_that_look_like_markup_are_shown_as_written(tpo_run: Run) -> None:
    res = CliRunner().invoke(cli, ["eval", tpo_run.path, "--label", "[/INST] run"])
    assert res.exit_code == 0, res.output
    assert "[/INST] run" in res.output
