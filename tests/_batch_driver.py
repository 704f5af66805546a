"""A batch run through the Python API (``run_batch``), for tests/test_kill_resume.py to kill and resume.

Usage: ``python tests/_batch_driver.py INPUT OUTPUT CALL_LOG [LATENCY_S]``. Every policy call
is appended to CALL_LOG as ``pid<TAB>prompt id<TAB>step<TAB>purpose`` when its reply is
made. Replies and scores depend only on the request, so an interrupted and resumed run must
give exactly the results of an uninterrupted one. Its checkpoints are compacted every few
kilobytes (a real run waits for 64 MiB), so kills also land in the middle of compactions.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from tpo import GenerationRequest, Message, TPOConfig
from tpo.datasets import read_prompts
from tpo.runner import BatchSummary, run_batch
from tpo.testing import FunctionReward, ScriptedPolicy

CONFIG = TPOConfig(width=3, depth=2, seed=11, max_concurrent_prompts=8)
#: Small, so the run compacts its checkpoints several times (and may be killed while it does).
COMPACT_MIN_BYTES = 8192


def reply(request: GenerationRequest) -> list[str]:
    """Replies that are a pure function of the request: its prompt, step, role, seed and messages."""
    key = hashlib.sha256(
        repr((request.prompt_id, request.step, request.purpose, request.sampling.seed, request.messages)).encode()
    ).hexdigest()[:10]
    if request.purpose == "sample":
        return [f"Answer {i} to {request.prompt_id} [{key}]" for i in range(request.n)]
    if request.purpose == "loss":
        return [f"Critique of step {request.step} [{key}]"]
    if request.purpose == "gradient":
        return [f"Advice for step {request.step} [{key}]"]
    tag = CONFIG.prompts.tag
    return [f"<{tag}>Rewrite {i} at step {request.step} of {request.prompt_id} [{key}]</{tag}>" for i in range(request.n)]


def score(messages: Sequence[Message], answer: str) -> float:
    """A score that looks random across answers but is fixed for each."""
    return int(hashlib.sha256(answer.encode()).hexdigest()[:6], 16) / 0xFFFFFF


def run(input_path: Path, output: Path, call_log: IO[str] | None = None, latency_s: float = 0.0) -> BatchSummary:
    """The batch run, logging every policy call to ``call_log``."""

    def logged(request: GenerationRequest) -> list[str]:
        if call_log is not None:
            call_log.write(f"{os.getpid()}\t{request.prompt_id}\t{request.step}\t{request.purpose}\n")
        return reply(request)

    return run_batch(
        read_prompts(input_path, id_field="id"), output, policy=ScriptedPolicy(logged, latency_s=latency_s),
        reward=FunctionReward(score), config=CONFIG, compact_min_bytes=COMPACT_MIN_BYTES,
    )


def main(argv: list[str]) -> int:
    input_path, output, log_path = Path(argv[0]), Path(argv[1]), Path(argv[2])
    latency_s = float(argv[3]) if len(argv) > 3 else 0.02
    with log_path.open("a", buffering=1, encoding="utf-8") as log:  # one write per line, so a kill tears none
        summary = run(input_path, output, log, latency_s)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
