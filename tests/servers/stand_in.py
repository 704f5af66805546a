"""A plain HTTP server on 127.0.0.1, in a thread, whose JSON replies a test scripts: a stand-in for a scoring API.

    with StandIn(lambda path, body, n: Reply(json={"score": float(len(body["answer"]))})) as server:
        reward = reward_from_spec(f"http:{server.url}/score")
        ...
    assert len(server.seen) == 2

``handle(path, body, n)`` gets the request's path, its body (parsed JSON, or the raw bytes
when it is not JSON) and its number (0 for the first request). Every request is kept in
``seen``; ``peak`` is the most requests that were in progress at once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the stand-in server answers to one request: ``json`` encoded, or ``raw`` bytes as they are."""

    status: int = 200
    json: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    """One request the stand-in server received (header names in lower case)."""

    path: str
    body: Any
    headers: dict[str, str]


Handle = Callable[[str, Any, int], Reply]


class StandIn:
    """An HTTP server in a thread whose replies come from ``handle(path, body, n)`` (n: the request's number)."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer._connections.add(self.connection)

            def finish(self) -> None:
                with outer._lock:
                    outer._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with outer._lock:
                    n = len(outer.seen)
                    outer.seen.append(Seen(self.path, body, {k.lower(): v for k, v in self.headers.items()}))
                    outer.in_flight += 1
                    outer.peak = max(outer.peak, outer.in_flight)
                try:
                    reply = outer.handle(self.path, body, n)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    payload = reply.raw if reply.raw is not None else json.dumps(reply.json).encode()
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        #: ``http://127.0.0.1:PORT``, without a path: the test adds the one it serves on.
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving: new connections are refused, and kept-alive ones are cut, as when a server dies."""
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=5)

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
