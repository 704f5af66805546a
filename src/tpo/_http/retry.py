"""When to retry an HTTP request and how long to wait first: the one policy of tpo's HTTP clients.

Shared by the OpenAI-compatible policy backend and the HTTP reward, so that both treat a
busy server alike:

* **What is retried.** 408 (request timeout), 409 (conflict: a resource busy for now),
  425 (too early), 429 (too many requests), and every 5xx except 501 (not implemented)
  and 505 (HTTP version not supported), which say that this request can never be served.
  Timeouts and connection errors are retried too; the callers decide that, since only
  they know their client's exceptions. Any other status is the request's own fault.
* **How long to wait.** Exponential backoff with jitter: before retry *k* (after failed
  attempt *k*) a random time between half and all of ``backoff_s * 2**(k-1)``, capped at
  ``max_backoff_s``.
* **What the server asks.** ``retry-after-ms`` (sent by OpenAI's API), else ``Retry-After``
  in seconds or as an HTTP date. The wait is at least that long, plus a little jitter so
  that clients told the same instant do not all return together. The server's wish is
  capped by ``max_retry_after_s``, separately from ``max_backoff_s``: the server knows
  better than a guess when it can serve again, so its wait may be longer than any backoff,
  yet a misconfigured server must not park a run for an hour. ``max_retry_after_s=0``
  ignores the header.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timezone

from ..errors import ConfigError

__all__ = ["NEVER_RETRY_5XX", "RETRY_STATUSES", "RetryPolicy"]

#: Statuses that say "not now" rather than "not this request" (besides the 5xx ones).
RETRY_STATUSES = frozenset({408, 409, 425, 429})
#: 5xx statuses that say the request itself cannot be served, so that retrying cannot help.
NEVER_RETRY_5XX = frozenset({501, 505})
# 2**64 backoff units are far past any sensible cap; a larger exponent would overflow a float.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; see the module docstring for the rules.

    ``rng`` draws the jitter: seed it for reproducible waits (jitter only spreads retries
    in time and never changes a result). ``clock`` gives the wall time in seconds since the
    epoch, for ``Retry-After`` dates.
    """

    #: Retries after the first attempt; a request is sent at most ``max_retries + 1`` times.
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be a whole number >= 0, not {self.max_retries!r}")
        for name in ("backoff_s", "max_backoff_s", "max_retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, not {value!r}")

    def retryable(self, status: int) -> bool:
        """Whether an HTTP ``status`` may go away if the same request is sent again."""
        return status in RETRY_STATUSES or (500 <= status < 600 and status not in NEVER_RETRY_5XX)

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (counted from 1) before the next.

        ``retry_after_s`` is what the server asked for (see ``retry_after_s``), if anything.
        """
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(max(attempt - 1, 0), _MAX_DOUBLINGS))
        delay = ceiling / 2 + self.rng.uniform(0, ceiling / 2)
        if retry_after_s is not None and math.isfinite(retry_after_s) and retry_after_s > 0:
            wait = min(retry_after_s, self.max_retry_after_s)
            delay = max(delay, wait + self.rng.uniform(0, min(1.0, wait / 10)))
        return delay

    def retry_after_s(self, headers: Mapping[str, str] | None) -> float | None:
        """Seconds a response's headers ask the client to wait, uncapped; None when they do not say.

        Reads ``retry-after-ms``, else ``Retry-After`` as seconds or as an HTTP date (a date
        in the past asks for no wait). Header names are matched without regard to case.
        A negative, infinite or unreadable value is ignored.
        """
        if headers is None:
            return None
        ms = _seconds(_header(headers, "retry-after-ms"))
        if ms is not None:
            return ms / 1000
        raw = _header(headers, "retry-after")
        if raw is None:
            return None
        seconds = _seconds(raw)
        if seconds is not None:
            return seconds
        try:
            when = email.utils.parsedate_to_datetime(raw.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": HTTP dates are in GMT
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - self.clock())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # httpx's Headers ignore case already
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value if isinstance(value, str) else None


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
