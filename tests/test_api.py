"""The public Python API: its surface, optimize and optimize_many, async twins, and configuration errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence

import pytest

import tpo
from conftest import hash_score, pure_reply
from tpo import (
    ConfigError,
    Generation,
    GenerationRequest,
    InputError,
    Prompt,
    ScoreRequest,
    TPOConfig,
    UserError,
    _guard,
)
from tpo.protocols import ClosesPerLoop, CountsTokens, KnowsContextWindow
from tpo.testing import FunctionReward, ScriptedPolicy

# tpo.__all__ is pinned in test_public_api.py, with the import paths the docs cite.


def test_importing_tpo_pulls_in_no_heavy_package() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tpo, tpo.testing\n"
        "heavy = {'torch', 'transformers', 'vllm', 'llama_cpp', 'openai', 'httpx', 'datasets', 'numpy'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_errors_separate_user_mistakes_from_runtime_failures() -> None:
    for user in (tpo.ConfigError, tpo.InputError, tpo.PromptTemplateError, tpo.MissingDependencyError):
        assert issubclass(user, tpo.UserError) and not issubclass(user, tpo.RunError)
    for run in (tpo.BackendError, tpo.RewardError):
        assert issubclass(run, tpo.RunError) and not issubclass(run, tpo.UserError)
    assert issubclass(tpo.UserError, tpo.TPOError) and issubclass(tpo.RunError, tpo.TPOError)


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 0}, "^width must be an integer >= 1, got 0$"),
        ({"depth": -1}, "^depth must be an integer >= 0, got -1$"),
        ({"mode": "dpo"}, "^mode must be one of tpo, revision, bon, got 'dpo'$"),
        ({"top_p": 0}, r"^top_p must be a number in \(0, 1\], got 0$"),
        ({"top_p": 1.5}, r"^top_p must be a number in \(0, 1\], got 1.5$"),
        ({"temperature": -0.1}, r"^temperature must be a number in \[0, 5\], got -0.1$"),
        ({"width": 2.5}, "^width must be an integer >= 1, got 2.5$"),
        ({"width": True}, "^width must be an integer >= 1, got True$"),
        ({"width": None}, "^width must be an integer >= 1, got None$"),
        ({"max_tokens": 0}, "^max_tokens must be an integer >= 1, got 0$"),
        ({"rejected_from": "worst"}, "^rejected_from must be one of all, latest, got 'worst'$"),
        ({"final_from": "best"}, "^final_from must be one of all, last_step, got 'best'$"),
        ({"early_stop_patience": 0}, "^early_stop_patience must be an integer >= 1, got 0$"),
        ({"early_stop_score": float("nan")}, "^early_stop_score must be a number, got nan$"),
        ({"seed": "7"}, "^seed must be an integer, got '7'$"),
        ({"context_window": 10}, "^context_window must be an integer >= 256, got 10$"),
        ({"prompts": "my.toml"}, r"prompts must be a tpo.PromptSet \(use PromptSet.load\(path\) for a file\)"),
        ({"widht": 3}, "^unknown option 'widht'; it takes: mode, width, .*"),
    ],
)
def test_bad_options_are_config_errors_before_any_model_work(options: dict, message: str) -> None:
    policy = ScriptedPolicy()
    with pytest.raises(ConfigError, match=message):
        tpo.optimize("q", policy=policy, reward=FunctionReward(hash_score), **options)
    with pytest.raises(ConfigError, match=message):
        tpo.optimize_many(["q"], policy=policy, reward=FunctionReward(hash_score), **options)
    assert policy.calls == []


def test_config_is_frozen_and_round_trips() -> None:
    config = TPOConfig(width=3, mode="revision", early_stop_score=0.5)
    with pytest.raises(AttributeError):
        config.width = 4  # type: ignore[misc]
    assert TPOConfig.from_dict(config.to_dict()) == config
    assert config.with_options(depth=4).depth == 4
    with pytest.raises(ConfigError, match="unknown option"):
        TPOConfig.from_dict({**config.to_dict(), "nonsense": 1})


def test_options_and_config_combine() -> None:
    policy = ScriptedPolicy()
    result = tpo.optimize(
        "q", policy=policy, reward=FunctionReward(hash_score), config=TPOConfig(width=3, depth=0), seed=11
    )
    assert (result.config["width"], result.config["depth"], result.seed) == (3, 0, 11)


def test_engine_rejects_objects_that_are_not_backends() -> None:
    with pytest.raises(ConfigError, match="policy must have an async generate"):
        tpo.Engine(object(), FunctionReward(hash_score))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reward must have an async score"):
        tpo.Engine(ScriptedPolicy(), object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="critic must have an async generate"):
        tpo.Engine(ScriptedPolicy(), FunctionReward(hash_score), critic=object())  # type: ignore[arg-type]


def test_the_test_doubles_satisfy_the_protocols() -> None:
    assert isinstance(ScriptedPolicy(), tpo.PolicyBackend)
    assert isinstance(ScriptedPolicy(), KnowsContextWindow) and isinstance(ScriptedPolicy(), CountsTokens)
    assert isinstance(FunctionReward(hash_score), tpo.RewardModel)


def test_a_backend_with_only_generate_is_a_policy_backend() -> None:
    class Minimal:
        name, batching, supports_n, supports_logprobs = "minimal", False, True, False

        async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
            return [Generation(tuple(pure_reply(r))) for r in requests]

    assert isinstance(Minimal(), tpo.PolicyBackend)
    assert not isinstance(Minimal(), KnowsContextWindow) and not isinstance(Minimal(), CountsTokens)
    result = tpo.optimize("q", policy=Minimal(), reward=FunctionReward(hash_score), width=2, depth=1)
    assert result.status == "complete", result.error


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("   ", "prompt '2': the prompt is empty"),
        ([], "prompt '2': the conversation has no messages"),
        ([{"role": "bot", "content": "hi"}], "prompt '2': message 0 has role 'bot'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "prompt '2': the conversation must end with a user message",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
            "prompt '2': message 1 is a system message",
        ),
        ([{"role": "user", "content": None}], "prompt '2': message 0 has no text content"),
        (42, "prompt '2': expected a string or a list of messages, got int"),
    ],
)
def test_a_list_of_prompts_is_validated_whole_before_any_model_work(bad: object, message: str) -> None:
    policy = ScriptedPolicy()
    with pytest.raises(InputError, match=message):
        list(tpo.optimize_many(["fine", "also fine", bad, "fine"], policy=policy, reward=FunctionReward(hash_score)))
    assert policy.calls == []


def test_duplicate_prompt_ids_are_an_error() -> None:
    policy = ScriptedPolicy()
    prompts = [Prompt.of("a", id="x"), Prompt.of("b", id="y"), Prompt.of("c", id="x")]
    with pytest.raises(InputError, match="two prompts have the id 'x'"):
        list(tpo.optimize_many(prompts, policy=policy, reward=FunctionReward(hash_score)))
    # A plain string takes its position as id, which may collide with an explicit one.
    with pytest.raises(InputError, match="two prompts have the id '1'"):
        list(tpo.optimize_many(["a", "b", Prompt.of("c", id="1")], policy=policy, reward=FunctionReward(hash_score)))
    assert policy.calls == []


def test_duplicate_ids_in_a_stream_stop_the_stream() -> None:
    prompts = (p for p in [Prompt.of("a", id="x"), Prompt.of("c", id="x")])
    with pytest.raises(InputError, match="two prompts have the id 'x'"):
        list(tpo.optimize_many(prompts, policy=ScriptedPolicy(), reward=FunctionReward(hash_score), depth=0))


def test_optimize_many_refuses_a_single_prompt() -> None:
    with pytest.raises(InputError, match="for a single prompt use optimize"):
        list(tpo.optimize_many("one prompt", policy=ScriptedPolicy(), reward=FunctionReward(hash_score)))


def test_optimize_rejects_a_bad_prompt(policy: ScriptedPolicy) -> None:
    with pytest.raises(InputError, match="the prompt is empty"):
        tpo.optimize("", policy=policy, reward=FunctionReward(hash_score))
    assert policy.calls == []


# --------------------------------------------------------------------------- optimize_many


def test_optimize_many_streams_results_as_prompts_finish() -> None:
    def latency(request: GenerationRequest) -> float:
        return 0.15 if request.prompt_id == "0" else 0.0

    policy = ScriptedPolicy(pure_reply, latency_s=latency)
    started = time.perf_counter()
    arrivals: list[tuple[str, float]] = []
    for result in tpo.optimize_many(
        ["slow", "fast", "faster"], policy=policy, reward=FunctionReward(hash_score), width=2, depth=1
    ):
        arrivals.append((result.prompt_id, time.perf_counter() - started))
    assert [pid for pid, _ in arrivals][-1] == "0"
    assert {pid for pid, _ in arrivals[:2]} == {"1", "2"}
    # The fast results were handed over while the slow prompt was still working (4 calls of 0.15 s).
    assert arrivals[0][1] < arrivals[-1][1] / 2


def test_optimize_many_accepts_any_iterable_and_keeps_ids_and_metadata() -> None:
    prompts = iter([Prompt.of("a", id="alpha", metadata={"k": 1}), "b", [{"role": "user", "content": "c"}]])
    results = {
        r.prompt_id: r
        for r in tpo.optimize_many(
            prompts, policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1
        )
    }
    assert set(results) == {"alpha", "1", "2"}
    assert results["alpha"].metadata == {"k": 1}
    assert all(r.status == "complete" for r in results.values())


class _LoopRecordingPolicy(ScriptedPolicy):
    """A scripted policy that notes the event loops it runs on and the requests cancelled in flight."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.cancelled = 0

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        loop = asyncio.get_running_loop()
        if loop not in self.loops:
            self.loops.append(loop)
        try:
            return await super().generate(requests)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_leaving_optimize_many_early_stops_the_work() -> None:
    policy = _LoopRecordingPolicy(pure_reply, latency_s=lambda r: 0.0 if r.prompt_id == "0" else 0.05)
    stream = tpo.optimize_many(
        [f"q{i}" for i in range(20)], policy=policy, reward=FunctionReward(hash_score), width=2, depth=3
    )
    first = next(stream)
    assert first.prompt_id == "0"
    (loop,) = policy.loops
    assert asyncio.all_tasks(loop)  # the other prompts are in flight while the caller holds a result
    stream.close()
    # Their requests were cancelled, not abandoned, and no task of the run is left pending.
    assert policy.cancelled > 0
    assert loop.is_closed() and asyncio.all_tasks(loop) == set()
    assert len(policy.calls) < 20 * 10


