"""Reward combinators: a weighted sum of several rewards, and a cache that never scores the same pair twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, TPOError
from ..options import check_value, integer, one_of
from ..protocols import RewardModel
from ..types import Score, ScoreRequest

__all__ = ["NORMALIZATIONS", "CachedReward", "WeightedReward"]

#: How ``WeightedReward`` can put its components on one scale before weighting them.
NORMALIZATIONS = ("none", "zscore", "minmax")


@dataclass(frozen=True)
class _Reference:
    """The fixed affine map of one component for one prompt: ``(raw - offset) / scale``."""

    offset: float
    scale: float

    def apply(self, raw: float) -> float:
        return (raw - self.offset) / self.scale


class WeightedReward:
    """Scores each answer with several rewards at once and returns their weighted sum.

    ``weights`` default to equal weights that sum to 1; negative weights are allowed (a
    penalty). The components are called concurrently; one that batches gets the whole batch
    in one call, one that does not gets one call per answer, all in flight together. When any
    component fails for an answer, the combined score fails with every component's error;
    ``details["components"]`` carries every component's raw (and normalised) score.

    ``normalize`` puts the components on one scale before weighting, per prompt (requests
    are grouped by ``prompt_id``):

    * ``"none"``: raw scores.
    * ``"zscore"``: ``(raw - mean) / std``.
    * ``"minmax"``: ``(raw - min) / (max - min)``.

    The statistics come from the *first* batch of a prompt's answers that a component scores
    successfully (when the engine drives it, the prompt's N initial samples, which arrive in
    one call because normalising makes this reward ``batching``) and are then frozen for
    that prompt. Every later answer of the prompt goes through the same map, so the combined
    score is one fixed linear function of the raw scores for the whole prompt: answers from
    different steps stay comparable, which selection over the whole candidate store needs
    (re-normalising each step's batch on its own would make a step's best look as good as
    the best overall). Later answers can therefore fall outside [0, 1] or have |z| > 3. A
    reference without spread (one answer, or all equal) uses scale 1, i.e. the raw
    differences. The references of the last ``max_prompts`` prompts are kept.

    The references live in this object only, so a prompt resumed from a checkpoint in a new
    process would get a new reference from its next batch, and its earlier and later scores
    would be on different scales. ``per_prompt_state`` (True when normalising) says so to
    whoever resumes: ``tpo batch`` then restarts such a prompt from its first step instead
    of continuing it mid-way.
    """

    supports_n = False
    supports_logprobs = False
    description = "Several rewards combined by weights, optionally normalised per prompt."

    def __init__(
        self,
        rewards: Sequence[RewardModel],
        *,
        weights: Sequence[float] | None = None,
        normalize: str = "none",
        name: str | None = None,
        max_prompts: int = 100_000,
    ) -> None:
        rewards = list(rewards)
        if not rewards:
            raise ConfigError("WeightedReward needs at least one reward")
        for i, r in enumerate(rewards):
            if not callable(getattr(r, "score", None)):
                raise ConfigError(f"reward {i} ({type(r).__name__}) has no score() method")
        if weights is None:
            weights = [1.0 / len(rewards)] * len(rewards)
        weights = list(weights)
        if len(weights) != len(rewards):
            raise ConfigError(
                f"{len(weights)} reward weight(s) for {len(rewards)} rewards; give one weight per reward, in order"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"reward weights must be finite numbers, not {w!r}")
        if not any(w != 0 for w in weights):
            raise ConfigError("at least one reward weight must be non-zero")
        normalize = check_value("normalize", normalize, one_of(*NORMALIZATIONS), owner="WeightedReward")
        max_prompts = check_value("max_prompts", max_prompts, integer(min=1), owner="WeightedReward")
        self.rewards = rewards
        self.weights = [float(w) for w in weights]
        self.normalize = normalize
        self.max_prompts = max_prompts
        self.batching = normalize != "none" or any(bool(getattr(r, "batching", False)) for r in rewards)
        #: A score depends on what this object saw of the prompt before (its normalisation reference),
        #: so a prompt cannot be resumed mid-way in another process with comparable scores.
        self.per_prompt_state = normalize != "none"
        names = [str(getattr(r, "name", type(r).__name__)) for r in rewards]
        self._names = names
        self.name = name or " + ".join(f"{w:g}*{n}" for w, n in zip(self.weights, names, strict=True))
        # prompt id -> one reference per component (None until that component has scored one)
        self._references: OrderedDict[str, list[_Reference | None]] = OrderedDict()

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """The weighted sum per request; failed when any component failed for it."""
        requests = list(requests)
        if not requests:
            return []
        columns = await asyncio.gather(*(self._component(r, requests) for r in self.rewards))
        normalized = self._normalize(requests, columns) if self.normalize != "none" else None
        out = []
        for i in range(len(requests)):
            parts = []
            errors = []
            total = 0.0
            for k, name in enumerate(self._names):
                s = columns[k][i]
                part: dict[str, Any] = {"name": name, "weight": self.weights[k], "value": s.value}
                if s.error is not None or s.value is None:
                    part["error"] = s.error or "no score"
                    errors.append(f"{name}: {part['error']}")
                else:
                    value = s.value
                    scaled = normalized[k][i] if normalized is not None else None
                    if scaled is not None:
                        value = part["normalized"] = scaled
                    total += self.weights[k] * value
                if s.details:
                    part["details"] = dict(s.details)
                parts.append(part)
            details = {"components": parts}
            if errors:
                out.append(Score.failed("; ".join(errors), details))
            elif not math.isfinite(total):
                out.append(Score.failed(f"the weighted sum is not finite ({total})", details))
            else:
                out.append(Score(total, details=details))
        return out

    @property
    def parts(self) -> tuple[RewardModel, ...]:
        """The component rewards (so per-loop connections inside them can be closed)."""
        return tuple(self.rewards)

    async def aclose(self) -> None:
        """Close every component that holds resources."""
        for r in self.rewards:
            close = getattr(r, "aclose", None)
            if close is not None:
                await close()

    async def _component(self, reward: RewardModel, requests: list[ScoreRequest]) -> list[Score]:
        """One component's scores; its failure becomes failed scores, so the other components still count."""
        label = str(getattr(reward, "name", type(reward).__name__))
        try:
            if getattr(reward, "batching", False) or len(requests) == 1:
                scores = list(await reward.score(requests))
                if len(scores) != len(requests):
                    return [Score.failed(f"returned {len(scores)} scores for {len(requests)} answers")] * len(requests)
                return scores
            parts = await asyncio.gather(*(reward.score([r]) for r in requests), return_exceptions=True)
        except TPOError as e:
            return [Score.failed(f"{type(e).__name__}: {e}")] * len(requests)
        except Exception as e:  # a component that let a third-party error escape
            return [Score.failed(f"{label} failed: {type(e).__name__}: {e}")] * len(requests)
        out = []
        for part in parts:
            if isinstance(part, BaseException):
                if not isinstance(part, Exception):
                    raise part
                out.append(Score.failed(f"{type(part).__name__}: {part}"))
            elif len(part) != 1:
                out.append(Score.failed(f"returned {len(part)} scores for 1 answer"))
            else:
                out.append(part[0])
        return out

    def _normalize(self, requests: list[ScoreRequest], columns: list[list[Score]]) -> list[list[float | None]]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.prompt_id, []).append(i)
        out: list[list[float | None]] = [[None] * len(requests) for _ in self.rewards]
        for prompt_id, rows in groups.items():
            refs = self._references.get(prompt_id)
            if refs is None:
                refs = [None] * len(self.rewards)
                self._references[prompt_id] = refs
                while len(self._references) > self.max_prompts:
                    self._references.popitem(last=False)
            else:
                self._references.move_to_end(prompt_id)
            for k in range(len(self.rewards)):
                values = {
                    i: float(v) for i in rows if columns[k][i].error is None and (v := columns[k][i].value) is not None
                }
                if not values:
                    continue
                ref = refs[k]
                if ref is None:
                    ref = refs[k] = self._reference(list(values.values()))
                for i, v in values.items():
                    out[k][i] = ref.apply(v)
        return out

    def _reference(self, values: list[float]) -> _Reference:
        if self.normalize == "zscore":
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            return _Reference(mean, std if std > 1e-12 else 1.0)
        low, high = min(values), max(values)
        return _Reference(low, high - low if high - low > 1e-12 else 1.0)


