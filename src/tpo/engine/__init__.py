"""The method: TPO, revision and best-of-N as one engine over many prompts, with its candidate store and prompts."""

from __future__ import annotations

from .algorithm import Engine, StepCallback, derive_seed
from .prompts import DEFAULT_PROMPTS, PromptSet, extract_answer
from .store import Candidate, CandidateStore, answer_id

__all__ = [
    "DEFAULT_PROMPTS",
    "Candidate",
    "CandidateStore",
    "Engine",
    "PromptSet",
    "StepCallback",
    "answer_id",
    "derive_seed",
    "extract_answer",
]
