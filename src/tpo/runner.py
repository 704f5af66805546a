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
are read from the output (by ``tpo._jsonl``, the reader ``tpo eval`` uses too), and every
unfinished prompt continues from its latest checkpoint. Checkpoints of finished prompts are
compacted away, so the sidecar stays as small as the work in flight.
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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

from ._jsonl import ResultLines, is_whole_object, read_result_lines
from .algorithm import Engine
from .api import _no_running_loop, aclose_per_loop
from .config import TPOConfig
from .datasets import PromptDataset, Source, read_prompts
from .errors import ConfigError, InputError, RunError
from .protocols import PolicyBackend, RewardModel
from .result import TPOResult, Usage, dumps_json
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

#: Option names whose values are secrets, masked in fingerprint.json and config.json. Whole names
#: only (lower-cased, ``-`` read as ``_``): ``max_tokens`` or ``tokenizer`` change results and must
#: stay visible to the fingerprint.
_SECRET_NAMES = frozenset({
    "access_token", "api_key", "api_token", "apikey", "auth", "auth_token", "authorization", "bearer",
    "bearer_token", "client_secret", "cookie", "credential", "credentials", "hf_token", "id_token",
    "passphrase", "passwd", "password", "private_key", "proxy_authorization", "refresh_token", "secret",
    "secret_key", "session_token", "token",
})
#: Endings that make a name a secret whatever comes before (``openai_api_key``, ``db_password``).
_SECRET_SUFFIXES = ("_api_key", "_apikey", "_api_token", "_access_token", "_auth_token", "_password",
                    "_passwd", "_secret", "_secret_key", "_private_key", "_credentials")
