"""Private helpers for the in-process plugins only (vLLM, torch and Transformers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["refuse_loading_options"]


def refuse_loading_options(given: Mapping[str, Any], loading: Iterable[str], *, owner: str, loads: str) -> None:
    """``ConfigError`` if ``given`` (a constructor's keywords) sets any of ``loading``, the options only loading uses.

    A constructor that wraps a model (or engine: ``loads``) already loaded cannot apply them;
    ``from_spec`` does, when it loads one.
    """
    named = [k for k in loading if given.get(k) is not None]
    if named:
        raise ConfigError(
            f"{owner}: {', '.join(named)} apply when from_spec loads the {loads}; "
            f"the constructor takes a loaded {loads}"
        )
