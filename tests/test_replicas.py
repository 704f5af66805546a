"""The pool of replicas behind several servers of one model (``tpo._http.replicas``), with scripted replicas.

Each fake replica behaves as the HTTP backends do: it reports every attempt through its
``on_attempt`` hook, retries a server that does not answer a few times, and refuses what its
server refuses. Real servers on loopback are in tests/test_replicas_http.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tpo import Generation, GenerationRequest, Message, Score, ScoreRequest
from tpo._http.replicas import ReplicaPool, ReplicatedPolicy, ReplicatedReward, split_urls
from tpo.errors import BackendError, ConfigError, RewardError


class FakeServer:
    """A replica: ``mode`` is ``ok``, ``down`` (connections refused) or ``refuse`` (HTTP 400 to everything)."""

    name = "openai:m"
    batching = False
    supports_n = True
    supports_logprobs = True

    def __init__(self, label: str, *, latency_s: float = 0.005, window: int | None = None, attempts: int = 4) -> None:
        self.label = label
        self.mode = "ok"
        self.latency_s = latency_s
        self.window = window
        self.attempts = attempts
        self.served: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.closed = 0
        self.on_attempt = None

    def _report(self, failure: str | None) -> None:
        if self.on_attempt is not None:
            self.on_attempt(failure)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        (request,) = requests
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for _ in range(self.attempts):
                await asyncio.sleep(self.latency_s)
                if self.mode == "down":
                    self._report("could not connect (ConnectError: refused)")
                    continue
                self._report(None)
                if self.mode == "refuse":
                    raise BackendError(f"{self.label} refused the request: HTTP 400: bad request", status=400)
                self.served.append(request.prompt_id)
                return [Generation((f"{request.prompt_id} by {self.label}",) * request.n)]
            raise BackendError(f"{self.label} failed after {self.attempts} attempts", status=None)
        finally:
            self.in_flight -= 1

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        out = []
        for request in requests:
            await asyncio.sleep(self.latency_s)
            if self.mode == "down":
                self._report("cannot connect (ConnectError)")
                out.append(Score.failed(f"{self.label} failed after 1 attempt; last error: cannot connect"))
            elif self.mode == "refuse":
                self._report(None)
                out.append(Score.failed(f"{self.label} answered without a score"))
            else:
                self._report(None)
                self.served.append(request.prompt_id)
                out.append(Score(float(len(request.answer))))
        return out

    async def preflight(self) -> None:
        if self.mode == "down":
            raise BackendError(f"{self.label} cannot be reached")

    async def context_window(self) -> int | None:
        return self.window

    async def aclose(self) -> None:
        self.closed += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _request(i: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest((Message("user", f"q{i}"),), n=n, prompt_id=f"p{i}")


def _policy(*servers: FakeServer, **options: object) -> ReplicatedPolicy:
    return ReplicatedPolicy([(s.label, s) for s in servers], **options)


async def _all(policy: ReplicatedPolicy, count: int, n: int = 1) -> list[Generation]:
    return await policy.generate([_request(i, n) for i in range(count)])


def test_urls_come_as_a_list_or_comma_separated() -> None:
    assert split_urls("http://a/v1, http://b/v1", what="base_url") == ["http://a/v1", "http://b/v1"]
    assert split_urls(["http://a/v1", "http://b/v1,http://c/v1"], what="base_url") == [
        "http://a/v1",
        "http://b/v1",
        "http://c/v1",
    ]
    with pytest.raises(ConfigError, match="empty URL between its commas"):
        split_urls("http://a/v1,,http://b/v1", what="base_url")
    with pytest.raises(ConfigError, match="'http://a/v1' more than once"):
        split_urls("http://a/v1,http://a/v1", what="base_url")
    with pytest.raises(ConfigError, match="base_url is empty"):
        split_urls([], what="base_url")


def test_requests_go_to_the_replica_with_the_fewest_in_flight() -> None:
    a, b, c = FakeServer("a", latency_s=0.002), FakeServer("b", latency_s=0.006), FakeServer("c", latency_s=0.006)
    policy = _policy(a, b, c)
    out = asyncio.run(_all(policy, 90))
    assert [g.texts[0].split(" by ")[0] for g in out] == [f"p{i}" for i in range(90)]
    assert sorted(a.served + b.served + c.served) == sorted(f"p{i}" for i in range(90))
    # All start together, evenly; none holds more than its share at once.
    assert max(s.peak for s in (a, b, c)) == 30
    reports = policy.replica_reports()
    assert [r.requests for r in reports] == [len(a.served), len(b.served), len(c.served)]
    assert all(r.state == "up" and r.failures == 0 for r in reports)


def test_sequences_count_n_and_the_busier_replica_gets_less() -> None:
    a, b = FakeServer("a"), FakeServer("b")
    policy = _policy(a, b)

    async def main() -> None:
        big = asyncio.ensure_future(policy.generate([_request(0, n=8)]))  # 8 sequences on one replica
        await asyncio.sleep(0)
        await policy.generate([_request(i) for i in range(1, 8)])  # the 7 singles fill the other first
        await big

    asyncio.run(main())
    reports = policy.replica_reports()
    assert sorted(r.sequences for r in reports) == [7, 8]


def test_a_dead_replica_is_set_aside_and_its_requests_finish_on_the_others() -> None:
    a, b, c = FakeServer("a"), FakeServer("b"), FakeServer("c")
    b.mode = "down"
    policy = _policy(a, b, c, failures_to_cool_off=3)
    out = asyncio.run(_all(policy, 60))
    assert len(out) == 60 and not b.served
    assert sorted(a.served + c.served) == sorted(f"p{i}" for i in range(60))  # every request once
    report = policy.replica_reports()[1]
    assert report.state == "cooling off" and report.failures >= 3 and "could not connect" in (report.last_error or "")


def test_a_replica_killed_mid_run_hands_over_what_it_had_in_flight() -> None:
    a, b = FakeServer("a", latency_s=0.01), FakeServer("b", latency_s=0.01, attempts=50)
    policy = _policy(a, b)

    async def main() -> list[Generation]:
        first = await policy.generate([_request(i) for i in range(10)])
        second = asyncio.ensure_future(policy.generate([_request(i) for i in range(10, 30)]))
        await asyncio.sleep(0.005)
        b.mode = "down"  # b would retry what it holds 50 times; the pool moves it after 3 failures
        return first + await second

    out = asyncio.run(main())
    assert len(out) == 30 and sorted(a.served + b.served) == sorted(f"p{i}" for i in range(30))  # each once
    assert len(b.served) == 5 and len(a.served) == 25  # b served half of the first ten, none after
    assert policy.replica_reports()[1].state == "cooling off"


def test_a_refused_request_fails_as_with_one_server_and_is_not_resent() -> None:
    a, b = FakeServer("a"), FakeServer("b")
    a.mode = b.mode = "refuse"
    policy = _policy(a, b)
    with pytest.raises(BackendError, match="refused the request: HTTP 400") as caught:
        asyncio.run(policy.generate([_request(0)]))
    assert caught.value.status == 400
    assert all(r.state == "up" for r in policy.replica_reports())


def test_a_replica_is_probed_after_its_cool_off_and_taken_back() -> None:
    clock = Clock()
    a, b = FakeServer("a"), FakeServer("b")
    b.mode = "down"
    policy = _policy(a, b, clock=clock, cool_off_s=10.0)

    async def main() -> None:
        await _all(policy, 10)
        assert policy.replica_reports()[1].state == "cooling off"
        b.mode = "ok"
        clock.now += 5  # too early: no probe yet
        await _all(policy, 10)
        assert policy.replica_reports()[1].state == "cooling off" and len(b.served) == 0
        clock.now += 6  # the cool-off is over: the next request starts a probe
        await _all(policy, 1)
        await asyncio.sleep(0.01)
        assert policy.replica_reports()[1].state == "up"
        await _all(policy, 10)

    asyncio.run(main())
    assert len(b.served) >= 4


def test_a_failed_probe_doubles_the_cool_off() -> None:
    clock = Clock()
    a, b = FakeServer("a"), FakeServer("b")
    b.mode = "down"
    policy = _policy(a, b, clock=clock, cool_off_s=10.0)

    async def main() -> None:
        await _all(policy, 10)
        clock.now += 11
        await _all(policy, 1)  # starts a probe, which fails
        await asyncio.sleep(0.01)
        assert policy.pool.replicas[1].cooling_until == pytest.approx(clock.now + 20)
        assert "probe: b cannot be reached" in (policy.replica_reports()[1].last_error or "")

    asyncio.run(main())


def test_when_every_replica_is_down_the_error_names_each() -> None:
    servers = [FakeServer(label) for label in ("http://a:1/v1", "http://b:2/v1", "http://c:3/v1")]
    for s in servers:
        s.mode = "down"
    policy = _policy(*servers)
    with pytest.raises(BackendError, match="no replica is left of 3") as caught:
        asyncio.run(_all(policy, 5))
    text = str(caught.value)
    for s in servers:
        assert f"{s.label}: probe: {s.label} cannot be reached" in text


def test_a_request_failing_on_every_replica_names_each() -> None:
    a, b = FakeServer("a", attempts=2), FakeServer("b", attempts=2)
    a.mode = b.mode = "down"
    policy = _policy(a, b, failures_to_cool_off=100)  # never set aside: the request itself fails everywhere
    every = r"the request failed on every replica \(a: could not connect.*; b: could not"
    with pytest.raises(BackendError, match=every):
        asyncio.run(policy.generate([_request(0)]))


def test_preflight_sets_aside_failing_servers_and_fails_only_when_all_do() -> None:
    a, b = FakeServer("a"), FakeServer("b")
    b.mode = "down"
    policy = _policy(a, b)
    asyncio.run(policy.preflight())
    assert [r.state for r in policy.replica_reports()] == ["up", "cooling off"]
    a.mode = "down"
    policy = _policy(a, b)
    with pytest.raises(BackendError, match=r"no replica is left of 2 .*a: a cannot be reached; b: b cannot be reached"):
        asyncio.run(policy.preflight())


def test_a_refused_key_in_preflight_is_a_config_error() -> None:
    a, b = FakeServer("a"), FakeServer("b")

    async def refuse() -> None:
        raise ConfigError("refused the API key")

    a.preflight = b.preflight = refuse  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="refused the API key"):
        asyncio.run(_policy(a, b).preflight())


def test_the_context_window_is_the_smallest_reported_and_close_reaches_every_replica() -> None:
    a, b, c = FakeServer("a", window=8192), FakeServer("b", window=4096), FakeServer("c")
    policy = _policy(a, b, c)
    assert asyncio.run(policy.context_window()) == 4096
    asyncio.run(policy.aclose())
    assert (a.closed, b.closed, c.closed) == (1, 1, 1)
    assert policy.name == "openai:m" and policy.supports_logprobs and not policy.batching


def test_scores_failed_by_a_dead_server_are_asked_again_elsewhere() -> None:
    a, b = FakeServer("http://a/pooling"), FakeServer("http://b/pooling")
    a.mode = "down"
    reward = ReplicatedReward([(a.label, a), (b.label, b)], failures_to_cool_off=2)
    requests = [ScoreRequest((Message("user", "q"),), "x" * i, prompt_id=f"p{i}") for i in range(1, 21)]
    scores = asyncio.run(reward.score(requests))
    assert [s.value for s in scores] == [float(i) for i in range(1, 21)]
    assert reward.name == "openai:http://a/pooling,http://b/pooling"  # the first name part, then every URL
    assert reward.replica_reports()[0].state == "cooling off"


def test_a_score_the_server_could_not_give_is_returned_as_it_is() -> None:
    a, b = FakeServer("a"), FakeServer("b")
    a.mode = b.mode = "refuse"
    reward = ReplicatedReward([("a", a), ("b", b)])
    (score,) = asyncio.run(reward.score([ScoreRequest((Message("user", "q"),), "x")]))
    assert score.value is None and "answered without a score" in (score.error or "")


def test_when_every_reward_server_is_down_the_error_names_each() -> None:
    a, b = FakeServer("a"), FakeServer("b")
    a.mode = b.mode = "down"
    reward = ReplicatedReward([("a", a), ("b", b)], failures_to_cool_off=1)
    with pytest.raises(RewardError, match="no replica is left of 2"):
        asyncio.run(reward.score([ScoreRequest((Message("user", "q"),), "x")]))


def test_the_pool_needs_a_replica() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        ReplicaPool([], what="openai:m")
