"""The errors ``tpo serve`` answers with, all in the OpenAI error shape ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

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


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """400: the request is wrong; ``param`` names the field."""
    return APIError(400, message, param=param, code=code)
