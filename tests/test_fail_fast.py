"""Failing fast: pre-flight checks before the first prompt, and a run that stops when its first prompts all fail alike.

An unreachable server used to cost about a minute of retries per prompt before every prompt
failed; a reward function with the wrong parameters failed only after every prompt had
sampled. Servers here are fakes on loopback; a closed loopback port stands in for a server
that is down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from conftest import hash_score, pure_reply
from servers.fake_openai import FakeOpenAIServer, Reply, free_port
from tpo import BackendError, ConfigError, GenerationRequest, RewardError, RunError, TPOConfig
from tpo.api import apreflight
from tpo.backends.openai_server import OpenAIPolicy
from tpo.batch.datasets import read_prompts
from tpo.batch.fail_fast import FailFast
from tpo.batch.runner import BatchSummary, run_batch
from tpo.cli import cli
from tpo.rewards.combine import WeightedReward
from tpo.rewards.function import PythonReward
from tpo.rewards.http_server import HTTPReward
from tpo.rewards.judge import JudgeReward
from tpo.testing import FunctionReward, ScriptedPolicy

CONFIG = TPOConfig(width=2, depth=1, seed=3, max_concurrent_prompts=3)
#: A run that fails over to its pre-flight check must fail well within this (the retries it avoids take minutes).
QUICK_S = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i:02d}", "prompt": f"Question {i}?"} for i in range(n)]


def batch(n: int, out: Path, policy: Any, reward: Any = None, **kwargs: Any) -> BatchSummary:
    dataset = read_prompts(rows(n), id_field="id")
    return run_batch(
        dataset,
        out,
        policy=policy,
        reward=reward or FunctionReward(hash_score, name="hash"),
        config=kwargs.pop("config", CONFIG),
        **kwargs,
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# ---------------------------------------------------------------------- pre-flight: servers


def test_an_unreachable_server_fails_the_run_in_seconds_before_any_prompt(
    tmp_path: Path, allow_real_requests: None
) -> None:
    # The defaults retry each request 6 times with backoff: about a minute per prompt without the check.
    policy = OpenAIPolicy("m", base_url=closed_url())
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    unreachable = r"model 'm' at http://127\.0\.0\.1:\d+/v1 cannot be reached .*server running"
    with pytest.raises(BackendError, match=unreachable):
        batch(20, out, policy)
    assert time.monotonic() - started < QUICK_S
    assert lines(out) == [] and policy.stats.http_requests == 0


def test_the_commands_fail_in_seconds_on_an_unreachable_server(tmp_path: Path, allow_real_requests: None) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(10)))
    model = ["--policy", "openai:m", "--base-url", closed_url()]
    started = time.monotonic()
    batched = invoke("batch", data, "-o", tmp_path / "out.jsonl", "--id-field", "id", *model)
    single = invoke("run", "Hi", *model)
    assert time.monotonic() - started < 2 * QUICK_S
    for result in (batched, single):
        assert result.exit_code == 1, result.output
        assert "cannot be reached" in result.stderr
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_a_refused_key_is_a_configuration_error(
    server: FakeOpenAIServer, tmp_path: Path, allow_real_requests: None
) -> None:
    server.reset(routes={"/v1/models": Reply(401, {"error": {"message": "Incorrect API key provided"}})})
    policy = OpenAIPolicy("m", base_url=server.base_url, api_key="sk-wrong-key-1234")
    refused = r"refused the API key: HTTP 401: Incorrect API key provided \(check the API key"
    with pytest.raises(ConfigError, match=refused) as e:
        batch(3, tmp_path / "out.jsonl", policy)
    assert "sk-wrong-key-1234" not in str(e.value)
    assert server.chat_calls() == []


@pytest.mark.parametrize("models", [Reply(404, {"detail": "Not Found"}), Reply(500, "oops"), Reply(200, "<html>")])
def test_a_server_that_answers_passes_whatever_it_says_about_its_models(
    server: FakeOpenAIServer, tmp_path: Path, models: Reply, allow_real_requests: None
) -> None:
    server.reset(routes={"/v1/models": models})
    summary = batch(2, tmp_path / "out.jsonl", OpenAIPolicy("m", base_url=server.base_url, max_retries=0))
    assert summary.ok and server.chat_calls()


def test_a_silent_server_fails_the_check_after_probe_timeout_s(
    server: FakeOpenAIServer, allow_real_requests: None
) -> None:
    server.reset(routes={"/v1/models": Reply(body={"data": []}, delay_s=5)})
    policy = OpenAIPolicy("m", base_url=server.base_url, probe_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"does not answer: GET /models took longer than 0\.3 s \(probe_timeout_s\)"):
        asyncio.run(_checked(policy))
    assert time.monotonic() - started < 3


async def _checked(*objects: Any) -> None:
    try:
        await apreflight(*objects)
    finally:
        for obj in objects:
            close = getattr(obj, "aclose", None)
            if close is not None:
                await close()


def test_the_http_reward_checks_its_server(server: FakeOpenAIServer, allow_real_requests: None) -> None:
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"cannot be reached .*ConnectError"):
        asyncio.run(_checked(HTTPReward(f"http://127.0.0.1:{free_port()}/pooling", max_retries=5)))
    assert time.monotonic() - started < QUICK_S
    server.reset(
        routes={
            "/pooling": Reply(422, {"detail": "field required: model"}),
            "/classify": Reply(200, {"data": [{"index": 0}]}),
            "/busy": Reply(503, "loading"),
            "/picky": Reply(400, {"error": "metadata.answer is required"}),
            "/ok": Reply(200, {"data": [{"index": 0, "data": [1.5]}]}),
        }
    )
    base = server.root_url
    with pytest.raises(RewardError, match=r"refused a trivial request: HTTP 422: .*field required"):
        asyncio.run(_checked(HTTPReward(f"{base}/pooling")))
    with pytest.raises(RewardError, match=r"HTTP 404"):
        asyncio.run(_checked(HTTPReward(f"{base}/missing")))
    with pytest.raises(RewardError, match=r"in a form tpo cannot read: .*without data\[0\]\.probs"):
        asyncio.run(_checked(HTTPReward(f"{base}/classify")))
    with pytest.raises(RewardError, match=r"index 3 is out of range"):
        asyncio.run(_checked(HTTPReward(f"{base}/ok", api="vllm-pooling", index=3)))
    # Busy servers are retried by the run; a simple endpoint may want what real prompts carry.
    for ok in (f"{base}/busy", f"{base}/picky", f"{base}/ok"):
        asyncio.run(_checked(HTTPReward(ok, api="vllm-pooling" if ok.endswith("/ok") else "auto")))


# ---------------------------------------------------------------------- pre-flight: python rewards


def no_answer(messages: Any) -> float:
    return 1.0


@pytest.mark.parametrize(
    "fn, batched, expected",
    [
        (no_answer, None, r"cannot be called as tpo calls it, fn\(messages, answer\).*its signature is \(messages"),
        (lambda answer, *, metadata: 1.0, None, r"fn\(messages, answer\)"),
        (lambda messages, answer, extra: 1.0, None, r"missing a required argument: 'extra'"),
        (lambda messages_list: [1.0], True, r"fn\(list_of_messages, list_of_answers\)"),
    ],
)
def test_a_python_reward_with_the_wrong_parameters_fails_before_any_prompt(
    tmp_path: Path, fn: Any, batched: bool | None, expected: str
) -> None:
    policy = ScriptedPolicy(pure_reply)
    with pytest.raises(ConfigError, match=expected):
        batch(5, tmp_path / "out.jsonl", policy, PythonReward(fn, batched=batched))
    assert policy.requests == [] and lines(tmp_path / "out.jsonl") == []


@pytest.mark.parametrize(
    "fn, batched",
    [
        (lambda messages, answer: 1.0, None),
        (lambda messages, answer, metadata: 1.0, None),
        (lambda *args, **kwargs: 1.0, None),
        (lambda messages, answer, scale=2.0: 1.0, None),
        (lambda messages_list, answers, metadata=None: [1.0] * len(answers), True),
        (max, None),  # a builtin that says nothing of its parameters: its first call will tell
    ],
)
def test_python_rewards_that_can_be_called_pass(fn: Any, batched: bool | None) -> None:
    asyncio.run(apreflight(PythonReward(fn, batched=batched)))


def test_checks_reach_inside_wrappers_and_a_judges_own_backend(
    server: FakeOpenAIServer, allow_real_requests: None
) -> None:
    wrapped = WeightedReward([FunctionReward(hash_score), PythonReward(no_answer)])
    with pytest.raises(ConfigError, match="cannot be called as tpo calls it"):
        asyncio.run(apreflight(ScriptedPolicy(pure_reply), wrapped))
    judge = JudgeReward(OpenAIPolicy("judge-model", base_url=closed_url()), owns_policy=True)
    with pytest.raises(BackendError, match=r"model 'judge-model' .* cannot be reached"):
        asyncio.run(_checked(judge))


def test_the_cli_refuses_a_python_reward_with_the_wrong_parameters_before_sampling(
    server: FakeOpenAIServer, tmp_path: Path, allow_real_requests: None
) -> None:
    server.reset(routes={"/v1/models": Reply(body={"data": [{"id": "m"}]})})
    rm = tmp_path / "rm.py"
    rm.write_text("def score(answer):\n    return 1.0\n")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(4)))
    result = invoke(
        "batch",
        data,
        "-o",
        tmp_path / "out.jsonl",
        "--id-field",
        "id",
        "--policy",
        "openai:m",
        "--base-url",
        server.base_url,
        "--reward",
        f"python:{rm}:score",
    )
    assert result.exit_code == 2, result.output
    assert f"python:{rm}:score cannot be called as tpo calls it" in " ".join(result.stderr.split())
    assert server.chat_calls() == []


# ---------------------------------------------------------------------- stopping after K identical failures


def always_failing(message: str = "the server is on fire") -> ScriptedPolicy:
    def reply(request: GenerationRequest) -> list[str]:
        raise BackendError(message)

    return ScriptedPolicy(reply)


def test_a_run_whose_first_k_prompts_fail_alike_stops_and_resumes_later(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(RunError, match=r"stopped early: the first 8 prompts all failed with the same error") as e:
        batch(40, out, always_failing())
    message = str(e.value)
    assert "the server is on fire" in message and str(out) in message and "run again to continue" in message
    written = lines(out)
    assert 8 <= len(written) < 40 and all(r["status"] == "failed" for r in written)
    # Rerunning resumes: the failed prompts are retried and the others run.
    summary = batch(40, out, ScriptedPolicy(pure_reply))
    assert summary.ok and summary.complete == 40 and summary.finished_before == 0
    assert len(lines(out)) == 40


def test_a_reward_that_always_fails_stops_the_run(tmp_path: Path) -> None:
    def broken(messages: Any, answer: str) -> float:
        raise ValueError("the reward model is not loaded")

    policy = ScriptedPolicy(pure_reply)
    with pytest.raises(RunError, match=r"no answer could be scored: .*the reward model is not loaded"):
        batch(40, tmp_path / "out.jsonl", policy, PythonReward(broken), fail_fast_after=4)
    assert len(lines(tmp_path / "out.jsonl")) < 40
    assert len({r.prompt_id for r in policy.requests}) < 40  # the rest never sampled


@pytest.mark.parametrize("case", ["different errors", "one success", "disabled", "no more prompts than K"])
def test_the_run_goes_on_unless_the_first_k_all_fail_alike(tmp_path: Path, case: str) -> None:
    n, options = 20, {"fail_fast_after": 4}

    def reply(request: GenerationRequest) -> list[str]:
        if case == "different errors":
            raise BackendError(f"prompt {request.prompt_id} is too long")
        if case == "one success" and request.prompt_id == "q01":
            return pure_reply(request)
        raise BackendError("the server is on fire")

    if case == "disabled":
        options = {"fail_fast_after": 0}
    if case == "no more prompts than K":
        n = 4
    summary = batch(
        n,
        tmp_path / "out.jsonl",
        ScriptedPolicy(reply),
        config=CONFIG.with_options(max_concurrent_prompts=1),
        **options,
    )
    assert summary.done == n
    assert summary.failed == (n - 1 if case == "one success" else n)


def test_fail_fast_after_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"fail_fast_after must be a whole number >= 0"):
        FailFast(-1, 10)


def test_the_cli_stops_after_k_identical_failures(
    tmp_path: Path, server: FakeOpenAIServer, allow_real_requests: None
) -> None:
    server.reset(lambda call: Reply(400, {"error": {"message": "this model is not served here"}}))
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(30)))
    rm = tmp_path / "rm.py"
    rm.write_text("def score(messages, answer):\n    return 1.0\n")
    out = tmp_path / "out.jsonl"
    args = [
        data,
        "-o",
        out,
        "--id-field",
        "id",
        "-n",
        1,
        "-d",
        0,
        "--policy",
        "openai:m",
        "--base-url",
        server.base_url,
        "--reward",
        f"python:{rm}:score",
        "--concurrency",
        2,
    ]
    stopped = invoke("batch", *args, "--fail-fast", 3)
    assert stopped.exit_code == 1, stopped.output
    assert "stopped early: the first 3 prompts all failed with the same error" in stopped.stderr
    assert "this model is not served here" in stopped.stderr
    assert 3 <= len(lines(out)) < 30
    server.reset()  # the server is fixed: the same command resumes and finishes
    again = invoke("batch", *args, "--fail-fast", 3)
    assert again.exit_code == 0, again.output
    assert len(lines(out)) == 30 and all(r["status"] == "complete" for r in lines(out))
