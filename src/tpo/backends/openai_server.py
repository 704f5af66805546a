"""A policy backend for any OpenAI-compatible chat server: vLLM, SGLang, llama.cpp, Ollama, hosted APIs.

Requests go out one HTTP call each, concurrently, through the official ``openai`` async
client; the backend keeps up to ``max_concurrency`` *sequences* in flight (a request for
``n`` answers counts ``n``), retries what a busy or flaky server gets wrong, and learns
whether the server honours ``n``::

    policy = OpenAIPolicy.from_spec("Qwen/Qwen3-8B", base_url="http://gpu-box:8000/v1")
    result = tpo.optimize("...", policy=policy, reward=reward)

It sends no system prompt and no stop strings of its own: the server's chat template
decides how the conversation is rendered.

The HTTP client is made per event loop and closed with it (see ``tpo._http.per_loop``);
``aclose()`` closes the running loop's client at once, and the backend opens a new one
if it is used again. Tests pass ``transport=httpx.MockTransport(handler)`` to talk to no
server at all.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import os
import random
import re
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .._guard import check_real_request_allowed
from .._http.loopback import exempt_from_guard
from .._http.per_loop import PerLoop
from .._http.replicas import ReplicatedPolicy, joined_urls, split_urls
from .._http.retry import RetryPolicy
from .._redact import display_url, mask_secrets_in_text, url_secrets
from ..errors import BackendError, ConfigError, MalformedResponseError, MissingDependencyError
from ..options import PluginOptions, custom, flag, integer, mapping, number, option, string
from ..types import Generation, GenerationRequest, Message, TokenLogprob

if TYPE_CHECKING:
    import httpx
    import httpx2

__all__ = ["MalformedResponseError", "OpenAIOptions", "OpenAIPolicy", "OpenAIStats"]

#: Where requests go when neither ``base_url`` nor ``OPENAI_BASE_URL`` says otherwise.
OFFICIAL_BASE_URL = "https://api.openai.com/v1"
#: Sent as the key to servers that need none (the client refuses to run without one).
_PLACEHOLDER_KEY = "no-key-needed"
#: Ollama sizes its window by the machine unless told; this is the smallest of its current defaults.
_OLLAMA_DEFAULT_WINDOW = 4096
#: Statuses with which a server may refuse ``n > 1``; llama.cpp's server says "Only one completion
#: choice is allowed" with a 400 or, in some versions, a 500.
_MAYBE_N = frozenset({400, 422, 501})
_MENTIONS_N = re.compile(r"\bn\b|choice", re.IGNORECASE)
_SEED_STRIDE = 0x9E3779B1

T = TypeVar("T")


@dataclass
class OpenAIStats:
    """Counters over the backend's lifetime, for logs and for checking a deployment."""

    #: HTTP requests sent for generations (every attempt counts).
    http_requests: int = 0
    #: Attempts that were retried after a 429, a 5xx, a timeout or a connection error.
    retries: int = 0
    #: Extra single-answer requests sent because the server returned fewer choices than asked.
    topped_up: int = 0
    #: The most sequences in flight at one moment.
    peak_sequences_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Choice:
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] | None


@dataclass
class _Reply:
    choices: list[_Choice]
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass
class _Failure:
    """Why one attempt failed, and whether another attempt may succeed."""

    what: str
    status: int | None
    retryable: bool
    retry_after_s: float | None = None
    #: Set when a request for several answers was refused, perhaps because of ``n`` itself.
    maybe_n: bool = False


class _FailedCall(Exception):
    """Internal: one call failed for good; carries the failure for the fallback logic."""

    def __init__(self, failure: _Failure, error: BackendError) -> None:
        super().__init__(str(error))
        self.failure = failure
        self.error = error


class _Secret:
    """Holds the API key so that it never shows in a repr, a log line or a traceback's locals."""

    __slots__ = ("_more", "_value")

    def __init__(self, value: str, *more: str) -> None:
        self._value = value
        self._more = more

    def reveal(self) -> str:
        return self._value

    def all(self) -> tuple[str, ...]:
        """The value and any further secrets held with it (those inside the base URL)."""
        return (self._value, *self._more)

    def __repr__(self) -> str:
        return "_Secret('***')"

    __str__ = __repr__


