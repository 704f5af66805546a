"""A reward model behind an HTTP server: vLLM's ``/pooling`` and ``/classify`` endpoints, or a simple JSON one.

Three request shapes (option ``api``; by default taken from the URL's path):

``vllm-pooling`` (a URL ending in ``/pooling``)
    ``{"model": M, "messages": [..., {"role": "assistant", "content": ANSWER}], "use_activation": false}``
    → ``{"data": [{"index": 0, "data": [logit, ...]}]}``; a per-token answer
    (``[[...], ...]``, the ``token_classify`` task) is read at its last token.
``vllm-classify`` (a URL ending in ``/classify``)
    the same request → ``{"data": [{"index": 0, "probs": [...], "num_classes": K}]}``.
``simple`` (any other URL)
    ``{"messages": [...], "answer": ANSWER, "prompt_id": ID, "metadata": {...}}`` →
    ``{"score": 0.83}`` (or ``{"error": "why"}``). With ``batched=true`` the server takes
    ``{"items": [{"messages", "answer", "prompt_id", "metadata"}, ...]}`` and answers
    ``{"scores": [0.83, null, ...], "errors": [null, "why", ...]}``.

The score is output number ``index`` (default 0). For the vLLM endpoints ``raw=true`` (the
default) sends ``use_activation: false`` so that the server returns the raw logit, as the
Transformers reward does, not its sigmoid or softmax; vLLM servers older than 0.11.1 ignore
that field, so pass ``extra_body={"activation": false}`` (``/classify``) or
``{"softmax": false}`` (``/pooling``) to them instead.

Requests are independent (``batching = False``; the engine sends them concurrently) and at
most ``concurrency`` are in flight. A connection error, a timeout (``timeout_s`` per
attempt), HTTP 408, 409, 425, 429 or a 5xx other than 501 and 505 is retried up to
``max_retries`` times with exponential backoff (``backoff_s`` doubling up to
``max_backoff_s``) and jitter, waiting at least as long as the server's ``retry-after-ms``
or ``Retry-After`` (capped at ``max_retry_after_s``); the rules are those of the OpenAI
backend, in ``tpo._retry``. Another HTTP error or an unreadable response fails that
answer's score at once; the error names the URL and the last status, and the run goes on.

The connection pool is made per event loop and closed with it (see ``tpo._per_loop``);
``aclose()`` closes the running loop's pool at once, and the reward opens a new one if it
is used again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._guard import check_real_request_allowed
from .._loopback import exempt_from_guard
from .._per_loop import PerLoop
from .._retry import RetryPolicy
from ..errors import ConfigError, MissingDependencyError, RewardError
from ..registry import take_options
from ..types import Score, ScoreRequest

if TYPE_CHECKING:
    import httpx

__all__ = ["APIS", "HTTPReward"]

#: The request shapes ``HTTPReward`` speaks.
APIS = ("simple", "vllm-pooling", "vllm-classify")
_ENDPOINTS = {"vllm-pooling": "/pooling", "vllm-classify": "/classify"}

_DEFAULTS: dict[str, Any] = {
    "api": "auto",
    "model": None,
    "timeout_s": 60.0,
    "max_retries": 4,
    "concurrency": 16,
    "backoff_s": 0.5,
    "max_backoff_s": 30.0,
    "max_retry_after_s": 300.0,
    "headers": None,
    "api_key_env": None,
    "index": 0,
    "raw": True,
    "task": None,
    "batched": False,
    "extra_body": None,
}


@dataclass
class _Connection:
    """The connection pool and the concurrency limit of one event loop."""

    client: httpx.AsyncClient
    semaphore: asyncio.Semaphore


class HTTPReward:
    """Scores answers by asking a reward model served over HTTP; see the module docstring for the protocols.

    ``transport`` (Python only; an ``httpx.AsyncBaseTransport`` such as ``httpx.MockTransport``)
    replaces the network; it is shared by the pools of every event loop and closed with them.
    ``rng`` draws the retry jitter.

    Where real model requests are forbidden (``tpo._guard``, as in a test suite), ``score``
    raises ``ConfigError`` unless the URL is a loopback address or the transport a mock
    (``tpo._loopback``).
    """

    name = "http"
    batching = False
    supports_n = False
    supports_logprobs = False
    description = "A reward model behind an HTTP server: vLLM /pooling or /classify, or a simple JSON endpoint."
    #: The pool belongs to one event loop: a synchronous tpo call, which runs a loop of its own,
    #: should ``aclose()`` the reward before its loop ends (it reopens on reuse).
    closes_per_loop = True

    def __init__(
        self,
        url: str,
        *,
        api: str = "auto",
        model: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 16,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        headers: Mapping[str, str] | None = None,
        api_key_env: str | None = None,
        index: int = 0,
        raw: bool = True,
        task: str | None = None,
        batched: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError as e:
            raise MissingDependencyError("httpx", "openai", "The http reward") from e
        self._httpx = httpx
        self.url, self.api = _resolve_url(url, api)
        _positive("timeout_s", timeout_s)
        _positive("max_backoff_s", max_backoff_s)
        for option, value in (("backoff_s", backoff_s), ("max_retry_after_s", max_retry_after_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"the http reward's {option} must be a number of seconds >= 0, not {value!r}")
        _whole("max_retries", max_retries, 0)
        _whole("concurrency", concurrency, 1)
        _whole("index", index, 0)
        for flag, value in (("raw", raw), ("batched", batched)):
            if not isinstance(value, bool):
                raise ConfigError(f"the http reward's option {flag} must be true or false, not {value!r}")
        if batched and self.api != "simple":
            raise ConfigError(f"batched=true is for the simple API; vLLM's {_ENDPOINTS[self.api]} takes one conversation per request")
        if task is not None and self.api != "vllm-pooling":
            raise ConfigError("the option task is for vLLM's /pooling endpoint (e.g. task=classify or task=token_classify)")
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ConfigError(f"the http reward's extra_body must be a JSON object, not {extra_body!r}")
        if headers is not None and not (
            isinstance(headers, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise ConfigError("the http reward's headers must be a JSON object of strings")
        all_headers = dict(headers or {})
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"the http reward's api_key_env names {api_key_env!r}, but that environment variable is not set")
            all_headers["Authorization"] = f"Bearer {key}"
        self._headers = all_headers
        self._model = model
        self._timeout_s = float(timeout_s)
        self._concurrency = concurrency
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigError(f"the http reward's rng must be a random.Random, not {type(rng).__name__}")
        self._retry = RetryPolicy(
            max_retries=max_retries,
            backoff_s=float(backoff_s),
            max_backoff_s=float(max_backoff_s),
            max_retry_after_s=float(max_retry_after_s),
            # Jitter only spreads retries out; it never changes a score, so it needs no run seed.
            rng=rng if rng is not None else random.Random(),  # noqa: S311
        )
        self._index = index
        self._raw = raw
        self._task = task
        self._extra = dict(extra_body or {})
        self._transport = transport
        self.batching = batched
        self.name = f"http:{_display(self._httpx.URL(self.url))}"
        self._connections: PerLoop[_Connection] = PerLoop(self._open, self._close)
        # Loopback servers and mock transports cannot be real models: the guard lets them through.
        self._guarded = not exempt_from_guard(self.url, transport)

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> HTTPReward:
        """``http:URL`` with the options of the module docstring."""
        opts = take_options(options, _DEFAULTS, owner="the http reward")
        if not target.strip():
            raise ConfigError("the http reward needs a URL: --reward http:http://HOST:PORT/pooling")
        return cls(target, **opts)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """One score per request; an answer the server could not score is returned as ``Score.failed``."""
        if not requests:
            return []
        if self._guarded:
            check_real_request_allowed(self.name)
        if self.batching:
            return await self._score_batched(list(requests))
        return list(await asyncio.gather(*(self._score_one(r) for r in requests)))

    async def aclose(self) -> None:
        """Close the running event loop's connection pool; the reward opens a new one if it is used again."""
        await self._connections.aclose()

    # ------------------------------------------------------------------ requests

    async def _score_one(self, request: ScoreRequest) -> Score:
        try:
            body, attempts = await self._post(self._body(request))
            score = self._read(body)
        except RewardError as e:
            return Score.failed(str(e))
        if score.value is not None and attempts > 1:
            return Score(score.value, details={"attempts": attempts})
        return score

    async def _score_batched(self, requests: list[ScoreRequest]) -> list[Score]:
        try:
            body, _ = await self._post({"items": [_simple_item(r) for r in requests]})
        except RewardError as e:
            return [Score.failed(str(e))] * len(requests)
        scores = body.get("scores") if isinstance(body, Mapping) else None
        if not isinstance(scores, list) or len(scores) != len(requests):
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"no list of scores ({_excerpt(body)})"
            return [Score.failed(f"{self.url} answered {got} for {len(requests)} answers")] * len(requests)
        errors = body.get("errors")
        out = []
        for i, value in enumerate(scores):
            error = errors[i] if isinstance(errors, list) and i < len(errors) else None
            if value is None:
                out.append(Score.failed(f"{self.url}: {error or 'the server returned no score'}"))
            else:
                out.append(_number(value, f"{self.url} score {i}"))
        return out

    def _body(self, request: ScoreRequest) -> dict[str, Any]:
        if self.api == "simple":
            return {**_simple_item(request), **self._extra}
        body: dict[str, Any] = {}
        if self._model:
            body["model"] = self._model
        body["messages"] = [m.as_dict() for m in request.messages] + [{"role": "assistant", "content": request.answer}]
        if self._raw:
            body["use_activation"] = False
        if self._task:
            body["task"] = self._task
        body.update(self._extra)
        return body

    def _read(self, body: Any) -> Score:
        if self.api == "simple":
            if isinstance(body, (int, float)) and not isinstance(body, bool):
                return _number(body, self.url)
            if isinstance(body, Mapping):
                if body.get("score") is not None:
                    return _number(body["score"], self.url)
                if body.get("error"):
                    return Score.failed(f"{self.url}: {body['error']}")
            raise RewardError(f"{self.url} answered without a score: {_excerpt(body)}")
        key = "data" if self.api == "vllm-pooling" else "probs"
        try:
            values = body["data"][0][key]
        except (KeyError, IndexError, TypeError):
            raise RewardError(f"{self.url} answered without data[0].{key}: {_excerpt(body)}") from None
        if isinstance(values, list) and values and isinstance(values[-1], list):
            values = values[-1]  # per-token outputs: the last token's
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not values:
            raise RewardError(f"{self.url} answered data[0].{key} = {_excerpt(values)}, not a list of numbers")
        if self._index >= len(values):
            raise RewardError(f"{self.url} returned {len(values)} output(s); index {self._index} is out of range")
        return _number(values[self._index], f"{self.url} output {self._index}")

    async def _post(self, body: Mapping[str, Any]) -> tuple[Any, int]:
        """The decoded JSON answer and the number of attempts it took; ``RewardError`` when it cannot be had."""
        httpx = self._httpx
        connection = await self._connections.get()
        attempts = self._retry.max_retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            try:
                async with connection.semaphore:
                    response = await asyncio.wait_for(connection.client.post(self.url, json=body), self._timeout_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                last = f"no answer within {self._timeout_s:g} s"
            except httpx.TransportError as e:
                last = f"cannot connect ({type(e).__name__}: {e})" if isinstance(e, httpx.ConnectError) else f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:
                raise RewardError(f"request to {self.url} failed: {type(e).__name__}: {e}") from e
            else:
                status = response.status_code
                if self._retry.retryable(status):
                    last = f"HTTP {status}: {_excerpt(response.text)}"
                    retry_after = self._retry.retry_after_s(response.headers)
                elif status >= 400:
                    raise RewardError(f"{self.url} answered HTTP {status}: {_excerpt(response.text)}")
                else:
                    try:
                        return response.json(), attempt
                    except ValueError:
                        raise RewardError(f"{self.url} answered HTTP {status} with invalid JSON: {_excerpt(response.text)}") from None
            if attempt < attempts:
                await asyncio.sleep(self._retry.delay_s(attempt, retry_after))
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        raise RewardError(f"{self.url} failed after {tries}; last error: {last}")

    def _open(self) -> _Connection:
        # Connections and semaphores belong to one event loop; each synchronous tpo call runs a new one.
        httpx = self._httpx
        client = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(self._timeout_s),
            limits=httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency),
            transport=self._transport,
        )
        return _Connection(client, asyncio.Semaphore(self._concurrency))

    @staticmethod
    async def _close(connection: _Connection) -> None:
        await connection.client.aclose()