def test_leaving_aoptimize_many_early_cancels_every_prompt_still_running() -> None:
    policy = _LoopRecordingPolicy(pure_reply, latency_s=lambda r: 0.0 if r.prompt_id == "0" else 0.05)

    async def main() -> set[asyncio.Task[object]]:
        stream = tpo.aoptimize_many(
            [f"q{i}" for i in range(20)], policy=policy, reward=FunctionReward(hash_score), width=2, depth=3
        )
        assert (await stream.__anext__()).prompt_id == "0"
        await stream.aclose()
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(main()) == set()  # checked inside the loop, before asyncio.run could tidy up
    assert policy.cancelled > 0


# --------------------------------------------------------------------------- sync and async


def test_async_twins_work_inside_an_event_loop() -> None:
    async def main() -> tuple[tpo.TPOResult, list[tpo.TPOResult]]:
        one = await tpo.aoptimize(
            "q", policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1
        )
        many = [
            r
            async for r in tpo.aoptimize_many(
                ["a", "b", "c"], policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1
            )
        ]
        return one, many

    one, many = asyncio.run(main())
    assert one.status == "complete" and len(one.candidates) == 4
    assert sorted(r.prompt_id for r in many) == ["0", "1", "2"]
    # The async result equals the sync one.
    sync = tpo.optimize("q", policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1)
    assert one.to_dict()["candidates"] == sync.to_dict()["candidates"]


