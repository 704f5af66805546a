"""Stopping a run early when its first prompts all fail with one error: the others would most likely fail alike."""

from __future__ import annotations

from ..errors import ConfigError
from ..result import TPOResult

__all__ = ["DEFAULT_FAIL_FAST_AFTER", "FailFast"]

#: Failed prompts, all with the same error and with none complete before them, that stop a run.
DEFAULT_FAIL_FAST_AFTER = 8


class FailFast:
    """Watches the results of one session in the order they finish and says when to stop.

    The run stops when its first ``after`` results all failed with the very same error (an
    unreachable server, a reward that always raises): the remaining prompts would only burn
    time and tokens on it. A single complete result, or two different errors among the first
    ``after``, turns the rule off for the session. ``after=0`` never stops, and neither does
    a session with no more than ``after`` prompts to run, since all of them are run anyway.
    """

    def __init__(self, after: int, unfinished: int) -> None:
        self.after = check_fail_fast_after(after)
        self._errors: list[str] | None = [] if 0 < after < unfinished else None

    def observe(self, result: TPOResult) -> str | None:
        """The error to stop the run with, once the rule is met by ``result``; otherwise None."""
        if self._errors is None:
            return None
        if result.status == "complete" or not result.error:
            self._errors = None
            return None
        self._errors.append(result.error)
        if len(self._errors) < self.after:
            return None
        errors, self._errors = self._errors, None
        return errors[0] if len(set(errors)) == 1 else None


def check_fail_fast_after(after: object) -> int:
    """``after``, checked: a whole number >= 0."""
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ConfigError(f"fail_fast_after must be a whole number >= 0 (0: never stop early), not {after!r}")
    return after