class _SequenceLimiter:
    """A first-come, first-served semaphore whose units are sequences, not requests.

    A request for more sequences than the limit is admitted alone, so it cannot wait forever.
    """

    def __init__(self, limit: int, stats: OpenAIStats) -> None:
        self.limit = limit
        self.in_flight = 0
        self._stats = stats
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, sequences: int) -> AsyncIterator[None]:
        k = max(1, min(sequences, self.limit))
        await self._acquire(k)
        try:
            yield
        finally:
            self._release(k)

    async def _acquire(self, k: int) -> None:
        if not self._waiters and self.in_flight + k <= self.limit:
            self._take(k)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((k, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(k)  # granted just before the cancellation arrived
            else:
                self._wake()  # let whoever queued behind this request go
            raise

    def _take(self, k: int) -> None:
        self.in_flight += k
        self._stats.peak_sequences_in_flight = max(self._stats.peak_sequences_in_flight, self.in_flight)

    def _release(self, k: int) -> None:
        self.in_flight -= k
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            k, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.in_flight + k > self.limit:
                return
            self._waiters.popleft()
            self._take(k)
            fut.set_result(None)


@dataclass
class _LoopState:
    """The client and the limiter of one event loop (each ``tpo.optimize`` call runs its own loop)."""

    client: Any
    limiter: _SequenceLimiter


@dataclass(frozen=True)
class OpenAIOptions(PluginOptions):
    """The options of ``OpenAIPolicy`` (``--policy-option NAME=VALUE``); see the class for what each does."""

    owner: ClassVar[str] = "openai"

    # Connection settings (affects_results=False): a resumed batch run may change them.
    base_url: str | None = option(
        None,
        custom(
            joined_urls,
            kind="string",
            constraint="URL[,URL...]",
            description="a URL, or several separated by commas (a list from Python)",
        ),
        "the server's URL, or several servers of the model, comma-separated (default: OPENAI_BASE_URL, then the "
        "OpenAI API)",
        affects_results=False,
    )
    api_key_env: str | None = option(
        None, string(), "the variable holding the key (from_spec default: OPENAI_API_KEY)", affects_results=False
    )
    max_concurrency: int = option(256, integer(min=1), "sequences in flight at once", affects_results=False)
    timeout_s: float = option(600.0, number(0, min_open=True), "seconds each attempt may take", affects_results=False)
    max_retries: int = option(
        6, integer(min=0), "retries after a 429, a 5xx, a timeout or a connection error", affects_results=False
    )
    backoff_s: float = option(1.0, number(0), "the first backoff in seconds, doubling per retry", affects_results=False)
    max_backoff_s: float = option(60.0, number(0), "the longest backoff in seconds", affects_results=False)
    max_retry_after_s: float = option(
        300.0, number(0), "the longest Retry-After honoured, in seconds (0: ignore it)", affects_results=False
    )
    native_n: bool | None = option(None, flag(), "whether the server returns n choices per request (default: learn)")
    context_window: int | None = option(None, integer(min=1), "the context window in tokens (default: ask the server)")
    extra_body: Mapping[str, Any] | None = option(None, mapping(), "merged into every request body")
    probe_timeout_s: float = option(
        10.0,
        number(0, min_open=True),
        "seconds a probe may take (the context window, preflight(), a replica's health check)",
        affects_results=False,
    )


class OpenAIPolicy:
    """Samples answers from an OpenAI-compatible ``/chat/completions`` endpoint.

    ``model`` is the name the server serves. ``base_url`` defaults to ``OPENAI_BASE_URL``,
    then to the OpenAI API. The key comes from ``api_key`` (Python only), else from the
    environment variable ``api_key_env`` (default ``OPENAI_API_KEY``); a server that needs
    no key gets a placeholder. The key never appears in a repr, an error or a result.

    ``max_concurrency`` limits the sequences in flight (a request for ``n`` answers counts
    ``n``). Each attempt may take ``timeout_s``; 408/409/425/429, 5xx other than 501 and
    505, timeouts and connection errors are retried up to ``max_retries`` times with
    exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``, with jitter drawn
    from ``rng``), waiting at least as long as the server's ``retry-after-ms`` or
    ``Retry-After`` (up to ``max_retry_after_s``); ``tpo._http.retry`` has the rules. The final ``BackendError``
    names the model, the server and the last status. A reply that is not a chat completion
    (not JSON, no choices, no text in any choice) raises ``MalformedResponseError`` at once:
    a server that answers wrongly answers wrongly again. An empty text is the model's answer
    and is returned as one (the engine records it as a failed sample).

    ``native_n``: ``None`` learns whether the server returns ``n`` choices per request
    (most do; llama-cpp-python's server and some proxies return one); ``True`` always asks
    for ``n`` at once; ``False`` always sends ``n`` single-answer requests. Missing choices
    are always fetched with extra requests, each with its own seed.

    ``context_window`` overrides what the server reports. ``extra_body`` is merged into
    every request body (for example ``{"top_k": 20}`` or vLLM's ``chat_template_kwargs``).

    From Python only: ``transport`` (an ``httpx.AsyncBaseTransport``, e.g.
    ``httpx.MockTransport(handler)``) replaces the network; the backend wraps it in a client
    of its own for each event loop and closes it with that client. ``http_client`` (an
    ``httpx.AsyncClient``) is used as is for every request and never closed by the backend:
    its owner closes it, and it serves one event loop (or opens no connections at all).
    httpx2's equivalents, which the ``openai`` package uses itself, are accepted too.

    Where real model requests are forbidden (``tpo._guard``, as in a test suite), requests
    raise ``ConfigError`` unless they go to a loopback address or into a mock transport
    (``tpo._http.loopback``).
    """

    name: str = "openai"
    description = "Any OpenAI-compatible chat server: vLLM, SGLang, llama.cpp, Ollama, hosted APIs."
    #: The CLI's --base-url and --api-key-env go to backends that list them here.
    server_options = ("base_url", "api_key_env")
    batching = False
    supports_n = True
    supports_logprobs = True
    counts_tokens = False
    knows_context_window = True
    #: The HTTP client belongs to one event loop: a synchronous tpo call, which runs a loop of
    #: its own, should ``aclose()`` the backend before its loop ends (it reopens on reuse).
    closes_per_loop = True
    options_class = OpenAIOptions

    def __init__(
        self,
        model: str,
        *,
        options: OpenAIOptions | None = None,
        api_key: str | None = None,
        rng: random.Random | None = None,
        http_client: httpx.AsyncClient | httpx2.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | httpx2.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        """``options`` as an ``OpenAIOptions``, or as keyword options (``base_url=...``) on top of them."""
        opts = self.options = OpenAIOptions.from_options(kwargs, base=options)
        base_url = opts.base_url
        self._openai = _import_openai()
        if not isinstance(model, str) or not model.strip():
            raise ConfigError(
                "the openai backend needs a model name: --policy openai:MODEL, with MODEL the name "
                "your server serves (GET /v1/models lists them)"
            )
        self.model = model.strip()
        given_url = base_url if base_url is not None else OFFICIAL_BASE_URL
        # Messages name the server by ``_shown_url``: its password, token and key-like query values masked.
        #: The server's URL without its query string; the query (``base_query``) goes on every request.
        self.base_url, self.base_query, self._shown_url = _check_base_url(given_url)
        self.name = f"openai:{self.model}"
        self.max_concurrency = opts.max_concurrency
        self.timeout_s = opts.timeout_s
        self.probe_timeout_s = opts.probe_timeout_s
        self._native_n_option = opts.native_n
        #: What the backend believes about ``n``: None until a request for several answers has told.
        self._native_n = opts.native_n
        self._window_option = opts.context_window
        self._window: int | None = None
        self._window_known = False
        self.extra_body: dict[str, Any] = dict(opts.extra_body or {})
        api_key = _resolve_key(api_key, opts.api_key_env, self.base_url)
        self._key = _Secret(api_key)
        self._secrets = _Secret(api_key if api_key != _PLACEHOLDER_KEY else "", *url_secrets(given_url))
        # Newer OpenAI models refuse the older `max_tokens`; open-source servers know only it for sure.
        self._max_tokens_field = "max_completion_tokens" if _is_official(self.base_url) else "max_tokens"
        #: Counters over this backend's lifetime.
        self.stats = OpenAIStats()
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigError(f"rng must be a random.Random, not {type(rng).__name__}")
        self._retry = RetryPolicy(
            max_retries=opts.max_retries,
            backoff_s=opts.backoff_s,
            max_backoff_s=opts.max_backoff_s,
            max_retry_after_s=opts.max_retry_after_s,
            # Jitter only spreads retries of many clients in time; it never changes a result.
            rng=rng if rng is not None else random.Random(),  # noqa: S311 - not for security
        )
        self._http_client, self._transport = _check_http(self._openai, http_client, transport)
        # Loopback servers and mock transports cannot be real models: the guard lets them through.
        self._guarded = not exempt_from_guard(self.base_url, self._transport)
        self._clients: PerLoop[_LoopState] = PerLoop(self._open, self._close)
        #: Told the outcome of every HTTP attempt, by a pool of replicas (``tpo._http.replicas``): ``None``
        #: when the server answered, else the failure another server may not have.
        self.on_attempt: Callable[[str | None], None] | None = None

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> OpenAIPolicy | ReplicatedPolicy:
        """Build from ``openai:MODEL`` and ``OpenAIOptions`` (``base_url``, ``api_key_env``, ``max_concurrency``, ...).

        ``base_url`` falls back to the environment variable ``OPENAI_BASE_URL``; the key is read
        from the variable named by ``api_key_env``, else from ``OPENAI_API_KEY``. Several URLs
        (comma-separated) are several servers of the model: the result is a
        ``tpo._http.replicas.ReplicatedPolicy`` of one ``OpenAIPolicy`` per server, each with
        these options (``max_concurrency`` is per server), requests going to the least busy.
        """
        opts = OpenAIOptions.from_options(options)
        if opts.base_url is None:
            opts = opts.replace(base_url=os.environ.get("OPENAI_BASE_URL") or None)
        key = (os.environ.get("OPENAI_API_KEY") or None) if opts.api_key_env is None else None
        if opts.base_url is None or "," not in opts.base_url:
            return cls(target, options=opts, api_key=key)
        # split_urls refuses an empty part and a repeat, so a comma means two servers or more.
        urls = split_urls(opts.base_url, what="base_url")
        replicas = [cls(target, options=opts.replace(base_url=url), api_key=key) for url in urls]
        return ReplicatedPolicy([(r._shown_url, r) for r in replicas])

    def __repr__(self) -> str:
        return (
            f"OpenAIPolicy(model={self.model!r}, base_url={self._shown_url!r}, "
            f"max_concurrency={self.max_concurrency}, native_n={self._native_n!r})"
        )

    @property
    def native_n(self) -> bool | None:
        """Whether the server returns ``n`` choices per request: True, False, or None while unknown."""
        return self._native_n

    # ------------------------------------------------------------------ protocol

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One ``Generation`` per request, in order; the requests run concurrently."""
        self._check_guard()
        return await _all_or_cancel([self._generate_one(r) for r in requests])

    async def context_window(self) -> int | None:
        """The ``context_window`` option, else what the server reports, else ``None``; asked once.

        Looked up, in order: ``max_model_len`` and similar fields of ``GET /v1/models`` (vLLM,
        SGLang, LM Studio), llama.cpp's ``GET /props``, Ollama's ``POST /api/show`` (its
        ``num_ctx``, else the model's length capped at Ollama's default of 4096), and
        text-generation-inference's ``GET /info``. llama-cpp-python's server reports none.
        """
        if self._window_option is not None:
            return self._window_option
        if not self._window_known:
            self._check_guard()
            self._window = await self._probe_window()
            self._window_known = True
        return self._window

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Always ``None``: counting would cost a round trip, so the engine estimates instead."""
        return None

    async def preflight(self) -> None:
        """Check, before a run, that the server answers: one ``GET /models``, not retried.

        Raises ``BackendError`` when the server cannot be reached or does not answer within
        ``probe_timeout_s``, and ``ConfigError`` when it refuses the API key (401, 403). Any
        other answer passes: the server is there, and a server without ``/models`` may still
        serve chat completions.
        """
        self._check_guard()
        oa = self._openai
        client = (await self._clients.get()).client
        try:
            await asyncio.wait_for(self._get(client, "/models"), self.probe_timeout_s)
        except (asyncio.TimeoutError, oa.APITimeoutError) as e:
            raise BackendError(
                self._scrub(
                    f"{self._where()} does not answer: GET /models took longer than {self.probe_timeout_s:g} s "
                    "(probe_timeout_s)"
                ),
                backend=self.name,
            ) from e
        except oa.APIConnectionError as e:
            raise BackendError(
                self._scrub(
                    f"{self._where()} cannot be reached ({_cause_text(e)}); is the server running, and is "
                    "the base URL right?"
                ),
                backend=self.name,
            ) from e
        except oa.APIStatusError as e:
            if e.status_code in (401, 403):
                said = _server_message(e.body, getattr(e, "message", ""))
                refused = f"{self._where()} refused the API key: HTTP {e.status_code}: {said}{_hint(e.status_code)}"
                raise ConfigError(self._scrub(refused)) from e
        except Exception:  # noqa: S110 - an unreadable reply (not JSON, say) still means the server answered
            pass  # the first generation will tell what is wrong, with the full error handling

    def _check_guard(self) -> None:
        """Refuse when real model requests are forbidden (``tpo._guard``), unless the server is on loopback or mocked."""
        if self._guarded:
            check_real_request_allowed(self.name)

    async def aclose(self) -> None:
        """Close the running event loop's HTTP connections; the backend opens new ones if it is used again.

        A client of the caller's own (``http_client``) is left open.
        """
        await self._clients.aclose()

    # ------------------------------------------------------------------ one request

    async def _generate_one(self, request: GenerationRequest) -> Generation:
        n = request.n
        if n < 1:
            return Generation(texts=())
        replies: list[_Reply] = []
        choices: list[_Choice] = []
        if n == 1 or self._native_n is not False:
            try:
                first = await self._call(request, n_ask=n, index=0)
            except _FailedCall as e:
                if not (e.failure.maybe_n and self._native_n_option is None):
                    raise e.error from e.__cause__
                # The server may refuse n > 1 outright (llama.cpp's server does): try single requests.
                replies = await _all_or_cancel([self._call_or_raise(request, 1, i) for i in range(n)])
                self._native_n = False
                return _merge(replies, [c for r in replies for c in r.choices[:1]])
            replies.append(first)
            choices = first.choices[:n]
            if n > 1 and self._native_n_option is None:
                self._native_n = len(first.choices) >= n
        missing = range(len(choices), n)
        if missing:
            if replies:
                self.stats.topped_up += len(missing)
            extra = await _all_or_cancel([self._call_or_raise(request, 1, i) for i in missing])
            replies.extend(extra)
            choices.extend(c for r in extra for c in r.choices[:1])
        return _merge(replies, choices)

    async def _call_or_raise(self, request: GenerationRequest, n_ask: int, index: int) -> _Reply:
        try:
            return await self._call(request, n_ask=n_ask, index=index)
        except _FailedCall as e:
            raise e.error from e.__cause__

    async def _call(self, request: GenerationRequest, *, n_ask: int, index: int) -> _Reply:
        """One chat completion for ``n_ask`` answers, retried; ``index`` picks the seed of a single answer."""
        state = await self._clients.get()
        body = self._body(request, n_ask=n_ask, index=index)
        attempts = 0
        async with state.limiter.hold(n_ask):
            while True:
                attempts += 1
                self.stats.http_requests += 1
                failure, cause, text = await self._attempt(state.client, body)
                if failure is None:
                    if self.on_attempt is not None:
                        self.on_attempt(None)
                    try:
                        reply = self._parse(text or "")
                    except MalformedResponseError as e:  # its excerpt of the reply may echo a secret
                        scrubbed = MalformedResponseError(self._scrub(str(e)), backend=self.name, status=e.status)
                        raise scrubbed from e.__cause__
                    if len(reply.choices) > n_ask:
                        reply.choices = reply.choices[:n_ask]
                    self.stats.prompt_tokens += reply.prompt_tokens or 0
                    self.stats.completion_tokens += reply.completion_tokens or 0
                    return reply
                if (
                    n_ask > 1
                    and self._native_n is None
                    and failure.status is not None
                    and (failure.status in _MAYBE_N or (failure.status >= 500 and _MENTIONS_N.search(failure.what)))
                ):
                    # Not retried: single-answer requests will tell at once whether n was the trouble.
                    failure.maybe_n, failure.retryable = True, False
                if self.on_attempt is not None:  # the server answered, or failed as another may not
                    self.on_attempt(failure.what if failure.retryable else None)
                if not failure.retryable or attempts > self._retry.max_retries:
                    raise _FailedCall(failure, self._final_error(failure, attempts)) from cause
                self.stats.retries += 1
                await asyncio.sleep(self._retry.delay_s(attempts, failure.retry_after_s))

    async def _attempt(
        self, client: Any, body: dict[str, Any]
    ) -> tuple[_Failure | None, BaseException | None, str | None]:
        """Send one request; return (failure, its cause, None) or (None, None, the response text)."""
        oa = self._openai
        try:
            raw = await asyncio.wait_for(
                client.chat.completions.with_raw_response.create(
                    **body, extra_body=self.extra_body or None, timeout=self.timeout_s + 5.0
                ),
                timeout=self.timeout_s,
            )
            return None, None, str(raw.text)
        except asyncio.TimeoutError as e:
            return _Failure(f"no reply within {self.timeout_s:g} s", None, True), e, None
        except oa.APIStatusError as e:
            status = int(e.status_code)
            message = f"HTTP {status}: {_server_message(e.body, getattr(e, 'message', ''))}"
            retry_after_s = self._retry.retry_after_s(e.response.headers)
            return _Failure(message, status, self._retry.retryable(status), retry_after_s), e, None
        except oa.APITimeoutError as e:
            return _Failure(f"no reply within {self.timeout_s:g} s", None, True), e, None
        except oa.APIConnectionError as e:
            return _Failure(f"could not connect ({_cause_text(e)})", None, True), e, None
        except oa.OpenAIError as e:
            return _Failure(f"{type(e).__name__}: {e}", None, False), e, None

    def _body(self, request: GenerationRequest, *, n_ask: int, index: int) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages_as_dicts(),
            "temperature": s.temperature,
            "top_p": s.top_p,
            self._max_tokens_field: s.max_tokens,
        }
        if n_ask > 1:
            body["n"] = n_ask
        if s.seed is not None:
            body["seed"] = _seed_for(s.seed, index)
        if s.stop:
            body["stop"] = list(s.stop)
        if request.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        return body

    def _parse(self, text: str) -> _Reply:
        where = self._where()
        try:
            data = json.loads(text)
        except ValueError as e:
            start = text.strip()[:80]
            raise MalformedResponseError(
                f"{where}: the reply is not JSON (it starts {start!r}); is the base URL right? It usually ends in /v1",
                backend=self.name,
                status=200,
            ) from e
        if not isinstance(data, dict):
            raise MalformedResponseError(f"{where}: the reply is JSON but not an object", backend=self.name, status=200)
        raw_choices = data.get("choices")
        if not isinstance(raw_choices, list) or not raw_choices:
            said = f" (the server says: {_server_message(data, '')})" if "error" in data else ""
            raise MalformedResponseError(f"{where}: the reply has no choices{said}", backend=self.name, status=200)
        indexed: list[tuple[int, _Choice]] = []
        null_content: list[str | None] = []
        for pos, raw in enumerate(raw_choices):
            if not isinstance(raw, dict) or not isinstance(raw.get("message"), dict):
                raise MalformedResponseError(f"{where}: choice {pos} has no message", backend=self.name, status=200)
            content = _content_text(raw["message"].get("content"))
            finish = raw.get("finish_reason")
            finish = finish if isinstance(finish, str) else None
            if content is None:
                null_content.append(finish)
            idx = raw.get("index")
            key = idx if isinstance(idx, int) and not isinstance(idx, bool) else pos
            indexed.append((key, _Choice(content or "", finish, _logprobs(raw.get("logprobs")))))
        if len(null_content) == len(raw_choices):
            reasons = ", ".join(sorted({str(r) for r in null_content}))
            raise MalformedResponseError(
                f"{where}: the reply has no text content (finish_reason {reasons}); a reasoning model may have spent "
                "max_tokens on its reasoning, or the server returned a tool call",
                backend=self.name,
                status=200,
            )
        indexed.sort(key=lambda kv: kv[0])
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        return _Reply(
            [c for _, c in indexed], _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        )

    def _final_error(self, failure: _Failure, attempts: int) -> BackendError:
        where = self._where()
        if failure.retryable:
            text = f"{where} failed after {attempts} attempt{'s' * (attempts != 1)}; the last: {failure.what}"
        else:
            text = f"{where} refused the request: {failure.what}{_hint(failure.status)}"
        return BackendError(self._scrub(text), backend=self.name, status=failure.status)

    def _where(self) -> str:
        return f"model {self.model!r} at {self._shown_url}"

    def _scrub(self, text: str) -> str:
        """``text`` with the key and the base URL's credentials masked: every error passes through here."""
        return mask_secrets_in_text(text, self._secrets.all())

    # ------------------------------------------------------------------ client per event loop

    def _open(self) -> _LoopState:
        # A client's connections belong to the loop that opened them; a new loop needs a new client.
        timeout_s = self.timeout_s + 5.0
        http_client = self._http_client
        if http_client is None:
            http_client = _new_http_client(self._openai, self._transport, self.max_concurrency + 8, timeout_s)
        client = self._openai.AsyncOpenAI(
            api_key=self._key.reveal(),
            base_url=self.base_url,
            # The query of the base URL (?api-version=..., ?key=...) goes on every request, not into the path.
            default_query=dict(self.base_query) or None,
            max_retries=0,  # this backend retries itself, so retries never multiply
            timeout=timeout_s,
            http_client=http_client,
        )
        return _LoopState(client, _SequenceLimiter(self.max_concurrency, self.stats))

    async def _close(self, state: _LoopState) -> None:
        if self._http_client is None:  # the caller's own client stays open
            await state.client.close()

    # ------------------------------------------------------------------ context window

    async def _probe_window(self) -> int | None:
        client = (await self._clients.get()).client
        root = _server_root(self.base_url)
        probes: list[Callable[[], Awaitable[int | None]]] = [lambda: self._window_from_models(client)]
        if not _is_official(self.base_url):
            probes += [
                lambda: self._window_from_llamacpp(client, root),
                lambda: self._window_from_ollama(client, root),
                lambda: self._window_from_tgi(client, root),
            ]
        for probe in probes:
            try:
                window = await probe()
            except Exception:  # noqa: S112 - a server without this endpoint just does not tell
                continue
            if window is not None:
                return window
        return None

    async def _get(self, client: Any, url: str) -> Any:
        return await client.get(url, cast_to=object, options={"timeout": self.probe_timeout_s})

    async def _window_from_models(self, client: Any) -> int | None:
        data = await self._get(client, "/models")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            return None
        mine = [e for e in entries if isinstance(e, dict) and e.get("id") == self.model]
        if not mine and len(entries) == 1 and isinstance(entries[0], dict):
            mine = entries  # single-model servers (llama.cpp) answer under any name
        for entry in mine:
            for key in (
                "loaded_context_length",
                "max_model_len",
                "n_ctx",
                "context_length",
                "context_window",
                "max_context_length",
            ):
                value = _count(entry.get(key))
                if value:
                    return value
        return None

    async def _window_from_llamacpp(self, client: Any, root: str) -> int | None:
        data = await self._get(client, root + "/props")
        if not isinstance(data, dict):
            return None
        settings = data.get("default_generation_settings")
        value = _count(settings.get("n_ctx")) if isinstance(settings, dict) else None
        return value or _count(data.get("n_ctx"))

    async def _window_from_ollama(self, client: Any, root: str) -> int | None:
        data = await client.post(
            root + "/api/show", cast_to=object, body={"model": self.model}, options={"timeout": self.probe_timeout_s}
        )
        if not isinstance(data, dict):
            return None
        params = data.get("parameters")
        if isinstance(params, str):
            for line in params.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == "num_ctx":
                    value = _count(_to_int(parts[1]))
                    if value:
                        return value
        info = data.get("model_info")
        if isinstance(info, dict):
            lengths = [_count(v) for k, v in info.items() if isinstance(k, str) and k.endswith(".context_length")]
            trained = max((v for v in lengths if v), default=None)
            if trained:
                return min(trained, _OLLAMA_DEFAULT_WINDOW)
        return None

    async def _window_from_tgi(self, client: Any, root: str) -> int | None:
        data = await self._get(client, root + "/info")
        return _count(data.get("max_total_tokens")) if isinstance(data, dict) else None


# ---------------------------------------------------------------------- helpers


def _import_openai() -> Any:
    try:
        return importlib.import_module("openai")
    except ImportError as e:
        raise MissingDependencyError("openai", "openai", "The openai policy backend") from e


def _httpx_modules(openai_module: Any) -> list[Any]:
    """The httpx flavours whose clients ``openai`` takes: its own (httpx2 or httpx), then httpx if imported."""
    modules = []
    try:
        modules.append(_openai_httpx(openai_module))
    except Exception:  # noqa: S110 - an unfamiliar openai version: fall back to httpx alone
        pass
    # A client or transport made with httpx means httpx is imported already.
    legacy = sys.modules.get("httpx")
    if legacy is not None and legacy not in modules:
        modules.append(legacy)
    return modules


def _openai_httpx(openai_module: Any) -> Any:
    """The httpx flavour (httpx2 or httpx) whose ``AsyncClient`` openai's default client extends."""
    base = next(c for c in openai_module.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.split(".")[0])


def _check_http(openai_module: Any, http_client: Any, transport: Any) -> tuple[Any, Any]:
    """``http_client`` and ``transport``, checked: at most one, each of a kind the openai client takes."""
    if http_client is not None and transport is not None:
        raise ConfigError("give the openai backend an http_client or a transport, not both")
    modules = _httpx_modules(openai_module)
    if http_client is not None and not any(isinstance(http_client, m.AsyncClient) for m in modules):
        raise ConfigError(f"http_client must be an httpx.AsyncClient, not {type(http_client).__name__}")
    if transport is not None and not any(isinstance(transport, m.AsyncBaseTransport) for m in modules):
        raise ConfigError(
            f"transport must be an httpx.AsyncBaseTransport (e.g. httpx.MockTransport), not {type(transport).__name__}"
        )
    return http_client, transport


def _new_http_client(openai_module: Any, transport: Any, connections: int, timeout_s: float) -> Any:
    """An HTTP client over ``transport``, else the default one with a pool as large as the concurrency limit.

    The default pool keeps only 100 connections alive; more requests in flight would open
    and close a connection each time. None leaves the choice to the openai client.
    """
    cls = openai_module.DefaultAsyncHttpxClient
    if transport is not None:
        module = next(m for m in _httpx_modules(openai_module) if isinstance(transport, m.AsyncBaseTransport))
        if issubclass(cls, module.AsyncClient):
            return cls(transport=transport, timeout=timeout_s)  # with openai's own defaults
        return module.AsyncClient(transport=transport, timeout=timeout_s, follow_redirects=True)
    try:
        limits = _openai_httpx(openai_module).Limits(max_connections=connections, max_keepalive_connections=connections)
        return cls(limits=limits, timeout=timeout_s)
    except Exception:  # an unfamiliar openai or httpx version: its defaults will do
        return None


def _resolve_key(api_key: str | None, api_key_env: str | None, base_url: str) -> str:
    """The key to send: given, or read from ``api_key_env``; a local server without one gets a placeholder."""
    if api_key is None and api_key_env is not None:
        key_env = api_key_env.strip()
        api_key = os.environ.get(key_env) or None
        if api_key is None:
            raise ConfigError(f"api_key_env={key_env}, but the environment variable {key_env} is not set")
    if api_key is not None:
        return api_key
    if _is_official(base_url):
        raise ConfigError(
            f"{base_url} needs an API key: set OPENAI_API_KEY, or name another variable with "
            "api_key_env=NAME (--api-key-env NAME). For a local server, give its URL with --base-url."
        )
    return _PLACEHOLDER_KEY


def _check_base_url(url: str) -> tuple[str, dict[str, str], str]:
    """The base URL without its query string, that query's parameters (sent with every request), and the URL as shown.

    The URL as shown is the base URL with its query, without credentials and with secrets masked (``display_url``).
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("base_url is empty; give the server's URL, e.g. http://localhost:8000/v1")
    url = url.strip()
    if "," in url:
        raise ConfigError(
            "base_url holds several URLs, and an OpenAIPolicy talks to one server; OpenAIPolicy.from_spec "
            "and tpo.build_models make one per server and send each request to the least busy"
        )
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        raise ConfigError(f"base_url {shown!r} is not a valid URL ({mask_secrets_in_text(str(e))})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"base_url {shown!r} is not an http(s) URL; e.g. http://localhost:8000/v1")
    if parts.fragment:
        raise ConfigError(f"base_url {shown!r} has a #fragment, which a server never sees; remove it")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True) if parts.query else []
    except ValueError:
        raise ConfigError(f"base_url {shown!r}: its query string is not NAME=VALUE pairs joined by &") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise ConfigError(f"base_url {shown!r} gives the query parameter {name!r} twice; give it once")
        query[name] = value
    base = urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
    return base, query, display_url(base + (f"?{parts.query}" if parts.query else ""))


def _is_official(url: str) -> bool:
    return urlsplit(url).hostname == "api.openai.com"


def _server_root(base_url: str) -> str:
    """``http://host:8000/v1`` → ``http://host:8000``: where servers keep their own endpoints."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _seed_for(seed: int, index: int) -> int:
    """The seed of the ``index``-th single-answer request; the first keeps the request's seed."""
    return seed if index == 0 else (seed + _SEED_STRIDE * index) & 0x7FFFFFFF


def _to_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _count(value: Any) -> int | None:
    """A non-negative integer from a JSON value, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value):
        return None
    return int(value)


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        texts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) if texts else None
    return None


def _logprobs(raw: Any) -> tuple[TokenLogprob, ...] | None:
    """Chat-style log-probabilities (``{"content": [{token, logprob, top_logprobs}, ...]}``), or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), list):
        return None
    out = []
    for item in raw["content"]:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            return None
        top = tuple(
            (t["token"], _logprob(t.get("logprob")))
            for t in item.get("top_logprobs") or ()
            if isinstance(t, dict) and isinstance(t.get("token"), str)
        )
        out.append(TokenLogprob(item["token"], _logprob(item.get("logprob")), top))
    return tuple(out)