class CachedReward:
    """Remembers the scores of a reward so that the same (conversation, answer) is scored once.

    The key is a hash of the conversation, the answer and the prompt's metadata (a verifier's
    score depends on the reference answer in it). Only successful scores are kept, so a
    failure is retried the next time; the ``max_entries`` most recently used are kept. Two
    concurrent requests for the same key share one scoring. The wrapper batches like the
    reward it wraps, and passes on only the requests it has no score for.

    Put it around a component, not around a normalising ``WeightedReward``, whose scores
    depend on the prompt they were normalised for.
    """

    supports_n = False
    supports_logprobs = False
    description = "Caches another reward's scores by (conversation, answer)."

    def __init__(self, reward: RewardModel, *, max_entries: int = 100_000) -> None:
        if not callable(getattr(reward, "score", None)):
            raise ConfigError(f"CachedReward needs a reward with a score() method, got {type(reward).__name__}")
        max_entries = check_value("max_entries", max_entries, integer(min=1), owner="CachedReward")
        self.reward = reward
        self.max_entries = max_entries
        self.name = str(getattr(reward, "name", type(reward).__name__))
        self.batching = bool(getattr(reward, "batching", False))
        self._cache: OrderedDict[bytes, Score] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Score]] = {}
        #: Requests answered from the cache, and requests passed to the wrapped reward.
        self.hits = 0
        self.misses = 0

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Cached scores where known; the rest from the wrapped reward, in one call."""
        keys = [_key(r) for r in requests]
        out: list[Score | None] = [None] * len(requests)
        waits: dict[int, asyncio.Future[Score]] = {}
        mine: dict[bytes, asyncio.Future[Score]] = {}
        todo: list[int] = []
        for i, key in enumerate(keys):
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                out[i] = cached
                self.hits += 1
            elif key in self._inflight:
                waits[i] = self._inflight[key]
                self.hits += 1
            else:
                fut: asyncio.Future[Score] = asyncio.get_running_loop().create_future()
                self._inflight[key] = mine[key] = fut
                todo.append(i)
        if todo:
            self.misses += len(todo)
            try:
                scores = list(await self.reward.score([requests[i] for i in todo]))
                if len(scores) != len(todo):
                    scores = [Score.failed(f"{self.name} returned {len(scores)} scores for {len(todo)} answers")] * len(
                        todo
                    )
            except BaseException as e:
                for key, fut in mine.items():
                    self._inflight.pop(key, None)
                    if fut.done():
                        continue
                    if isinstance(e, asyncio.CancelledError):
                        fut.cancel()
                    else:
                        fut.set_exception(e)
                        fut.exception()  # retrieved here, so an unshared future does not warn
                raise
            for i, s in zip(todo, scores, strict=True):
                out[i] = s
                fut = mine[keys[i]]
                self._inflight.pop(keys[i], None)
                if not fut.done():
                    fut.set_result(s)
                if s.error is None and s.value is not None:
                    self._cache[keys[i]] = s
                    while len(self._cache) > self.max_entries:
                        self._cache.popitem(last=False)
        # The same key twice in one call, or a key another call is scoring.
        for i in range(len(requests)):
            if out[i] is None:
                out[i] = await (waits[i] if i in waits else mine[keys[i]])
        return [s for s in out if s is not None]

    @property
    def parts(self) -> tuple[RewardModel, ...]:
        """The wrapped reward (so per-loop connections inside it can be closed)."""
        return (self.reward,)

    async def aclose(self) -> None:
        """Close the wrapped reward."""
        close = getattr(self.reward, "aclose", None)
        if close is not None:
            await close()


def _key(request: ScoreRequest) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for m in request.messages:
        h.update(json.dumps([m.role, m.content]).encode("utf-8", "surrogatepass"))
    h.update(b"\x00answer\x00")
    h.update(request.answer.encode("utf-8", "surrogatepass"))
    h.update(b"\x00metadata\x00")
    h.update(_canonical(request.metadata))
    return h.digest()


def _canonical(metadata: Mapping[str, Any]) -> bytes:
    if not metadata:
        return b"{}"
    try:
        return json.dumps(metadata, sort_keys=True, default=repr).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):  # keys that cannot be sorted together
        return repr(sorted(metadata.items(), key=lambda kv: repr(kv[0]))).encode("utf-8", "surrogatepass")
