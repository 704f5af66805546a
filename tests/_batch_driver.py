"""A batch run through the Python API (``run_batch``), for tests/test_kill_resume.py to kill and resume.

Usage: ``python tests/_batch_driver.py INPUT OUTPUT CALL_LOG [LATENCY_S]``. The policy and
reward are those of the ``tpo batch`` test (``tests/plugin_fixture``): replies and scores
depend only on the request, so an interrupted and resumed run must give exactly the results
of an uninterrupted one, and every policy call is appended to CALL_LOG as ``pid<TAB>prompt
id<TAB>step<TAB>purpose`` when its reply is made. Its checkpoints are compacted every few
kilobytes (a real run waits for 64 MiB), so kills also land in the middle of compactions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from plugin_fixture.reward import score  # this script's folder, tests/, is first on sys.path
from plugin_fixture.tpo_test_plugin import CALL_LOG_ENV, ScriptedBackend
from tpo import TPOConfig
from tpo.batch.datasets import read_prompts
from tpo.batch.runner import run_batch
from tpo.testing import FunctionReward

CONFIG = TPOConfig(width=3, depth=2, seed=11, max_concurrent_prompts=8)
#: Small, so the run compacts its checkpoints several times (and may be killed while it does).
COMPACT_MIN_BYTES = 8192


def main(argv: list[str]) -> int:
    input_path, output, log_path = Path(argv[0]), Path(argv[1]), Path(argv[2])
    latency_s = float(argv[3]) if len(argv) > 3 else 0.02
    os.environ[CALL_LOG_ENV] = str(log_path)  # where the policy logs its calls
    summary = run_batch(
        read_prompts(input_path, id_field="id"),
        output,
        policy=ScriptedBackend(latency_s),
        reward=FunctionReward(score),
        config=CONFIG,
        compact_min_bytes=COMPACT_MIN_BYTES,
    )
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
