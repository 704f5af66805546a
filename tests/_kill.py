"""Kill -9 and resume for the tests: start a process again and again, SIGKILL it at chosen moments, leave none running.

    for run in kill_and_resume(start, lambda: newlines(output), [("more", 5), ("time", 0.8)]):
        assert run.returncode in (0, -signal.SIGKILL), run.stderr
    with reaped(start()) as proc:
        assert proc.wait(timeout=90) == 0

``progress()`` counts what the runs have finished so far (``newlines`` of their output files);
a kill moment is measured from it. Every process these helpers start or are handed is killed
when the test fails or times out, so a failing test leaves no process behind.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

Process = subprocess.Popen[bytes]


def newlines(*paths: Path) -> int:
    """The complete lines in these files together; a file not written yet has none."""
    total = 0
    for path in paths:
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return total


@contextmanager
def reaped(proc: Process) -> Iterator[Process]:
    """``proc``, SIGKILLed on leaving the block if it is still running (the test failed or timed out)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until(proc: Process, done: Callable[[float], bool], *, limit_s: float) -> None:
    """Poll every 5 ms until ``proc`` has ended, ``done(seconds since the call)`` holds, or ``limit_s`` passed."""
    started = time.monotonic()
    while proc.poll() is None:
        elapsed = time.monotonic() - started
        if elapsed > limit_s or done(elapsed):
            return
        time.sleep(0.005)


def finish(proc: Process, timeout_s: float) -> str:
    """``proc``'s standard error once it has ended; it is killed if it has not ended within ``timeout_s``."""
    with reaped(proc):
        _, err = proc.communicate(timeout=timeout_s)
    return err.decode() if err else ""


@dataclass(frozen=True)
class Run:
    """One process of ``kill_and_resume``, once it has ended."""

    kind: str
    when: float
    pid: int
    #: False when the process ended by itself before its moment came.
    killed: bool
    returncode: int
    stderr: str


def kill_and_resume(
    start: Callable[[], Process],
    progress: Callable[[], int],
    schedule: Sequence[tuple[str, float]],
    *,
    mid: Callable[[Process], bool] | None = None,
    limit_s: float = 30,
) -> Iterator[Run]:
    """Start a process for each moment of ``schedule``, SIGKILL it then, and yield how it ended.

    Kinds: ``("more", k)`` kills once ``progress()`` has grown by k since the process started,
    ``("time", s)`` after s seconds (start-up included), ``("mid", k)`` once it has grown by k
    and ``mid(process)`` holds (the process has a prompt half-done, say). A process still
    running after ``limit_s`` is killed all the same. The last run, which should finish, is the
    caller's: a process started after the schedule resumes the killed ones.
    """
    for kind, when in schedule:
        if kind not in ("more", "time", "mid") or (kind == "mid" and mid is None):
            raise ValueError(f"unknown kill moment {kind!r}" if kind != "mid" else "a 'mid' kill needs mid=")
        before = progress()
        with reaped(start()) as proc:
            wait_until(proc, _moment(kind, when, before, progress, proc, mid), limit_s=limit_s)
            killed = proc.poll() is None
            if killed:
                proc.kill()
                proc.wait()
            err = finish(proc, 30)
        yield Run(kind, when, proc.pid, killed, proc.returncode, err)


def _moment(
    kind: str,
    when: float,
    before: int,
    progress: Callable[[], int],
    proc: Process,
    mid: Callable[[Process], bool] | None,
) -> Callable[[float], bool]:
    """Whether the moment ``(kind, when)`` of ``kill_and_resume`` has come, given the seconds since ``proc`` started."""

    def due(elapsed: float) -> bool:
        if kind == "time":
            return elapsed >= when
        grown = progress() >= before + when
        return grown and (kind == "more" or (mid is not None and mid(proc)))

    return due
