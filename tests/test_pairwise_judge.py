"""``tpo judge``: both orders, combined verdicts, resuming without judging twice, the statistics, the command.

The judge is a ``ScriptedPolicy`` that reads the two replies out of its prompt, so every
test knows what it must decide.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tpo
from conftest import hash_score, pure_reply
from tpo import ConfigError, GenerationRequest, InputError, PromptTemplateError
from tpo.analysis.evaluate import Run, load_run
from tpo.analysis.judge import (
    DEFAULT_JUDGE_PROMPTS,
    JudgePrompts,
    JudgeRun,
    JudgeSettings,
    OrderVerdict,
    Verdict,
    parse_winner,
    read_verdicts,
    summarize_verdicts,
)
from tpo.analysis.stats import sigmoid
from tpo.cli import cli
from tpo.testing import FunctionReward, ScriptedPolicy

SNAPSHOTS = Path(__file__).parent / "snapshots"
REPLIES = re.compile(r"<reply_1>\n(.*?)\n</reply_1>\n\n<reply_2>\n(.*?)\n</reply_2>", re.DOTALL)


def _replies(request: GenerationRequest) -> tuple[str, str]:
    m = REPLIES.search(request.messages[-1].content)
    assert m is not None, request.messages[-1].content
    return m.group(1), m.group(2)


def prefers_rewrites(request: GenerationRequest) -> list[str]:
    """A fair judge: the reply that is a rewrite wins; two of a kind tie."""
    first, second = _replies(request)
    a, b = "Rewrite" in first, "Rewrite" in second
    winner = "tie" if a == b else "1" if a else "2"
    return [f"Reply {winner} follows the feedback better.\nWinner: {winner}"]


def always_first(request: GenerationRequest) -> list[str]:
    """A judge with nothing but position bias."""
    return ["The first one reads well.\nWinner: 1"]


def rewrites_first(messages: Any, answer: str) -> float:
    """Any rewrite beats any sample, so a TPO run's final answers are rewrites."""
    return hash_score(messages, answer) + (100.0 if "Rewrite" in answer else 0.0)


def _write(path: Path, **options: Any) -> Path:
    prompts = [tpo.Prompt.of(f"Question {i}?", id=f"q{i}") for i in range(8)]
    with path.open("w", encoding="utf-8") as f:
        for r in tpo.optimize_many(
            prompts, policy=ScriptedPolicy(pure_reply), reward=FunctionReward(rewrites_first), **options
        ):
            f.write(r.to_json() + "\n")
    return path


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Run, Run]:
    return (
        load_run(_write(tmp_path / "tpo.jsonl", width=2, depth=1)),
        load_run(_write(tmp_path / "bon.jsonl", mode="bon", width=4)),
    )


def _judge(a: Run, b: Run, output: Path, judge: ScriptedPolicy, **settings: Any) -> Any:
    run = JudgeRun(a, b, output, judge={"spec": "scripted"}, settings=JudgeSettings(**settings))
    return run.run(judge)


# --------------------------------------------------------------------------- the prompt and the decision


def test_the_default_pairwise_prompt_snapshot() -> None:
    (message,) = DEFAULT_JUDGE_PROMPTS.messages("Be correct.", "user: What is 2 + 2?", "4", "Five.")
    text = message.content
    path = SNAPSHOTS / "judge_pairwise.txt"
    if os.environ.get("TPO_UPDATE_SNAPSHOTS"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), "regenerate with TPO_UPDATE_SNAPSHOTS=1 and review"
    assert message.role == "user"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Reasons.\nWinner: 1", "1"),
        ("winner: 2", "2"),
        ("Both fine.\nWinner: tie", "tie"),
        ("**Winner:** Reply 2", "2"),
        ("Winner: [1]", "1"),
        ("Winner: 1 ... on reflection, Winner: 2", "2"),  # the last decision counts
        ("I cannot decide.", None),
        ("Winner: 3", None),
    ],
)
def test_parse_winner(reply: str, expected: str | None) -> None:
    assert parse_winner(reply) == expected


def test_custom_templates_are_checked() -> None:
    with pytest.raises(PromptTemplateError, match="missing: second"):
        JudgePrompts(case="{{conversation}} {{first}}")
    with pytest.raises(PromptTemplateError, match="unknown: extra"):
        JudgePrompts(instructions="{{rubric}} {{extra}}")
    with pytest.raises(ConfigError, match="rubric is empty"):
        JudgeSettings(rubric="  ")


# --------------------------------------------------------------------------- both orders