#: The password in a URL's user information: ``https://user:PASSWORD@host``.
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*):[^/@\s]*@")
_URL_QUERY_PARAM = re.compile(r"([?&])([^=&#\s]+)=([^&#\s]*)")


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        _append(f, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dump_line(result: TPOResult) -> bytes:
    return (result.to_json() + "\n").encode("utf-8")


def _repair_tail(path: Path) -> int:
    """Make ``path`` end with a whole line before anything is appended to it; return the bytes cut off.

    A last line without its newline that is not a whole JSON object is a write a kill cut
    short: it is cut off. One that is whole (cut just before its newline) gets its newline,
    so it counts as ``tpo._jsonl`` counts it.
    """
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        start = _last_line_start(f, size)
        f.seek(start)
        if is_whole_object(f.read(size - start)):
            f.seek(size)
            f.write(b"\n")
            cut = 0
        else:
            f.truncate(start)
            cut = size - start
        f.flush()
        os.fsync(f.fileno())
    return cut


def _last_line_start(f: IO[bytes], size: int) -> int:
    end = size
    chunk = 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        cut = f.read(end - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _scored(d: Mapping[str, Any]) -> bool:
    return any(isinstance(c, Mapping) and c.get("score") is not None for c in d.get("candidates") or ())


def _output_info(d: Mapping[str, Any]) -> tuple[bool, bool]:
    """(failed, has a scored answer) of one output line."""
    status = d["status"]
    if status not in ("complete", "failed"):
        raise ValueError(f"a finished result's status is 'complete' or 'failed', not {status!r}")
    return status != "complete", _scored(d)


def _checkpoint_info(d: Mapping[str, Any]) -> tuple[int, bool]:
    """(steps finished, has a scored answer) of one checkpoint line."""
    return len(d["steps"]), _scored(d)


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


class _GroupLog:
    """An append-only file of lines, made durable in groups without blocking the event loop.

    ``append`` queues one line and returns once the line is on disk (written and fsynced).
    Lines queued while a group is being written form the next group: one write and one
    ``fsync`` per group, in a worker thread. So however many prompts finish a step at once,
    they share an ``fsync``, and the model requests in flight never wait for the disk. A
    write that fails is taken back (the file is truncated to where the group began), then
    that line's group and every later line fail with ``_WriteFailed``: nothing is ever
    appended after half a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Bytes on disk, as of the last group written.
        self.size = 0
        #: Groups written (one fsync each).
        self.groups = 0
        self._f: IO[bytes] | None = None
        self._queue: list[tuple[bytes, Callable[[int], None] | None, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def append(self, data: bytes, on_written: Callable[[int], None] | None = None) -> None:
        """Append ``data`` (one line with its newline); return once it is durable.

        ``on_written(offset)`` runs on the event loop once the line is on disk, even when the
        caller was cancelled meanwhile, so whatever indexes the file stays true to it.
        """
        if self._failure is not None:
            raise self._failure
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((data, on_written, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_groups())
        await future

    async def drain(self) -> None:
        """Wait until no group is being written (the lines' own waiters receive any error)."""
        while self._writer is not None:
            await asyncio.wait([self._writer])

    async def _write_groups(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # lines queued in this same turn of the loop join the group
                group, self._queue = self._queue, []
                try:
                    job = self._before_group()
                    offset, job_result = await asyncio.to_thread(self._write_group, b"".join(d for d, _, _ in group), job)
                    self.groups += 1
                    self._after_group(job_result)
                    for data, on_written, _ in group:
                        if on_written is not None:
                            on_written(offset)
                        offset += len(data)
                        self.size = offset
                except BaseException as e:
                    # Whatever went wrong, no waiter may hang: each gets the error.
                    self._fail(e, group)
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    return
                for _, _, future in group:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._writer = None

    def _fail(self, error: BaseException, group: list[tuple[bytes, Any, asyncio.Future[None]]]) -> None:
        if isinstance(error, asyncio.CancelledError):
            self._failure = _WriteFailed(f"could not write {self.path}: a write was interrupted")
        else:
            self._failure = error
        for _, _, future in [*group, *self._queue]:
            if future.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(self._failure)
        self._queue = []

    def _write_group(self, data: bytes, job: Any) -> tuple[int, Any]:
        """In the worker thread: run ``job`` (see ``_before_group``), then append ``data`` durably; return its offset."""
        job_result = self._run_job(job) if job is not None else None
        if self._f is None:
            self._f = self.path.open("ab")
        f = self._f
        offset = os.fstat(f.fileno()).st_size
        try:
            _append(f, data)
        except OSError as e:
            try:
                f.truncate(offset)
                f.flush()
            except OSError as e2:  # the file may end in half a line now; the next start cuts or reports it
                raise _WriteFailed(f"could not write {self.path}: {e}; the partial write could not be undone either ({e2})") from e
            raise _WriteFailed(f"could not write {self.path}: {e}") from e
        return offset, job_result

    # Hooks for work that must not overlap a group's write (a compaction that replaces the file).
    def _before_group(self) -> Any:
        """On the loop, as a group is taken: a job for the worker thread to run first, or None."""
        return None

    def _run_job(self, job: Any) -> Any:
        """In the worker thread, before the group is appended."""
        return None

    def _after_group(self, job_result: Any) -> None:
        """On the loop, after the group is durable and before its lines' ``on_written``."""

    def close(self) -> None:
        """Close the file (after ``drain``: a group in flight would fail)."""
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    length: int
    steps: int


class _Checkpoints(_GroupLog, Mapping[str, TPOResult]):
    """The append-only file of partial results, indexed by prompt id (the latest line wins).

    As a mapping it is the ``resume`` argument of ``Engine.optimize_many``: a result is read
    from disk only when the engine asks for it, through a handle on the file the index
    describes (a compaction in the worker thread replaces the file; the loop switches the
    index and the handle together).
    """

    def __init__(self, path: Path, compact_min_bytes: int) -> None:
        super().__init__(path)
        self.compact_min_bytes = compact_min_bytes
        self.entries: dict[str, _Entry] = {}
        self.live_bytes = 0
        self._reader: IO[bytes] | None = None
        #: Told about a checkpoint that cannot be read back (its prompt then starts over).
        self.note: Callable[[str], None] = lambda message: None

    # Mapping: what the engine resumes from.
    def __getitem__(self, prompt_id: str) -> TPOResult:
        entry = self.entries[prompt_id]
        if self._reader is None:
            self._reader = self.path.open("rb")
        self._reader.seek(entry.offset)
        try:
            return TPOResult.from_dict(json.loads(self._reader.read(entry.length)))
        except (ValueError, KeyError, TypeError) as e:
            # Unreadable (another tpo version's schema, a damaged line): the prompt starts over,
            # and says so, rather than failing the run or vanishing silently.
            self.note(f"the checkpoint of prompt {prompt_id!r} cannot be read ({type(e).__name__}: {e}); it starts over")
            raise KeyError(prompt_id) from e

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.entries  # without reading the checkpoint from disk

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
        torn = _repair_tail(self.path)
        read: ResultLines[tuple[int, bool]] = read_result_lines(self.path, _checkpoint_info, skip_malformed=True)
        self.entries = {}
        for pid, line in read.lines.items():
            steps, scored = line.value
            # Nothing scored yet: the engine could not go on from there, so the prompt starts over.
            if pid in wanted and pid not in finished and scored:
                self.entries[pid] = _Entry(line.offset, line.length, steps)
        self.size = self.path.stat().st_size
        self.live_bytes = sum(e.length for e in self.entries.values())
        return torn, len(read.malformed)

    def forget_all(self) -> int:
        """Drop every checkpoint from the index (their prompts start over); return how many there were."""
        count = len(self.entries)
        self.entries = {}
        self.live_bytes = 0
        return count

    def compact(self, extra: Iterable[tuple[str, bytes, int]] = ()) -> None:
        """Rewrite the file with only the live checkpoints (plus ``extra`` ones), atomically; no group may be in flight."""
        entries, size, reader = self._rewrite(self.entries, extra)
        self._switch(entries, size, reader)

    def _rewrite(
        self, live: Mapping[str, _Entry], extra: Iterable[tuple[str, bytes, int]] = ()
    ) -> tuple[dict[str, _Entry], int, IO[bytes]]:
        super().close()  # the next append opens the new file
        tmp = self.path.with_name(self.path.name + ".tmp")
        entries: dict[str, _Entry] = {}
        with self.path.open("rb") as src, tmp.open("wb") as dst:
            for pid, e in live.items():
                src.seek(e.offset)
                data = src.read(e.length)
                entries[pid] = _Entry(dst.tell(), len(data), e.steps)
                dst.write(data)
            for pid, data, steps in extra:
                entries[pid] = _Entry(dst.tell(), len(data), steps)
                dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
            size = dst.tell()
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        return entries, size, self.path.open("rb")

    def _switch(self, entries: dict[str, _Entry], size: int, reader: IO[bytes]) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = reader
        self.entries = entries
        self.size = size
        self.live_bytes = sum(e.length for e in entries.values())

    async def append_partial(self, partial: TPOResult) -> None:
        """Append a prompt's latest partial result; return once it is durable."""
        data = _dump_line(partial)

        def index(offset: int) -> None:
            old = self.entries.get(partial.prompt_id)
            if old is not None:
                self.live_bytes -= old.length
            self.entries[partial.prompt_id] = _Entry(offset, len(data), len(partial.steps))
            self.live_bytes += len(data)

        await self.append(data, index)

    def drop(self, prompt_id: str) -> None:
        """Forget a finished prompt's checkpoint (the next compaction removes it from the file)."""
        old = self.entries.pop(prompt_id, None)
        if old is not None:
            self.live_bytes -= old.length

    def _before_group(self) -> Any:
        dead = self.size - self.live_bytes
        if dead > self.compact_min_bytes and dead > self.live_bytes:
            return dict(self.entries)
        return None

    def _run_job(self, job: Any) -> Any:
        return self._rewrite(job)

    def _after_group(self, job_result: Any) -> None:
        if job_result is None:
            return
        entries, size, reader = job_result
        # Prompts that finished while the file was rewritten are gone from the index; keep them out.
        self._switch({pid: e for pid, e in entries.items() if pid in self.entries}, size, reader)

    def close(self) -> None:
        super().close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# ---------------------------------------------------------------------------- fingerprints


def _is_secret(name: str) -> bool:
    key = name.lower().replace("-", "_")
    return key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES)


def _redact(value: Any) -> Any:
    """``value`` as JSON data, with the values of secret-named keys masked and URL passwords hidden."""
    if isinstance(value, Mapping):
        return {str(k): "***" if _is_secret(str(k)) and v else _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(r"\1:***@", value)
        if "://" in value:  # secrets in a URL's query string: ?key=..., &api_key=...
            value = _URL_QUERY_PARAM.sub(
                lambda m: f"{m[1]}{m[2]}=***" if _is_secret(m[2]) or m[2].lower() == "key" else m[0], value
            )
        return value
    if value is None or isinstance(value, (int, float, bool)):
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
            what = {"input": "the input rows", "method": "the prompt templates"}.get(key.split(".")[0], "its content")
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

    ``models`` describes the policy, critic and reward (specs and every option that can
    change a result) for the fingerprint; values of secret-named keys (``api_key``,
    ``token``, ``password``, ...) are masked. ``settings`` is anything else worth saving in
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
        self._checkpoints.note = self.observer.on_note
        self._out = _GroupLog(self.output)
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
            "models": self.models,
            "input": self.dataset.describe(),
        }
        return json.loads(json.dumps(data))  # type: ignore[no-any-return]

    def open(self, *, restart: bool = False) -> list[str]:
        """Check the output against the run it belongs to, repair it, and get ready to run.

        A new run writes its fingerprint; an existing one must have the same fingerprint
        (else ``ConfigError`` lists what differs), unless ``restart`` removes its output
        and checkpoints first. Takes the run's lock until ``arun`` ends or ``close()``.
        Returns what was removed, for the user to see; notes the invalid rows the dataset skipped.
        """
        if self._lock_file is not None:
            return []
        problems = self.dataset.problem_count
        if problems:
            listed = "\n  ".join(str(p) for p in self.dataset.problems[:5])
            more = f"\n  … and {problems - 5} more" if problems > 5 else ""
            self.observer.on_note(f"skipped {problems} invalid row(s):\n  {listed}{more}")
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
            record = dumps_json(self._config_record(), indent=2) + "\n"
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
        torn = _repair_tail(self.output)
        if torn:
            self.observer.on_note(f"repaired {self.output}: removed an unfinished last line ({torn} bytes) written when the run was stopped")
        read = read_result_lines(
            self.output, _output_info,
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
            drop = {offset for offset, _, _ in retry.values()}
            drop.update(s.offset for s in read.superseded if s.prompt_id in retry)
            self._rewrite_output_without(drop)
            for pid in retry:
                del self._finished[pid]
            self.observer.on_note(f"retrying {len(retry)} prompt(s) that failed before (--no-retry-failed keeps them as they are)")
        self._out.size = self.output.stat().st_size
        self._finished_before = len(self._finished)

    def _rewrite_output_without(self, offsets: set[int]) -> None:
        """Rewrite the output atomically without the lines that start at ``offsets``."""
        tmp = self.output.with_name(self.output.name + ".tmp")
        with self.output.open("rb") as src, tmp.open("wb") as dst:
            offset = 0
            for raw in src:
                if offset not in offsets:
                    dst.write(raw)
                offset += len(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.output)
        _fsync_dir(self.output.parent)

    # ------------------------------------------------------------------ running

    def run(self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None) -> BatchSummary:
        """Run every unfinished prompt (blocking); see ``arun``."""
        _no_running_loop("runner.BatchRun.run", "runner.BatchRun.arun")
        return asyncio.run(_closing(self.arun(policy, reward, critic=critic), policy, critic, reward))

    async def arun(self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None) -> BatchSummary:
        """Run every unfinished prompt, appending each result to the output as it finishes.

        A prompt that fails (its backend or reward keeps failing) is written with its error
        and the run goes on. Interrupting the run (Ctrl-C, a kill) loses at most the steps
        in flight; ``open()`` and ``arun()`` again continue it. With a reward that keeps
        state per prompt (``per_prompt_state``), prompts checkpointed mid-way start over.
        """
        self.open()
        try:
            return await self._run(policy, reward, critic)
        except _WriteFailed as e:
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

    async def _run(self, policy: PolicyBackend, reward: RewardModel, critic: PolicyBackend | None) -> BatchSummary:
        self._restarted = self._forget_partials(reward)
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

        async def on_step(partial: TPOResult) -> None:
            # The chain goes on only once its step is durable: that is what resuming relies on.
            await self._checkpoints.append_partial(partial)
            state.running[partial.prompt_id] = len(partial.steps)
            state.usage = state.usage + (partial.steps[-1].usage if partial.steps else Usage())
            state.steps_done += 1
            state.remaining_steps = max(0, state.remaining_steps - 1)
            self.observer.on_step(partial, state)

        async def finish(result: TPOResult) -> None:
            await self._out.append(_dump_line(result))
            failed = result.status != "complete"
            self._finished[result.prompt_id] = failed
            self._checkpoints.drop(result.prompt_id)  # only once the result is durable
            state.done += 1
            state.failed += failed
            self.observer.on_result(result, state)

        # Results are written concurrently, so those finishing together share one fsync.
        finishing: set[asyncio.Task[None]] = set()
        try:
            # Closed on the way out, so a failed write stops the prompts in flight at once.
            async with contextlib.aclosing(
                engine.optimize_many(pending(), resume=self._checkpoints, on_step=on_step)
            ) as results:
                async for result in results:
                    # No longer in progress (the engine starts the next prompt now), though its line is still being written.
                    steps = state.running.pop(result.prompt_id, len(result.steps))
                    state.remaining_steps = max(0, state.remaining_steps - (state.steps_per_prompt - steps))
                    finishing.add(asyncio.create_task(finish(result)))
                    for task in [t for t in finishing if t.done()]:
                        finishing.discard(task)
                        task.result()  # a failed write stops the run here
            while finishing:
                task = finishing.pop()
                await task
        finally:
            for task in finishing:
                task.cancel()
            await asyncio.gather(*finishing, return_exceptions=True)
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
) -> BatchSummary:
    """Async twin of ``run_batch``."""
    config = config if config is not None else TPOConfig()
    dataset = source if isinstance(source, PromptDataset) else read_prompts(source)
    if models is None:
        models = {"policy": _name(policy), "critic": _name(critic), "reward": _name(reward)}
    run = BatchRun(dataset, output, config=config, models=models, settings=settings, retry_failed=retry_failed,
                   observer=observer, compact_min_bytes=compact_min_bytes)
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
) -> BatchSummary:
    """Optimise every prompt of a dataset, appending one result line per prompt to ``output``.

    ``source`` is a ``PromptDataset`` from ``tpo.datasets.read_prompts`` (which reads any
    input and takes the prompt and id fields, ``limit``, ``shuffle``, ``skip_invalid``, ...),
    or a path, dataset name or iterable of rows, read with ``read_prompts``' defaults.
    Running the same call again continues an interrupted run from the last finished step of
    every prompt; a call whose configuration (method, ``models``, input) differs is refused
    with ``ConfigError`` unless ``restart=True``. Prompts that failed before are retried
    unless ``retry_failed=False``. ``models`` (default: the objects' names) identifies the
    policy, critic and reward in the fingerprint: give every option that changes results.
    Inside a running event loop, use ``await arun_batch(...)``.
    """
    _no_running_loop("runner.run_batch", "runner.arun_batch")
    return asyncio.run(
        _closing(
            arun_batch(
                source, output, policy=policy, reward=reward, critic=critic, config=config, restart=restart,
                retry_failed=retry_failed, models=models, settings=settings, observer=observer,
                compact_min_bytes=compact_min_bytes,
            ),
            policy, critic, reward,
        )
    )


T = TypeVar("T")


async def _closing(work: Awaitable[T], *objects: object) -> T:
    """Await ``work``, then close the connections the backends opened on this (private) event loop."""
    try:
        return await work
    finally:
        await aclose_per_loop(*objects)
