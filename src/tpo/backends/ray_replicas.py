"""``ray:``: a policy backend replicated as Ray actors, on one machine or a cluster.

``--policy ray:vllm:Qwen/Qwen2.5-72B-Instruct --policy-option replicas=4 --policy-option num_gpus=4
--policy-option tensor_parallel_size=4`` starts four actors of four GPUs each; each builds
``vllm:Qwen/Qwen2.5-72B-Instruct`` (with ``tensor_parallel_size=4``) once, on the node Ray
places it on. The options of ``RayOptions`` configure the actors; every other option goes to
the replicated backend. ``tpo._ray.pool`` spreads the engine's batches over the replicas and
re-sends the requests of a replica that dies. From Python::

    policy = RayPolicy.from_spec("vllm:Qwen/Qwen2.5-7B-Instruct", replicas=2, num_gpus=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._ray.pool import ActorPool, RayOptions
from ..engine._budget import estimate_messages
from ..types import Generation, GenerationRequest, ReplicaReport

__all__ = ["RayPolicy"]


def generation_cost(request: GenerationRequest) -> float:
    """Tokens a request may take: its prompt, estimated, and ``n`` answers of ``max_tokens``."""
    return float(estimate_messages(request.messages) + request.n * request.sampling.max_tokens)


class RayPolicy:
    """Replicas of any policy backend as Ray actors; capabilities and name are the replicated backend's.

    A batching backend (vLLM, Transformers, llama.cpp) receives chunks of each batch, balanced
    by estimated tokens; a non-batching one receives each request at the replica with the
    fewest tokens in flight. Prompt tokens are not counted exactly (that would cost a round
    trip per request): the engine estimates them, conservatively.
    """

    name = "ray"
    description = "Replicas of another policy backend as Ray actors: ray:SPEC, e.g. ray:vllm:MODEL (the ray extra)."
    #: ``--ray-address`` reaches this plugin through ``tpo.build_models``, as ``--base-url`` reaches a server's.
    server_options = ("ray_address",)
    options_class = RayOptions
    batching = True
    supports_n = True
    supports_logprobs = False
    max_batch_size: int | None = None

    def __init__(self, pool: ActorPool) -> None:
        """Wrap started replicas; ``from_spec`` starts them."""
        self._pool = pool
        info = pool.info
        self.name = str(info["name"])
        self.batching = bool(info["batching"])
        self.supports_n = bool(info["supports_n"])
        self.supports_logprobs = bool(info["supports_logprobs"])
        self._window = info.get("context_window")

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> RayPolicy:
        """``ray:SPEC``: start the replicas of the policy ``SPEC`` and wait until each has built it."""
        return cls(ActorPool.start("policy", target, options))

    def __repr__(self) -> str:
        return f"RayPolicy({self._pool.spec!r}, replicas={self._pool.options.replicas})"

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One ``Generation`` per request, in order, from whichever replicas were free."""
        costs = [generation_cost(r) for r in requests]
        return await self._pool.run("generate", requests, costs, lambda r: int(r.n))

    async def context_window(self) -> int | None:
        """The replicated backend's context window (the smallest any replica reported)."""
        return self._window

    async def preflight(self) -> None:
        """The replicated backend's pre-flight check, on every replica."""
        await self._pool.preflight()

    async def aclose(self) -> None:
        """Let each replica close its backend, then end the actors."""
        await self._pool.aclose()

    def replica_reports(self) -> list[ReplicaReport]:
        """Each replica's share of the work so far."""
        return self._pool.reports()