def test_aoptimize_many_takes_an_async_stream() -> None:
    async def prompts() -> AsyncIterator[str]:
        for i in range(3):
            await asyncio.sleep(0)
            yield f"q{i}"

    async def main() -> list[str]:
        return [
            r.prompt_id
            async for r in tpo.aoptimize_many(
                prompts(), policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=2, depth=0
            )
        ]

    assert sorted(asyncio.run(main())) == ["0", "1", "2"]


def test_sync_versions_refuse_to_run_inside_an_event_loop() -> None:
    async def main() -> None:
        with pytest.raises(UserError, match=r"use 'await tpo.aoptimize\(...\)'"):
            tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(hash_score))
        # Raised at the call, before anything is iterated.
        with pytest.raises(UserError, match=r"use 'await tpo.aoptimize_many\(...\)'"):
            tpo.optimize_many(["q"], policy=ScriptedPolicy(), reward=FunctionReward(hash_score))

    asyncio.run(main())


def test_one_engine_serves_several_event_loops() -> None:
    engine = tpo.Engine(ScriptedPolicy(pure_reply), FunctionReward(hash_score), config=TPOConfig(width=2, depth=1))
    first = asyncio.run(engine.optimize("q"))
    second = asyncio.run(engine.optimize("q"))
    assert first.to_dict()["candidates"] == second.to_dict()["candidates"]
    assert engine.usage.policy_calls == 8


