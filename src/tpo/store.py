"""The candidate store: every scored answer of one prompt, with its lineage, and selection over it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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
    """

    id: str
    text: str
    score: float | None
    step: int
    parent_id: str | None = None
    origin: Origin = "sample"
    score_error: str | None = None
    finish_reason: str | None = None

    @property
    def scored(self) -> bool:
        """True when the candidate has a score and so takes part in selection."""
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "score": self.score,
            "step": self.step,
            "parent_id": self.parent_id,
            "origin": self.origin,
            "score_error": self.score_error,
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(
            id=d["id"],
            text=d["text"],
            score=d.get("score"),
            step=d["step"],
            parent_id=d.get("parent_id"),
            origin=d.get("origin", "sample"),
            score_error=d.get("score_error"),
            finish_reason=d.get("finish_reason"),
        )


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
        return len(self._by_id)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._by_id.values())

    def __contains__(self, candidate_id: object) -> bool:
        return candidate_id in self._by_id

    def get(self, candidate_id: str) -> Candidate | None:
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
