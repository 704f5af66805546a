"""Runs the engine over a whole dataset into a JSONL file, checkpointing every prompt after every step so a killed run resumes where it stopped.

Files, for an output ``out.jsonl`` (format: ``docs/batch.md``)::

    out.jsonl                   one finished result per line (TPOResult.to_dict()), in finishing order
    out.jsonl.tpo/
        fingerprint.json        what the results depend on; a resume must match it
        config.json             the resolved configuration, the tpo version, the options
        checkpoints.jsonl       the latest partial result of every unfinished prompt (append-only)
        lock                    held while a process writes the run

Every line is appended with one write and made durable (``fsync``) before the engine goes
on, so a process killed at any moment loses at most the step in flight. On the next start
a torn last line is cut off, the finished ids are read from the output, and every
unfinished prompt continues from its latest checkpoint. Checkpoints of finished prompts
are compacted away, so the sidecar stays as small as the work in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from .algorithm import Engine
from .config import TPOConfig
from .datasets import InputFormat, PromptDataset, Source, read_prompts
from .errors import ConfigError, InputError, RunError
from .protocols import PolicyBackend, RewardModel
from .result import TPOResult, Usage
from .types import Prompt

__all__ = [
    "DEFAULT_COMPACT_MIN_BYTES",
    "SIDECAR_SUFFIX",
    "BatchObserver",
    "BatchRun",
    "BatchState",
    "BatchSummary",
    "arun_batch",
    "run_batch",
    "sidecar_dir",
]

#: The sidecar folder is the output's path plus this suffix.
SIDECAR_SUFFIX = ".tpo"
#: Checkpoints of finished prompts are compacted away once they take more than this (and more than the live ones).
DEFAULT_COMPACT_MIN_BYTES = 64 * 1024 * 1024
#: Version of the sidecar's layout; a different one is refused like a different configuration.
_LAYOUT_VERSION = 1
_SECRET = re.compile(r"(api_?key|token|secret|password|passwd|authorization|credential)", re.IGNORECASE)


def sidecar_dir(output: str | os.PathLike[str]) -> Path:
    """The folder beside ``output`` that holds the run's fingerprint, configuration and checkpoints."""
    return Path(os.fspath(output) + SIDECAR_SUFFIX)


# ---------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class BatchSummary:
    """How a batch run ended.

    ``complete`` and ``failed`` count every prompt of the run, including those finished by
    earlier sessions (``finished_before``). ``usage`` sums the steps finished in this session
    (its ``wall_time_s`` adds up the steps of prompts that ran concurrently); ``elapsed_s`` is
    this session's wall-clock time.
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


# ---------------------------------------------------------------------------- durable files


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (where the platform allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _append(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _append_line(f: IO[bytes], data: bytes) -> int:
    """Append one line durably and return its offset; a failed write is taken back, so later lines stay whole."""
    offset = f.tell()
    try:
        _append(f, data)
    except OSError:
        try:
            f.truncate(offset)
            f.flush()
        except OSError as e:  # the file may end in half a line now; the next start cuts or reports it
            raise OSError(f"{e}; the partial write could not be undone either") from e
        raise
    return offset


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        _append(f, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dump_line(result: TPOResult) -> bytes:
    return (result.to_json() + "\n").encode("utf-8")


def _cut_torn_tail(path: Path) -> int:
    """Remove a last line that has no newline (a write cut short by a kill); return the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        end = size
        chunk = 1 << 16
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            block = f.read(end - start)
            if end == size and block.endswith(b"\n"):
                return 0
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) for every line of a file that ends in a newline."""
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            yield offset, raw
            offset += len(raw)


def _scored(d: Mapping[str, Any]) -> bool:
    return any(isinstance(c, Mapping) and c.get("score") is not None for c in d.get("candidates") or ())


def _lock(path: Path) -> IO[str]:
    """Hold an exclusive lock on ``path`` so two processes cannot write one run (the OS releases it on exit, even on kill -9)."""
    f = path.open("a+")
    try:
        import fcntl  # POSIX only; elsewhere runs are not guarded
    except ImportError:
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunError(f"another process is writing this run right now (it holds the lock {path})") from None
    return f


class _WriteFailed(Exception):
    """A run file could not be written. Not a RunError: the engine must not take it for one prompt's failure."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name the file of a failed write (disk full, permissions); ``arun`` turns it into a RunError that stops the run."""
    try:
        yield
    except OSError as e:
        raise _WriteFailed(f"could not write {path}: {e}") from e


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    length: int
    steps: int


