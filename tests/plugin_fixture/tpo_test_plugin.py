"""A policy backend plugin for tests: deterministic scripted replies after a small delay, each call logged to a file.

The folder ``tpo_test_plugin-0.1.dist-info`` beside this module registers it in the
``tpo.backends`` entry-point group as ``scripted``; with this folder on ``PYTHONPATH``,
``importlib.metadata`` finds it as it finds any installed plugin, so a real ``tpo batch``
process can run with ``--policy scripted``. Replies depend only on the request, so an
interrupted and resumed run must give exactly the results of an uninterrupted one. When the
environment variable ``TPO_TEST_CALL_LOG`` names a file, every call is appended to it, when
its reply is made, as ``pid<TAB>prompt id<TAB>step<TAB>purpose``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from tpo import GenerationRequest
from tpo.registry import take_options
from tpo.testing import ScriptedPolicy

CALL_LOG_ENV = "TPO_TEST_CALL_LOG"
#: The tag the default prompt templates ask rewrites to be wrapped in.
TAG = "improved_reply"


def reply(request: GenerationRequest) -> list[str]:
    """Replies that are a pure function of the request: its prompt, step, purpose, seed and messages."""
    key = hashlib.sha256(
        repr((request.prompt_id, request.step, request.purpose, request.sampling.seed, request.messages)).encode()
    ).hexdigest()[:10]
    if request.purpose == "sample":
        return [f"Answer {i} to {request.prompt_id} [{key}]" for i in range(request.n)]
    if request.purpose == "loss":
        return [f"Critique of step {request.step} [{key}]"]
    if request.purpose == "gradient":
        return [f"Advice for step {request.step} [{key}]"]
    return [
        f"<{TAG}>Rewrite {i} at step {request.step} of {request.prompt_id} [{key}]</{TAG}>" for i in range(request.n)
    ]


class ScriptedBackend(ScriptedPolicy):
    """``scripted``: deterministic replies after ``latency_s`` seconds, every call logged to ``$TPO_TEST_CALL_LOG``."""

    name = "scripted"
    batching = False
    supports_n = True
    supports_logprobs = False
    counts_tokens = False
    knows_context_window = False
    description = "Deterministic scripted replies for tests (tests/plugin_fixture)."

    def __init__(self, latency_s: float) -> None:
        super().__init__(self._logged, latency_s=latency_s)
        path = os.environ.get(CALL_LOG_ENV)
        # One write() per line on an O_APPEND descriptor: a kill cannot leave half a line.
        self._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> ScriptedBackend:
        """``scripted`` (no target); option ``latency_s`` (default 0.02)."""
        opts = take_options(options, {"latency_s": 0.02}, owner="the scripted test backend")
        return cls(float(opts["latency_s"]))

    def _logged(self, request: GenerationRequest) -> list[str]:
        if self._log_fd is not None:
            line = f"{os.getpid()}\t{request.prompt_id}\t{request.step}\t{request.purpose}\n"
            os.write(self._log_fd, line.encode())
        return reply(request)

    async def aclose(self) -> None:
        """Close the call log."""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
