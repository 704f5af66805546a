"""The result of optimising one prompt, and its JSON form (schema: ``docs/result-schema.md``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .engine.store import Candidate
from .errors import InputError

__all__ = ["SCHEMA_VERSION", "StepRecord", "TPOResult", "Usage", "dumps_json"]

#: Bumped whenever a field of the JSON form changes meaning or disappears.
SCHEMA_VERSION = 1

Status = Literal["complete", "partial", "failed"]
StepKind = Literal["sample", "tpo", "revision"]


def dumps_json(data: Any, *, indent: int | None = None, compact: bool = False, allow_nan: bool = True) -> str:
    """``data`` as a JSON string that can always be written to a UTF-8 file.

    Non-ASCII text is kept as is, unless some text holds a lone surrogate (which no UTF-8
    file can hold): then everything non-ASCII is written as ASCII escapes, so the string
    still saves and reads back unchanged. ``compact`` drops the spaces after separators;
    ``allow_nan=False`` raises ``ValueError`` on NaN or infinity instead of writing them.
    """
    separators = (",", ":") if compact else None
    text = json.dumps(data, ensure_ascii=False, indent=indent, separators=separators, allow_nan=allow_nan)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True, indent=indent, separators=separators, allow_nan=allow_nan)
    return text


@dataclass(frozen=True, slots=True)
class Usage:
    """Work done: policy requests and sequences, tokens, answers scored, wall time, and estimated FLOPs.

    ``prompt_flops`` and ``completion_flops`` estimate the inference compute as 2 ×
    parameters × tokens, for the prompt tokens and the generated tokens apart; they are
    ``None`` when the parameter count of a model the run used is unknown (see
    ``TPOConfig.policy_params``). In a sum, ``None`` counts as nothing, so ``Usage()``
    adds to estimates without losing them.
    """

    policy_calls: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reward_calls: int = 0
    reward_failures: int = 0
    wall_time_s: float = 0.0
    prompt_flops: float | None = None
    completion_flops: float | None = None

    @property
    def tokens(self) -> int:
        """Prompt and generated tokens together."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def flops(self) -> float | None:
        """The estimated FLOPs of prompt and generated tokens together; ``None`` when unknown."""
        if self.prompt_flops is None or self.completion_flops is None:
            return None
        return self.prompt_flops + self.completion_flops

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(_add(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every counter by name (the FLOPs estimates ``None`` when unknown)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Usage:
        """Rebuild usage from ``to_dict()``; a missing counter is 0 and a missing FLOPs estimate ``None``."""
        return cls(**{f.name: d.get(f.name, None if f.name in _ESTIMATES else 0) for f in fields(cls)})


_ESTIMATES = frozenset({"prompt_flops", "completion_flops"})


def _add(a: Any, b: Any) -> Any:  # a counter (int or float), or an estimate that may be None
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What happened at one step of one prompt. Step 0 is the initial sampling.

    ``kind`` is the critique actually used: ``"tpo"`` (chosen against rejected) or
    ``"revision"`` (chosen alone); ``fallback_to_revision`` is True when TPO had to fall back
    because chosen and rejected were the same answer. ``candidate_ids`` lists the answers the
    step produced, in order, repeats included. ``extraction`` counts how each rewrite was
    taken out of the reply (``tagged`` or a fallback); ``failures`` describes every rewrite
    that produced no scored candidate. ``usage`` is the work of this step; ``cumulative``
    the prompt's work up to the end of this step (earlier sessions of a resumed prompt
    included), or ``None`` in results written before tpo recorded it.
    """

    step: int
    kind: StepKind
    candidate_ids: tuple[str, ...] = ()
    chosen_id: str | None = None
    rejected_id: str | None = None
    fallback_to_revision: bool = False
    critique: str | None = None
    feedback: str | None = None
    extraction: Mapping[str, int] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()
    best_score: float | None = None
    usage: Usage = Usage()
    cumulative: Usage | None = None

    @property
    def fallbacks(self) -> int:
        """Rewrites whose reply lacked properly closed answer tags."""
        return sum(n for kind, n in self.extraction.items() if kind != "tagged")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the step (see ``docs/result-schema.md``), with the derived ``fallbacks``."""
        return {
            "step": self.step,
            "kind": self.kind,
            "candidate_ids": list(self.candidate_ids),
            "chosen_id": self.chosen_id,
            "rejected_id": self.rejected_id,
            "fallback_to_revision": self.fallback_to_revision,
            "critique": self.critique,
            "feedback": self.feedback,
            "extraction": dict(self.extraction),
            "fallbacks": self.fallbacks,
            "failures": list(self.failures),
            "truncated": list(self.truncated),
            "best_score": self.best_score,
            "usage": self.usage.to_dict(),
            "cumulative": self.cumulative.to_dict() if self.cumulative is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepRecord:
        """Rebuild a step from ``to_dict()``; the derived ``fallbacks`` is recomputed, not read."""
        return cls(
            step=d["step"],
            kind=d["kind"],
            candidate_ids=tuple(d.get("candidate_ids", ())),
            chosen_id=d.get("chosen_id"),
            rejected_id=d.get("rejected_id"),
            fallback_to_revision=d.get("fallback_to_revision", False),
            critique=d.get("critique"),
            feedback=d.get("feedback"),
            extraction=dict(d.get("extraction", {})),
            failures=tuple(d.get("failures", ())),
            truncated=tuple(d.get("truncated", ())),
            best_score=d.get("best_score"),
            usage=Usage.from_dict(d.get("usage", {})),
            cumulative=Usage.from_dict(d["cumulative"]) if d.get("cumulative") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class TPOResult:
    """The outcome for one prompt: the final answer, every candidate and every step.

    ``status`` is ``"complete"``, ``"partial"`` (a checkpoint taken after a step) or
    ``"failed"`` (``error`` says why; whatever was computed before is kept).
    ``answer`` and ``score`` are those of the final candidate ``best_id``; ``answer`` is
    ``None`` only when no candidate could be scored.
    """

    prompt_id: str
    messages: tuple[Mapping[str, str], ...]
    status: Status
    answer: str | None
    score: float | None
    best_id: str | None
    candidates: tuple[Candidate, ...]
    steps: tuple[StepRecord, ...]
    usage: Usage
    seed: int
    config: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    stopped_early: str | None = None
    policy: str | None = None
    critic: str | None = None
    reward: str | None = None
    tpo_version: str | None = None

    @property
    def score_failures(self) -> int:
        """Candidates whose score could not be computed."""
        return sum(1 for c in self.candidates if c.score is None)

    @property
    def best(self) -> Candidate | None:
        """The final candidate."""
        return next((c for c in self.candidates if c.id == self.best_id), None)

    def candidate(self, candidate_id: str) -> Candidate:
        """The candidate with this id; ``KeyError`` when there is none."""
        for c in self.candidates:
            if c.id == candidate_id:
                return c
        raise KeyError(candidate_id)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form documented in ``docs/result-schema.md``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "tpo_version": self.tpo_version,
            "prompt_id": self.prompt_id,
            "status": self.status,
            "error": self.error,
            "messages": [dict(m) for m in self.messages],
            "metadata": dict(self.metadata),
            "answer": self.answer,
            "score": self.score,
            "best_id": self.best_id,
            "stopped_early": self.stopped_early,
            "score_failures": self.score_failures,
            "extraction_fallbacks": sum(s.fallbacks for s in self.steps),
            "candidates": [c.to_dict() for c in self.candidates],
            "steps": [s.to_dict() for s in self.steps],
            "usage": self.usage.to_dict(),
            "seed": self.seed,
            "policy": self.policy,
            "critic": self.critic,
            "reward": self.reward,
            "config": dict(self.config),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """``to_dict()`` as a JSON string (non-ASCII kept as is).

        Text with a lone surrogate (which no UTF-8 file can hold) is written with ASCII
        escapes instead, so the string can always be saved and reads back unchanged.
        """
        return dumps_json(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TPOResult:
        """Rebuild a result from its JSON form (for resuming and analysis)."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"result has schema_version {version!r}; this tpo reads {SCHEMA_VERSION}")
        return cls(
            prompt_id=d["prompt_id"],
            messages=tuple(dict(m) for m in d["messages"]),
            status=d["status"],
            answer=d.get("answer"),
            score=d.get("score"),
            best_id=d.get("best_id"),
            candidates=tuple(Candidate.from_dict(c) for c in d.get("candidates", ())),
            steps=tuple(StepRecord.from_dict(s) for s in d.get("steps", ())),
            usage=Usage.from_dict(d.get("usage", {})),
            seed=d["seed"],
            config=dict(d.get("config", {})),
            metadata=dict(d.get("metadata", {})),
            error=d.get("error"),
            stopped_early=d.get("stopped_early"),
            policy=d.get("policy"),
            critic=d.get("critic"),
            reward=d.get("reward"),
            tpo_version=d.get("tpo_version"),
        )
