"""A sweep through the Python API (``tpo.batch.sweep.Sweep``), for tests/test_sweep.py to kill and resume.

Usage: ``python tests/_sweep_driver.py INPUT FOLDER CALL_LOG``. The grid is TPO at widths 2 and 3,
depths 1 and 2, and best-of-N at 4 and 6: three configurations run (``tpo-d2-n2``,
``tpo-d2-n3``, ``bon-n6``) and three are derived. Replies and scores depend only on the
request, so an interrupted and resumed sweep must give exactly the results of an
uninterrupted one. Every policy call is appended to CALL_LOG, when its reply is made, as
``pid<TAB>width<TAB>prompt id<TAB>step<TAB>purpose``: the width of the configuration
that asked, read from the request (samples say how many were asked for, and every later
request quotes an answer that says it).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from tpo import GenerationRequest, TPOConfig
from tpo.batch.datasets import read_prompts
from tpo.batch.sweep import Sweep, plan_sweep
from tpo.testing import FunctionReward, ScriptedPolicy

TAG = "improved_reply"
BASE = TPOConfig(seed=5, max_concurrent_prompts=6)
WIDTH = re.compile(r"of (\d+) for ")


def entries() -> tuple:  # type: ignore[type-arg]
    return plan_sweep(BASE, modes=["tpo", "bon"], widths=[2, 3], depths=[1, 2], bon_widths=[4, 6])


def _width(request: GenerationRequest) -> str:
    """The width a loss, gradient or update request's configuration runs at: every such request quotes an answer."""
    found = WIDTH.search("\n".join(m.content for m in request.messages))
    return found.group(1) if found else "?"


def reply(request: GenerationRequest) -> list[str]:
    """Replies that are a pure function of the request; samples say how many were asked for."""
    seed = request.sampling.seed
    if request.purpose == "sample":
        return [f"Answer {i} of {request.n} for {request.prompt_id} (seed {seed})" for i in range(request.n)]
    width = _width(request)
    tail = f"of {width} for {request.prompt_id}"
    if request.purpose in ("loss", "gradient"):
        return [f"{request.purpose} at step {request.step} (seed {seed}) {tail}"]
    return [f"<{TAG}>Rewrite {i} at step {request.step} (seed {seed}) {tail}</{TAG}>" for i in range(request.n)]


def score(messages: object, answer: str) -> float:
    import hashlib

    return int(hashlib.sha256(answer.encode()).hexdigest()[:6], 16) % 1000 / 10


class LoggedPolicy(ScriptedPolicy):
    def __init__(self, log: str) -> None:
        super().__init__(self._logged, latency_s=0.02)
        self._fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log != os.devnull else None

    def _logged(self, request: GenerationRequest) -> list[str]:
        out = reply(request)
        if self._fd is not None:
            width = str(request.n) if request.purpose == "sample" else _width(request)
            # One write() per line on an O_APPEND descriptor: a kill cannot leave half a line.
            os.write(
                self._fd, f"{os.getpid()}\t{width}\t{request.prompt_id}\t{request.step}\t{request.purpose}\n".encode()
            )
        return out


def main(argv: list[str]) -> int:
    input_path, folder, log = Path(argv[0]), Path(argv[1]), argv[2]
    sweep = Sweep(
        read_prompts(input_path, id_field="id"), folder, entries(), models={"policy": "logged"}, compact_min_bytes=4096
    )
    sweep.open()
    summary = sweep.run(LoggedPolicy(log), FunctionReward(score))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
