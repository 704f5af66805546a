"""tpo: Test-Time Preference Optimization, aligning a model's answers with a reward at inference time."""

from __future__ import annotations

from .algorithm import Engine, derive_seed
from .api import aoptimize, aoptimize_many, optimize, optimize_many
from .config import TPOConfig
from .errors import (
    BackendError,
    ConfigError,
    InputError,
    MissingDependencyError,
    PromptTemplateError,
    RewardError,
    RunError,
    TPOError,
    UserError,
)
from .prompts import DEFAULT_PROMPTS, PromptSet, extract_answer
from .protocols import PolicyBackend, RewardModel
from .result import StepRecord, TPOResult, Usage
from .store import Candidate, CandidateStore, answer_id
from .types import Generation, GenerationRequest, Message, Prompt, SamplingParams, Score, ScoreRequest, TokenLogprob

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PROMPTS",
    "BackendError",
    "Candidate",
    "CandidateStore",
    "ConfigError",
    "Engine",
    "Generation",
    "GenerationRequest",
    "InputError",
    "Message",
    "MissingDependencyError",
    "PolicyBackend",
    "Prompt",
    "PromptSet",
    "PromptTemplateError",
    "RewardError",
    "RewardModel",
    "RunError",
    "SamplingParams",
    "Score",
    "ScoreRequest",
    "StepRecord",
    "TPOConfig",
    "TPOError",
    "TPOResult",
    "TokenLogprob",
    "Usage",
    "UserError",
    "__version__",
    "answer_id",
    "aoptimize",
    "aoptimize_many",
    "derive_seed",
    "extract_answer",
    "optimize",
    "optimize_many",
]
