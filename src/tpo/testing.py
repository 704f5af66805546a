"""Deterministic test doubles for tpo and for plugin authors: a scripted policy, a function reward, and a switch.

Both doubles record every call. Neither touches a model, so tests that use them are fast and exact::

    policy = ScriptedPolicy()                       # sensible replies for every role
    reward = FunctionReward(lambda messages, answer: len(answer))
    result = tpo.optimize("Hi", policy=policy, reward=reward, width=3, depth=1)
    assert policy.requests[0].purpose == "sample"
    assert policy.violations == []                  # the engine kept the backend's contract

``forbid_real_requests()`` makes every real backend refuse to load a model or send a request,
so a test suite cannot reach a real model by mistake.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

from . import _guard
from .engine._budget import estimate_messages
from .errors import ConfigError
from .types import Generation, GenerationRequest, Message, Score, ScoreRequest

__all__ = ["FunctionReward", "ScriptedPolicy", "default_reply", "forbid_real_requests", "real_requests_allowed"]

Reply = str | Sequence[str]
ReplyFn = Callable[[GenerationRequest], Reply]


def default_reply(request: GenerationRequest, counter: Iterable[int] | None = None) -> list[str]:
    """Plausible, distinct replies for any request: samples, critiques, feedback and tagged rewrites."""
    numbers = iter(counter) if counter is not None else itertools.count()
    out = []
    for _ in range(request.n):
        k = next(numbers)
        if request.purpose == "sample":
            out.append(f"Answer {k} to prompt {request.prompt_id}.")
        elif request.purpose == "loss":
            out.append(f"Critique {k}: the chosen answer is clearer but could be more specific.")
        elif request.purpose == "gradient":
            out.append(f"Feedback {k}: add a concrete example and remove filler.")
        elif request.purpose == "update":
            tag = _update_tag(request)
            out.append(f"<{tag}>Improved answer {k} (step {request.step}) to prompt {request.prompt_id}.</{tag}>")
        else:
            out.append(f"Reply {k}.")
    return out


def _update_tag(request: GenerationRequest) -> str:
    import re

    m = re.search(r"between <([A-Za-z][A-Za-z0-9_\-]*)>", request.messages[-1].content)
    return m.group(1) if m else "improved_reply"


class ScriptedPolicy:
    """A policy backend whose replies come from a script, recording every request.

    ``replies``: a queue of strings, one per generated sequence, taken in order of the
    requests received; or a function of the request returning one string or a list of ``n``.
    With neither, ``default_reply`` answers. ``latency_s`` (a number, or a function of the
    request) delays each request to simulate a slow model. ``batching``, ``max_batch_size``
    and the other capability attributes are settable so tests can play any kind of backend.

    The policy also checks the engine's side of the contract: with a ``window``, every
    request must fit it (prompt tokens plus ``max_tokens``); with a queue of replies, the
    queue must not run out. A breach is appended to ``violations`` and raised as
    ``AssertionError``, which the engine reports as a failed prompt; a test asserts
    ``policy.violations == []`` to see it as what it is.
    """

    def __init__(
        self,
        replies: Iterable[str] | ReplyFn | None = None,
        *,
        batching: bool = False,
        supports_n: bool = True,
        supports_logprobs: bool = False,
        window: int | None = None,
        tokens: Callable[[Sequence[Message]], int] | None = None,
        latency_s: float | Callable[[GenerationRequest], float] = 0.0,
        name: str = "scripted",
        max_batch_size: int | None = None,
    ) -> None:
        self.name = name
        self.batching = batching
        self.supports_n = supports_n
        self.supports_logprobs = supports_logprobs
        self.max_batch_size = max_batch_size
        self._window = window
        self._tokens = tokens
        self._latency = latency_s
        self._fn: ReplyFn | None = None
        self._queue: deque[str] | None = None
        if callable(replies):
            self._fn = replies
        elif replies is not None:
            if isinstance(replies, str):
                raise ConfigError("ScriptedPolicy(replies=...) takes a list of strings or a function, not one string")
            self._queue = deque(replies)
        self._counter = itertools.count()
        #: Every call to ``generate``: one list of requests per call.
        self.calls: list[list[GenerationRequest]] = []
        #: Every breach of the backend contract seen (a request beyond the window, the script run out).
        self.violations: list[str] = []

    @property
    def requests(self) -> list[GenerationRequest]:
        """Every request received, in order."""
        return [r for call in self.calls for r in call]

    def requests_for(self, purpose: str) -> list[GenerationRequest]:
        """The requests of one purpose (``"sample"``, ``"loss"``, ``"gradient"``, ``"update"``, ``"judge"``)."""
        return [r for r in self.requests if r.purpose == purpose]

    async def context_window(self) -> int | None:
        """The ``window`` given to the constructor (``None``: unknown)."""
        return self._window

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """The ``tokens`` function's count, or ``None`` without one (the engine then estimates)."""
        return self._tokens(messages) if self._tokens is not None else None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Record the call, wait the latency, and answer every request from the script."""
        self.calls.append(list(requests))
        delays = [self._latency(r) if callable(self._latency) else self._latency for r in requests]
        if max(delays, default=0) > 0:
            await asyncio.sleep(max(delays))
        return [self._answer(r) for r in requests]

    def _answer(self, request: GenerationRequest) -> Generation:
        if self._window is not None:
            used = self.count_tokens(request.messages) or estimate_messages(request.messages)
            if used + request.sampling.max_tokens > self._window:
                self._violation(
                    f"a {request.purpose!r} request of {used} prompt tokens + {request.sampling.max_tokens} new tokens "
                    f"exceeds the window of {self._window}"
                )
        if self._fn is not None:
            out = self._fn(request)
            texts = [out] if isinstance(out, str) else list(out)
        elif self._queue is not None:
            texts = []
            for _ in range(request.n):
                if not self._queue:
                    self._violation(f"ScriptedPolicy ran out of scripted replies at a {request.purpose!r} request")
                texts.append(self._queue.popleft())
        else:
            texts = default_reply(request, self._counter)
        prompt_tokens = estimate_messages(request.messages)
        completion_tokens = sum(max(1, len(t) // 4) for t in texts)
        return Generation(tuple(texts), prompt_tokens, completion_tokens, tuple("stop" for _ in texts))

    def _violation(self, message: str) -> None:
        # Recorded as well as raised: the engine turns the AssertionError into a failed prompt.
        self.violations.append(message)
        raise AssertionError(message)


class FunctionReward:
    """A reward model from a function, recording every call.

    ``fn(messages, answer) -> float`` (``messages`` as a tuple of ``tpo.Message``), or with
    ``batched=True`` ``fn(list_of_messages, list_of_answers) -> list[float]``. The function
    may be async. Raising inside it records a failed score for that answer (or batch).
    ``max_batch_size`` caps the answers per call on a batching reward.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        batched: bool = False,
        batching: bool | None = None,
        name: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        self._fn = fn
        self._batched = batched
        self.batching = batched if batching is None else batching
        self.max_batch_size = max_batch_size
        self.name: str = name or str(getattr(fn, "__name__", "function"))
        #: Every call to ``score``: one list of requests per call.
        self.calls: list[list[ScoreRequest]] = []

    @property
    def requests(self) -> list[ScoreRequest]:
        """Every score request received, in order."""
        return [r for call in self.calls for r in call]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Record the call and score every request with the function; its failures become failed scores."""
        self.calls.append(list(requests))
        if self._batched:
            try:
                values = await _maybe_await(self._fn([r.messages for r in requests], [r.answer for r in requests]))
            except Exception as e:  # the user's function: its failure is data, not a crash
                return [Score.failed(f"{type(e).__name__}: {e}")] * len(requests)
            values = list(values)
            if len(values) != len(requests):
                return [Score.failed(f"the function returned {len(values)} scores for {len(requests)} answers")] * len(
                    requests
                )
            return [_to_score(v) for v in values]
        out = []
        for r in requests:
            try:
                out.append(_to_score(await _maybe_await(self._fn(r.messages, r.answer))))
            except Exception as e:
                out.append(Score.failed(f"{type(e).__name__}: {e}"))
        return out


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _to_score(value: Any) -> Score:
    if isinstance(value, Score):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Score.failed(f"the function returned {type(value).__name__} {value!r}, not a number")
    return Score(float(value))


class forbid_real_requests:  # lower case: called like a function, as contextlib.suppress is
    """Forbid (or with ``False``, allow) real model requests: backends then raise ``ConfigError``.

    Called plainly it sets the switch for the rest of the process::

        tpo.testing.forbid_real_requests()

    As a context manager it restores the previous setting on exit::

        with tpo.testing.forbid_real_requests():
            ...  # only test doubles work here
        with tpo.testing.forbid_real_requests(False):
            ...  # real backends allowed again for this block

    Real backends call ``tpo._guard.check_real_request_allowed(name)`` before they load a
    model or send a request; the test doubles here never do.
    """

    def __init__(self, forbid: bool = True) -> None:
        self._previous = _guard.set_real_requests_allowed(not forbid)

    def __enter__(self) -> forbid_real_requests:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _guard.set_real_requests_allowed(self._previous)


def real_requests_allowed() -> bool:
    """True unless real model requests are currently forbidden."""
    return _guard.real_requests_allowed()
