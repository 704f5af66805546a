"""The ASGI application: OpenAI chat completions over one shared engine, with models, traces, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..config import MODES, TPOConfig
from ..engine.algorithm import UNSCORED_ERROR_PREFIX, Engine
from ..errors import ConfigError, RunError, UserError
from ..models import Models
from ..result import TPOResult
from ..rewards.judge import JudgeReward
from ._auth import AuthMiddleware, KeyCheck
from ._errors import APIError, bad_request, internal_error, model_not_found, send_json
from ._gate import Gate, QueueFull, Slot
from ._limits import ServeLimits
from ._metrics import MeteredPolicy, MeteredReward, Metrics
from ._protocol import (
    ChatRequest,
    completion_body,
    finish_reason,
    parse_chat_request,
    ranked_answers,
    split_text,
    tpo_extension,
    usage_of,
)
from ._rubrics import RubricRouter
from ._traces import Traces

log = logging.getLogger("tpo.serve")


class _Disconnected(Exception):
    """The client closed the connection."""


class TPOServer:
    """The state behind one application: one engine for every request, the gate, traces and metrics.

    Built by ``create_app``; ``app.state.tpo`` holds it (tests and operators read its metrics).
    """

    def __init__(
        self,
        models: Models,
        config: TPOConfig,
        limits: ServeLimits,
        *,
        api_keys: tuple[str, ...],
        trace_log: str | Path | None,
        model_name: str,
        close_models: bool,
    ) -> None:
        limits.check_config(config)
        self.models = models
        self.config = config
        self.limits = limits
        self.metrics = Metrics()
        self.gate = Gate(limits.max_concurrent, limits.max_queue)
        self.metrics.in_flight.set_function(lambda: self.gate.running)
        self.metrics.queued.set_function(lambda: self.gate.waiting)
        self.traces = Traces(limits.max_traces, trace_log)
        self.presets = _presets(config, model_name)
        self.created = int(time.time())
        #: A moving average of how long answered requests took: what a refused client is told to wait.
        self._typical_s = 5.0
        self._close_models = close_models
        self._keys = KeyCheck(api_keys) if api_keys else None
        reward: Any = models.reward
        #: Why a request may not set its own rubric (None: it may).
        self.no_rubrics: str | None = None
        if isinstance(reward, JudgeReward):
            reward = RubricRouter(reward)
        else:
            self.no_rubrics = f"the server's reward is {getattr(reward, 'name', type(reward).__name__)}, not a judge"
        critic = MeteredPolicy(models.critic, self.metrics, "critic") if models.critic is not None else None
        # One engine for every request: its dispatchers gather the ready work of all of them.
        self.engine = Engine(
            MeteredPolicy(models.policy, self.metrics, "policy"),
            MeteredReward(reward, self.metrics),
            critic=critic,
            config=config,
        )

    # ------------------------------------------------------------------ the app

    def app(self) -> Starlette:
        middleware = [Middleware(AuthMiddleware, check=self._keys)] if self._keys is not None else []
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", _ASGIEndpoint(self.chat), methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/v1/tpo/traces/{trace_id}", self.get_trace, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.get_metrics, methods=["GET"]),
            ],
            middleware=middleware,
            exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
            lifespan=self._lifespan,
        )
        app.state.tpo = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            # Fit the server's own templates to the models' windows now: a misconfigured server
            # must fail at start-up, not answer every request with an error that blames the client.
            await self.engine.prepare()
            yield
        finally:
            await self.traces.aclose()
            if self._close_models:
                await self.models.aclose()

    # ------------------------------------------------------------------ small endpoints

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in self.presets]})

    async def get_model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        if name not in self.presets:
            raise model_not_found(name, self.presets)
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict[str, Any]:
        cfg = self.presets[name]
        engine = self.engine
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "tpo",
            "tpo": {
                "mode": cfg.mode,
                "width": cfg.width,
                "depth": cfg.depth,
                "seed": cfg.seed,
                "max_tokens": cfg.max_tokens,
                "policy": _name(engine.policy),
                "critic": _name(engine.critic),
                "reward": _name(engine.reward),
            },
        }

    async def get_trace(self, request: Request) -> Response:
        trace_id = request.path_params["trace_id"]
        result = self.traces.get(trace_id)
        if result is None:
            raise APIError(
                404,
                f"no trace {trace_id!r}: unknown, or older than the last {self.traces.capacity} kept",
                param="trace_id",
                code="trace_not_found",
            )
        return Response(result.to_json(), media_type="application/json")

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "prompts_in_flight": self.gate.running, "queued": self.gate.waiting})

    async def get_metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ chat completions

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.monotonic()
        status = 500
        try:
            try:
                request = parse_chat_request(
                    await self._read_json(scope, receive), self.presets, self.limits, rubrics=self.no_rubrics
                )
                slot = self._enter()
            except APIError as e:
                status = e.status
                await e.send(send)
                return
            except _Disconnected:
                status = 499
                return
            trace_id = "chatcmpl-" + secrets.token_hex(12)
            deadline = arrived + self.limits.request_timeout_s
            if request.stream:
                status = await self._stream(receive, send, request, slot, trace_id, deadline)
            else:
                status = await self._respond(receive, send, request, slot, trace_id, deadline)
        finally:
            took = time.monotonic() - arrived
            self.metrics.requests.labels(status=str(status)).inc()
            self.metrics.request_latency.observe(took)
            if status == 200:
                self._typical_s += 0.1 * (took - self._typical_s)

    def _enter(self) -> Slot:
        try:
            return self.gate.enter()
        except QueueFull:
            # About when a slot frees up: one typical request's time, bounded to something a client will honour.
            retry = min(60, max(1, math.ceil(self._typical_s)))
            raise APIError(
                429,
                f"the server is at capacity: {self.gate.running} prompts running and "
                f"{self.gate.waiting} waiting (--max-concurrent, --max-queue); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"retry-after": str(retry)},
            ) from None

    async def _read_json(self, scope: Scope, receive: Receive) -> Any:
        limit = self.limits.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _too_large(int(value), limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if not raw.strip():
            raise bad_request("the request body is empty; send the chat completion request as JSON")
        try:
            return json.loads(raw)
        except RecursionError:
            raise bad_request("the request body nests too deeply to be a chat completion request") from None
        except ValueError as e:  # UnicodeDecodeError included
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from e

    async def _optimize(
        self,
        request: ChatRequest,
        slot: Slot,
        trace_id: str,
        deadline: float,
        on_progress: Callable[[TPOResult], None] | None = None,
    ) -> TPOResult:
        """Wait for a slot, optimise, keep the trace; raise ``APIError`` for every way that fails."""
        partial: TPOResult | None = None
        seen = 0

        def on_step(result: TPOResult) -> None:
            nonlocal partial, seen
            partial = result
            seen = self.metrics.record_steps(result, seen)
            if on_progress is not None:
                on_progress(result)

        async def run() -> TPOResult:
            async with slot:
                return await self.engine.optimize(request.prompt, config=request.config, on_step=on_step)

        try:
            result = await asyncio.wait_for(run(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            timeout = self.limits.request_timeout_s
            if partial is not None:
                partial = replace(
                    partial, status="failed", error=f"timed out after {timeout:g} s (--request-timeout-s)"
                )
                self.metrics.record_usage(partial)
                await self.traces.add(trace_id, partial)
            found = "; the best answer so far is in error.tpo" if partial else ""
            raise APIError(
                504,
                f"the request took longer than this server's limit of {timeout:g} s (--request-timeout-s){found}",
                type="timeout_error",
                code="request_timeout",
                partial=partial,
                trace_id=trace_id if partial else None,
            ) from None
        except UserError as e:  # a per-request option the models cannot take (a template too long for it)
            raise bad_request(str(e)) from e
        except RunError as e:  # the models failed before the engine could start (the policy server is down)
            raise APIError(502, str(e), type="upstream_error", code="upstream_error") from e
        self.metrics.record_usage(result)
        await self.traces.add(trace_id, result)
        if result.status == "failed":
            raise _failure(result, trace_id)
        return result

    async def _respond(
        self, receive: Receive, send: Send, request: ChatRequest, slot: Slot, trace_id: str, deadline: float
    ) -> int:
        created = int(time.time())
        work = asyncio.create_task(self._optimize(request, slot, trace_id, deadline))
        gone = asyncio.create_task(_wait_disconnect(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: its optimisation is abandoned
                return 499
            try:
                result = work.result()
            except APIError as e:
                await e.send(send)
                return e.status
            await send_json(send, 200, completion_body(result, request, trace_id, created))
            return 200
        finally:
            await _cancel(work, gone)
            slot.leave()  # a task cancelled before it ever ran did not give its place back itself

    async def _stream(
        self, receive: Receive, send: Send, request: ChatRequest, slot: Slot, trace_id: str, deadline: float
    ) -> int:
        created = int(time.time())
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def work() -> None:
            try:
                result = await self._optimize(
                    request, slot, trace_id, deadline, on_progress=lambda r: events.put_nowait(("progress", r))
                )
                events.put_nowait(("done", result))
            except APIError as e:
                events.put_nowait(("error", e))
            except Exception as e:  # a bug: the client hears of it instead of waiting forever
                log.exception("request %s failed", trace_id)
                events.put_nowait(("error", internal_error(e)))

        async def watch() -> None:
            await _wait_disconnect(receive)
            events.put_nowait(("gone", None))

        chunk = _Chunks(trace_id, created, request)
        tasks = (asyncio.create_task(work()), asyncio.create_task(watch()))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await _sse(
                send,
                chunk.make(
                    [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                    tpo={"trace_id": trace_id, "status": "running" if slot.ready else "queued"},
                ),
            )
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=self.limits.keepalive_s)
                except asyncio.TimeoutError:
                    await _send_raw(send, b": keep-alive\n\n")
                    continue
                if kind == "gone":
                    return 499
                if kind == "progress":
                    await _sse(send, chunk.progress(payload))
                elif kind == "error":
                    await _sse(send, payload.body())
                    await _send_raw(send, b"", more=False)
                    return int(payload.status)
                else:
                    for data in chunk.answer(payload):
                        await _sse(send, data)
                    await _send_raw(send, b"data: [DONE]\n\n", more=False)
                    return 200
        except OSError:  # the client went away while we were writing
            return 499
        finally:
            await _cancel(*tasks)
            slot.leave()  # a task cancelled before it ever ran did not give its place back itself


class _Chunks:
    """The ``chat.completion.chunk`` objects of one streamed reply."""

    def __init__(self, trace_id: str, created: int, request: ChatRequest) -> None:
        self.trace_id = trace_id
        self.created = created
        self.request = request

    def make(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        for c in choices:
            c.setdefault("logprobs", None)
            c.setdefault("finish_reason", None)
        data: dict[str, Any] = {
            "id": self.trace_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.request.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.request.include_usage:
            data["usage"] = None
        data.update(extra)
        return data

    def progress(self, partial: TPOResult) -> dict[str, Any]:
        """An empty delta that clients ignore, with the step just finished in the ``tpo`` extension."""
        last = partial.steps[-1] if partial.steps else None
        return self.make(
            [{"index": 0, "delta": {}}],
            tpo={
                "trace_id": self.trace_id,
                "status": "step",
                "step": last.step if last else None,
                "depth": partial.config.get("depth"),
                "kind": last.kind if last else None,
                "best_score": last.best_score if last else None,
                "candidates": len(partial.candidates),
            },
        )

    def answer(self, result: TPOResult) -> list[dict[str, Any]]:
        answers = ranked_answers(result, self.request.n)
        out = []
        for i, c in enumerate(answers):
            if i > 0:
                out.append(self.make([{"index": i, "delta": {"role": "assistant", "content": ""}}]))
            out.extend(self.make([{"index": i, "delta": {"content": piece}}]) for piece in split_text(c.text))
        for i, c in enumerate(answers):
            last = i == len(answers) - 1
            extra = {"tpo": tpo_extension(result, self.trace_id, answers)} if last else {}
            out.append(self.make([{"index": i, "delta": {}, "finish_reason": finish_reason(c)}], **extra))
        if self.request.include_usage:
            usage = self.make([])
            usage["usage"] = usage_of(result)
            out.append(usage)
        return out


class _ASGIEndpoint:
    """A raw ASGI endpoint (Starlette calls a plain function with a Request; this it calls as ASGI)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Any]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def _presets(config: TPOConfig, name: str) -> dict[str, TPOConfig]:
    """The served model names: ``name`` runs the server's configuration, ``name-MODE`` the same in another mode."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise ConfigError(f"the served model name must be a non-empty word, not {name!r}")
    presets = {name: config}
    for mode in MODES:
        # Revision and TPO need improvement steps; a server configured with none offers best-of-N only.
        if mode != config.mode and (mode == "bon" or config.depth > 0):
            presets[f"{name}-{mode}"] = config.with_options(mode=mode)
    return presets


def _failure(result: TPOResult, trace_id: str) -> APIError:
    """The error response for a failed result: the prompt's own fault is 400, a model's failure 502."""
    error = result.error or "failed"
    kind = error.split(":", 1)[0]
    if kind == "InputError":
        code = "context_length_exceeded" if "context window" in error else "invalid_value"
        return APIError(400, error, param="messages", code=code, trace_id=trace_id)
    if kind == "RewardError" or error.startswith(UNSCORED_ERROR_PREFIX):
        message, code = f"the reward model failed: {error}", "reward_error"
    else:
        message, code = f"the policy model failed: {error}", "upstream_error"
    return APIError(
        502, message, type="upstream_error", code=code, partial=result if result.answer else None, trace_id=trace_id
    )


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size} bytes, over this server's limit of {limit} (--max-body-bytes)",
        code="request_too_large",
    )


def _name(obj: object) -> str:
    return str(getattr(obj, "name", type(obj).__name__))


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _sse(send: Send, data: Any) -> None:
    await _send_raw(send, b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n\n")


async def _send_raw(send: Send, body: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, APIError):
        return await _server_error(request, exc)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(detail)
    code = "not_found" if status == 404 else None
    return await _api_error(request, APIError(status, message, code=code, headers=getattr(exc, "headers", None)))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return await _api_error(request, internal_error(exc))
