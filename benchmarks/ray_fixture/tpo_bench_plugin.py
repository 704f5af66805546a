"""A policy backend that takes a fixed service time and serves one call at a time, like a saturated GPU.

Registered as ``fixed`` in ``tpo.backends`` by the dist-info folder beside it: with this folder
on ``PYTHONPATH`` (and, for Ray's actors, in their ``runtime_env``), ``--policy fixed`` and
``--policy ray:fixed`` find it like any installed plugin. Options: ``service_s`` (seconds per
call; with ``batching=true`` seconds per request of a call) and ``batching``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tpo import Generation, GenerationRequest
from tpo.registry import take_options


class FixedTimePolicy:
    """``fixed``: each call holds the model ``service_s`` (× its requests if batching), one call at a time."""

    name = "fixed"
    supports_n = True
    supports_logprobs = False
    description = "A fixed service time per call (benchmarks/ray_fixture)."

    def __init__(self, service_s: float, batching: bool) -> None:
        self.service_s = service_s
        self.batching = batching
        self._busy: asyncio.Lock | None = None

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> FixedTimePolicy:
        """``fixed`` (no target); options ``service_s`` (default 0.02) and ``batching`` (default false)."""
        opts = take_options(options, {"service_s": 0.02, "batching": False}, owner="the fixed benchmark backend")
        return cls(float(opts["service_s"]), bool(opts["batching"]))

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Hold the model for the service time, then answer every request with ``n`` short texts."""
        if self._busy is None:
            self._busy = asyncio.Lock()
        async with self._busy:
            if self.service_s > 0:
                await asyncio.sleep(self.service_s * (len(requests) if self.batching else 1))
        return [Generation(tuple(f"answer {i} to {r.prompt_id}" for i in range(r.n)), 10, 3 * r.n) for r in requests]
