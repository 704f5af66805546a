"""Runs the engine over a whole dataset into a JSONL file, checkpointing every prompt after every step so a killed run resumes where it stopped.

Files, for an output ``out.jsonl`` (format: ``docs/batch.md``)::

    out.jsonl                   one finished result per line (TPOResult.to_dict()), in finishing order
    out.jsonl.tpo/
        fingerprint.json        what the results depend on; a resume must match it
        config.json             the resolved configuration, the tpo version, the options
        checkpoints.jsonl       the latest partial result of every unfinished prompt (append-only)
        lock                    held while a process writes the run

Every line is appended whole and made durable (``fsync``) before the prompt that wrote it
goes on, so a process killed at any moment loses at most the steps in flight. The lines
that prompts write at about the same time are committed as a group, with one write and
one ``fsync`` in a worker thread: the event loop, and the model requests in flight on it,
never wait for the disk. On the next start a torn last line is cut off, the finished ids
are read from the output (by ``tpo.batch.jsonl``, the reader ``tpo eval`` uses too), and every
unfinished prompt continues from its latest checkpoint. Checkpoints of finished prompts are
compacted away, so the sidecar stays as small as the work in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import shutil
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TypeVar

from .._redact import redact as _redact
from ..api import _no_running_loop, aclose_per_loop, apreflight
from ..config import TPOConfig
from ..engine.algorithm import Engine
from ..errors import ConfigError, RunError
from ..protocols import PolicyBackend, RewardModel
from ..result import TPOResult, Usage, dumps_json
from ..types import Prompt
from .checkpoints import _Checkpoints, _output_info
from .datasets import AUTO, PromptDataset, Source, read_prompts
from .durable import (
    GroupLog,
    WriteFailed,
    claim_output,
    dump_line,
    fsync_dir,
    read_fingerprint,
    repair_tail,
    rewrite_lines,
    write_atomic,
)
from .fail_fast import DEFAULT_FAIL_FAST_AFTER, FailFast, check_fail_fast_after
from .fingerprint import _differences, _method_fingerprint, result_options
from .jsonl import read_result_lines
from .progress import BatchObserver, BatchState, BatchSummary

__all__ = [
    "DEFAULT_COMPACT_MIN_BYTES",
    "SIDECAR_SUFFIX",
    "BatchObserver",
    "BatchRun",
    "BatchState",
    "BatchSummary",
    "arun_batch",
    "dataset_notes",
    "resume_id_field",
    "run_batch",
    "sidecar_dir",
]

#: The sidecar folder is the output's path plus this suffix.
SIDECAR_SUFFIX = ".tpo"
#: Checkpoints of finished prompts are compacted away once they take more than this (and more than the live ones).
DEFAULT_COMPACT_MIN_BYTES = 64 * 1024 * 1024
#: Version of the sidecar's layout; a different one is refused like a different configuration.
_LAYOUT_VERSION = 1


def sidecar_dir(output: str | os.PathLike[str]) -> Path:
    """The folder beside ``output`` that holds the run's fingerprint, configuration and checkpoints.

    For an output reached through a symbolic link it is beside the link's target, as ``BatchRun`` keeps it.
    """
    return Path(os.fspath(_real_path(Path(output))) + SIDECAR_SUFFIX)


def resume_id_field(output: str | os.PathLike[str]) -> str | None:
    """The ``read_prompts(id_field=...)`` that keeps the ids of the run writing ``output``: ``AUTO``, or None.

    None (row hashes) when the run there recorded row hashes as its ids (one begun before ids
    were found automatically, say): finding an ``id`` field now would make it a different run.
    ``AUTO`` otherwise, a new run included; a fingerprint that cannot be read is left for
    ``BatchRun.open()`` to report.
    """
    try:
        recorded = json.loads((sidecar_dir(output) / "fingerprint.json").read_text(encoding="utf-8"))["input"]
    except (OSError, ValueError, KeyError, TypeError):
        return AUTO
    if isinstance(recorded, dict) and "id_field" in recorded and recorded["id_field"] is None:
        return None
    return AUTO


def dataset_notes(dataset: PromptDataset) -> list[str]:
    """What a run says about its dataset when it opens: where the prompt ids come from, and the invalid rows skipped."""
    notes = [dataset.id_note] if dataset.id_note else []
    problems = dataset.problem_count
    if problems:
        listed = "\n  ".join(str(p) for p in dataset.problems[:5])
        more = f"\n  … and {problems - 5} more" if problems > 5 else ""
        notes.append(f"skipped {problems} invalid row(s):\n  {listed}{more}")
    return notes


def _real_path(path: Path) -> Path:
    """``path`` as given or, when a symbolic link is on the way, the file it leads to: one file, one run."""
    real = Path(os.path.realpath(path))
    return path if real == Path(os.path.abspath(path)) else real


# ---------------------------------------------------------------------------- the run


class BatchRun:
    """One batch run: a dataset, an output file and the configuration, resumable after any interruption.

    ``models`` describes the policy, critic and reward (specs and every option that can
    change a result) for the fingerprint; options their plugins declare not to affect
    results are left out (``tpo.batch.fingerprint.result_options``) and values of
    secret-named keys (``api_key``, ``token``, ``password``, ...) are masked. ``settings`` is anything else worth saving in
    ``config.json`` (the command's options, say); it is not part of the fingerprint.
    Call ``open()`` before loading models, so that a mismatching run is refused early,
    then ``run()`` or ``arun()``.

    ``fail_fast_after`` (K): when the first K prompts of a session all fail with the same
    error, the run stops with a ``RunError`` carrying that error instead of going through
    the dataset (``tpo.batch.fail_fast``; 0 never stops early). Finished prompts stay.

    ``dataset_notes=False`` leaves the notes about the dataset (``dataset_notes``) to whoever
    shares it among several runs, as ``Sweep`` does, which notes them once.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        output: str | os.PathLike[str],
        *,
        config: TPOConfig,
        models: Mapping[str, Any],
        settings: Mapping[str, Any] | None = None,
        retry_failed: bool = True,
        observer: BatchObserver | None = None,
        compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
        fail_fast_after: int = DEFAULT_FAIL_FAST_AFTER,
        dataset_notes: bool = True,
    ) -> None:
        self.fail_fast_after = check_fail_fast_after(fail_fast_after)
        self.dataset = dataset
        self._dataset_notes = dataset_notes
        #: The output file: the target of a symlink rather than the link, so that its sidecar (and lock) is one.
        self.output = _real_path(Path(output))
        self._given_output = Path(output)
        self.sidecar = sidecar_dir(self.output)
        self.config = config
        self.models = _redact(models)
        self.settings = _redact(settings or {})
        self.retry_failed = retry_failed
        self.observer = observer or BatchObserver()
        self._checkpoints = _Checkpoints(self.sidecar / "checkpoints.jsonl", compact_min_bytes)
        self._checkpoints.note = self.observer.on_note
        self._out = GroupLog(self.output)
        #: Finished prompt id → True when it failed. Only ids; results are never kept.
        self._finished: dict[str, bool] = {}
        self._finished_before = 0
        self._restarted = 0
        self._lock_file: IO[str] | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Everything the results depend on; resuming requires the same."""
        data = {
            "layout": _LAYOUT_VERSION,
            "method": _method_fingerprint(self.config),
            # Connection settings (timeouts, retries, concurrency, the server's address) are left out:
            # a resumed run may change them.
            "models": result_options(self.models),
            "input": self.dataset.describe(),
        }
        return json.loads(json.dumps(data))  # type: ignore[no-any-return]

    def open(self, *, restart: bool = False) -> list[str]:
        """Check the output against the run it belongs to, repair it, and get ready to run.

        A new run writes its fingerprint; an existing one must have the same fingerprint
        (else ``ConfigError`` lists what differs), unless ``restart`` removes its output
        and checkpoints first. Takes the run's lock until ``arun`` ends or ``close()``.
        Returns what was removed, for the user to see; notes the invalid rows the dataset skipped.
        A file or folder that cannot be created, read or written raises ``ConfigError`` naming it.
        """
        if self._lock_file is not None:
            return []
        try:
            return self._open(restart)
        except OSError as e:
            raise ConfigError(f"cannot write {e.filename or self.output}: {e.strerror or e}") from e

    def _open(self, restart: bool) -> list[str]:
        for note in dataset_notes(self.dataset) if self._dataset_notes else ():
            self.observer.on_note(note)
        if self.output != self._given_output:
            self.observer.on_note(
                f"{self._given_output} leads to {self.output} through a symbolic link; the run writes there"
            )
        fp_path = self.sidecar / "fingerprint.json"
        if self.output.resolve() == Path(self.dataset.source).resolve():
            raise ConfigError(f"the output {self.output} is the input file; choose another output file")
        if self.output.parent.exists() and not self.output.parent.is_dir():
            raise ConfigError(f"cannot write {self.output}: {self.output.parent} is a file, not a folder")
        self._lock_file = claim_output(self.output, self.sidecar, made_by="a tpo batch run", restart=restart)
        try:
            removed = self._remove_old() if restart else []
            old = read_fingerprint(fp_path, start_over="start the run over")
            if old is not None:
                if isinstance(old, dict) and isinstance(old.get("models"), dict):
                    # Fingerprints written before connection settings were left out compare without them.
                    old["models"] = result_options(old["models"])
                diffs = _differences(old, self.fingerprint)
                if diffs and not self._has_work():
                    # Nothing was finished or checkpointed (models failed to load, say): nothing to protect.
                    write_atomic(fp_path, (json.dumps(self.fingerprint, indent=2) + "\n").encode())
                    self.observer.on_note(
                        "the earlier run in this folder had finished nothing; it now uses the new configuration"
                    )
                    diffs = []
                if diffs:
                    raise ConfigError(
                        f"{self.output} belongs to a run with a different configuration:\n  "
                        + "\n  ".join(diffs)
                        + "\nRun with the same options to resume it, or add --restart to discard its results and start over."
                    )
            else:
                # Without a fingerprint no model work was done: anything else in the folder is stale.
                for stale in self.sidecar.glob("checkpoints.jsonl*"):
                    stale.unlink()
                write_atomic(fp_path, (json.dumps(self.fingerprint, indent=2) + "\n").encode())
            self._load()
            record = dumps_json(self._config_record(), indent=2) + "\n"
            write_atomic(self.sidecar / "config.json", record.encode("utf-8"))
        except BaseException:
            self.close()
            raise
        return removed

    def _has_work(self) -> bool:
        return any(p.exists() and p.stat().st_size > 0 for p in (self.output, self._checkpoints.path))

    def close(self) -> None:
        """Close the run's files and release its lock (``arun`` does this when it ends)."""
        self._checkpoints.close()
        self._out.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _remove_old(self) -> list[str]:
        removed = []
        if self.output.exists():
            with self.output.open("rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            self.output.unlink()
            removed.append(f"{self.output} ({lines} finished prompt{'s' if lines != 1 else ''})")
        old = [p for p in self.sidecar.iterdir() if p.name != "lock"]
        for p in old:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        if old:
            removed.append(f"{self.sidecar}/ (fingerprint, configuration and checkpoints)")
        return removed

    def _config_record(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "tpo_version": __version__,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "output": str(self.output),
            "input": {
                **self.dataset.describe(),
                "rows_read": self.dataset.rows_read,
                "invalid_rows_skipped": self.dataset.problem_count,
            },
            "method": self.config.to_dict(),
            "models": self.models,
            "options": self.settings,
            "retry_failed": self.retry_failed,
        }

    def _load(self) -> None:
        """Read what earlier sessions finished and checkpointed; cut torn lines; queue failed prompts for a retry."""
        wanted = dict.fromkeys(self.dataset.ids)
        self._finished = {}
        created = not self.output.exists()
        self._out.open()  # creates it, and finds out now if it cannot be written
        if created:
            fsync_dir(self.output.parent)
        torn = repair_tail(self.output)
        if torn:
            self.observer.on_note(
                f"repaired {self.output}: removed an unfinished last line ({torn} bytes) written when the run was stopped"
            )
        read = read_result_lines(
            self.output,
            _output_info,
            hint="; the file was changed by hand? Fix or remove that line, or add --restart to start the run over",
        )
        for s in read.superseded:
            self.observer.on_note(
                f"{self.output} line {s.by_lineno}: prompt {s.prompt_id!r} appears again (first on line {s.lineno}); "
                "the later line counts"
            )
        retry: dict[str, tuple[int, int, bool]] = {}  # id → (offset, length, has a scored answer)
        for pid, line in read.lines.items():
            if pid not in wanted:
                continue
            failed, scored = line.value
            self._finished[pid] = failed
            if failed and self.retry_failed:
                retry[pid] = (line.offset, line.length, scored)
        torn, corrupt = self._checkpoints.load(wanted, self._finished)
        if torn:
            self.observer.on_note(
                f"repaired {self._checkpoints.path}: removed an unfinished last checkpoint ({torn} bytes)"
            )
        if corrupt:
            self.observer.on_note(
                f"ignored {corrupt} unreadable line(s) in {self._checkpoints.path}; those prompts redo their last step"
            )
        # A failed prompt goes on from the last step it finished, so that work is not done again.
        extra = []
        if retry:
            with self.output.open("rb") as f:
                for pid, (offset, length, scored) in retry.items():
                    if not scored:
                        continue
                    f.seek(offset)
                    partial = replace(TPOResult.from_dict(json.loads(f.read(length))), status="partial", error=None)
                    extra.append((pid, dump_line(partial), len(partial.steps)))
        self._checkpoints.compact(extra)
        if retry:
            drop = {offset for offset, _, _ in retry.values()}
            drop.update(s.offset for s in read.superseded if s.prompt_id in retry)
            self._rewrite_output_without(drop)
            for pid in retry:
                del self._finished[pid]
            self.observer.on_note(
                f"retrying {len(retry)} prompt(s) that failed before (--no-retry-failed keeps them as they are)"
            )
        self._out.size = self.output.stat().st_size
        self._finished_before = len(self._finished)

    def _rewrite_output_without(self, offsets: set[int]) -> None:
        """Rewrite the output atomically without the lines that start at ``offsets``."""
        self._out.close()  # it would go on appending to the file replaced
        rewrite_lines(self.output, lambda offset: offset not in offsets)
        self._out.open()

    # ------------------------------------------------------------------ running

    def run(self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None) -> BatchSummary:
        """Run every unfinished prompt (blocking); see ``arun``."""
        _no_running_loop("runner.BatchRun.run", "runner.BatchRun.arun")
        return asyncio.run(_closing(self.arun(policy, reward, critic=critic), policy, critic, reward))

    async def arun(
        self,
        policy: PolicyBackend,
        reward: RewardModel,
        *,
        critic: PolicyBackend | None = None,
        engine: Engine | None = None,
        preflight: bool = True,
    ) -> BatchSummary:
        """Run every unfinished prompt, appending each result to the output as it finishes.

        A prompt that fails (its backend or reward keeps failing) is written with its error
        and the run goes on. Interrupting the run (Ctrl-C, a kill) loses at most the steps
        in flight; ``open()`` and ``arun()`` again continue it. With a reward that keeps
        state per prompt (``per_prompt_state``), prompts checkpointed mid-way start over.

        Before the first prompt, the policy, critic and reward run their cheap checks
        (``tpo.api.apreflight``): an unreachable server fails the run in seconds.
        ``preflight=False`` leaves that to the caller (``tpo sweep`` checks its models once for
        every configuration).

        ``engine``: run on this engine, which must hold these same models, so that its
        dispatchers serve this run and whatever else runs on it at once (``tpo sweep`` runs
        every configuration on one engine); by default the run makes an engine of its own.
        """
        if engine is not None and (
            engine.policy is not policy
            or engine.reward is not reward
            or engine.critic is not (critic if critic is not None else policy)
        ):
            raise ConfigError(
                "BatchRun.arun: the engine given holds other models than the policy, critic and reward given"
            )
        self.open()
        try:
            if preflight and self.unfinished:
                await apreflight(policy, critic, reward)
            return await self._run(policy, reward, critic, engine)
        except WriteFailed as e:
            raise RunError(str(e)) from e.__cause__
        finally:
            # A group still being written in the worker thread must not have its file closed under it.
            await self._checkpoints.drain()
            await self._out.drain()
            self.close()

    def _forget_partials(self, reward: RewardModel) -> int:
        """With a reward whose scores depend on per-prompt state, checkpointed prompts start over; return how many."""
        if not getattr(reward, "per_prompt_state", False):
            return 0
        count = self._checkpoints.forget_all()
        if count:
            self.observer.on_note(
                f"{count} prompt(s) with finished steps start over from their first step: the reward normalises "
                "scores per prompt, and that reference does not survive a restart, so continuing mid-way would mix "
                "two scales (finished prompts are kept)"
            )
        return count

    async def _run(
        self, policy: PolicyBackend, reward: RewardModel, critic: PolicyBackend | None, engine: Engine | None
    ) -> BatchSummary:
        self._restarted = self._forget_partials(reward)
        state = BatchState(len(self.dataset), self.config.depth + 1)
        state.done = state.finished_before = self._finished_before
        state.failed = sum(self._finished.values())
        state.remaining_steps = sum(
            state.steps_per_prompt - self._checkpoints.steps(pid)
            for pid in self.dataset.ids
            if pid not in self._finished
        )
        if engine is None:
            engine = Engine(policy, reward, critic=critic, config=self.config)
        self.observer.on_start(state)

        def pending() -> Iterator[Prompt]:
            for prompt in self.dataset.prompts(skip=self._finished):
                state.running[prompt.id] = self._checkpoints.steps(prompt.id)
                yield prompt

        async def on_step(partial: TPOResult) -> None:
            # The chain goes on only once its step is durable: that is what resuming relies on.
            await self._checkpoints.append_partial(partial)
            state.running[partial.prompt_id] = len(partial.steps)
            state.usage = state.usage + (partial.steps[-1].usage if partial.steps else Usage())
            state.steps_done += 1
            state.remaining_steps = max(0, state.remaining_steps - 1)
            self.observer.on_step(partial, state)

        async def finish(result: TPOResult) -> None:
            failed = result.status != "complete"

            def written(offset: int) -> None:
                # Counted once durable, even if the run was stopped meanwhile: the summary must match the file.
                self._finished[result.prompt_id] = failed
                self._checkpoints.drop(result.prompt_id)  # only once the result is durable

            await self._out.append(dump_line(result), written)
            state.done += 1
            state.failed += failed
            self.observer.on_result(result, state)

        # Results are written concurrently, so those finishing together share one fsync.
        finishing: set[asyncio.Task[None]] = set()
        fail_fast, stop = FailFast(self.fail_fast_after, self.unfinished), None
        try:
            # Closed on the way out, so a failed write stops the prompts in flight at once.
            async with contextlib.aclosing(
                engine.optimize_many(pending(), resume=self._checkpoints, on_step=on_step, config=self.config)
            ) as results:
                async for result in results:
                    # No longer in progress (the engine starts the next prompt now), though its line is still being written.
                    steps = state.running.pop(result.prompt_id, len(result.steps))
                    state.remaining_steps = max(0, state.remaining_steps - (state.steps_per_prompt - steps))
                    finishing.add(asyncio.create_task(finish(result)))
                    for task in [t for t in finishing if t.done()]:
                        finishing.discard(task)
                        task.result()  # a failed write stops the run here
                    stop = fail_fast.observe(result)
                    if stop is not None:
                        break  # leaving stops the prompts in flight; their checkpoints stay
            while finishing:
                task = finishing.pop()
                await task
        finally:
            for task in finishing:
                task.cancel()
            await asyncio.gather(*finishing, return_exceptions=True)
        if stop is not None:
            raise RunError(
                f"stopped early: the first {fail_fast.after} prompts all failed with the same error, which the others "
                f"would most likely meet too:\n  {stop}\n{len(self._finished)} finished prompt(s) are kept in "
                f"{self.output}; fix the cause and run again to continue (the failed prompts are retried). "
                "fail_fast_after=0 (--fail-fast 0) never stops early."
            )
        if len(self._finished) == len(self.dataset) and self._checkpoints.size:
            await self._checkpoints.drain()
            await asyncio.to_thread(self._checkpoints.compact)
        summary = self.summary(usage=state.usage, elapsed_s=state.elapsed_s)
        self.observer.on_end(summary)
        return summary

    @property
    def unfinished(self) -> int:
        """Prompts without a line in the output (known after ``open()``)."""
        return len(self.dataset) - len(self._finished)

    def summary(self, *, usage: Usage | None = None, elapsed_s: float = 0.0) -> BatchSummary:
        """The run's counts as they stand (after ``open()``); ``run`` returns the same at its end."""
        failed_ids = tuple(pid for pid in self.dataset.ids if self._finished.get(pid))
        return BatchSummary(
            output=self.output,
            total=len(self.dataset),
            complete=len(self._finished) - len(failed_ids),
            failed=len(failed_ids),
            finished_before=self._finished_before,
            failed_ids=failed_ids,
            invalid_rows=self.dataset.problem_count,
            usage=usage or Usage(),
            elapsed_s=elapsed_s,
            restarted=self._restarted,
        )


# ---------------------------------------------------------------------------- one call


async def arun_batch(
    source: Source | PromptDataset,
    output: str | os.PathLike[str],
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    restart: bool = False,
    retry_failed: bool = True,
    models: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    observer: BatchObserver | None = None,
    compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
    fail_fast_after: int = DEFAULT_FAIL_FAST_AFTER,
) -> BatchSummary:
    """Async twin of ``run_batch``."""
    config = config if config is not None else TPOConfig()
    dataset = source if isinstance(source, PromptDataset) else read_prompts(source)
    if models is None:
        models = {"policy": _name(policy), "critic": _name(critic), "reward": _name(reward)}
    run = BatchRun(
        dataset,
        output,
        config=config,
        models=models,
        settings=settings,
        retry_failed=retry_failed,
        observer=observer,
        compact_min_bytes=compact_min_bytes,
        fail_fast_after=fail_fast_after,
    )
    for line in run.open(restart=restart):
        run.observer.on_note(f"removed {line}")
    return await run.arun(policy, reward, critic=critic)


def run_batch(
    source: Source | PromptDataset,
    output: str | os.PathLike[str],
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    restart: bool = False,
    retry_failed: bool = True,
    models: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    observer: BatchObserver | None = None,
    compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
    fail_fast_after: int = DEFAULT_FAIL_FAST_AFTER,
) -> BatchSummary:
    """Optimise every prompt of a dataset, appending one result line per prompt to ``output``.

    ``source`` is a ``PromptDataset`` from ``tpo.batch.datasets.read_prompts`` (which reads any
    input and takes the prompt and id fields, ``limit``, ``shuffle``, ``skip_invalid``, ...),
    or a path, dataset name or iterable of rows, read with ``read_prompts``' defaults.
    Running the same call again continues an interrupted run from the last finished step of
    every prompt; a call whose configuration (method, ``models``, input) differs is refused
    with ``ConfigError`` unless ``restart=True``. Prompts that failed before are retried
    unless ``retry_failed=False``. The run checks its models before the first prompt and stops
    when its first ``fail_fast_after`` prompts all fail alike (see ``BatchRun``).
    ``models`` (default: the objects' names) identifies the
    policy, critic and reward in the fingerprint: give every option that changes results.
    Inside a running event loop, use ``await arun_batch(...)``.
    """
    _no_running_loop("runner.run_batch", "runner.arun_batch")
    return asyncio.run(
        _closing(
            arun_batch(
                source,
                output,
                policy=policy,
                reward=reward,
                critic=critic,
                config=config,
                restart=restart,
                retry_failed=retry_failed,
                models=models,
                settings=settings,
                observer=observer,
                compact_min_bytes=compact_min_bytes,
                fail_fast_after=fail_fast_after,
            ),
            policy,
            critic,
            reward,
        )
    )


def _name(obj: object | None) -> str | None:
    return None if obj is None else str(getattr(obj, "name", type(obj).__name__))


T = TypeVar("T")


async def _closing(work: Awaitable[T], *objects: object) -> T:
    """Await ``work``, then close the connections the backends opened on this (private) event loop."""
    try:
        return await work
    finally:
        await aclose_per_loop(*objects)
