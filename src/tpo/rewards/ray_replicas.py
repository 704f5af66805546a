"""``ray:``: a reward model replicated as Ray actors, on one machine or a cluster.

``--reward ray:hf:sfairXC/FsfairX-LLaMA3-RM-v0.1 --reward-option replicas=8 --reward-option num_gpus=1``
starts eight actors of one GPU each; each loads the reward model once, on the node Ray
places it on. The options of ``tpo._ray.pool.RayOptions`` configure the actors; every other
option goes to the replicated reward model. From Python::

    reward = RayReward.from_spec("hf:./my-rm", replicas=2, num_gpus=1, max_batch_size=16)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._ray.pool import ActorPool, RayOptions
from ..engine._budget import estimate_messages, estimate_tokens
from ..types import ReplicaReport, Score, ScoreRequest

__all__ = ["RayReward"]


def score_cost(request: ScoreRequest) -> float:
    """Tokens a reward model reads for one answer: the conversation and the answer, estimated."""
    return float(estimate_messages(request.messages) + estimate_tokens(request.answer))


class RayReward:
    """Replicas of any reward model as Ray actors; its name and batching are the replicated model's.

    A reward that uses the run's policy (the judge) cannot be replicated itself: replicate the
    model it calls instead (``--reward judge:ray:vllm:MODEL``).
    """

    name = "ray"
    description = "Replicas of another reward model as Ray actors: ray:SPEC, e.g. ray:hf:MODEL (the ray extra)."
    #: ``--ray-address`` reaches this plugin through ``tpo.build_models``.
    server_options = ("ray_address",)
    options_class = RayOptions
    batching = True
    max_batch_size: int | None = None

    def __init__(self, pool: ActorPool) -> None:
        """Wrap started replicas; ``from_spec`` starts them."""
        self._pool = pool
        self.name = str(pool.info["name"])
        self.batching = bool(pool.info["batching"])

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> RayReward:
        """``ray:SPEC``: start the replicas of the reward model ``SPEC`` and wait until each has built it."""
        return cls(ActorPool.start("reward", target, options))

    def __repr__(self) -> str:
        return f"RayReward({self._pool.spec!r}, replicas={self._pool.options.replicas})"

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """One ``Score`` per request, in order, from whichever replicas were free."""
        costs = [score_cost(r) for r in requests]
        return await self._pool.run("score", requests, costs, lambda r: 1)

    async def preflight(self) -> None:
        """The replicated reward model's pre-flight check, on every replica."""
        await self._pool.preflight()

    async def aclose(self) -> None:
        """Let each replica close its reward model, then end the actors."""
        await self._pool.aclose()

    def replica_reports(self) -> list[ReplicaReport]:
        """Each replica's share of the work so far."""
        return self._pool.reports()
