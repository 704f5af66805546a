"""A real batch process, killed with SIGKILL at random moments and resumed, loses nothing and repeats no finished step."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
DRIVER = HERE / "_batch_driver.py"
PROMPTS = 100


def _driver() -> Any:
    spec = importlib.util.spec_from_file_location("_batch_driver", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strip_timings(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_timings(v) for k, v in data.items() if k != "wall_time_s"}
    if isinstance(data, list):
        return [_strip_timings(v) for v in data]
    return data


def _complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _start(input_path: Path, output: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(input_path), str(output), str(log), "0.02"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    input_path = tmp_path / "prompts.jsonl"
    with input_path.open("w") as f:
        for i in range(PROMPTS):
            f.write(json.dumps({"id": f"p{i:03d}", "prompt": f"Question number {i}?", "reference": str(i)}) + "\n")
    driver = _driver()
    reference_out = tmp_path / "reference.jsonl"
    assert driver.run(input_path, reference_out).ok
    reference = {d["prompt_id"]: d for d in map(json.loads, reference_out.read_text().splitlines())}

    output, log = tmp_path / "out.jsonl", tmp_path / "calls.tsv"
    rng = random.Random(20250501)
    # Kill when a few more results were written, and at random times (start-up included).
    schedule: list[tuple[str, float]] = [("more", 5), ("time", rng.uniform(0.2, 1.5)), ("more", 20),
                                         ("time", rng.uniform(1.0, 2.5)), ("more", 1), ("time", rng.uniform(0.5, 2.0)),
                                         ("more", 15)]
    kills = []
    for kind, when in schedule:
        before = _complete_lines(output)
        proc = _start(input_path, output, log)
        started = time.monotonic()
        while proc.poll() is None:
            if kind == "more" and _complete_lines(output) >= before + when:
                break
            if kind == "time" and time.monotonic() - started >= when:
                break
            if time.monotonic() - started > 30:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills.append((kind, when, _complete_lines(output)))
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    final = _start(input_path, output, log)
    _, err = final.communicate(timeout=60)
    assert final.returncode == 0, err.decode()
    assert len(kills) >= 4, kills
    assert any(0 < lines < PROMPTS for _, _, lines in kills), kills

    # Every prompt exactly once, with the trace of the uninterrupted run.
    raw = output.read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().split("\n")[:-1]]
    ids = [d["prompt_id"] for d in lines]
    assert len(ids) == PROMPTS and len(set(ids)) == PROMPTS and set(ids) == set(reference)
    for d in lines:
        assert d["status"] == "complete"
        assert d["metadata"] == {"reference": str(int(d["prompt_id"][1:]))}
        assert _strip_timings(d) == _strip_timings(reference[d["prompt_id"]]), d["prompt_id"]
    assert (tmp_path / "out.jsonl.tpo" / "checkpoints.jsonl").stat().st_size == 0

    # No finished step computed twice: a call is repeated only in a later process, and only for
    # the step its prompt was working on when the earlier process was killed.
    calls = [line.split("\t") for line in log.read_text().splitlines() if line.count("\t") == 3]
    segments = list(dict.fromkeys(pid for pid, *_ in calls))
    assert 3 <= len(segments) <= len(kills) + 1  # a process killed during start-up made no call
    seen: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    last_step: dict[tuple[int, str], int] = {}
    for pid, prompt, step, purpose in calls:
        seg = segments.index(pid)
        seen[(prompt, int(step), purpose)].append(seg)
        last_step[(seg, prompt)] = max(last_step.get((seg, prompt), -1), int(step))
    repeated = 0
    for (prompt, step, purpose), segs in seen.items():
        assert len(segs) == len(set(segs)), f"{prompt} step {step} {purpose} called twice in one process"
        for seg in segs[:-1]:
            repeated += 1
            assert step == last_step[(seg, prompt)], (
                f"{prompt} step {step} ({purpose}) was finished in process {seg} and computed again later"
            )
    expected_calls = PROMPTS * (1 + 3 * driver.CONFIG.depth)
    assert len(seen) == expected_calls
    assert len(calls) == expected_calls + repeated
    # Resuming did happen mid-prompt: some prompt ran its steps in more than one process.
    spread = defaultdict(set)
    for (prompt, _, _), segs in seen.items():
        spread[prompt].update(segs)
    assert any(len(s) > 1 for s in spread.values())