def test_prompts_that_finish_together_come_out_in_input_order() -> None:
    prompts = [Prompt.of(f"q{i}", id=f"p{9 - i}") for i in range(10)]
    for batching in (False, True):
        results = tpo.optimize_many(
            prompts,
            policy=ScriptedPolicy(pure_reply, batching=batching),
            reward=FunctionReward(hash_score),
            width=2,
            depth=1,
        )
        assert [r.prompt_id for r in results] == [f"p{9 - i}" for i in range(10)]


def test_an_error_in_the_callers_code_stops_the_run_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    import gc

    def on_step(result: tpo.TPOResult) -> None:
        raise ValueError(f"callback broke on {result.prompt_id}")

    policy = ScriptedPolicy(pure_reply)
    with pytest.raises(ValueError, match="callback broke on 0"):
        list(
            tpo.optimize_many(
                [f"q{i}" for i in range(5)],
                policy=policy,
                reward=FunctionReward(hash_score),
                width=2,
                depth=2,
                on_step=on_step,
            )
        )
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert len(policy.requests) == 5  # every prompt sampled once, then the run stopped


# --------------------------------------------------------------------------- what the sync functions close


class _PooledPolicy(_LoopRecordingPolicy):
    """A policy with HTTP connections per event loop, which it reopens on reuse."""

    closes_per_loop = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(pure_reply, **kwargs)
        self.closed_on: list[asyncio.AbstractEventLoop] = []

    async def aclose(self) -> None:
        self.closed_on.append(asyncio.get_running_loop())


class _PooledReward(FunctionReward):
    closes_per_loop = True

    def __init__(self) -> None:
        super().__init__(hash_score)
        self.closed_on: list[asyncio.AbstractEventLoop] = []

    async def aclose(self) -> None:
        self.closed_on.append(asyncio.get_running_loop())


class _InProcessPolicy(ScriptedPolicy):
    """A policy whose ``aclose`` frees its model: the sync functions must leave it loaded."""

    def __init__(self) -> None:
        super().__init__(pure_reply)
        self.freed = False

    async def aclose(self) -> None:
        self.freed = True


def test_optimize_closes_per_loop_connections_at_the_end_and_leaves_models_loaded() -> None:
    policy, reward = _PooledPolicy(), _PooledReward()
    assert isinstance(policy, ClosesPerLoop)
    tpo.optimize("q", policy=policy, reward=reward, width=2, depth=1)
    # Once (the policy is also the critic), on the loop the work ran on, while it was still open.
    assert policy.closed_on == policy.loops and len(policy.loops) == 1
    assert reward.closed_on == policy.loops
    # The next call opens new connections on its own loop, and closes those too.
    result = tpo.optimize("q", policy=policy, reward=reward, width=2, depth=1)
    assert result.status == "complete"
    assert policy.closed_on == policy.loops and len(policy.loops) == 2
    # A backend without closes_per_loop is never closed: its aclose() may free a model.
    in_process = _InProcessPolicy()
    tpo.optimize("q", policy=in_process, critic=policy, reward=reward, width=2, depth=1)
    assert not in_process.freed
    assert len(policy.closed_on) == 3


def test_optimize_many_closes_connections_when_exhausted_or_closed() -> None:
    policy, reward = _PooledPolicy(), _PooledReward()
    stream = tpo.optimize_many(["a", "b"], policy=policy, reward=reward, width=2, depth=1)
    next(stream)
    assert policy.closed_on == []  # still in use
    assert len(list(stream)) == 1
    assert policy.closed_on == policy.loops and reward.closed_on == policy.loops
    stream = tpo.optimize_many(["a", "b"], policy=policy, reward=reward, width=2, depth=1)
    next(stream)
    stream.close()
    assert policy.closed_on == policy.loops and len(policy.loops) == 2


def test_the_async_functions_close_nothing() -> None:
    policy, reward = _PooledPolicy(), _PooledReward()

    async def main() -> None:
        await tpo.aoptimize("q", policy=policy, reward=reward, width=2, depth=1)
        async for _ in tpo.aoptimize_many(["a"], policy=policy, reward=reward, width=2, depth=1):
            pass

    asyncio.run(main())
    assert policy.closed_on == [] and reward.closed_on == []


def test_a_failure_to_close_is_a_warning_and_the_result_is_kept() -> None:
    class BadClose(_PooledPolicy):
        async def aclose(self) -> None:
            raise OSError("socket already gone")

    with pytest.warns(RuntimeWarning, match="closing scripted failed: OSError: socket already gone"):
        result = tpo.optimize("q", policy=BadClose(), reward=FunctionReward(hash_score), width=2, depth=1)
    assert result.status == "complete"