def _resolve_url(url: str, api: str) -> tuple[str, str]:
    import httpx

    text = url.strip()
    if text.startswith("//"):
        # `--reward http://host/pooling` arrives as the reward "http" with the target "//host/pooling".
        text = "http:" + text
    elif "://" not in text:
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
    except Exception as e:  # httpx raises several types for a malformed URL
        raise ConfigError(f"the http reward's URL {url!r} is not a valid URL: {e}") from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the http reward's URL {url!r} must be http:// or https:// with a host")
    path = parsed.path.rstrip("/")
    if api == "auto":
        api = next((name for name, end in _ENDPOINTS.items() if path.endswith(end)), "simple")
    elif api not in APIS:
        raise ConfigError(f"the http reward's api must be auto or one of {', '.join(APIS)}, not {api!r}")
    elif api in _ENDPOINTS and not path:
        # A bare server address: the endpoint is implied by the API.
        parsed = parsed.copy_with(path=_ENDPOINTS[api])
    return str(parsed), api


def _display(url: httpx.URL) -> str:
    # Credentials in the URL never reach names, logs or results.
    return str(url.copy_with(username=None, password=None)) if url.userinfo else str(url)


def _simple_item(request: ScoreRequest) -> dict[str, Any]:
    return {
        "messages": [m.as_dict() for m in request.messages],
        "answer": request.answer,
        "prompt_id": request.prompt_id,
        "metadata": _jsonable(request.metadata),
    }


def _jsonable(metadata: Mapping[str, Any]) -> Any:
    # Metadata can hold anything a dataset row held; what JSON cannot carry is sent as text.
    return json.loads(json.dumps(dict(metadata), default=str))


def _number(value: Any, where: str) -> Score:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Score.failed(f"{where}: expected a number, got {_excerpt(value)}")
    if not math.isfinite(value):
        return Score.failed(f"{where}: the score {value!r} is not finite")
    return Score(float(value))


def _excerpt(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _positive(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"the http reward's {option} must be a positive number of seconds, not {value!r}")


def _whole(option: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"the http reward's {option} must be a whole number >= {minimum}, not {value!r}")