def _logprob(value: Any) -> float:
    # JSON has no -infinity; servers send null (or a huge negative number) for impossible tokens.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("-inf")


def _merge(replies: Sequence[_Reply], choices: Sequence[_Choice]) -> Generation:
    prompt = [r.prompt_tokens for r in replies]
    completion = [r.completion_tokens for r in replies]
    want_logprobs = any(c.logprobs is not None for c in choices)
    return Generation(
        texts=tuple(c.text for c in choices),
        prompt_tokens=sum(p for p in prompt if p is not None) if prompt and None not in prompt else None,
        completion_tokens=sum(c for c in completion if c is not None)
        if completion and None not in completion
        else None,
        finish_reasons=tuple(c.finish_reason for c in choices),
        logprobs=tuple(c.logprobs for c in choices) if want_logprobs else None,
    )


def _server_message(body: Any, fallback: str) -> str:
    """The human part of an error body: OpenAI's ``{"error": {"message"}}``, FastAPI's ``detail``, or text."""
    msg: Any = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        if msg is None:
            msg = body.get("detail", body.get("message"))
    elif isinstance(body, str):
        msg = body
    if msg is None or (isinstance(msg, str) and not msg.strip()):
        msg = fallback or "no details"
    text = msg if isinstance(msg, str) else json.dumps(msg)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _cause_text(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    if cause is None:
        return type(error).__name__
    detail = str(cause).strip()
    return f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__


def _hint(status: int | None) -> str:
    if status in (401, 403):
        return " (check the API key: set OPENAI_API_KEY, or name another variable with api_key_env=NAME)"
    if status == 404:
        return " (check the model name and that the base URL ends in /v1; GET /v1/models lists what the server serves)"
    return ""


async def _all_or_cancel(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await all, in order; on the first failure cancel the rest (they hold server capacity) and raise it."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