def test_sync_calls_shut_down_their_worker_threads() -> None:
    threads: set[threading.Thread] = set()

    class Threaded(ScriptedPolicy):
        async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
            await asyncio.to_thread(lambda: threads.add(threading.current_thread()))
            return await super().generate(requests)

    list(
        tpo.optimize_many(["a", "b"], policy=Threaded(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1)
    )
    assert threads and not any(t.is_alive() for t in threads)
    threads.clear()
    tpo.optimize("q", policy=Threaded(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1)
    assert threads and not any(t.is_alive() for t in threads)


# --------------------------------------------------------------------------- no real model in a test by mistake


def test_real_requests_are_forbidden_in_tests_unless_allowed() -> None:
    assert not tpo.testing.real_requests_allowed()  # the autouse fixture in conftest.py
    with pytest.raises(ConfigError, match="llamacpp:tiny: real model requests are forbidden"):
        _guard.check_real_request_allowed("llamacpp:tiny")
    with tpo.testing.forbid_real_requests(False):
        assert tpo.testing.real_requests_allowed()
        _guard.check_real_request_allowed("llamacpp:tiny")
    assert not tpo.testing.real_requests_allowed()  # the context manager restored the setting
    tpo.testing.forbid_real_requests(False)  # a plain call sets it (the fixture restores it after the test)
    assert tpo.testing.real_requests_allowed()
    tpo.testing.forbid_real_requests()
    assert not tpo.testing.real_requests_allowed()


def test_the_allow_real_requests_fixture_allows_them(allow_real_requests: None) -> None:
    assert tpo.testing.real_requests_allowed()


@pytest.mark.usefixtures("allow_real_requests")
def test_allow_real_requests_also_works_as_a_mark_for_a_whole_module() -> None:
    # As ``pytestmark = pytest.mark.usefixtures("allow_real_requests")`` in a module of tiny-model tests.
    assert tpo.testing.real_requests_allowed()


@pytest.mark.parametrize("batching", [False, True])
def test_a_forbidden_real_request_stops_the_run_loudly(batching: bool) -> None:
    class GuardedPolicy(ScriptedPolicy):
        async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
            _guard.check_real_request_allowed(self.name)
            return await super().generate(requests)

    class GuardedReward(FunctionReward):
        async def score(self, requests: Sequence[ScoreRequest]) -> list[tpo.Score]:
            _guard.check_real_request_allowed(self.name)
            return await super().score(requests)

    # Not a failed prompt that a test might take for the behaviour under test: an error.
    with pytest.raises(ConfigError, match="real: real model requests are forbidden"):
        list(
            tpo.optimize_many(
                ["a", "b"],
                policy=GuardedPolicy(pure_reply, batching=batching, name="real"),
                reward=FunctionReward(hash_score),
                width=2,
                depth=1,
            )
        )
    with pytest.raises(ConfigError, match="judge: real model requests are forbidden"):
        list(
            tpo.optimize_many(
                ["a", "b"],
                policy=ScriptedPolicy(pure_reply),
                reward=GuardedReward(hash_score, batching=batching, name="judge"),
                width=2,
                depth=1,
            )
        )


def test_closing_per_loop_connections_reaches_inside_wrappers() -> None:
    import asyncio

    from tpo.api import aclose_per_loop
    from tpo.rewards.combine import CachedReward, WeightedReward

    class PerLoop(FunctionReward):
        closes_per_loop = True

        def __init__(self) -> None:
            super().__init__(lambda m, a: 1.0)
            self.closed = 0

        async def aclose(self) -> None:
            self.closed += 1

    class Loaded(FunctionReward):
        def __init__(self) -> None:
            super().__init__(lambda m, a: 1.0)
            self.closed = 0

        async def aclose(self) -> None:  # would free a model: must not be called
            self.closed += 1

    inner, loaded = PerLoop(), Loaded()
    wrapped = WeightedReward([CachedReward(inner), loaded])
    asyncio.run(aclose_per_loop(wrapped, inner))
    assert inner.closed == 1 and loaded.closed == 0


def test_ctrl_c_inside_a_sync_optimize_many_surfaces_as_keyboard_interrupt() -> None:
    from tpo.testing import default_reply

    calls = 0

    def reply(request: GenerationRequest) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return default_reply(request)

    policy = ScriptedPolicy(reply, latency_s=0.01)
    with pytest.raises(KeyboardInterrupt):
        for _ in tpo.optimize_many(["a", "b", "c"], policy=policy, reward=FunctionReward(lambda m, a: 1.0), depth=1):
            pass
