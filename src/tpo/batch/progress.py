"""What a batch run reports while it works: its live state, its observer hooks and its final summary."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..result import TPOResult, Usage


@dataclass(frozen=True)
class BatchSummary:
    """How a batch run ended.

    ``complete`` and ``failed`` count every prompt of the run, including those finished by
    earlier sessions (``finished_before``). ``usage`` sums the steps finished in this session
    (its ``wall_time_s`` adds up the steps of prompts that ran concurrently); ``elapsed_s`` is
    this session's wall-clock time. ``restarted`` counts the prompts that had finished steps
    in an earlier session but started over from their first step, because the reward keeps
    state per prompt (``per_prompt_state``, e.g. ``--reward-normalize``).
    """

    output: Path
    total: int
    complete: int
    failed: int
    finished_before: int
    failed_ids: tuple[str, ...]
    invalid_rows: int
    usage: Usage
    elapsed_s: float
    restarted: int = 0

    @property
    def done(self) -> int:
        """Prompts with a line in the output."""
        return self.complete + self.failed

    @property
    def ok(self) -> bool:
        """True when every prompt finished and none failed."""
        return self.failed == 0 and self.complete == self.total


class BatchState:
    """Live counters of a run, for progress displays. Read it; the run updates it."""

    def __init__(self, total: int, steps_per_prompt: int) -> None:
        self.total = total
        self.steps_per_prompt = steps_per_prompt
        #: Prompts with a line in the output (complete or failed), this session or before.
        self.done = 0
        self.failed = 0
        self.finished_before = 0
        #: Prompts in progress: id → steps finished so far.
        self.running: dict[str, int] = {}
        self.steps_done = 0
        #: Work of the steps finished in this session (wall times add up over concurrent prompts).
        self.usage = Usage()
        self.remaining_steps = 0
        self.started_at = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        """Seconds since this session started."""
        return time.monotonic() - self.started_at

    def at_step(self) -> dict[int, int]:
        """How many prompts in progress work on each step (0 is the initial sampling)."""
        counts: dict[int, int] = {}
        for steps in self.running.values():
            step = min(steps, self.steps_per_prompt - 1)  # all steps done: being written out
            counts[step] = counts.get(step, 0) + 1
        return dict(sorted(counts.items()))

    def tokens_per_s(self) -> float:
        """Generated tokens per second in this session."""
        return self.usage.completion_tokens / max(self.elapsed_s, 1e-9)

    def eta_s(self) -> float | None:
        """Estimated seconds left, from this session's rate of finished steps (an upper bound with early stopping)."""
        if self.steps_done == 0:
            return None
        return self.remaining_steps * self.elapsed_s / self.steps_done


class BatchObserver:
    """Receives a run's events; subclass it for a progress display. Every method does nothing by default."""

    def on_note(self, message: str) -> None:
        """Something the user should know: a repaired file, prompts being retried, rows skipped."""

    def on_start(self, state: BatchState) -> None:
        """The run starts (or resumes); ``state.done`` prompts are already finished."""

    def on_step(self, partial: TPOResult, state: BatchState) -> None:
        """A prompt finished a step, and its checkpoint is on disk."""

    def on_result(self, result: TPOResult, state: BatchState) -> None:
        """A prompt finished (complete or failed), and its line is in the output."""

    def on_end(self, summary: BatchSummary) -> None:
        """Every prompt is finished."""
