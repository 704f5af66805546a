"""The errors ``tpo serve`` answers with, in the OpenAI shape ``{"error": {message, type, param, code}}``, and how they are sent."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.types import Send

from ..result import TPOResult


class APIError(Exception):
    """An error response: the HTTP status and the OpenAI error object.

    ``partial`` (a result that did not finish, or failed) puts the best answer found so far
    into the error object's ``tpo`` extension, so a client that waited still gets it.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        partial: TPOResult | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.partial = partial
        self.trace_id = trace_id

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.trace_id is not None or self.partial is not None:
            extra: dict[str, Any] = {"trace_id": self.trace_id}
            if self.partial is not None:
                extra.update(answer=self.partial.answer, score=self.partial.score, steps=len(self.partial.steps))
            error["tpo"] = extra
        return {"error": error}

    async def send(self, send: Send) -> None:
        """Answer with this error on a raw ASGI connection."""
        await send_json(send, self.status, self.body(), self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """400: the request is wrong; ``param`` names the field."""
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, presets: Iterable[str]) -> APIError:
    """404: ``name`` is none of the served ``presets``."""
    return APIError(
        404,
        f"the model {name!r} does not exist here; served: {', '.join(presets)}",
        param="model",
        code="model_not_found",
    )


def internal_error(exc: BaseException) -> APIError:
    """500: a bug; the client learns the exception's type only."""
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """A whole JSON response on a raw ASGI connection."""
    data = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
