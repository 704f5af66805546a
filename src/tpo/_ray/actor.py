"""The Ray actor behind one replica: it builds a backend or reward model from its spec and serves calls to it.

This module runs inside Ray's worker processes (Ray imports it there by name), and in the
driver only when the ``ray:`` plugins start replicas; it imports nothing from Ray itself.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..types import Generation, GenerationRequest, Score, ScoreRequest

Kind = Literal["policy", "reward"]


class ReplicaActor:
    """Builds ``spec`` with ``options`` once, on the node Ray placed it on, and serves calls to what it built.

    A build failure is kept, not raised: Ray would report it as the actor's death, without
    the exception, so ``describe`` raises it instead, as itself, for the driver to show. When
    Ray restarts the actor after a crash, this constructor runs again and builds anew.
    Calls to a batching model are served one at a time (it expects whole batches, never two
    at once); a non-batching one gets each request as a call of its own, concurrently.
    """

    def __init__(self, kind: Kind, spec: str, options: Mapping[str, Any]) -> None:
        self._kind = kind
        self._spec = spec
        self._error: BaseException | None = None
        self._model: Any = None
        try:
            from ..registry import policy_from_spec, reward_from_spec

            build = policy_from_spec if kind == "policy" else reward_from_spec
            self._model = build(spec, **dict(options))
        except Exception as e:  # reported by describe(), with its type and message intact
            self._error = e
        self._lock = asyncio.Lock()

    async def describe(self) -> dict[str, Any]:
        """What the driver needs to know of the model: its name, capabilities and context window; or the build error."""
        if self._error is not None:
            raise self._error
        model = self._model
        window = None
        getter = getattr(model, "context_window", None)
        if self._kind == "policy" and callable(getter):
            window = await getter()
        return {
            "name": str(getattr(model, "name", self._spec)),
            "batching": bool(getattr(model, "batching", False)),
            "supports_n": bool(getattr(model, "supports_n", False)),
            "supports_logprobs": bool(getattr(model, "supports_logprobs", False)),
            "max_batch_size": getattr(model, "max_batch_size", None),
            "context_window": window,
            "preflights": callable(getattr(model, "preflight", None)),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    async def ready(self) -> bool:
        """True once built: what the driver asks a restarted replica before sending it work again."""
        if self._error is not None:
            raise self._error
        return True

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The policy's ``generate``, batched as the policy likes."""
        return await self._serve("generate", requests)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """The reward model's ``score``, batched as the reward model likes."""
        return await self._serve("score", requests)

    async def preflight(self) -> None:
        """The model's own pre-flight check, when it has one."""
        check = getattr(self._model, "preflight", None)
        if check is not None:
            await check()

    async def close(self) -> None:
        """Release what the model holds (``aclose``), before the driver ends the actor."""
        close = getattr(self._model, "aclose", None)
        if close is not None:
            await close()

    async def _serve(self, method: str, requests: Sequence[Any]) -> list[Any]:
        if self._error is not None:
            raise self._error
        if not requests:
            return []
        call = getattr(self._model, method)
        if not getattr(self._model, "batching", False):
            parts = await asyncio.gather(*(call([r]) for r in requests))
            return [out for part in parts for out in part]
        # The pool never sends more than the model's max_batch_size (``describe``) in one call.
        async with self._lock:
            out: list[Any] = await call(list(requests))
        return out
