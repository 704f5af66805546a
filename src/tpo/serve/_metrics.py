"""Prometheus metrics of one server (a registry of its own), and backends wrapped to count their calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..result import TPOResult
from ..types import Generation, GenerationRequest, Score, ScoreRequest

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Every ``tpo_`` metric the server exports; ``registry`` is what ``GET /metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tpo_requests",
            "Chat completion requests answered, by HTTP status (499: the client disconnected first).",
            ["status"],
            registry=r,
        )
        self.in_flight = Gauge("tpo_prompts_in_flight", "Prompts being optimised now.", registry=r)
        self.queued = Gauge("tpo_queue_length", "Requests waiting for a free slot.", registry=r)
        self.request_latency = Histogram(
            "tpo_request_latency_seconds",
            "Time from a request's arrival to its answer.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.step_latency = Histogram(
            "tpo_step_latency_seconds",
            "Wall time of one step of one prompt, by kind.",
            ["kind"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "tpo_tokens", "Tokens spent by policy and critic calls, by kind (prompt, completion).", ["kind"], registry=r
        )
        self.backend_calls = Counter(
            "tpo_backend_calls", "Calls to the models, by role (policy, critic, reward).", ["role"], registry=r
        )
        self.batch_size = Histogram(
            "tpo_backend_batch_size",
            "Requests per call to the models, by role.",
            ["role"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind=kind)

    def record_steps(self, result: TPOResult, seen: int) -> int:
        """Observe the latency of the steps of ``result`` after the first ``seen``; return how many there are now."""
        for record in result.steps[seen:]:
            self.step_latency.labels(kind=record.kind).observe(record.usage.wall_time_s)
        return len(result.steps)

    def record_usage(self, result: TPOResult) -> None:
        self.tokens.labels(kind="prompt").inc(result.usage.prompt_tokens)
        self.tokens.labels(kind="completion").inc(result.usage.completion_tokens)

    def call(self, role: str, size: int) -> None:
        self.backend_calls.labels(role=role).inc()
        self.batch_size.labels(role=role).observe(size)


class MeteredPolicy:
    """A policy backend that counts its calls and batch sizes; everything else is the wrapped backend's."""

    def __init__(self, inner: Any, metrics: Metrics, role: str) -> None:
        self._inner = inner
        self._metrics = metrics
        self._role = role

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self._metrics.call(self._role, len(requests))
        return list(await self._inner.generate(requests))


class MeteredReward:
    """A reward model that counts its calls and batch sizes; everything else is the wrapped model's."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        self._metrics.call("reward", len(requests))
        return list(await self._inner.score(requests))