class _Checkpoints(Mapping[str, TPOResult]):
    """The append-only file of partial results, indexed by prompt id (the latest line wins).

    As a mapping it is the ``resume`` argument of ``Engine.optimize_many``: a result is read
    from disk only when the engine asks for it.
    """

    def __init__(self, path: Path, compact_min_bytes: int) -> None:
        self.path = path
        self.compact_min_bytes = compact_min_bytes
        self.entries: dict[str, _Entry] = {}
        self.live_bytes = 0
        self.size = 0
        self._f: IO[bytes] | None = None

    # Mapping: what the engine resumes from.
    def __getitem__(self, prompt_id: str) -> TPOResult:
        entry = self.entries[prompt_id]
        with self.path.open("rb") as f:
            f.seek(entry.offset)
            return TPOResult.from_dict(json.loads(f.read(entry.length)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def steps(self, prompt_id: str) -> int:
        entry = self.entries.get(prompt_id)
        return entry.steps if entry is not None else 0

    def load(self, wanted: Mapping[str, Any], finished: Mapping[str, bool]) -> tuple[int, int]:
        """Index the latest checkpoint of every unfinished prompt of ``wanted``; return (torn bytes cut, corrupt lines)."""
        if not self.path.exists():
            self.path.touch()
        self.entries = {}
        torn = _cut_torn_tail(self.path)
        corrupt = 0
        for offset, raw in _lines(self.path):
            try:
                d = json.loads(raw)
                pid = d["prompt_id"]
                steps = len(d["steps"])
            except (ValueError, KeyError, TypeError):
                corrupt += 1
                continue
            if pid in finished or pid not in wanted:
                continue
            if not _scored(d):
                # Nothing scored yet: the engine could not go on from here, so the prompt starts over.
                self.entries.pop(pid, None)
                continue
            self.entries[pid] = _Entry(offset, len(raw), steps)
        self.size = self.path.stat().st_size
        self.live_bytes = sum(e.length for e in self.entries.values())
        return torn, corrupt

    def compact(self, extra: Iterable[tuple[str, bytes, int]] = ()) -> None:
        """Rewrite the file with only the live checkpoints (plus ``extra`` ones), atomically."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        entries: dict[str, _Entry] = {}
        with self.path.open("rb") as src, tmp.open("wb") as dst:
            for pid, e in self.entries.items():
                src.seek(e.offset)
                data = src.read(e.length)
                entries[pid] = _Entry(dst.tell(), len(data), e.steps)
                dst.write(data)
            for pid, data, steps in extra:
                entries[pid] = _Entry(dst.tell(), len(data), steps)
                dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.entries = entries
        self.size = self.live_bytes = sum(e.length for e in entries.values())

    def _handle(self) -> IO[bytes]:
        if self._f is None:
            self._f = self.path.open("ab")
        return self._f

    def append(self, partial: TPOResult) -> None:
        data = _dump_line(partial)
        offset = _append_line(self._handle(), data)
        old = self.entries.get(partial.prompt_id)
        if old is not None:
            self.live_bytes -= old.length
        self.entries[partial.prompt_id] = _Entry(offset, len(data), len(partial.steps))
        self.live_bytes += len(data)
        self.size = offset + len(data)
        self._maybe_compact()

    def drop(self, prompt_id: str) -> None:
        old = self.entries.pop(prompt_id, None)
        if old is not None:
            self.live_bytes -= old.length
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        dead = self.size - self.live_bytes
        if dead > self.compact_min_bytes and dead > self.live_bytes:
            self.compact()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------------------- fingerprints


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): "***" if _SECRET.search(str(k)) and not str(k).endswith("_env") and v else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key.endswith("sha256"):
            what = "the input rows" if key.startswith("input.") else "the prompt templates"
            out.append(f"{key}: {what} changed")
        else:
            out.append(f"{key}: {_short(a.get(key, '<unset>'))} → {_short(b.get(key, '<unset>'))}")
    return out


def _method_fingerprint(config: TPOConfig) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("max_concurrent_prompts", None)  # how many run at once does not change any result
    prompts = data.pop("prompts", None)
    data["prompts_sha256"] = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    return data


def _name(obj: object | None) -> str | None:
    return None if obj is None else str(getattr(obj, "name", type(obj).__name__))


# ---------------------------------------------------------------------------- the run


class BatchRun:
    """One batch run: a dataset, an output file and the configuration, resumable after any interruption.

    ``models`` describes the policy, critic and reward (specs and options) for the
    fingerprint; secrets in it are masked. ``settings`` is anything else worth saving in
    ``config.json`` (the command's options, say); it is not part of the fingerprint.
    Call ``open()`` before loading models, so that a mismatching run is refused early,
    then ``run()`` or ``arun()``.
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
    ) -> None:
        self.dataset = dataset
        self.output = Path(output)
        self.sidecar = sidecar_dir(self.output)
        self.config = config
        self.models = _redact(models)
        self.settings = _redact(settings or {})
        self.retry_failed = retry_failed
        self.observer = observer or BatchObserver()
        self._checkpoints = _Checkpoints(self.sidecar / "checkpoints.jsonl", compact_min_bytes)
        #: Finished prompt id → True when it failed. Only ids; results are never kept.
        self._finished: dict[str, bool] = {}
        self._finished_before = 0
        self._lock_file: IO[str] | None = None
        self._out: IO[bytes] | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Everything the results depend on; resuming requires the same."""
        data = {
            "layout": _LAYOUT_VERSION,
            "method": _method_fingerprint(self.config),
            "models": self.models,
            "input": self.dataset.describe(),
        }
        return json.loads(json.dumps(data))  # type: ignore[no-any-return]

    def open(self, *, restart: bool = False) -> list[str]:
        """Check the output against the run it belongs to, repair it, and get ready to run.

        A new run writes its fingerprint; an existing one must have the same fingerprint
        (else ``ConfigError`` lists what differs), unless ``restart`` removes its output
        and checkpoints first. Takes the run's lock until ``arun`` ends or ``close()``.
        Returns what was removed, for the user to see.
        """
        if self._lock_file is not None:
            return []
        fp_path = self.sidecar / "fingerprint.json"
        if not restart and not fp_path.exists() and self.output.exists() and self.output.stat().st_size > 0:
            raise ConfigError(
                f"{self.output} already exists and is not the output of a tpo batch run (there is no {self.sidecar.name}/ "
                "beside it); choose another output file, or add --restart to overwrite it"
            )
        if self.output.resolve() == Path(self.dataset.source).resolve():
            raise ConfigError(f"the output {self.output} is the input file; choose another output file")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.sidecar.mkdir(exist_ok=True)
        self._lock_file = _lock(self.sidecar / "lock")
        try:
            removed = self._remove_old() if restart else []
            if fp_path.exists():
                try:
                    old = json.loads(fp_path.read_text(encoding="utf-8"))
                except ValueError as e:
                    raise InputError(f"{fp_path} is not valid JSON ({e}); add --restart to start the run over") from e
                diffs = _differences(old, self.fingerprint)
                if diffs and not self._has_work():
                    # Nothing was finished or checkpointed (models failed to load, say): nothing to protect.
                    _write_atomic(fp_path, (json.dumps(self.fingerprint, indent=2) + "\n").encode())
                    self.observer.on_note("the earlier run in this folder had finished nothing; it now uses the new configuration")
                    diffs = []
                if diffs:
                    raise ConfigError(
                        f"{self.output} belongs to a run with a different configuration:\n  " + "\n  ".join(diffs)
                        + "\nRun with the same options to resume it, or add --restart to discard its results and start over."
                    )
            else:
                # Without a fingerprint no model work was done: anything else in the folder is stale.
                for stale in self.sidecar.glob("checkpoints.jsonl*"):
                    stale.unlink()
                _write_atomic(fp_path, (json.dumps(self.fingerprint, indent=2) + "\n").encode())
            self._load()
            record = json.dumps(self._config_record(), indent=2, ensure_ascii=False) + "\n"
            _write_atomic(self.sidecar / "config.json", record.encode("utf-8"))
        except BaseException:
            self.close()
            raise
        return removed

    def _has_work(self) -> bool:
        return any(p.exists() and p.stat().st_size > 0 for p in (self.output, self._checkpoints.path))

    def close(self) -> None:
        """Close the run's files and release its lock (``arun`` does this when it ends)."""
        self._checkpoints.close()
        if self._out is not None:
            self._out.close()
            self._out = None
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
        from . import __version__

        return {
            "tpo_version": __version__,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "output": str(self.output),
            "input": {**self.dataset.describe(), "rows_read": self.dataset.rows_read,
                      "invalid_rows_skipped": self.dataset.problem_count},
            "method": self.config.to_dict(),
            "models": self.models,
            "options": self.settings,
            "retry_failed": self.retry_failed,
        }

    def _load(self) -> None:
        """Read what earlier sessions finished and checkpointed; cut torn lines; queue failed prompts for a retry."""
        wanted = dict.fromkeys(self.dataset.ids)
        self._finished = {}
        if not self.output.exists():
            self.output.touch()
            _fsync_dir(self.output.parent)
        torn = _cut_torn_tail(self.output)
        if torn:
            self.observer.on_note(f"repaired {self.output}: removed an unfinished last line ({torn} bytes) written when the run was stopped")
        retry: dict[str, tuple[int, int, bool]] = {}  # id → (offset, length, has a scored answer)
        for lineno, (offset, raw) in enumerate(_lines(self.output), start=1):
            try:
                d = json.loads(raw)
                pid, status = d["prompt_id"], d["status"]
            except (ValueError, KeyError, TypeError):
                raise InputError(
                    f"{self.output} line {lineno} is not a result line; the file was changed by hand? "
                    "Fix or remove that line, or add --restart to start the run over"
                ) from None
            if pid not in wanted:
                continue
            if pid in self._finished:
                self.observer.on_note(f"{self.output} line {lineno}: prompt {pid!r} appears again; the first line counts")
                continue
            failed = status != "complete"
            self._finished[pid] = failed
            if failed and self.retry_failed:
                retry[pid] = (offset, len(raw), _scored(d))
        torn, corrupt = self._checkpoints.load(wanted, self._finished)
        if torn:
            self.observer.on_note(f"repaired {self._checkpoints.path}: removed an unfinished last checkpoint ({torn} bytes)")
        if corrupt:
            self.observer.on_note(f"ignored {corrupt} unreadable line(s) in {self._checkpoints.path}; those prompts redo their last step")
        # A failed prompt goes on from the last step it finished, so that work is not done again.
        extra = []
        if retry:
            with self.output.open("rb") as f:
                for pid, (offset, length, scored) in retry.items():
                    if not scored:
                        continue
                    f.seek(offset)
                    partial = replace(TPOResult.from_dict(json.loads(f.read(length))), status="partial", error=None)
                    extra.append((pid, _dump_line(partial), len(partial.steps)))
        self._checkpoints.compact(extra)
        if retry:
            self._rewrite_output_without(retry)
            for pid in retry:
                del self._finished[pid]
            self.observer.on_note(f"retrying {len(retry)} prompt(s) that failed before (--no-retry-failed keeps them as they are)")
        self._finished_before = len(self._finished)

    def _rewrite_output_without(self, drop: Mapping[str, tuple[int, int, bool]]) -> None:
        skip = {offset for offset, _, _ in drop.values()}
        tmp = self.output.with_name(self.output.name + ".tmp")
        with tmp.open("wb") as dst:
            for offset, raw in _lines(self.output):
                if offset not in skip:
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.output)
        _fsync_dir(self.output.parent)

    # ------------------------------------------------------------------ running

    def run(self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None) -> BatchSummary:
        """Run every unfinished prompt (blocking); see ``arun``."""
        return asyncio.run(self.arun(policy, reward, critic=critic))

    async def arun(self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None) -> BatchSummary:
        """Run every unfinished prompt, appending each result to the output as it finishes.

        A prompt that fails (its backend or reward keeps failing) is written with its error
        and the run goes on. Interrupting the run (Ctrl-C, a kill) loses at most the steps
        in flight; ``open()`` and ``arun()`` again continue it.
        """
        self.open()
        try:
            return await self._run(policy, reward, critic)
        except _WriteFailed as e:
            raise RunError(str(e)) from e.__cause__
        finally:
            self.close()

    async def _run(self, policy: PolicyBackend, reward: RewardModel, critic: PolicyBackend | None) -> BatchSummary:
        state = BatchState(len(self.dataset), self.config.depth + 1)
        state.done = state.finished_before = self._finished_before
        state.failed = sum(self._finished.values())
        state.remaining_steps = sum(
            state.steps_per_prompt - self._checkpoints.steps(pid) for pid in self.dataset.ids if pid not in self._finished
        )
        engine = Engine(policy, reward, critic=critic, config=self.config)
        self.observer.on_start(state)

        def pending() -> Iterator[Prompt]:
            for prompt in self.dataset.prompts(skip=self._finished):
                state.running[prompt.id] = self._checkpoints.steps(prompt.id)
                yield prompt

        def on_step(partial: TPOResult) -> None:
            with _writing(self._checkpoints.path):
                self._checkpoints.append(partial)
            state.running[partial.prompt_id] = len(partial.steps)
            step_usage = partial.steps[-1].usage if partial.steps else Usage()
            state.usage = state.usage + step_usage
            state.steps_done += 1
            state.remaining_steps = max(0, state.remaining_steps - 1)
            self.observer.on_step(partial, state)

        async for result in engine.optimize_many(pending(), resume=self._checkpoints, on_step=on_step):
            with _writing(self.output):
                self._append_output(result)
            failed = result.status != "complete"
            self._finished[result.prompt_id] = failed
            with _writing(self._checkpoints.path):
                self._checkpoints.drop(result.prompt_id)
            steps = state.running.pop(result.prompt_id, len(result.steps))
            state.remaining_steps = max(0, state.remaining_steps - (state.steps_per_prompt - steps))
            state.done += 1
            state.failed += failed
            self.observer.on_result(result, state)
        if len(self._finished) == len(self.dataset) and self._checkpoints.size:
            with _writing(self._checkpoints.path):
                self._checkpoints.compact()
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
        )

    def _append_output(self, result: TPOResult) -> None:
        if self._out is None:
            self._out = self.output.open("ab")
        _append_line(self._out, _dump_line(result))



