"""The candidate store: every scored answer of one prompt, with its lineage, and selection over it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

__all__ = ["Candidate", "CandidateStore", "answer_id"]

Origin = Literal["sample", "tagged", "unclosed", "unopened", "untagged"]


def answer_id(text: str) -> str:
    """A stable id for an answer: the first 16 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One answer in the store.

    ``parent_id`` is the chosen answer it was rewritten from (``None`` for initial samples);
    the critique and feedback that produced it are in the step record of ``step``.
    ``score`` is ``None`` when scoring failed; ``score_error`` then says why.
    ``score_details`` is what the reward model said besides the number (a judge's reasoning,
    the components of a weighted reward, a verifier's extracted answer), made JSON-safe:
    keys become strings, tuples lists, and any value JSON cannot hold (an object, NaN) its ``str``.
    """

    id: str
    text: str
    score: float | None
    step: int
    parent_id: str | None = None
    origin: Origin = "sample"
    score_error: str | None = None
    finish_reason: str | None = None
    # Excluded from the hash (a mapping has none); equality still compares it.
    score_details: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.score_details is not None:
            details = _json_safe(self.score_details)
            object.__setattr__(self, "score_details", details if isinstance(details, dict) else {"details": details})

    @property
    def scored(self) -> bool:
        """True when the candidate has a score and so takes part in selection."""
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the candidate: every field by name (see ``docs/result-schema.md``)."""
        # A fresh copy of the details, so that changing the dict does not change the candidate.
        return {
            f.name: _json_safe(getattr(self, f.name)) if f.name == "score_details" else getattr(self, f.name)
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidate:
        """Rebuild a candidate from ``to_dict()``; optional fields missing from ``d`` take their defaults."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in d:
                kwargs[f.name] = d[f.name]
            elif f.default is MISSING and f.name != "score":
                raise KeyError(f.name)
        kwargs.setdefault("score", None)
        return cls(**kwargs)


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: what JSON cannot hold becomes its ``str``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # strict JSON has no NaN or infinity
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


class CandidateStore:
    """Unique answers of one prompt, keyed by content hash, in the order they were first seen.

    Selection is deterministic: among equal scores, the answer seen first wins, for both
    the best and the worst. Unscored candidates (failed scoring) never take part.
    """

    def __init__(self, candidates: Iterable[Candidate] = ()) -> None:
        self._by_id: dict[str, Candidate] = {}
        for c in candidates:
            self.add(c)

    def __len__(self) -> int:
        """The number of distinct answers."""
        return len(self._by_id)

    def __iter__(self) -> Iterator[Candidate]:
        """The candidates in the order first seen."""
        return iter(self._by_id.values())

    def __contains__(self, candidate_id: object) -> bool:
        """True when an answer with this id is in the store."""
        return candidate_id in self._by_id

    def get(self, candidate_id: str) -> Candidate | None:
        """The candidate with this id, or ``None``."""
        return self._by_id.get(candidate_id)

    def add(self, candidate: Candidate) -> bool:
        """Add a candidate; return False (and keep the first) when the same answer is already there."""
        if candidate.id in self._by_id:
            return False
        self._by_id[candidate.id] = candidate
        return True

    def scored(self, step: int | None = None) -> list[Candidate]:
        """Scored candidates in insertion order, optionally only those first seen at ``step``."""
        return [c for c in self._by_id.values() if c.score is not None and (step is None or c.step == step)]

    def best(self, step: int | None = None) -> Candidate | None:
        """The highest-scoring candidate (first seen wins ties), or None when nothing is scored."""
        pool = self.scored(step)
        if not pool:
            return None
        return max(pool, key=lambda c: c.score)  # type: ignore[arg-type,return-value]  # max keeps the first of equals

    def worst(self, step: int | None = None) -> Candidate | None:
        """The lowest-scoring candidate (first seen wins ties), or None when nothing is scored."""
        pool = self.scored(step)
        if not pool:
            return None
        return min(pool, key=lambda c: c.score)  # type: ignore[arg-type,return-value]
