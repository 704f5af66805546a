"""The two interfaces tpo's engine talks to: a policy backend and a reward model.

Both are batch-shaped. Capabilities are attributes, not subclasses:

* ``batching = True``: the backend runs a whole batch together (vLLM, a GPU reward model,
  llama.cpp in-process); the engine gathers every request that is ready and hands them over
  in one call, one call at a time.
* ``batching = False``: requests are independent (an HTTP server); the engine calls with one
  request at a time, concurrently, and the backend limits what it keeps in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .types import Generation, GenerationRequest, Message, Score, ScoreRequest

__all__ = ["PolicyBackend", "RewardModel"]


@runtime_checkable
class PolicyBackend(Protocol):
    """Generates answers. Implement ``generate``; the rest are capability attributes."""

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

    async def context_window(self) -> int | None:
        """The model's context window in tokens, or ``None`` when unknown."""
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Tokens the conversation takes as a prompt (chat template included), or ``None``."""
        ...


@runtime_checkable
class RewardModel(Protocol):
    """Scores answers. Implement ``score``; ``batching`` says how it likes to be called."""

    name: str
    batching: bool

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Return one ``Score`` per request, in order.

        A single answer that cannot be scored is returned as ``Score.failed(...)``; raising
        ``RewardError`` fails every request of the call.
        """
        ...
