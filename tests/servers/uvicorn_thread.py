"""Run any ASGI app under a real uvicorn on 127.0.0.1 (a free port) in a background thread, for tests.

    with UvicornThread(app) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="...")

Leaving the block stops the server, even when the test failed; requests still running are cancelled
(after a second's grace, or at once with ``stop(force=True)``, for requests that hang on purpose).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class UvicornThread:
    """A real uvicorn server for ``app``; ``base_url`` is ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, app: Any, *, lifespan: str = "on", log_level: str = "warning") -> None:
        self.app = app
        self._lifespan = lifespan
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.error: BaseException | None = None

    @property
    def root_url(self) -> str:
        if self._socket is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as e:  # reported by start() instead of vanishing with the thread
            self.error = e

    def start(self) -> UvicornThread:
        # IPPROTO_TCP given explicitly: asyncio sets TCP_NODELAY on accepted connections only for
        # sockets that say so, and without it every response waits 40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket = sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            config = uvicorn.Config(
                self.app,
                log_level=self._log_level,
                lifespan=self._lifespan,
                access_log=False,
                backlog=1024,
                timeout_graceful_shutdown=1,
            )
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 20
            while not self._server.started:
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise RuntimeError(f"uvicorn did not start: {self.error!r}")
                time.sleep(0.01)
        except BaseException:
            self.stop(force=True)  # no thread or socket left behind by a start that failed
            raise
        return self

    def stop(self, *, force: bool = False) -> None:
        """Stop the server; ``force`` cancels requests still running at once instead of after a second's grace."""
        if self._server is not None:
            self._server.should_exit = True
            if force:
                self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
