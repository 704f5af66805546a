"""A judge reward that grades each prompt against the rubric its request gave (``tpo.prefer``), or its own."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from ..rewards.judge import JudgeReward
from ..types import Score, ScoreRequest

#: The metadata key a prompt's own rubric travels under (the server sets it from ``tpo.prefer``).
RUBRIC_KEY = "prefer"


class RubricRouter:
    """Routes each answer to a judge with its prompt's rubric; one batch may mix rubrics.

    The judges share the default judge's backend. The ``max_rubrics`` most recently used are kept.
    """

    def __init__(self, judge: JudgeReward, *, max_rubrics: int = 256) -> None:
        self.judge = judge
        self.name = judge.name
        self.batching = judge.batching
        self.max_batch_size = judge.max_batch_size
        self.parts = (judge,)
        self._judges: OrderedDict[str, JudgeReward] = OrderedDict()
        self._max = max_rubrics

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            rubric = r.metadata.get(RUBRIC_KEY)
            groups.setdefault(rubric if isinstance(rubric, str) else None, []).append(i)
        keys = list(groups)
        parts = await asyncio.gather(*(self._judge(k).score([requests[i] for i in groups[k]]) for k in keys))
        out: list[Score] = [Score.failed("not scored")] * len(requests)
        for key, scores in zip(keys, parts, strict=True):
            for i, score in zip(groups[key], scores, strict=True):
                out[i] = score
        return out

    def _judge(self, rubric: str | None) -> JudgeReward:
        if rubric is None:
            return self.judge
        judge = self._judges.get(rubric)
        if judge is None:
            judge = self._judges[rubric] = self.judge.with_rubric(rubric)
            while len(self._judges) > self._max:
                self._judges.popitem(last=False)
        else:
            self._judges.move_to_end(rubric)
        return judge
