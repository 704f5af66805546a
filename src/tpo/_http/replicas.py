"""Several servers of one model used as one: least-busy routing, failing servers set aside, probes, one final error.

``--base-url http://a:8000/v1 --base-url http://b:8000/v1`` (or ``OPENAI_BASE_URL`` holding
both, comma-separated) gives the OpenAI backend one replica per URL; ``--reward
http:http://a/pooling,http://b/pooling`` does the same for the HTTP reward. Each replica is a
whole backend of its own (``OpenAIPolicy`` or ``HTTPReward``): its own connections, its own
concurrency limit, its own retries, and its own record of whether its server honours ``n``.
``ReplicaPool`` sits in front of them:

* **Routing.** A request goes to the replica with the fewest sequences in flight.
* **Health.** Each replica tells the pool the outcome of every HTTP attempt (its
  ``on_attempt`` hook: ``None`` when the server answered, else what went wrong: refused
  connection, timeout, 5xx, 429). After ``failures_to_cool_off`` failures in a row the
  replica is set aside for ``cool_off_s`` seconds (doubling, up to ``max_cool_off_s``, each
  time its probe fails): its requests in flight are cancelled and sent to the others at
  once, rather than after their retries run out there.
* **Re-sending.** A request that failed on a replica for a reason another server may not
  have (the last attempt's failure, as above) is sent to a replica it has not tried yet. A
  request the server refused (a 4xx other than 408/409/425/429) fails as with one server.
* **Probing.** Once its cool-off is over, a replica is probed with its own ``preflight()``
  (``GET /models``; a trivial scoring request) and takes requests again when that passes.
* **Giving up.** When no replica is left (all cooling off, and an immediate probe of each
  fails), the request fails with an error naming every replica and its last error.

The context window is the smallest any replica's server reports.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import BackendError, ConfigError, RewardError, RunError
from ..types import Generation, GenerationRequest, Message, ReplicaReport, Score, ScoreRequest

__all__ = ["ReplicaPool", "ReplicatedPolicy", "ReplicatedReward", "joined_urls", "split_urls"]

B = TypeVar("B")
R = TypeVar("R")

#: Failed attempts in a row that set a replica aside.
FAILURES_TO_COOL_OFF = 3
#: Seconds a replica set aside waits before its first probe.
COOL_OFF_S = 10.0
#: The longest cool-off, reached by doubling after each failed probe.
MAX_COOL_OFF_S = 160.0


def split_urls(value: str | Sequence[str], *, what: str) -> list[str]:
    """URLs from one comma-separated string or a list of them; ``ConfigError`` for an empty one or a repeat."""
    items = [value] if isinstance(value, str) else list(value)
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what} must be a URL or a list of URLs, not {type(item).__name__}")
        parts = [p.strip() for p in item.split(",")]
        if any(not p for p in parts):
            raise ConfigError(f"{what} {item!r} has an empty URL between its commas")
        urls.extend(parts)
    if not urls:
        raise ConfigError(f"{what} is empty; give at least one URL")
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ConfigError(
            f"{what} gives {repeated[0]!r} more than once; give each server once "
            "(and raise its concurrency for more requests in flight)"
        )
    return urls


def joined_urls(value: Any) -> str:
    """An option holding one URL or several: a string (comma-separated) as it is, a list joined with commas.

    ``ValueError`` for anything else (what ``tpo.options.custom`` turns into the option's message).
    """
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return ",".join(value)
    raise ValueError(f"not a URL or a list of URLs: {value!r}")


@dataclass
class _Attempts:
    """The outcome of the last HTTP attempt made for one request on one replica (``None``: the server answered)."""

    last_failure: str | None = None


#: Set around each call the pool makes, so that a replica's ``on_attempt`` reports reach that call.
_CURRENT: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar("tpo_replica_attempts", default=None)


@dataclass(eq=False)
class _Replica(Generic[B]):
    label: str
    backend: B
    in_flight: int = 0
    requests: int = 0
    sequences: int = 0
    failures: int = 0
    in_a_row: int = 0
    last_error: str | None = None
    cooling_until: float | None = None
    cool_off_s: float = COOL_OFF_S
    probe: asyncio.Task[None] | None = None
    calls: set[asyncio.Task[Any]] = field(default_factory=set)
    #: One per call in flight, resolved when the replica is set aside: the call then moves on at once.
    set_aside: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def up(self) -> bool:
        return self.cooling_until is None


class ReplicaPool(Generic[B]):
    """Replicas of one model behind one interface; see the module docstring.

    ``replicas`` are ``(label, backend)`` pairs; the label (a URL with its secrets masked) names
    the replica in messages and reports. Each backend gets an ``on_attempt`` hook. ``what``
    names the model in the final error; ``error`` is the error class raised then.
    """

    def __init__(
        self,
        replicas: Sequence[tuple[str, B]],
        *,
        what: str,
        error: type[RunError] = BackendError,
        failures_to_cool_off: int = FAILURES_TO_COOL_OFF,
        cool_off_s: float = COOL_OFF_S,
        max_cool_off_s: float = MAX_COOL_OFF_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not replicas:
            raise ConfigError(f"{what}: a pool of replicas needs at least one")
        self.what = what
        self._error = error
        self._failures_to_cool_off = failures_to_cool_off
        self._cool_off_s = cool_off_s
        self._max_cool_off_s = max_cool_off_s
        self._clock = clock
        self.replicas: list[_Replica[B]] = [
            _Replica(label, backend, cool_off_s=cool_off_s) for label, backend in replicas
        ]
        for rep in self.replicas:
            rep.backend.on_attempt = functools.partial(self._on_attempt, rep)  # type: ignore[attr-defined]

    @property
    def backends(self) -> list[B]:
        """The replicas' backends, in order."""
        return [rep.backend for rep in self.replicas]

    # ------------------------------------------------------------------ calls

    async def call(
        self, sequences: int, fn: Callable[[B], Awaitable[R]], failed: Callable[[R], bool] = lambda _: False
    ) -> R:
        """``fn(backend)`` at the least busy replica, re-sent to another when that replica fails.

        ``sequences`` is what the call holds of a replica's capacity (``n`` for a generation).
        ``failed(result)`` says whether a result that came back is a failure (a failed score);
        it is re-sent like an exception when the replica's last attempt failed.
        """
        tried: set[int] = set()
        last: BaseException | R | None = None
        while True:
            rep = await self._pick(tried)
            if rep is None:  # every replica up has failed this request
                if isinstance(last, BaseException):
                    raise self._error(f"{self.what}: the request failed on every replica ({self._each()})") from last
                return last  # type: ignore[return-value]  # a failed score, with its own error
            attempts = _Attempts()
            token = _CURRENT.set(attempts)
            try:
                task = asyncio.ensure_future(fn(rep.backend))
            finally:
                _CURRENT.reset(token)
            aside: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            rep.calls.add(task)
            rep.set_aside.add(aside)
            rep.in_flight += sequences
            try:
                either: set[asyncio.Future[Any]] = {task, aside}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                rep.calls.discard(task)
                rep.set_aside.discard(aside)
                rep.in_flight -= sequences
            if not task.done() or task.cancelled():
                # The replica was set aside with this request in flight: it goes elsewhere now. (The
                # cancelled call may still be winding down; its result, if any, is not used.)
                task.cancel()
                task.add_done_callback(_consume)
                continue
            error = task.exception()
            result = None if error is not None else task.result()
            if error is None and not failed(result):  # type: ignore[arg-type]
                rep.requests += 1
                rep.sequences += sequences
                return result  # type: ignore[return-value]
            if attempts.last_failure is None or (error is not None and not isinstance(error, RunError)):
                if error is not None:
                    raise error  # the request's own fault (a refusal, a malformed reply): another server would agree
                return result  # type: ignore[return-value]
            tried.add(id(rep))
            last = error if error is not None else result

    async def preflight(self) -> None:
        """Run every replica's ``preflight()`` at once; set aside those that fail, and raise only when all do."""
        outcomes = await asyncio.gather(
            *(rep.backend.preflight() for rep in self.replicas),  # type: ignore[attr-defined]
            return_exceptions=True,
        )
        failures = [(rep, o) for rep, o in zip(self.replicas, outcomes, strict=True) if isinstance(o, BaseException)]
        for _, outcome in failures:
            if not isinstance(outcome, Exception):
                raise outcome
        if len(failures) == len(self.replicas):
            if all(isinstance(o, ConfigError) for _, o in failures):
                raise failures[0][1]  # a refused key: the same everywhere
            for rep, outcome in failures:
                rep.last_error = str(outcome)
            raise self._error(self._none_left())
        for rep, outcome in failures:
            rep.failures += 1
            self._cool_off(rep, str(outcome))

    def reports(self) -> list[ReplicaReport]:
        """Each replica's share of the work so far, and its state."""
        return [
            ReplicaReport(
                rep.label, "up" if rep.up else "cooling off", rep.requests, rep.sequences, rep.failures, rep.last_error
            )
            for rep in self.replicas
        ]

    # ------------------------------------------------------------------ health

    def _on_attempt(self, rep: _Replica[B], failure: str | None) -> None:
        """A replica's report of one HTTP attempt: ``None`` when its server answered, else what failed."""
        attempts = _CURRENT.get()
        if attempts is not None:
            attempts.last_failure = failure
        if failure is None:
            rep.in_a_row = 0
            return
        rep.failures += 1
        rep.in_a_row += 1
        rep.last_error = failure
        if rep.up and rep.in_a_row >= self._failures_to_cool_off:
            self._cool_off(rep, failure)
            # Its requests go to the replicas still up, not through its retries.
            for aside in list(rep.set_aside):
                if not aside.done():
                    aside.set_result(None)
            for task in list(rep.calls):
                task.cancel()

    def _cool_off(self, rep: _Replica[B], error: str) -> None:
        rep.last_error = error
        rep.cooling_until = self._clock() + rep.cool_off_s

    async def _pick(self, tried: set[int]) -> _Replica[B] | None:
        """The up replica with the fewest sequences in flight not in ``tried``; waits for probes when none is up."""
        while True:
            self._start_due_probes()
            up = [rep for rep in self.replicas if rep.up]
            if up:
                fresh = [rep for rep in up if id(rep) not in tried]
                return min(fresh, key=lambda r: r.in_flight) if fresh else None
            # None is up: probe every replica now rather than wait out the cool-offs.
            for rep in self.replicas:
                if rep.probe is None or rep.probe.done():
                    rep.probe = asyncio.ensure_future(self._probe(rep))
            await asyncio.gather(*(rep.probe for rep in self.replicas if rep.probe is not None))
            if not any(rep.up for rep in self.replicas):
                raise self._error(self._none_left())

    def _start_due_probes(self) -> None:
        now = self._clock()
        for rep in self.replicas:
            if (
                not rep.up
                and rep.cooling_until is not None
                and rep.cooling_until <= now
                and (rep.probe is None or rep.probe.done())
            ):
                rep.probe = asyncio.ensure_future(self._probe(rep))

    async def _probe(self, rep: _Replica[B]) -> None:
        check = getattr(rep.backend, "preflight", None)
        try:
            if check is not None:
                await check()
        except Exception as e:  # still failing: a longer cool-off
            rep.failures += 1
            rep.cool_off_s = min(self._max_cool_off_s, rep.cool_off_s * 2)
            self._cool_off(rep, f"probe: {e}")
            return
        rep.cooling_until, rep.in_a_row, rep.cool_off_s = None, 0, self._cool_off_s

    def _none_left(self) -> str:
        return f"{self.what}: no replica is left of {len(self.replicas)} ({self._each()})"

    def _each(self) -> str:
        return "; ".join(f"{rep.label}: {rep.last_error or 'no error recorded'}" for rep in self.replicas)


class _Replicated:
    """What the replicated policy and reward share: the pool's pre-flight check, closing and reports."""

    closes_per_loop = True
    pool: ReplicaPool[Any]

    async def preflight(self) -> None:
        """Check every server; those that fail are set aside, and only when all fail does this raise."""
        await self.pool.preflight()

    async def aclose(self) -> None:
        """Close every replica's connections of the running event loop."""
        await _aclose_all(self.pool.backends)

    def replica_reports(self) -> list[ReplicaReport]:
        """Each server's share of the work so far."""
        return self.pool.reports()


class ReplicatedPolicy(_Replicated):
    """A policy backend spread over several servers of one model (``OpenAIPolicy`` replicas, say).

    Name and capabilities are the replicas' (they serve one model). ``aclose()`` closes each
    replica's connections of the running event loop, as a single server's backend does.
    """

    batching = False
    supports_n = True

    def __init__(self, replicas: Sequence[tuple[str, Any]], **pool_options: Any) -> None:
        """``replicas``: ``(label, backend)`` pairs, each backend non-batching with an ``on_attempt`` hook."""
        self.pool = ReplicaPool(replicas, what="the replicated policy", error=BackendError, **pool_options)
        first = self.pool.backends[0]
        self.name: str = first.name
        self.supports_logprobs: bool = bool(getattr(first, "supports_logprobs", False))
        self.pool.what = self.name  # the pool's errors name the model

    def __repr__(self) -> str:
        return f"ReplicatedPolicy({self.name!r}, replicas={[r.label for r in self.pool.replicas]})"

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One ``Generation`` per request, each from the least busy replica."""

        async def one(request: GenerationRequest) -> Generation:
            out: list[Generation] = await self.pool.call(max(1, request.n), lambda b: b.generate([request]))
            return out[0]

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def context_window(self) -> int | None:
        """The smallest context window the replicas' servers report (``None`` when none does)."""
        windows = await asyncio.gather(*(b.context_window() for b in self.pool.backends), return_exceptions=True)
        known = [w for w in windows if isinstance(w, int) and not isinstance(w, bool) and w > 0]
        return min(known, default=None)

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Always ``None``: the engine estimates prompt tokens, as for one server."""
        return None


class ReplicatedReward(_Replicated):
    """A reward model spread over several servers (``HTTPReward`` replicas); see ``ReplicatedPolicy``.

    A score that failed because its server failed (refused connections, timeouts, 5xx after
    retries) is asked again of another server; one the server refused is returned as it is.
    """

    def __init__(self, replicas: Sequence[tuple[str, Any]], **pool_options: Any) -> None:
        """``replicas``: ``(label, reward)`` pairs, each with an ``on_attempt`` hook."""
        self.pool = ReplicaPool(replicas, what="the replicated reward", error=RewardError, **pool_options)
        first = self.pool.backends[0]
        self.batching: bool = bool(getattr(first, "batching", False))
        self.name: str = first.name.split(":", 1)[0] + ":" + ",".join(rep.label for rep in self.pool.replicas)
        self.pool.what = self.name  # the pool's errors name the model

    def __repr__(self) -> str:
        return f"ReplicatedReward(replicas={[r.label for r in self.pool.replicas]})"

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """One ``Score`` per request; a batching reward's call goes to one replica whole."""
        if not requests:
            return []
        if self.batching:
            batch = list(requests)
            scores: list[Score] = await self.pool.call(len(batch), lambda b: b.score(batch), _any_failed)
            return scores

        async def one(request: ScoreRequest) -> Score:
            out: list[Score] = await self.pool.call(1, lambda b: b.score([request]), _any_failed)
            return out[0]

        return list(await asyncio.gather(*(one(r) for r in requests)))


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve the outcome of a call abandoned with its replica, so that asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


def _any_failed(scores: list[Score]) -> bool:
    return any(s.value is None for s in scores)


async def _aclose_all(backends: Sequence[Any]) -> None:
    errors = []
    for backend in backends:
        try:
            await backend.aclose()
        except Exception as e:  # one failing to close does not keep the others open
            errors.append(e)
    if errors:
        raise errors[0]