# ---------------------------------------------------------------------------- one call


async def arun_batch(
    source: Source | PromptDataset,
    output: str | os.PathLike[str],
    *,
    policy: PolicyBackend,
    reward: RewardModel,
    critic: PolicyBackend | None = None,
    config: TPOConfig | None = None,
    prompt_field: str = "prompt",
    id_field: str | None = None,
    split: str | None = None,
    input_format: InputFormat | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    shuffle_seed: int | None = None,
    skip_invalid: bool = False,
    restart: bool = False,
    retry_failed: bool = True,
    models: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    observer: BatchObserver | None = None,
    compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
) -> BatchSummary:
    """Async twin of ``run_batch``."""
    config = config if config is not None else TPOConfig()
    if isinstance(source, PromptDataset):
        dataset = source
    else:
        dataset = read_prompts(
            source, prompt_field=prompt_field, id_field=id_field, split=split, input_format=input_format,
            limit=limit, shuffle=shuffle, seed=config.seed if shuffle_seed is None else shuffle_seed,
            skip_invalid=skip_invalid,
        )
    if models is None:
        models = {"policy": _name(policy), "critic": _name(critic), "reward": _name(reward)}
    run = BatchRun(dataset, output, config=config, models=models, settings=settings, retry_failed=retry_failed,
                   observer=observer, compact_min_bytes=compact_min_bytes)
    if dataset.problem_count:
        shown = "; ".join(str(p) for p in dataset.problems[:5])
        more = f" (and {dataset.problem_count - 5} more)" if dataset.problem_count > 5 else ""
        run.observer.on_note(f"skipped {dataset.problem_count} invalid row(s): {shown}{more}")
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
    prompt_field: str = "prompt",
    id_field: str | None = None,
    split: str | None = None,
    input_format: InputFormat | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    shuffle_seed: int | None = None,
    skip_invalid: bool = False,
    restart: bool = False,
    retry_failed: bool = True,
    models: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    observer: BatchObserver | None = None,
    compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
) -> BatchSummary:
    """Optimise every prompt of a dataset, appending one result line per prompt to ``output``.

    ``source`` is a path or dataset name, an iterable of row mappings, or a ``PromptDataset``
    from ``tpo.datasets.read_prompts`` (whose options then apply instead of these). Running
    the same call again continues an interrupted run from the last finished step of every
    prompt; a call whose configuration (method, ``models``, input) differs is refused with
    ``ConfigError`` unless ``restart=True``. Prompts that failed before are retried unless
    ``retry_failed=False``. ``models`` (default: the objects' names) identifies the
    policy, critic and reward in the fingerprint. ``shuffle_seed`` defaults to
    ``config.seed``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_batch() cannot run inside an event loop; use 'await arun_batch(...)'")
    return asyncio.run(
        arun_batch(
            source, output, policy=policy, reward=reward, critic=critic, config=config, prompt_field=prompt_field,
            id_field=id_field, split=split, input_format=input_format, limit=limit, shuffle=shuffle,
            shuffle_seed=shuffle_seed, skip_invalid=skip_invalid, restart=restart, retry_failed=retry_failed,
            models=models, settings=settings, observer=observer, compact_min_bytes=compact_min_bytes,
        )
    )
