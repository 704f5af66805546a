"""The operator's limits on what one request may ask for and on the load the server takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import TPOConfig
from ..errors import ConfigError
from ..options import check_fields, integer, number, option


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

    owner: ClassVar[str] = "serve limits"

    max_width: int = option(16, integer(min=1), "most answers per step a request may ask for (tpo.width)")
    max_depth: int = option(8, integer(min=0), "most improvement steps a request may ask for (tpo.depth)")
    max_n: int = option(16, integer(min=1), "most choices (n) per request")
    max_request_tokens: int | None = option(
        None, integer(min=1), "most new tokens per answer a request may ask for (default: the server's max_tokens)"
    )
    max_concurrent: int = option(64, integer(min=1), "prompts optimised at once")
    max_queue: int = option(256, integer(min=0), "requests that may wait for a slot; more get 429")
    max_body_bytes: int = option(1_048_576, integer(min=64), "largest request body; larger ones get 413")
    request_timeout_s: float = option(
        600.0, number(0, None, min_open=True), "longest a request may take, its wait in the queue included"
    )
    max_traces: int = option(1000, integer(min=1), "finished results kept for GET /v1/tpo/traces/{id}")
    keepalive_s: float = option(15.0, number(0, None, min_open=True), "a streaming keep-alive after this long quiet")

    def __post_init__(self) -> None:
        # The same checks and messages as TPOConfig's; None is not a value here (but for max_request_tokens).
        check_fields(self, none_means_default=False)

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
