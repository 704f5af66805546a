"""A scriptable OpenAI-compatible server on 127.0.0.1 for fault tests: any status, header, body or delay.

It runs uvicorn in a background thread (``UvicornThread``) and records every request::

    def handler(call: Call) -> Reply:
        if call.number == 0:
            return Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "1"})
        return Reply(body=completion(["hello"]))

    with FakeOpenAIServer(handler) as server:
        policy = OpenAIPolicy("m", base_url=server.base_url)
        ...
    assert [c.path for c in server.calls] == ["/v1/chat/completions"] * 2

Without a handler it answers every chat request with ``n`` numbered choices, so it acts
as a server that honours ``n``. ``routes`` maps other paths (``"/v1/models"``, ``"/props"``)
to fixed replies. The server also tracks how many requests and sequences (the sum of
their ``n``) are in progress at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from servers.uvicorn_thread import UvicornThread


@dataclass
class Reply:
    """What the server sends back: ``body`` as JSON unless it is ``str`` or ``bytes`` (sent as is)."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    content_type: str = "application/json"


@dataclass
class Call:
    """One request the server received."""

    number: int
    method: str
    path: str
    headers: Mapping[str, str]
    json: Any
    received_at: float
    #: The raw query string (``"api-version=1&key=..."``), empty when there is none.
    query: str = ""

    @property
    def n(self) -> int:
        """The ``n`` asked for (1 when absent)."""
        if isinstance(self.json, dict) and isinstance(self.json.get("n"), int):
            return int(self.json["n"])
        return 1


Handler = Callable[[Call], Reply]


def completion(
    texts: list[str | None],
    *,
    finish_reason: str = "stop",
    usage: Mapping[str, int] | None = None,
    model: str = "fake",
    logprobs: list[Any] | None = None,
) -> dict[str, Any]:
    """A chat completion body with one choice per text (``None`` gives ``"content": null``)."""
    choices = []
    for i, text in enumerate(texts):
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
        }
        if logprobs is not None:
            choice["logprobs"] = logprobs[i]
        choices.append(choice)
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": choices,
    }
    body["usage"] = (
        dict(usage)
        if usage is not None
        else {
            "prompt_tokens": 10,
            "completion_tokens": 3 * len(texts),
            "total_tokens": 10 + 3 * len(texts),
        }
    )
    return body


def honour_n(call: Call) -> Reply:
    """The default: ``n`` choices that name the request's seed and their index."""
    seed = call.json.get("seed") if isinstance(call.json, dict) else None
    return Reply(body=completion([f"answer {i} (seed {seed})" for i in range(call.n)]))


class FakeOpenAIServer:
    """A chat completions server scripted by ``handler``; see the module docstring."""

    def __init__(self, handler: Handler | None = None, *, routes: Mapping[str, Reply] | None = None) -> None:
        self.handler = handler or honour_n
        self.routes = dict(routes or {})
        self.calls: list[Call] = []
        self.requests_in_flight = 0
        self.sequences_in_flight = 0
        self.peak_requests = 0
        self.peak_sequences = 0
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])])
        self._server = UvicornThread(app, lifespan="off", log_level="error")

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return self._server.base_url

    @property
    def root_url(self) -> str:
        return self._server.root_url

    def reset(self, handler: Handler | None = None, *, routes: Mapping[str, Reply] | None = None) -> None:
        """Forget the calls and the peaks and take a new script, so that one server can serve many tests.

        Requests still in progress (a test that let one hang) would skew the peaks of the next
        test; such tests should have a server of their own.
        """
        with self._lock:
            self.handler = handler or honour_n
            self.routes = dict(routes or {})
            self.calls = []
            self.peak_requests = self.requests_in_flight
            self.peak_sequences = self.sequences_in_flight

    def chat_calls(self) -> list[Call]:
        """The chat completion requests, in the order received."""
        return [c for c in self.calls if c.path.endswith("/chat/completions")]

    async def _endpoint(self, request: Request) -> Response:
        raw = await request.body()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        with self._lock:
            call = Call(
                len(self.calls),
                request.method,
                request.url.path,
                dict(request.headers),
                payload,
                time.monotonic(),
                query=request.url.query,
            )
            self.calls.append(call)
        if call.path in self.routes:
            reply = self.routes[call.path]
        elif call.path.endswith("/chat/completions"):
            reply = self.handler(call)
        else:
            reply = Reply(404, {"detail": "Not Found"})
        with self._lock:
            self.requests_in_flight += 1
            self.sequences_in_flight += call.n
            self.peak_requests = max(self.peak_requests, self.requests_in_flight)
            self.peak_sequences = max(self.peak_sequences, self.sequences_in_flight)
        try:
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
        finally:
            with self._lock:
                self.requests_in_flight -= 1
                self.sequences_in_flight -= call.n
        if isinstance(reply.body, (str, bytes)):
            content: bytes = reply.body.encode() if isinstance(reply.body, str) else reply.body
        else:
            content = json.dumps(reply.body).encode()
        return Response(content, status_code=reply.status, headers=dict(reply.headers), media_type=reply.content_type)

    def start(self) -> FakeOpenAIServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(force=True)  # requests that hang on purpose must not hold the shutdown up

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
