"""A process-wide switch that forbids real model requests, so a test suite cannot reach a real model by mistake.

Backends call ``check_real_request_allowed(name)`` before they load a model or send a
request; test doubles never do. Tests turn the switch with ``tpo.testing.forbid_real_requests``.
"""

from __future__ import annotations

from .errors import ConfigError

_allowed = True


def real_requests_allowed() -> bool:
    """True unless real model requests are currently forbidden."""
    return _allowed


def set_real_requests_allowed(allowed: bool) -> bool:
    """Allow or forbid real model requests; return the previous setting."""
    global _allowed
    previous, _allowed = _allowed, bool(allowed)
    return previous


def check_real_request_allowed(backend_name: str) -> None:
    """Raise ``ConfigError`` when real model requests are forbidden; backends call this first."""
    if not _allowed:
        raise ConfigError(
            f"{backend_name}: real model requests are forbidden here (tpo.testing.forbid_real_requests); "
            "use tpo.testing.ScriptedPolicy or FunctionReward, or allow real requests for this test"
        )
