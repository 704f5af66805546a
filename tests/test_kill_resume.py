"""A real batch process, killed with SIGKILL at random moments and resumed, loses nothing and repeats no finished step.

The main test kills a real ``tpo batch`` process: the command line as a user runs it, with a
policy plugin (``tests/plugin_fixture``) found through its entry point and a ``python:``
reward. A second test kills a process running ``run_batch`` (``tests/_batch_driver.py``)
whose checkpoint compaction runs every few kilobytes, so that kills land in compactions too.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from _kill import finish, kill_and_resume, newlines, reaped, wait_until
from conftest import strip_timings

HERE = Path(__file__).parent
FIXTURE = HERE / "plugin_fixture"
DRIVER = HERE / "_batch_driver.py"
TPO = Path(sys.executable).parent / "tpo"
PROMPTS = 100
WIDTH, DEPTH = 3, 2
CALLS_PER_PROMPT = 1 + 3 * DEPTH  # sample, then loss, gradient and update per step

Start = Callable[[Path, Path | None], "subprocess.Popen[bytes]"]


def _write_input(path: Path) -> None:
    with path.open("w") as f:
        for i in range(PROMPTS):
            f.write(json.dumps({"id": f"p{i:03d}", "prompt": f"Question number {i}?", "reference": str(i)}) + "\n")


def _cli(input_path: Path) -> Start:
    """Start ``tpo batch`` with the scripted plugin policy; the same command every time, as a user resumes."""

    def start(output: Path, log: Path | None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "TPO_TEST_CALL_LOG"}
        env["PYTHONPATH"] = str(FIXTURE)  # where importlib.metadata finds the plugin's dist-info
        if log is not None:
            env["TPO_TEST_CALL_LOG"] = str(log)
        command = [
            str(TPO),
            "batch",
            str(input_path),
            "-o",
            str(output),
            "--id-field",
            "id",
            "--policy",
            "scripted",
            "--policy-option",
            "latency_s=0.02",
            "--reward",
            f"python:{FIXTURE / 'reward.py'}:score",
            "--width",
            str(WIDTH),
            "--depth",
            str(DEPTH),
            "--seed",
            "11",
            "--concurrency",
            "8",
            "--log",
            "plain",
        ]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    return start


def _driver(input_path: Path) -> Start:
    def start(output: Path, log: Path | None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
        log_arg = str(log) if log is not None else os.devnull
        return subprocess.Popen(
            [sys.executable, str(DRIVER), str(input_path), str(output), log_arg, "0.02"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    return start


def _finish(proc: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    err = finish(proc, timeout_s)
    assert proc.returncode == 0, err


def _finished_ids(path: Path) -> set[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    return {json.loads(line)["prompt_id"] for line in raw.split(b"\n")[:-1]}


def _unfinished_in(log: Path, pid: int, output: Path) -> set[str]:
    """Prompts that process ``pid`` made a policy call for and that have no line in the output yet."""
    try:
        calls = [line.split("\t") for line in log.read_text().splitlines()]
    except FileNotFoundError:
        return set()
    mine = {c[1] for c in calls if len(c) == 4 and c[0] == str(pid)}
    return mine - _finished_ids(output)


Kill = tuple[str, float, int, bool]


def _kill_and_resume(start: Start, output: Path, log: Path, schedule: list[tuple[str, float]]) -> list[Kill]:
    """Start the run, SIGKILL it when the schedule says, and again; finally let it finish. Returns the kills made.

    Kinds: ``("more", k)`` kills once k more results are written, ``("time", s)`` after s seconds
    (start-up included), ``("mid", k)`` once the process has written k more results and has made
    a call for a prompt it has not finished. Each kill records whether some prompt was left
    half-done, so the test knows a resume had to continue a prompt rather than only skip
    finished ones (group commits and fsyncs make a random kill often land between prompts).
    """
    kills: list[Kill] = []
    for run in kill_and_resume(
        lambda: start(output, log),
        lambda: newlines(output),
        schedule,
        mid=lambda proc: bool(_unfinished_in(log, proc.pid, output)),
    ):
        if run.killed:
            kills.append((run.kind, run.when, newlines(output), bool(_unfinished_in(log, run.pid, output))))
        assert run.returncode in (0, -signal.SIGKILL), run.stderr
    _finish(start(output, log))
    return kills


def _check(output: Path, reference: Path, log: Path, kills: list[Kill]) -> None:
    assert len(kills) >= 4, kills
    assert any(0 < lines < PROMPTS for _, _, lines, _ in kills), kills
    assert any(half_done for *_, half_done in kills), kills  # some kill left a prompt half-done
    expected = {d["prompt_id"]: d for d in map(json.loads, reference.read_text().splitlines())}
    assert len(expected) == PROMPTS

    # Every prompt exactly once, with the trace of the uninterrupted run.
    raw = output.read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().split("\n")[:-1]]
    ids = [d["prompt_id"] for d in lines]
    assert len(ids) == PROMPTS and len(set(ids)) == PROMPTS and set(ids) == set(expected)
    for d in lines:
        assert d["status"] == "complete"
        assert d["metadata"] == {"reference": str(int(d["prompt_id"][1:]))}
        assert strip_timings(d) == strip_timings(expected[d["prompt_id"]]), d["prompt_id"]
    assert (output.parent / (output.name + ".tpo") / "checkpoints.jsonl").stat().st_size == 0

    # No finished step computed twice: a call is repeated only in a later process, and only for
    # the step its prompt was working on when the earlier process was killed.
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    assert all(len(c) == 4 for c in calls)  # one write per line: no kill tore one
    segments = list(dict.fromkeys(pid for pid, *_ in calls))
    assert 3 <= len(segments) <= len(kills) + 1  # a process killed during start-up made no call
    seen: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    last_step: dict[tuple[int, str], int] = {}
    for pid, prompt, step_text, purpose in calls:
        seg = segments.index(pid)
        seen[(prompt, int(step_text), purpose)].append(seg)
        last_step[(seg, prompt)] = max(last_step.get((seg, prompt), -1), int(step_text))
    repeated = 0
    for (prompt, step, purpose), segs in seen.items():
        assert len(segs) == len(set(segs)), f"{prompt} step {step} {purpose} called twice in one process"
        for seg in segs[:-1]:
            repeated += 1
            assert step == last_step[(seg, prompt)], (
                f"{prompt} step {step} ({purpose}) was finished in process {seg} and computed again later"
            )
    assert len(seen) == PROMPTS * CALLS_PER_PROMPT
    assert len(calls) == PROMPTS * CALLS_PER_PROMPT + repeated
    # Resuming did continue a prompt: it ran its steps in more than one process.
    spread = defaultdict(set)
    for (prompt, _, _), segs in seen.items():
        spread[prompt].update(segs)
    assert any(len(s) > 1 for s in spread.values())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_of_a_real_tpo_batch_process_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    input_path = tmp_path / "prompts.jsonl"
    _write_input(input_path)
    start = _cli(input_path)
    reference = tmp_path / "reference.jsonl"
    _finish(start(reference, None))

    output, log = tmp_path / "out.jsonl", tmp_path / "calls.tsv"
    rng = random.Random(20250501)
    # Kill when a few more results were written, at random times (start-up included), and mid-prompt.
    schedule: list[tuple[str, float]] = [
        ("more", 5),
        ("time", rng.uniform(0.2, 1.5)),
        ("mid", 3),
        ("more", 20),
        ("time", rng.uniform(1.0, 2.5)),
        ("more", 1),
        ("time", rng.uniform(0.5, 2.0)),
        ("more", 15),
    ]
    kills = _kill_and_resume(start, output, log, schedule)
    _check(output, reference, log, kills)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_during_checkpoint_compactions_of_run_batch(tmp_path: Path) -> None:
    input_path = tmp_path / "prompts.jsonl"
    _write_input(input_path)
    start = _driver(input_path)
    reference = tmp_path / "reference.jsonl"
    _finish(start(reference, None))

    output, log = tmp_path / "out.jsonl", tmp_path / "calls.tsv"
    rng = random.Random(7)
    schedule: list[tuple[str, float]] = [
        ("time", rng.uniform(0.5, 1.5)),
        ("more", 10),
        ("mid", 2),
        ("time", rng.uniform(0.5, 1.5)),
        ("more", 25),
        ("time", rng.uniform(0.3, 1.0)),
    ]
    kills = _kill_and_resume(start, output, log, schedule)
    _check(output, reference, log, kills)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_stops_a_real_tpo_batch_process_cleanly_and_a_rerun_resumes(tmp_path: Path) -> None:
    """SIGTERM (docker stop, systemd, Kubernetes) is Ctrl-C: checkpoints in hand written, a message, exit 143."""
    input_path = tmp_path / "prompts.jsonl"
    _write_input(input_path)
    start = _cli(input_path)
    reference = tmp_path / "reference.jsonl"
    _finish(start(reference, None))

    output = tmp_path / "out.jsonl"
    with reaped(start(output, None)) as proc:
        wait_until(proc, lambda _: newlines(output) >= 10, limit_s=30)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        err = finish(proc, 30)
    assert proc.returncode == 143, err
    found = re.search(
        r"Stopped by SIGTERM: (\d+) of 100 prompts are finished in .*out\.jsonl\. "
        r"Run the same command again to continue\.",
        err,
    )
    assert found, err
    done = int(found.group(1))
    # Every line whole: the results and checkpoints in hand were written before the process ended.
    assert 10 <= done < PROMPTS and output.read_bytes().endswith(b"\n") and newlines(output) == done
    checkpoints = (output.parent / (output.name + ".tpo") / "checkpoints.jsonl").read_bytes()
    assert checkpoints == b"" or checkpoints.endswith(b"\n")
    for line in checkpoints.splitlines():
        json.loads(line)

    proc = start(output, None)
    err = finish(proc, 90)
    assert proc.returncode == 0, err
    assert f"resuming: {done} of 100 prompts already finished" in err and "repaired" not in err
    expected = {d["prompt_id"]: strip_timings(d) for d in map(json.loads, reference.read_text().splitlines())}
    got = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(got) == PROMPTS and {d["prompt_id"]: strip_timings(d) for d in got} == expected
