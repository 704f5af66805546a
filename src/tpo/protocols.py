"""The two interfaces tpo's engine talks to: a policy backend and a reward model.

Both are batch-shaped. Capabilities are attributes, not subclasses:

* ``batching = True``: the backend runs a whole batch together (vLLM, a GPU reward model,
  llama.cpp in-process); the engine gathers every request that is ready and hands them over
  in one call, one call at a time.
* ``batching = False``: requests are independent (an HTTP server); the engine calls with one
  request at a time, concurrently, and the backend limits what it keeps in flight.

A backend or reward model only needs what ``PolicyBackend`` and ``RewardModel`` list. The
engine also uses these members when an object has them (see ``KnowsContextWindow``,
``CountsTokens`` and ``ClosesPerLoop`` for their exact signatures):

* ``async context_window() -> int | None``: the model's context window in tokens, so that
  every request is fitted into it (without it, ``TPOConfig.context_window`` or 8192).
* ``count_tokens(messages) -> int | None``: exact prompt token counts for fitting (without
  it, a conservative estimate).
* ``max_batch_size: int | None``: on a batching backend or reward model, the most requests
  one call may carry; more wait for the next call. ``None`` (or no attribute): no limit.
* ``parameter_count: float | None``: on a policy backend, its model's number of parameters,
  for the FLOPs estimates in ``Usage`` (``TPOConfig.policy_params`` and ``critic_params``
  take precedence). ``None`` (or no attribute): unknown, and no estimates are made.
* ``async aclose()``: release what the object holds. The engine never calls it; the caller
  owns the objects, except as follows.
* ``parts``: a wrapper (a weighted or cached reward, a judge) lists the objects it wraps, so
  closing per-loop connections and the pre-flight checks reach them.
* ``async preflight()``: a cheap check, made once before a run's first prompt
  (``tpo.api.apreflight``), of what would otherwise fail every prompt: a server that does
  not answer, a key it refuses, a reward function with the wrong parameters. It raises the
  error the run would have met (``BackendError``, ``RewardError``, ``ConfigError``) and must
  not change any result; whatever cannot be checked cheaply is left to the run.
* ``closes_per_loop = True``: ``aclose()`` only releases what belongs to the running event
  loop (HTTP connections) and the object opens them again when used on another loop. The
  synchronous ``tpo.optimize`` and ``tpo.optimize_many`` run a private event loop each, and
  call ``aclose()`` at its end on the policy, critic and reward that declare this. Backends
  whose ``aclose()`` frees a model (llama.cpp, Transformers, vLLM in-process) must not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .types import Generation, GenerationRequest, Message, Score, ScoreRequest

__all__ = ["ClosesPerLoop", "CountsTokens", "KnowsContextWindow", "PolicyBackend", "Preflights", "RewardModel"]


@runtime_checkable
class PolicyBackend(Protocol):
    """Generates answers. Implement ``generate``; the rest are capability attributes.

    The optional members the engine uses when present (``context_window``,
    ``count_tokens``, ``max_batch_size``, ``closes_per_loop``, ``aclose``) are described in
    this module's docstring.
    """

    #: A short label for logs and results, e.g. ``"llamacpp:SmolLM2-135M-Instruct"``.
    name: str
    #: True when the backend prefers whole batches of requests in one ``generate`` call.
    batching: bool
    #: True when one request with ``n > 1`` yields ``n`` samples natively.
    supports_n: bool
    #: True when ``GenerationRequest.logprobs`` is honoured.
    supports_logprobs: bool

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Return one ``Generation`` per request, in order. Raise ``BackendError`` on failure."""
        ...


@runtime_checkable
class KnowsContextWindow(Protocol):
    """Optional for a policy backend: it can tell its model's context window."""

    async def context_window(self) -> int | None:
        """The model's context window in tokens, or ``None`` when unknown."""
        ...


@runtime_checkable
class CountsTokens(Protocol):
    """Optional for a policy backend: it can count prompt tokens exactly."""

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Tokens the conversation takes as a prompt (chat template included), or ``None``."""
        ...


@runtime_checkable
class ClosesPerLoop(Protocol):
    """Optional for a backend or reward model: connections tied to one event loop, reopened on reuse."""

    #: True: ``aclose()`` releases only what belongs to the running event loop; the object stays usable.
    closes_per_loop: bool

    async def aclose(self) -> None:
        """Close the connections of the running event loop; the next use opens new ones."""
        ...


@runtime_checkable
class Preflights(Protocol):
    """Optional for a backend or reward model: a cheap check before a run's first prompt."""

    async def preflight(self) -> None:
        """Raise the error every request would meet (server unreachable, key refused, wrong signature)."""
        ...


@runtime_checkable
class RewardModel(Protocol):
    """Scores answers. Implement ``score``; ``batching`` says how it likes to be called.

    ``max_batch_size``, ``closes_per_loop`` and ``aclose`` are optional, as for a policy backend.
    """

    name: str
    batching: bool

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Return one ``Score`` per request, in order.

        A single answer that cannot be scored is returned as ``Score.failed(...)``. Raising
        ``RewardError`` fails every request of the call: on a non-batching reward model
        (called with one request at a time) that is just the one answer.
        """
        ...
