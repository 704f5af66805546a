"""The validated configuration of a TPO run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError
from .prompts import DEFAULT_PROMPTS, PromptSet

__all__ = ["MODES", "TPOConfig"]

Mode = Literal["tpo", "revision", "bon"]
MODES: tuple[Mode, ...] = ("tpo", "revision", "bon")


@dataclass(frozen=True)
class TPOConfig:
    """Everything that decides what a run computes, validated on construction.

    The defaults are the paper's: TPO with width 5 and depth 2, temperature 0.7, top-p 0.95,
    up to 2048 new tokens; chosen and rejected taken over the whole candidate store; the
    final answer is the best answer seen.

    ``mode="bon"`` is best-of-``width``: it resolves ``depth`` to 0.
    """

    mode: Mode = "tpo"
    width: int = 5
    depth: int = 2
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 2048
    #: Sampling temperature for the critique and feedback calls (default: ``temperature``).
    critic_temperature: float | None = None
    #: Token limit for the critique and feedback replies (default: ``max_tokens``).
    critic_max_tokens: int | None = None
    #: ``"all"``: the worst answer in the whole store (the paper); ``"latest"``: worst of the last step.
    rejected_from: Literal["all", "latest"] = "all"
    #: ``"all"``: the best answer seen (the paper); ``"last_step"``: the best of the last step.
    final_from: Literal["all", "last_step"] = "all"
    #: Stop a prompt once its best score reaches this value.
    early_stop_score: float | None = None
    #: Stop a prompt when its best score has not improved for this many steps.
    early_stop_patience: int | None = None
    seed: int = 0
    #: How many prompts are in progress at once in ``optimize_many``.
    max_concurrent_prompts: int = 256
    #: Override of the backend's context window in tokens (when it cannot tell, or to be safer).
    context_window: int | None = None
    prompts: PromptSet = field(default_factory=lambda: DEFAULT_PROMPTS)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        _int_at_least("width", self.width, 1)
        _int_at_least("depth", self.depth, 0)
        if self.mode == "bon" and self.depth != 0:
            object.__setattr__(self, "depth", 0)
        _number_in("temperature", self.temperature, 0.0, 5.0)
        if self.critic_temperature is not None:
            _number_in("critic_temperature", self.critic_temperature, 0.0, 5.0)
        _number_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int_at_least("max_tokens", self.max_tokens, 1)
        if self.critic_max_tokens is not None:
            _int_at_least("critic_max_tokens", self.critic_max_tokens, 1)
        if self.rejected_from not in ("all", "latest"):
            raise ConfigError(f"rejected_from must be 'all' or 'latest', not {self.rejected_from!r}")
        if self.final_from not in ("all", "last_step"):
            raise ConfigError(f"final_from must be 'all' or 'last_step', not {self.final_from!r}")
        if self.early_stop_score is not None:
            _number_in("early_stop_score", self.early_stop_score, -math.inf, math.inf)
        if self.early_stop_patience is not None:
            _int_at_least("early_stop_patience", self.early_stop_patience, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, not {self.seed!r}")
        _int_at_least("max_concurrent_prompts", self.max_concurrent_prompts, 1)
        if self.context_window is not None:
            _int_at_least("context_window", self.context_window, 256)
        if not isinstance(self.prompts, PromptSet):
            raise ConfigError("prompts must be a tpo.PromptSet (use PromptSet.load(path) for a file)")

    def with_options(self, **options: Any) -> TPOConfig:
        """A copy with some options changed; unknown names raise ``ConfigError``."""
        known = {f.name for f in fields(self)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        return replace(self, **options)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON-ready data (templates included)."""
        data = asdict(self)
        data["prompts"] = self.prompts.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TPOConfig:
        """Rebuild a configuration written by ``to_dict``."""
        data = dict(data)
        prompts = data.pop("prompts", None)
        config = cls().with_options(**data)
        if prompts is not None:
            config = replace(config, prompts=PromptSet(**prompts))
        return config


def _int_at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, not {value}")


def _number_in(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    if value > high or value < low or (low_open and value == low):
        lo = "(" if low_open else "["
        raise ConfigError(f"{name} must be in {lo}{low}, {high}], not {value}")
