"""A simulated OpenAI-compatible server that behaves like a continuous-batching GPU server.

It has K sequence slots. Every sequence waits for a free slot (first come, first served) and
holds it for its prefill (prompt tokens ÷ prefill rate, shared by the ``n`` sequences of a
request) plus its decode time (completion tokens ÷ per-sequence decode rate). ``n`` is
honoured. Answers are deterministic text of a set number of tokens, wrapped in whatever
answer tags the request asks for. All times are divided by ``time_scale``, so a run that
would take an hour on a GPU takes minutes. ``GET /stats`` returns the counters: requests,
sequences, tokens, peak concurrency and busy slot-time (in simulated seconds).

Run alone: .venv/bin/python benchmarks/sim_server.py --port 8123 --slots 64
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_TAGS = re.compile(r"between <([A-Za-z][A-Za-z0-9_\-]*)> and </\1>")
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


@dataclass
class SimSettings:
    slots: int = 64
    decode_tokens_per_s: float = 30.0  # per sequence, simulated
    prefill_tokens_per_s: float = 8000.0  # per request, simulated
    answer_tokens: int = 128
    time_scale: float = 1.0
    context_window: int = 32768


@dataclass
class SimStats:
    requests: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    peak_concurrency: int = 0
    busy_slot_s: float = 0.0  # simulated seconds summed over slots
    queue_wait_s: float = 0.0  # simulated seconds sequences waited for a slot
    first_request_at: float | None = None
    last_response_at: float | None = None


class SimServer:
    def __init__(self, settings: SimSettings) -> None:
        self.s = settings
        self.stats = SimStats()
        self._slots: asyncio.Semaphore | None = None

    def reset(self) -> None:
        self.stats = SimStats()

    def _sem(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.s.slots)
        return self._slots

    async def _sequence(self, prefill_s: float, decode_s: float) -> None:
        queued = time.perf_counter()
        async with self._sem():
            st = self.stats
            st.queue_wait_s += (time.perf_counter() - queued) * self.s.time_scale
            st.in_flight += 1
            st.peak_concurrency = max(st.peak_concurrency, st.in_flight)
            try:
                await asyncio.sleep((prefill_s + decode_s) / self.s.time_scale)
            finally:
                st.in_flight -= 1
                st.busy_slot_s += prefill_s + decode_s

    def _answer(self, messages: list[dict[str, Any]], index: int, seed: int | None) -> str:
        last = str(messages[-1].get("content", "")) if messages else ""
        h = hashlib.sha256(f"{seed}/{index}/{last[-200:]}".encode()).digest()
        words = [_WORDS[h[i % len(h)] % len(_WORDS)] for i in range(self.s.answer_tokens)]
        text = " ".join(words)
        m = _TAGS.search(last)
        return f"<{m.group(1)}>{text}</{m.group(1)}>" if m else text

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        now = time.perf_counter()
        st = self.stats
        if st.first_request_at is None:
            st.first_request_at = now
        messages = body.get("messages") or []
        n = int(body.get("n") or 1)
        prompt_tokens = max(1, sum(len(str(m.get("content", ""))) for m in messages) // 4)
        completion_tokens = min(self.s.answer_tokens, int(body.get("max_tokens") or self.s.answer_tokens))
        prefill_s = prompt_tokens / self.s.prefill_tokens_per_s
        decode_s = completion_tokens / self.s.decode_tokens_per_s
        st.requests += 1
        st.sequences += n
        st.prompt_tokens += prompt_tokens
        st.completion_tokens += completion_tokens * n
        await asyncio.gather(*(self._sequence(prefill_s, decode_s) for _ in range(n)))
        st.last_response_at = time.perf_counter()
        seed = body.get("seed")
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": self._answer(messages, i, seed)},
                "finish_reason": "stop",
            }
            for i in range(n)
        ]
        return JSONResponse(
            {
                "id": f"sim-{st.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "sim"),
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens * n,
                    "total_tokens": prompt_tokens + completion_tokens * n,
                },
            }
        )

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": "sim", "object": "model", "max_model_len": self.s.context_window}]}
        )

    async def get_stats(self, request: Request) -> JSONResponse:
        return JSONResponse({"settings": asdict(self.s), "stats": asdict(self.stats)})

    async def post_reset(self, request: Request) -> JSONResponse:
        self.reset()
        return JSONResponse({"ok": True})

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/stats", self.get_stats, methods=["GET"]),
                Route("/reset", self.post_reset, methods=["POST"]),
            ]
        )


def main() -> None:
    ap = argparse.ArgumentParser(description="Simulated continuous-batching OpenAI-compatible server (loopback only).")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--decode-tokens-per-s", type=float, default=30.0)
    ap.add_argument("--prefill-tokens-per-s", type=float, default=8000.0)
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--time-scale", type=float, default=1.0)
    a = ap.parse_args()
    settings = SimSettings(a.slots, a.decode_tokens_per_s, a.prefill_tokens_per_s, a.answer_tokens, a.time_scale)
    uvicorn.run(
        SimServer(settings).app(),
        host="127.0.0.1",
        port=a.port,
        log_level="warning",
        backlog=4096,
        timeout_keep_alive=60,
        limit_concurrency=None,
    )


if __name__ == "__main__":
    main()
