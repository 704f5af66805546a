"""The operator's limits on what one request may ask for and on the load the server takes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TPOConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on every request, checked before any model work; a request over one gets a 400 naming it.

    ``max_request_tokens`` (new tokens per answer a request may ask for with ``max_tokens`` or
    ``max_completion_tokens``) defaults to the server's own ``max_tokens``. ``max_concurrent``
    prompts are optimised at once; up to ``max_queue`` more wait, and beyond that a request
    gets 429. ``request_timeout_s`` counts from arrival, the wait in the queue included.
    ``max_traces`` finished results are kept for ``GET /v1/tpo/traces/{id}``. A streaming
    response sends a keep-alive comment after ``keepalive_s`` without other output.
    """

    max_width: int = 16
    max_depth: int = 8
    max_n: int = 16
    max_request_tokens: int | None = None
    max_concurrent: int = 64
    max_queue: int = 256
    max_body_bytes: int = 1_048_576
    request_timeout_s: float = 600.0
    max_traces: int = 1000
    keepalive_s: float = 15.0

    def __post_init__(self) -> None:
        for name, low in (
            ("max_width", 1),
            ("max_depth", 0),
            ("max_n", 1),
            ("max_concurrent", 1),
            ("max_queue", 0),
            ("max_body_bytes", 64),
            ("max_traces", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"serve limits: {name} must be an integer of at least {low}, not {value!r}")
        tokens = self.max_request_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ConfigError(f"serve limits: max_request_tokens must be a positive integer, not {tokens!r}")
        for name in ("request_timeout_s", "keepalive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"serve limits: {name} must be a positive number of seconds, not {value!r}")

    def request_tokens(self, config: TPOConfig) -> int:
        """The most new tokens per answer a request may ask for, given the server's configuration."""
        return self.max_request_tokens if self.max_request_tokens is not None else config.max_tokens

    def check_config(self, config: TPOConfig) -> None:
        """Raise ``ConfigError`` when the server's own defaults break its limits (every request would)."""
        for name, value, limit in (
            ("width", config.width, self.max_width),
            ("depth", config.depth, self.max_depth),
            ("max_tokens", config.max_tokens, self.request_tokens(config)),
        ):
            if value > limit:
                raise ConfigError(
                    f"the server's {name} {value} is over its own limit of {limit}; raise the limit or lower it"
                )