def test_every_prompt_is_judged_in_both_orders_and_the_verdicts_combine(runs: tuple[Run, Run], tmp_path: Path) -> None:
    a, b = runs
    judge = ScriptedPolicy(prefers_rewrites)
    outcome = _judge(a, b, tmp_path / "v.jsonl", judge)

    requests = judge.requests_for("judge")
    assert len(requests) == 16 and outcome.judged_now == 8 and outcome.unpaired == 0
    answers = {r.prompt_id: (r.answer, rb.answer) for r, rb in zip(a.results, b.results, strict=True)}
    for pid, (ans_a, ans_b) in answers.items():
        shown = sorted(_replies(r) for r in requests if r.prompt_id == pid)
        assert shown == sorted([(ans_a, ans_b), (ans_b, ans_a)])  # once each way round
    verdicts, warnings = read_verdicts(tmp_path / "v.jsonl")
    assert warnings == [] and len(verdicts) == 8
    for v in verdicts:
        assert v.verdict == "a" and {o.first for o in v.orders} == {"a", "b"}
        assert {o.position for o in v.orders} == {"1", "2"} and not v.position_bias
        assert all("follows the feedback" in (o.reply or "") for o in v.orders)
    s = summarize_verdicts(verdicts)
    assert (s.wins, s.ties, s.losses, s.win_rate, s.position_bias_rate) == (8, 0, 0, 1.0, 0.0)
    assert s.first_position_rate == 0.5 and s.lc_win_rate == 1.0 and s.a == "TPO D1-N2" and s.b == "BoN-4"


def test_a_position_biased_judge_produces_ties(runs: tuple[Run, Run], tmp_path: Path) -> None:
    _judge(*runs, tmp_path / "v.jsonl", ScriptedPolicy(always_first))
    s = summarize_verdicts(read_verdicts(tmp_path / "v.jsonl")[0])
    assert (s.wins, s.ties, s.losses) == (0, 8, 0)
    assert s.position_bias == 8 and s.position_bias_rate == 1.0 and s.first_position_rate == 1.0
    assert s.position_bias_interval is not None and s.position_bias_interval.high == 1.0


def test_a_reply_without_a_decision_is_asked_again_once_then_recorded_as_failed(
    runs: tuple[Run, Run], tmp_path: Path
) -> None:
    def shy(request: GenerationRequest) -> list[str]:
        if request.prompt_id == "q3":
            return ["Hard to say."]
        if request.prompt_id == "q5" and request.sampling.temperature == 0.0:
            return ["Let me think."]  # decides on the retry
        return prefers_rewrites(request)

    judge = ScriptedPolicy(shy)
    outcome = _judge(*runs, tmp_path / "v.jsonl", judge)
    assert outcome.failed_now == 1
    retries = [r for r in judge.requests if r.sampling.temperature == 0.7]
    assert sorted(r.prompt_id for r in retries) == ["q3", "q3", "q5", "q5"]
    assert len({r.sampling.seed for r in judge.requests if r.prompt_id == "q3"}) == 4  # a new seed each attempt
    verdicts = {v.prompt_id: v for v in read_verdicts(tmp_path / "v.jsonl")[0]}
    assert verdicts["q3"].verdict is None and "no 'Winner: 1'" in (verdicts["q3"].error or "")
    assert verdicts["q3"].orders[0].replies == ("Hard to say.", "Hard to say.")
    assert verdicts["q5"].verdict == "a"
    assert summarize_verdicts(list(verdicts.values())).failed == 1


# --------------------------------------------------------------------------- resuming


