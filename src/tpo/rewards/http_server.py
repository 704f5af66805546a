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
backend, in ``tpo._http.retry``. Another HTTP error or an unreadable response fails that
answer's score at once; the error names the URL and the last status, and the run goes on.

The connection pool is made per event loop and closed with it (see ``tpo._http.per_loop``);
``aclose()`` closes the running loop's pool at once, and the reward opens a new one if it
is used again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .._guard import check_real_request_allowed
from .._http.loopback import exempt_from_guard
from .._http.per_loop import PerLoop
from .._http.replicas import ReplicatedReward, split_urls
from .._http.retry import RetryPolicy
from .._redact import display_url, is_secret_name, mask_secrets_in_text, mask_url, url_secrets
from ..errors import ConfigError, MissingDependencyError, RewardError
from ..options import PluginOptions, flag, integer, mapping, number, one_of, option, string
from ..types import Message, Score, ScoreRequest

if TYPE_CHECKING:
    import httpx

__all__ = ["APIS", "HTTPReward", "HTTPRewardOptions"]

#: The request shapes ``HTTPReward`` speaks.
APIS = ("simple", "vllm-pooling", "vllm-classify")
_ENDPOINTS = {"vllm-pooling": "/pooling", "vllm-classify": "/classify"}


@dataclass(frozen=True)
class HTTPRewardOptions(PluginOptions):
    """The options of ``HTTPReward`` (``--reward-option NAME=VALUE``); see the module docstring."""

    owner: ClassVar[str] = "the http reward"

    api: str = option("auto", one_of("auto", *APIS), "the request shape (auto: from the URL's path)")
    model: str | None = option(None, string(), "the model name sent to vLLM")
    # Connection settings (affects_results=False): a resumed batch run may change them.
    timeout_s: float = option(60.0, number(0, min_open=True), "seconds each attempt may take", affects_results=False)
    max_retries: int = option(
        4, integer(min=0), "retries after a 429, a 5xx, a timeout or a connection error", affects_results=False
    )
    concurrency: int = option(16, integer(min=1), "requests in flight at once", affects_results=False)
    backoff_s: float = option(0.5, number(0), "the first backoff in seconds, doubling per retry", affects_results=False)
    max_backoff_s: float = option(
        30.0, number(0, min_open=True), "the longest backoff in seconds", affects_results=False
    )
    max_retry_after_s: float = option(
        300.0, number(0), "the longest Retry-After honoured, in seconds (0: ignore it)", affects_results=False
    )
    headers: Mapping[str, str] | None = option(None, mapping(str), "extra HTTP headers")
    api_key_env: str | None = option(
        None, string(), "the environment variable whose key is sent as a bearer token", affects_results=False
    )
    index: int = option(0, integer(min=0), "which output number is the score")
    raw: bool = option(True, flag(), "ask vLLM for raw logits (use_activation: false)")
    task: str | None = option(None, string(), "vLLM's pooling task, for /pooling (e.g. classify, token_classify)")
    batched: bool = option(False, flag(), "send every answer of a call in one request (simple API)")
    extra_body: Mapping[str, Any] | None = option(None, mapping(), "merged into every request body")


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
    (``tpo._http.loopback``).
    """

    name = "http"
    batching = False
    supports_n = False
    supports_logprobs = False
    description = "A reward model behind an HTTP server: vLLM /pooling or /classify, or a simple JSON endpoint."
    #: The pool belongs to one event loop: a synchronous tpo call, which runs a loop of its own,
    #: should ``aclose()`` the reward before its loop ends (it reopens on reuse).
    closes_per_loop = True
    options_class = HTTPRewardOptions

    def __init__(
        self,
        url: str,
        *,
        options: HTTPRewardOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        **kwargs: Any,
    ) -> None:
        """Score through ``url``; the options as keywords (``api="vllm-classify"``) or in ``options``."""
        opts = self.options = HTTPRewardOptions.from_options(kwargs, base=options)
        try:
            import httpx
        except ImportError as e:
            raise MissingDependencyError("httpx", "openai", "The http reward") from e
        self._httpx = httpx
        self.url, self.api = _resolve_url(url, opts.api)
        if opts.batched and self.api != "simple":
            raise ConfigError(
                f"batched=true is for the simple API; vLLM's {_ENDPOINTS[self.api]} takes one conversation per request"
            )
        if opts.task is not None and self.api != "vllm-pooling":
            raise ConfigError(
                "the option task is for vLLM's /pooling endpoint (e.g. task=classify or task=token_classify)"
            )
        all_headers = dict(opts.headers or {})
        api_key_env = opts.api_key_env
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(
                    f"the http reward's api_key_env names {api_key_env!r}, but that environment variable is not set"
                )
            all_headers["Authorization"] = f"Bearer {key}"
        self._headers = all_headers
        self._model = opts.model
        self._timeout_s = opts.timeout_s
        self._concurrency = opts.concurrency
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigError(f"the http reward's rng must be a random.Random, not {type(rng).__name__}")
        self._retry = RetryPolicy(
            max_retries=opts.max_retries,
            backoff_s=opts.backoff_s,
            max_backoff_s=opts.max_backoff_s,
            max_retry_after_s=opts.max_retry_after_s,
            # Jitter only spreads retries out; it never changes a score, so it needs no run seed.
            rng=rng if rng is not None else random.Random(),  # noqa: S311
        )
        self._index = opts.index
        self._raw = opts.raw
        self._task = opts.task
        self._extra = dict(opts.extra_body or {})
        self._transport = transport
        self.batching = opts.batched
        # Names and messages show the URL with its password, token and key-like query values masked.
        self._shown = display_url(self.url)
        header_secrets = [v.rpartition(" ")[2] for k, v in self._headers.items() if is_secret_name(k)]
        self._secrets = (*url_secrets(self.url), *header_secrets)
        self.name = f"http:{self._shown}"
        self._connections: PerLoop[_Connection] = PerLoop(self._open, self._close)
        #: Told the outcome of every HTTP attempt, by a pool of replicas (``tpo._http.replicas``): ``None``
        #: when the server answered, else the failure another server may not have.
        self.on_attempt: Callable[[str | None], None] | None = None
        # Loopback servers and mock transports cannot be real models: the guard lets them through.
        self._guarded = not exempt_from_guard(self.url, transport)

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> HTTPReward | ReplicatedReward:
        """``http:URL`` with the options of the module docstring.

        Several URLs, comma-separated (``http:http://a/pooling,http://b/pooling``), are several
        servers of one reward model: the result is a ``tpo._http.replicas.ReplicatedReward`` of
        one ``HTTPReward`` per server, each with these options (``concurrency`` is per server).
        """
        opts = HTTPRewardOptions.from_options(options)
        if not target.strip():
            raise ConfigError("the http reward needs a URL: --reward http:http://HOST:PORT/pooling")
        if "," not in target:
            return cls(target, options=opts)
        # split_urls refuses an empty part and a repeat, so a comma means two servers or more.
        replicas = [cls(url, options=opts) for url in split_urls(target, what="the http reward's URL list")]
        return ReplicatedReward([(r._shown, r) for r in replicas])

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """One score per request; an answer the server could not score is returned as ``Score.failed``."""
        if not requests:
            return []
        if self._guarded:
            check_real_request_allowed(self.name)
        if self.batching:
            scores = await self._score_batched(list(requests))
        else:
            scores = list(await asyncio.gather(*(self._score_one(r) for r in requests)))
        # Errors quote the server's answers and the transport's exceptions, which may echo a credential.
        return [replace(s, error=self._scrub(s.error)) if s.error else s for s in scores]

    async def aclose(self) -> None:
        """Close the running event loop's connection pool; the reward opens a new one if it is used again."""
        await self._connections.aclose()

    async def preflight(self) -> None:
        """Check, before a run, that the server takes one trivial request: one POST, not retried.

        Raises ``RewardError`` when the server cannot be reached or does not answer within
        ``timeout_s``, or refuses the request for good: HTTP 401, 403, 404 or 405, and for the
        vLLM endpoints (whose request shape tpo fixes) any 4xx a retry cannot cure or an answer
        tpo cannot read. A busy server (429, 5xx) passes, as the run retries those; so does a
        simple endpoint that rejects the trivial request's content, which real prompts may suit.
        """
        if self._guarded:
            check_real_request_allowed(self.name)
        httpx = self._httpx
        connection = await self._connections.get()
        trivial = ScoreRequest((Message("user", "Say hello."),), "Hello!", prompt_id="tpo-preflight")
        body = {"items": [_simple_item(trivial)]} if self.batching else self._body(trivial)
        try:
            async with connection.semaphore:
                response = await asyncio.wait_for(connection.client.post(self.url, json=body), self._timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException) as e:
            raise RewardError(
                f"{self._shown} does not answer: no reply to a trivial request within {self._timeout_s:g} s"
            ) from e
        except httpx.HTTPError as e:
            raise RewardError(
                self._scrub(
                    f"{self._shown} cannot be reached ({type(e).__name__}: {e}); "
                    "is the server running, and is the URL right?"
                )
            ) from e
        status, fixed_shape = response.status_code, self.api != "simple"
        refused_for_good = 400 <= status < 500 and not self._retry.retryable(status)
        if status in (401, 403, 404, 405) or (fixed_shape and refused_for_good):
            said = _excerpt(response.text)
            raise RewardError(self._scrub(f"{self._shown} refused a trivial request: HTTP {status}: {said}"))
        if fixed_shape and 200 <= status < 300:
            try:
                self._read(response.json())
            except (ValueError, RewardError) as e:
                said = f"{self._shown} answered a trivial request in a form tpo cannot read: {e}"
                raise RewardError(self._scrub(said)) from e

    def _scrub(self, text: str) -> str:
        """``text`` with the URL's credentials and secret header values masked."""
        return mask_secrets_in_text(text, self._secrets)

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
            return [Score.failed(f"{self._shown} answered {got} for {len(requests)} answers")] * len(requests)
        errors = body.get("errors")
        out = []
        for i, value in enumerate(scores):
            error = errors[i] if isinstance(errors, list) and i < len(errors) else None
            if value is None:
                out.append(Score.failed(f"{self._shown}: {error or 'the server returned no score'}"))
            else:
                out.append(_number(value, f"{self._shown} score {i}"))
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
                return _number(body, self._shown)
            if isinstance(body, Mapping):
                if body.get("score") is not None:
                    return _number(body["score"], self._shown)
                if body.get("error"):
                    return Score.failed(f"{self._shown}: {body['error']}")
            raise RewardError(f"{self._shown} answered without a score: {_excerpt(body)}")
        key = "data" if self.api == "vllm-pooling" else "probs"
        try:
            values = body["data"][0][key]
        except (KeyError, IndexError, TypeError):
            raise RewardError(f"{self._shown} answered without data[0].{key}: {_excerpt(body)}") from None
        if isinstance(values, list) and values and isinstance(values[-1], list):
            values = values[-1]  # per-token outputs: the last token's
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not values:
            raise RewardError(f"{self._shown} answered data[0].{key} = {_excerpt(values)}, not a list of numbers")
        if self._index >= len(values):
            raise RewardError(f"{self._shown} returned {len(values)} output(s); index {self._index} is out of range")
        return _number(values[self._index], f"{self._shown} output {self._index}")

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
                self._report(last)
            except httpx.TransportError as e:
                last = (
                    f"cannot connect ({type(e).__name__}: {e})"
                    if isinstance(e, httpx.ConnectError)
                    else f"{type(e).__name__}: {e}"
                )
                self._report(last)
            except httpx.HTTPError as e:
                raise RewardError(f"request to {self._shown} failed: {type(e).__name__}: {e}") from e
            else:
                status = response.status_code
                if not self._retry.retryable(status):
                    self._report(None)  # the server answered: what it said is about this request
                    if status >= 400:
                        raise RewardError(f"{self._shown} answered HTTP {status}: {_excerpt(response.text)}")
                    try:
                        return response.json(), attempt
                    except ValueError:
                        raise RewardError(
                            f"{self._shown} answered HTTP {status} with invalid JSON: {_excerpt(response.text)}"
                        ) from None
                last = f"HTTP {status}: {_excerpt(response.text)}"
                retry_after = self._retry.retry_after_s(response.headers)
                self._report(last)
            if attempt < attempts:
                await asyncio.sleep(self._retry.delay_s(attempt, retry_after))
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        raise RewardError(f"{self._shown} failed after {tries}; last error: {last}")

    def _report(self, failure: str | None) -> None:
        if self.on_attempt is not None:
            self.on_attempt(self._scrub(failure) if failure else None)

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
        why = mask_secrets_in_text(str(e), url_secrets(text))
        raise ConfigError(f"the http reward's URL {mask_url(url)!r} is not a valid URL: {why}") from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the http reward's URL {mask_url(url)!r} must be http:// or https:// with a host")
    path = parsed.path.rstrip("/")
    if api == "auto":
        api = next((name for name, end in _ENDPOINTS.items() if path.endswith(end)), "simple")
    elif api in _ENDPOINTS and not path:
        # A bare server address: the endpoint is implied by the API.
        parsed = parsed.copy_with(path=_ENDPOINTS[api])
    return str(parsed), api


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
