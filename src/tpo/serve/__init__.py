"""``tpo serve``: TPO behind an OpenAI-compatible chat-completions endpoint, one shared engine for every request.

From Python::

    import tpo
    from tpo.serve import ServeLimits, create_app, run

    models = tpo.build_models("openai:Qwen/Qwen3-8B", reward="hf:Skywork/Skywork-Reward-V2-Qwen3-0.6B",
                              base_url="http://gpu-host:8000/v1")
    app = create_app(models, tpo.TPOConfig(width=5, depth=2), ServeLimits(max_concurrent=128),
                     api_keys=["a-long-random-key"], close_models=True)
    run(app, host="0.0.0.0", port=8080)        # or hand `app` to any ASGI server

Every endpoint, option, limit, error and metric is described in ``docs/serve.md``. Needs the
``serve`` extra (uvicorn, Starlette, prometheus-client).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError

try:
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn
except ImportError as e:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(e.name or "uvicorn", "serve", "tpo serve") from e

from .._http.loopback import is_loopback_host as is_loopback
from ..config import TPOConfig
from ..models import Models
from ._app import TPOServer
from ._auth import check_bind, keys_from_env
from ._limits import ServeLimits

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["ServeLimits", "TPOServer", "check_bind", "create_app", "is_loopback", "keys_from_env", "run"]


def create_app(
    models: Models,
    config: TPOConfig | None = None,
    limits: ServeLimits | None = None,
    *,
    api_keys: Sequence[str] = (),
    trace_log: str | Path | None = None,
    model_name: str = "tpo",
    close_models: bool = False,
) -> Starlette:
    """The ASGI application serving ``models`` with TPO (``config``: the defaults a request may change).

    ``api_keys``: the bearer keys accepted (none: no authentication). ``trace_log``: a JSONL
    file every result is appended to. ``model_name`` is the served model; ``NAME-MODE`` is
    served too for each other mode (only ``NAME-bon`` when ``config.depth`` is 0). ``close_models``:
    close the models when the app shuts down (the app then owns them). Raises ``ConfigError``
    for settings that cannot work.
    """
    if isinstance(api_keys, str):
        api_keys = [api_keys]
    server = TPOServer(
        models,
        config if config is not None else TPOConfig(),
        limits if limits is not None else ServeLimits(),
        api_keys=tuple(api_keys),
        trace_log=trace_log,
        model_name=model_name,
        close_models=close_models,
    )
    return server.app()


def run(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace_s: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve ``app`` with uvicorn until SIGTERM or Ctrl-C, then stop gracefully and return.

    On the signal the server stops accepting connections, lets the requests in flight finish
    for up to ``grace_s`` seconds (then cancels them), runs the app's shutdown, and returns
    normally, so that the process exits with status 0.
    """
    # uvicorn annotates the grace period as int, but any number of seconds works (asyncio's timeout).
    grace: Any = grace_s
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        timeout_graceful_shutdown=grace,
        log_level=log_level,
        server_header=False,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    with _signals_end_quietly():
        server.run()


@contextlib.contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """Make the signals that stop uvicorn end the process normally.

    uvicorn handles SIGTERM and SIGINT itself while it runs; once it has shut down it raises the
    signal again with the handler it found, which by default would kill the process (status
    143) after a clean shutdown. The handler it finds is this one, which does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: object) -> None:
    """The signal was handled already (by uvicorn's graceful shutdown)."""
