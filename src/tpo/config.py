"""The validated configuration of a TPO run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .engine.prompts import DEFAULT_PROMPTS, PromptSet
from .errors import ConfigError
from .options import check_fields, integer, number, one_of, option, unknown_options_error

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

    mode: Mode = option("tpo", one_of(*MODES))
    width: int = option(5, integer(min=1))
    depth: int = option(2, integer(min=0))
    temperature: float = option(0.7, number(0, 5))
    top_p: float = option(0.95, number(0, 1, min_open=True))
    max_tokens: int = option(2048, integer(min=1))
    #: Sampling temperature for the critique and feedback calls (default: ``temperature``).
    critic_temperature: float | None = option(None, number(0, 5))
    #: Token limit for the critique and feedback replies (default: ``max_tokens``).
    critic_max_tokens: int | None = option(None, integer(min=1))
    #: ``"all"``: the worst answer in the whole store (the paper); ``"latest"``: worst of the last step.
    rejected_from: Literal["all", "latest"] = option("all", one_of("all", "latest"))
    #: ``"all"``: the best answer seen (the paper); ``"last_step"``: the best of the last step.
    final_from: Literal["all", "last_step"] = option("all", one_of("all", "last_step"))
    #: Stop a prompt once its best score reaches this value.
    early_stop_score: float | None = option(None, number(finite=False))
    #: Stop a prompt when its best score has not improved for this many steps.
    early_stop_patience: int | None = option(None, integer(min=1))
    seed: int = option(0, integer())
    #: How many prompts are in progress at once in ``optimize_many``.
    max_concurrent_prompts: int = option(256, integer(min=1))
    #: Override of the backend's context window in tokens (when it cannot tell, or to be safer).
    context_window: int | None = option(None, integer(min=256))
    prompts: PromptSet = field(default_factory=lambda: DEFAULT_PROMPTS)
    #: Parameters of the policy model, for the FLOPs estimates in ``Usage`` (2 × parameters × tokens).
    #: ``None``: the backend's ``parameter_count`` when it has one, else no estimate.
    policy_params: float | None = option(None, number(0, None, min_open=True))
    #: Parameters of the critic model (default: the policy's, when the policy writes the critiques).
    critic_params: float | None = option(None, number(0, None, min_open=True))

    def __post_init__(self) -> None:
        # The same checks and messages as every plugin's options; None is not a value here.
        check_fields(self, none_means_default=False)
        if self.mode == "bon" and self.depth != 0:
            object.__setattr__(self, "depth", 0)
        if not isinstance(self.prompts, PromptSet):
            raise ConfigError("prompts must be a tpo.PromptSet (use PromptSet.load(path) for a file)")

    def with_options(self, **options: Any) -> TPOConfig:
        """A copy with some options changed; unknown names raise ``ConfigError``."""
        known = [f.name for f in fields(self)]
        unknown = [name for name in options if name not in known]
        if unknown:
            raise unknown_options_error(unknown, known)
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