def test_a_rerun_judges_only_what_is_missing_or_failed(runs: tuple[Run, Run], tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"

    def flaky(request: GenerationRequest) -> list[str]:
        if request.prompt_id == "q2":
            raise tpo.BackendError("judge server went away")
        return prefers_rewrites(request)

    first = _judge(*runs, out, ScriptedPolicy(flaky))
    assert first.failed_now == 1
    # A kill mid-write leaves half a line: it is cut off and that prompt judged again.
    with out.open("ab") as f:
        f.write(b'{"prompt_id": "q9", "a_lab')
    again = ScriptedPolicy(prefers_rewrites)
    second = _judge(*runs, out, again)
    assert {r.prompt_id for r in again.requests} == {"q2"} and second.judged_now == 1
    verdicts, warnings = read_verdicts(out)
    assert warnings == [] and len(verdicts) == 8 and all(v.verdict == "a" for v in verdicts)
    assert out.read_bytes().count(b"\n") == 8  # one line per prompt: the failed line was replaced
    third = ScriptedPolicy(prefers_rewrites)
    assert _judge(*runs, out, third).judged_now == 0 and third.calls == []


def test_an_interrupted_judging_resumes_without_judging_anything_twice(runs: tuple[Run, Run], tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    slow = ScriptedPolicy(prefers_rewrites, latency_s=lambda r: 0.01 * (1 + int(r.prompt_id[1:])))
    run = JudgeRun(*runs, out, judge={"spec": "scripted"}, settings=JudgeSettings(concurrency=2))

    async def interrupted() -> None:
        task = asyncio.create_task(run.arun(slow))
        deadline = time.monotonic() + 30
        while not out.exists() or out.read_bytes().count(b"\n") < 3:
            if task.done() or time.monotonic() > deadline:
                task.cancel()
                error = task.exception() if task.done() and not task.cancelled() else None
                written = out.read_text() if out.exists() else "(nothing)"
                pytest.fail(
                    f"the judging wrote fewer than 3 verdicts (ended: {task.done()}, error: {error!r}):\n{written}"
                )
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    done_before = {v.prompt_id for v in read_verdicts(out)[0]}
    assert 3 <= len(done_before) < 8
    rest = ScriptedPolicy(prefers_rewrites)
    _judge(*runs, out, rest)
    assert {r.prompt_id for r in rest.requests} == {f"q{i}" for i in range(8)} - done_before
    assert len(read_verdicts(out)[0]) == 8


def test_another_judge_set_up_is_refused_unless_restarted(runs: tuple[Run, Run], tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    _judge(*runs, out, ScriptedPolicy(prefers_rewrites))
    with pytest.raises(ConfigError, match=r"settings\.rubric_and_templates_sha256: its content changed"):
        _judge(*runs, out, ScriptedPolicy(prefers_rewrites), rubric="Shorter is better.")
    with pytest.raises(ConfigError, match=r"judge\.spec"):
        JudgeRun(*runs, out, judge={"spec": "other"}).open()
    run = JudgeRun(*runs, out, judge={"spec": "scripted"}, settings=JudgeSettings(rubric="Shorter is better."))
    assert run.open(restart=True) == [str(out)]
    run.close()


def test_prompts_must_be_the_same_conversations(runs: tuple[Run, Run], tmp_path: Path) -> None:
    a, _ = runs
    other = tpo.optimize_many(
        [tpo.Prompt.of("Something else", id="q0")],
        policy=ScriptedPolicy(pure_reply),
        reward=FunctionReward(hash_score),
        mode="bon",
        width=2,
    )
    with pytest.raises(InputError, match="prompt 'q0' has different conversations"):
        JudgeRun(a, Run("other.jsonl", "x", tuple(other)), tmp_path / "v.jsonl", judge={})


# --------------------------------------------------------------------------- the statistics


def _verdict(i: int, outcome: str, a_chars: int, b_chars: int) -> Verdict:
    orders = (
        OrderVerdict("a", "1" if outcome == "a" else "2" if outcome == "b" else "tie", outcome, "r"),  # type: ignore[arg-type]
        OrderVerdict("b", "2" if outcome == "a" else "1" if outcome == "b" else "tie", outcome, "r"),
    )  # type: ignore[arg-type]
    return Verdict(f"p{i}", "A", "B", "0" * 16, "1" * 16, a_chars, b_chars, outcome, orders, "judge")  # type: ignore[arg-type]


def test_the_length_controlled_win_rate_recovers_a_known_answer() -> None:
    # A is longer on most prompts, and the judge likes length: the raw win rate overstates A.
    # The verdicts follow logit P(A wins) = b0 + b1 * tanh(diff / sd) with b0 = 0 (an even match at equal length).
    rng = random.Random(5)
    diffs = [rng.gauss(300, 400) for _ in range(4000)]
    sd = (sum((d - sum(diffs) / len(diffs)) ** 2 for d in diffs) / len(diffs)) ** 0.5
    verdicts = []
    for i, d in enumerate(diffs):
        p = sigmoid(0.0 + 1.5 * math.tanh(d / sd))
        verdicts.append(_verdict(i, "a" if rng.random() < p else "b", 1000 + round(d), 1000))
    s = summarize_verdicts(verdicts, bootstrap_samples=200)
    assert s.win_rate is not None and s.win_rate > 0.6
    assert s.lc_win_rate == pytest.approx(0.5, abs=0.03)
    assert s.lc_win_rate_interval is not None and s.lc_win_rate_interval.low < 0.5 < s.lc_win_rate_interval.high
    assert s.length_coefficient == pytest.approx(1.5, abs=0.2)


def test_summary_rates_and_intervals() -> None:
    verdicts = [_verdict(i, o, 100, 100) for i, o in enumerate(["a"] * 6 + ["tie"] * 2 + ["b"] * 2)]
    s = summarize_verdicts(verdicts, bootstrap_samples=300, seed=1)
    assert (s.wins, s.ties, s.losses, s.judged) == (6, 2, 2, 10)
    assert s.win_rate_ties_half == pytest.approx(0.7)
    assert s.win_interval is not None and s.win_interval.low < 0.6 < s.win_interval.high
    assert (
        s.win_rate_ties_half_interval
        == summarize_verdicts(verdicts, bootstrap_samples=300, seed=1).win_rate_ties_half_interval
    )
    # Equal lengths: nothing to control for, so the length-controlled rate is the ties-as-half rate.
    assert s.lc_win_rate == pytest.approx(0.7, abs=1e-3) and s.length_coefficient == pytest.approx(0.0)
    with pytest.raises(InputError, match="no verdicts"):
        summarize_verdicts([])


# --------------------------------------------------------------------------- the command


def test_the_judge_command_judges_resumes_and_reports(
    runs: tuple[Run, Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    judges: list[ScriptedPolicy] = []

    def build(spec: str, options: dict[str, Any], server: dict[str, Any]) -> ScriptedPolicy:
        assert (
            spec == "openai:judge-model" and options == {"max_concurrency": 4} and server == {"base_url": "http://x/v1"}
        )
        judges.append(ScriptedPolicy(prefers_rewrites))
        return judges[-1]

    monkeypatch.setattr("tpo.cli.judge._policy", build)
    a, b = runs
    out = tmp_path / "verdicts.jsonl"
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Prefer the answer a careful expert would give.", encoding="utf-8")
    args = [
        "judge",
        a.path,
        b.path,
        "--judge",
        "openai:judge-model",
        "-o",
        str(out),
        "--base-url",
        "http://x/v1",
        "--judge-option",
        "max_concurrency=4",
        "--rubric-file",
        str(rubric),
        "--label",
        "TPO",
        "--label",
        "BoN",
        "--bootstrap",
        "100",
    ]
    result = CliRunner().invoke(cli, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["a"], data["b"], data["wins"], data["judged"], data["unpaired"]) == ("TPO", "BoN", 8, 8, 0)
    assert "careful expert" in judges[0].requests[0].messages[0].content
    # The rerun judges nothing and loads no model.
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert len(judges) == 1
    assert "A wins" in again.stdout and "length-controlled" in again.stdout
    # Another rubric is another set-up.
    without_file = [x for i, x in enumerate(args) if "--rubric-file" not in (x, args[i - 1])]
    other = CliRunner().invoke(cli, [*without_file, "--rubric", "Shorter is better."])
    assert other.exit_code == 2 and "different judge set-up" in other.output


def test_the_judge_command_refuses_bad_options(runs: tuple[Run, Run], tmp_path: Path) -> None:
    a, b = runs
    base = ["judge", a.path, b.path, "--judge", "x", "-o", str(tmp_path / "v.jsonl")]
    r = CliRunner().invoke(cli, [*base, "--label", "only one"])
    assert r.exit_code == 2 and "two --label values" in r.output
    r = CliRunner().invoke(cli, [*base, "--rubric", "x", "--rubric-file", a.path])
    assert r.exit_code == 2 and "either --rubric or --rubric-file" in r.output
    r = CliRunner().invoke(cli, [*base, "--rubric", "  "])
    assert r.exit_code == 2 and "rubric is empty" in r.output


def test_the_judge_command_defaults_to_the_judge_settings_defaults() -> None:
    """The command's defaults are written out (the command loads tpo.analysis.judge only when it runs): pinned here."""
    from dataclasses import fields

    from tpo.cli.judge import judge_command

    settings = {f.name: f.default for f in fields(JudgeSettings)}
    options = {p.name: p.default for p in judge_command.params}
    for name in ("temperature", "max_tokens", "seed", "concurrency", "context_window"):
        assert options[name] == settings[name], name


def test_options_that_cannot_change_a_verdict_may_change_on_resuming(runs: tuple[Run, Run], tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"

    def judge(options: dict[str, Any]) -> JudgeRun:
        return JudgeRun(*runs, out, judge={"spec": "openai:judge", "options": options})

    judge({"max_concurrency": 4}).run(ScriptedPolicy(prefers_rewrites))
    # The openai backend declares max_concurrency not to affect results: a resume may change it ...
    again = judge({"max_concurrency": 64})
    again.open()
    again.close()
    assert again.remaining == 0 and "max_concurrency" not in again.fingerprint["judge"]["options"]
    # ... but not what the server is asked.
    with pytest.raises(ConfigError, match=r"judge\.options\.extra_body"):
        judge({"max_concurrency": 4, "extra_body": {"top_k": 5}}).open()
