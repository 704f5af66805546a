"""The one exception hierarchy of tpo.

::

    TPOError                      every error tpo raises on purpose
    ├── UserError                 the caller's mistake: fix the input and run again
    │   ├── ConfigError           an invalid option or combination of options
    │   ├── PromptTemplateError   a prompt template with a missing or unknown placeholder
    │   ├── InputError            a malformed prompt, conversation or dataset row
    │   └── MissingDependencyError  an optional extra is not installed (names the extra)
    └── RunError                  something failed while running: retrying may help
        ├── BackendError          a policy backend failed (server down, bad response, ...)
        │   └── MalformedResponseError  the server answered, but not with a reply tpo can read
        └── RewardError           a reward model failed to score

``UserError`` is raised before any model work where possible. ``RunError`` subclasses
wrap the third-party exception that caused them (``raise BackendError(...) from e``).
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "InputError",
    "MalformedResponseError",
    "MissingDependencyError",
    "PromptTemplateError",
    "RewardError",
    "RunError",
    "TPOError",
    "UserError",
]


class TPOError(Exception):
    """Base class of every error tpo raises on purpose."""


class UserError(TPOError):
    """The caller's mistake: bad configuration or bad input."""


class ConfigError(UserError, ValueError):
    """An invalid option, or options that do not go together."""


class PromptTemplateError(ConfigError):
    """A prompt template that lacks a required placeholder or names an unknown one."""


class InputError(UserError, ValueError):
    """A malformed prompt, conversation or dataset row; the message says where."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the Python package {package!r}, which is not installed. "
            f"Install it with: pip install 'tpo[{extra}]'"
        )


class RunError(TPOError):
    """A failure while running; the same call may succeed later."""


class BackendError(RunError):
    """A policy backend failed to generate."""

    def __init__(self, message: str, *, backend: str | None = None, status: int | None = None) -> None:
        self.backend = backend
        self.status = status
        super().__init__(message)


class MalformedResponseError(BackendError):
    """The server answered, but not with a reply tpo can read (not JSON, no choices, no text)."""


class RewardError(RunError):
    """A reward model failed to score."""
