"""The http reward against stand-in servers on 127.0.0.1: each API's shapes, and faults it must survive."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

import tpo
from servers.stand_in import Reply, StandIn
from tpo import ConfigError, Message, Score, ScoreRequest
from tpo.registry import reward_from_spec
from tpo.rewards.http_server import HTTPReward
from tpo.testing import ScriptedPolicy, forbid_real_requests

pytest.importorskip("httpx")

import httpx  # after the skip, which a missing httpx (the openai extra) takes

CONVERSATION = (Message("system", "Be kind."), Message("user", "Say hello."))


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[str, Any, int], Reply]], StandIn]]:
    servers: list[StandIn] = []

    def start(handle: Callable[[str, Any, int], Reply]) -> StandIn:
        s = StandIn(handle)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def req(text: str, prompt_id: str = "p1", **metadata: Any) -> ScoreRequest:
    return ScoreRequest(CONVERSATION, text, metadata, prompt_id)


def score(reward: HTTPReward, *requests: ScoreRequest) -> list[Score]:
    async def go() -> list[Score]:
        try:
            return await reward.score(list(requests))
        finally:
            await reward.aclose()

    return asyncio.run(go())


def fast(url: str, **options: Any) -> HTTPReward:
    """A reward that backs off in milliseconds, so fault tests stay quick."""
    options.setdefault("backoff_s", 0.01)
    options.setdefault("max_retries", 2)
    return HTTPReward(url, rng=random.Random(0), **options)


# ---------------------------------------------------------------------------- the three APIs


def test_simple_api_request_and_response_shapes(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": len(body["answer"]) / 10}))
    reward = reward_from_spec(f"http:{server.url}/score", backoff_s=0.01)
    assert isinstance(reward, HTTPReward) and reward.api == "simple" and reward.batching is False
    out = score(reward, req("hello there", ref="x", n=3), req("hi", "p2"))
    assert [s.value for s in out] == [1.1, 0.2]
    # The two requests are in flight together, so they may reach the server in either order.
    first = next(s for s in server.seen if s.body.get("answer") == "hello there")
    assert first.path == "/score"
    assert first.body == {
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello."}],
        "answer": "hello there",
        "prompt_id": "p1",
        "metadata": {"ref": "x", "n": 3},
    }


def test_simple_api_errors_numbers_and_unjsonable_metadata(serve: Callable[..., StandIn]) -> None:
    replies = {
        "a": Reply(json={"error": "too long to judge"}),
        "b": Reply(json=0.75),
        "c": Reply(json={"score": "high"}),
        "d": Reply(json={"verdict": 1}),
    }
    server = serve(lambda path, body, n: replies[body["answer"]])
    out = score(
        fast(server.url), req("a"), req("b", when=datetime(2024, 1, 2, tzinfo=timezone.utc)), req("c"), req("d")
    )
    assert out[0].value is None and out[0].error == f"{server.url}: too long to judge"
    assert out[1] == Score(0.75)
    assert out[2].error is not None and "expected a number" in out[2].error
    assert out[3].error is not None and "answered without a score" in out[3].error
    sent = next(s.body for s in server.seen if s.body["answer"] == "b")
    assert sent["metadata"] == {"when": "2024-01-02 00:00:00+00:00"}


def test_simple_api_batched(serve: Callable[..., StandIn]) -> None:
    def handle(path: str, body: Any, n: int) -> Reply:
        items = body["items"]
        return Reply(
            json={
                "scores": [None if it["answer"] == "bad" else float(len(it["answer"])) for it in items],
                "errors": [("cannot score" if it["answer"] == "bad" else None) for it in items],
            }
        )

    server = serve(handle)
    reward = reward_from_spec(f"http:{server.url}/batch", batched=True)
    assert reward.batching is True
    out = score(reward, req("ab"), req("bad"), req("abcd"))  # type: ignore[arg-type]
    assert [s.value for s in out] == [2.0, None, 4.0]
    assert out[1].error == f"{server.url}/batch: cannot score"
    assert len(server.seen) == 1 and [it["answer"] for it in server.seen[0].body["items"]] == ["ab", "bad", "abcd"]


def test_simple_api_batched_wrong_length_fails_every_answer(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"scores": [1.0]}))
    out = score(fast(server.url, batched=True), req("a"), req("b"))
    assert all(s.error == f"{server.url} answered 1 scores for 2 answers" for s in out)


def test_vllm_pooling_request_shape_and_outputs(serve: Callable[..., StandIn]) -> None:
    def handle(path: str, body: Any, n: int) -> Reply:
        answer = body["messages"][-1]["content"]
        if answer == "per-token":  # the token_classify task: one row per token
            return Reply(
                json={"data": [{"index": 0, "object": "pooling", "data": [[0.1, 0.2], [0.3, 0.4], [2.5, -1.0]]}]}
            )
        return Reply(
            json={
                "object": "list",
                "data": [{"index": 0, "object": "pooling", "data": [len(answer) * 1.0, -3.0]}],
                "usage": {"prompt_tokens": 9, "total_tokens": 9},
            }
        )

    server = serve(handle)
    reward = reward_from_spec(f"http:{server.url}/pooling", model="Skywork/Skywork-Reward-V2-Qwen3-0.6B")
    assert reward.api == "vllm-pooling"  # type: ignore[attr-defined]
    out = score(reward, req("good answer"), req("per-token"))  # type: ignore[arg-type]
    assert [s.value for s in out] == [11.0, 2.5]
    good = next(s for s in server.seen if s.body["messages"][-1]["content"] == "good answer")  # either may arrive first
    assert good.body == {
        "model": "Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "good answer"},
        ],
        "use_activation": False,
    }
    second = reward_from_spec(f"http:{server.url}/pooling", index=1, raw=False, task="classify")
    out = score(second, req("x"))  # type: ignore[arg-type]
    assert out == [Score(-3.0)]
    body = server.seen[-1].body
    assert "use_activation" not in body and "model" not in body and body["task"] == "classify"


def test_vllm_classify_and_a_bare_server_address(serve: Callable[..., StandIn]) -> None:
    server = serve(
        lambda path, body, n: Reply(
            json={"data": [{"index": 0, "label": "LABEL_0", "probs": [1.25], "num_classes": 1}]}
        )
    )
    reward = HTTPReward(server.url, api="vllm-classify", extra_body={"truncate_prompt_tokens": -1})
    assert reward.url == server.url + "/classify"
    assert score(reward, req("x")) == [Score(1.25)]
    assert server.seen[0].path == "/classify"
    assert server.seen[0].body["use_activation"] is False and server.seen[0].body["truncate_prompt_tokens"] == -1
    out = score(HTTPReward(server.url + "/classify", index=3), req("x"))
    assert out[0].error == f"{server.url}/classify returned 1 output(s); index 3 is out of range"


def test_vllm_response_without_data_fails(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"object": "error", "message": "model not found"}))
    [s] = score(fast(server.url + "/pooling"), req("x"))
    assert s.error is not None and "answered without data[0].data" in s.error and "model not found" in s.error


# ---------------------------------------------------------------------------- faults


def test_a_500_then_ok_is_retried(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(500, {"error": "warming up"}) if n == 0 else Reply(json={"score": 1.0}))
    [s] = score(fast(server.url), req("x"))
    assert s == Score(1.0, details={"attempts": 2})
    assert len(server.seen) == 2


def test_429_waits_for_retry_after(serve: Callable[..., StandIn]) -> None:
    server = serve(
        lambda path, body, n: (
            Reply(429, {"error": "slow down"}, headers={"Retry-After": "1"}) if n == 0 else Reply(json={"score": 2.0})
        )
    )
    t0 = time.monotonic()
    [s] = score(fast(server.url, backoff_s=0.001), req("x"))
    elapsed = time.monotonic() - t0
    assert s.value == 2.0
    assert elapsed >= 0.95  # the server asked for a second; the backoff alone would be a millisecond


def test_retry_after_is_capped(serve: Callable[..., StandIn]) -> None:
    server = serve(
        lambda path, body, n: Reply(503, headers={"Retry-After": "3600"}) if n == 0 else Reply(json={"score": 2.0})
    )
    t0 = time.monotonic()
    [s] = score(fast(server.url, max_retry_after_s=0.2), req("x"))
    assert s.value == 2.0 and time.monotonic() - t0 < 60  # not the hour the server asked for


def test_timeouts_are_retried_then_fail_naming_the_url(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": 1.0}, delay_s=1.5))
    [s] = score(fast(server.url, timeout_s=0.2, max_retries=1), req("x"))
    assert s.value is None and s.error is not None
    assert s.error == f"{server.url} failed after 2 attempts; last error: no answer within 0.2 s"


def test_server_errors_exhaust_the_retries(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(503, {"error": "overloaded"}))
    [s] = score(fast(server.url, max_retries=3), req("x"))
    assert len(server.seen) == 4
    assert s.error is not None and s.error.startswith(f"{server.url} failed after 4 attempts; last error: HTTP 503")
    assert "overloaded" in s.error


def test_bad_json_and_client_errors_are_not_retried(serve: Callable[..., StandIn]) -> None:
    server = serve(
        lambda path, body, n: (
            Reply(raw=b"<html>oops</html>") if body["answer"] == "a" else Reply(404, {"detail": "Not Found"})
        )
    )
    out = score(fast(server.url), req("a"), req("b"))
    assert out[0].error == f"{server.url} answered HTTP 200 with invalid JSON: <html>oops</html>"
    assert out[1].error == f'{server.url} answered HTTP 404: {{"detail": "Not Found"}}'
    assert len(server.seen) == 2


def test_a_server_that_is_down_fails_every_answer() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = score(fast(f"http://127.0.0.1:{port}/score", max_retries=1), req("a"), req("b"))
    for s in out:
        assert s.value is None and s.error is not None
        assert s.error.startswith(f"http://127.0.0.1:{port}/score failed after 2 attempts; last error: cannot connect")


def test_at_most_concurrency_requests_in_flight(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": 1.0}, delay_s=0.1))
    out = score(fast(server.url, concurrency=2), *[req(str(i)) for i in range(6)])
    assert all(s.value == 1.0 for s in out)
    assert server.peak <= 2
    assert len(server.seen) == 6


def test_the_run_goes_on_when_some_answers_cannot_be_scored(serve: Callable[..., StandIn]) -> None:
    def handle(path: str, body: Any, n: int) -> Reply:
        if body["answer"].startswith("Answer 1 "):
            return Reply(500, {"error": "crashed on this one"})
        return Reply(json={"score": float(len(body["answer"]))})

    server = serve(handle)
    reward = fast(server.url, max_retries=1)

    async def go() -> tpo.TPOResult:
        try:
            return await tpo.aoptimize("Hi", policy=ScriptedPolicy(), reward=reward, width=3, depth=1)
        finally:
            await reward.aclose()

    result = asyncio.run(go())
    assert result.status == "complete"
    assert result.usage.reward_failures == 1
    [failed] = [c for c in result.candidates if c.score is None]
    assert failed.text.startswith("Answer 1 ") and "crashed on this one" in (failed.score_error or "")


def test_usable_from_two_event_loops_in_turn(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": 1.0}))
    reward = fast(server.url)
    assert asyncio.run(reward.score([req("a")])) == [Score(1.0)]
    assert asyncio.run(reward.score([req("b")])) == [Score(1.0)]
    asyncio.run(reward.aclose())


def unclosed_resources(run: Callable[[], object]) -> list[str]:
    """The ResourceWarnings (unclosed sockets and transports) that ``run`` leaves for the collector."""
    gc.collect()  # what earlier tests left behind is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_sync_calls_each_close_their_connections(serve: Callable[..., StandIn]) -> None:
    assert HTTPReward.closes_per_loop is True
    server = serve(lambda path, body, n: Reply(json={"score": float(len(body["answer"]))}))

    def three_runs() -> None:
        reward = fast(server.url)
        for _ in range(3):  # each tpo.optimize runs its own event loop, and so its own pool
            result = tpo.optimize("Hi", policy=ScriptedPolicy(), reward=reward, width=3, depth=1)
            assert result.status == "complete" and result.usage.reward_failures == 0
            assert len(reward._connections) == 0  # closed with its loop

    assert unclosed_resources(three_runs) == []
    assert len(server.seen) >= 3 * 6


def test_aclose_then_reuse(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": 1.0}))
    reward = fast(server.url)

    async def twice() -> list[Score]:
        first = await reward.score([req("a")])
        await reward.aclose()
        await reward.aclose()  # twice is harmless
        return first + await reward.score([req("b")])

    def go() -> None:
        assert asyncio.run(twice()) == [Score(1.0), Score(1.0)]
        assert score(reward, req("c")) == [Score(1.0)]

    assert unclosed_resources(go) == []
    assert len(server.seen) == 3


# ---------------------------------------------------------------------------- an injected transport


@pytest.mark.parametrize(
    ("status", "sent"), [(408, 2), (409, 2), (425, 2), (429, 2), (502, 2), (501, 1), (505, 1), (422, 1)]
)
def test_which_statuses_are_retried(status: int, sent: int) -> None:
    seen: list[Any] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return (
            httpx.Response(status, json={"error": "no"}) if len(seen) == 1 else httpx.Response(200, json={"score": 3.0})
        )

    [s] = score(fast("http://127.0.0.1:9/score", transport=httpx.MockTransport(handle)), req("x"))
    assert len(seen) == sent
    assert s.value == (3.0 if sent == 2 else None)


def test_retry_after_ms_is_honoured_beyond_the_backoff_cap() -> None:
    times: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        if len(times) == 1:
            return httpx.Response(503, headers={"retry-after-ms": "300"}, json={"error": "busy"})
        return httpx.Response(200, json={"score": 1.0})

    reward = fast("http://127.0.0.1:9/score", transport=httpx.MockTransport(handle), max_backoff_s=0.01)
    assert score(reward, req("x")) == [Score(1.0, details={"attempts": 2})]
    # The server's wait is capped by max_retry_after_s, not by max_backoff_s.
    assert times[1] - times[0] >= 0.29


def test_the_guard_stops_real_servers_but_not_loopback_or_a_mock(serve: Callable[..., StandIn]) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": 1.0}))
    with forbid_real_requests():
        with pytest.raises(ConfigError, match="real model requests are forbidden"):
            score(fast("http://rm.invalid/score"), req("x"))
        assert score(fast(server.url), req("x")) == [Score(1.0)]
        mock = httpx.MockTransport(lambda request: httpx.Response(200, json={"score": 2.0}))
        assert score(fast("http://rm.invalid/score", transport=mock), req("x")) == [Score(2.0)]


# ---------------------------------------------------------------------------- configuration


def test_api_key_from_the_environment_and_no_credentials_in_the_name(
    serve: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(lambda path, body, n: Reply(json={"score": 1.0}))
    monkeypatch.setenv("TPO_TEST_RM_KEY", "sekret")
    reward = HTTPReward(server.url, api_key_env="TPO_TEST_RM_KEY", headers={"X-Team": "rm"})
    score(reward, req("x"))
    assert server.seen[0].headers["authorization"] == "Bearer sekret"
    assert server.seen[0].headers["x-team"] == "rm"
    assert "sekret" not in reward.name
    with_user = HTTPReward("http://user:pw@127.0.0.1:9/score")
    assert "pw" not in with_user.name and with_user.name == "http:http://127.0.0.1:9/score"
    with pytest.raises(ConfigError, match="TPO_TEST_MISSING_KEY"):
        HTTPReward(server.url, api_key_env="TPO_TEST_MISSING_KEY")


def test_scheme_less_urls_get_http() -> None:
    assert HTTPReward("127.0.0.1:8000/classify").url == "http://127.0.0.1:8000/classify"
    assert HTTPReward("127.0.0.1:8000/classify").api == "vllm-classify"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("ftp://host/x", {}, "must be http:// or https://"),
        ("http://h/x", {"api": "openai"}, "api must be one of auto, simple, vllm-pooling, vllm-classify, got 'openai'"),
        ("http://h/pooling", {"batched": True}, "batched=true is for the simple API"),
        ("http://h/classify", {"task": "classify"}, "task is for vLLM's /pooling"),
        ("http://h/x", {"timeout_s": 0}, "the http reward: timeout_s must be a number > 0, got 0"),
        ("http://h/x", {"max_retries": -1}, "max_retries must be an integer >= 0, got -1"),
        ("http://h/x", {"max_retry_after_s": -1}, "max_retry_after_s must be a number >= 0, got -1"),
        ("http://h/x", {"backoff_s": float("nan")}, "backoff_s must be a number >= 0, got nan"),
        ("http://h/x", {"concurrency": 0}, "concurrency must be an integer >= 1, got 0"),
        ("http://h/x", {"headers": {"a": 1}}, "headers must be a mapping of strings, got {'a': 1}"),
        ("http://h/x", {"raw": "no"}, "raw must be true or false, got 'no'"),
        ("http://h/x", {"retries": 3}, "the http reward: unknown option 'retries'; it takes: api, model,"),
        ("", {}, "needs a URL"),
    ],
)
def test_bad_configuration(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        reward_from_spec(f"http:{url}" if url else "http", **options)


def test_a_url_given_as_the_spec_itself(serve: Callable[..., StandIn]) -> None:
    # `--reward http://127.0.0.1:PORT/pooling` splits into the reward "http" and "//127.0.0.1:PORT/pooling".
    server = serve(lambda path, body, n: Reply(json={"data": [{"index": 0, "data": [0.5]}]}))
    reward = reward_from_spec(server.url + "/pooling")
    assert isinstance(reward, HTTPReward) and reward.url == server.url + "/pooling" and reward.api == "vllm-pooling"
    assert score(reward, req("x")) == [Score(0.5)]
