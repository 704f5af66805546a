"""Durable files for a batch run: whole appended lines, atomic rewrites, torn-tail repair, the run lock and group commit."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, InputError
from ..result import TPOResult
from .jsonl import is_whole_object

__all__ = [
    "GroupLog",
    "WriteFailed",
    "claim_output",
    "dump_line",
    "fsync_dir",
    "read_fingerprint",
    "repair_tail",
    "rewrite_lines",
    "take_lock",
    "write_atomic",
]


def fsync_dir(path: Path) -> None:
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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole: a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        _append(f, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def dump_line(result: TPOResult) -> bytes:
    """One result as a line of JSON, ready to append."""
    return (result.to_json() + "\n").encode("utf-8")


def repair_tail(path: Path) -> int:
    """Make ``path`` end with a whole line before anything is appended to it; return the bytes cut off.

    A last line without its newline that is not a whole JSON object is a write a kill cut
    short: it is cut off. One that is whole (cut just before its newline) gets its newline,
    so it counts as ``tpo.batch.jsonl`` counts it.
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


def take_lock(path: Path) -> IO[str]:
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
        # The caller's to resolve (wait, or choose another output), not a failure a retry fixes: a ConfigError.
        raise ConfigError(
            f"another process is writing this run right now (it holds the lock {path}); "
            "wait for it to finish, or write to another output file"
        ) from None
    return f


def claim_output(output: Path, sidecar: Path, *, made_by: str, restart: bool) -> IO[str]:
    """Refuse an output that another program wrote, then create the output's folder and sidecar and lock it.

    An output with content but no fingerprint in ``sidecar`` is not ``made_by``'s (``"tpo judge"``):
    it is overwritten only on ``restart``. Returns the held lock (see ``take_lock``).
    """
    if not restart and not (sidecar / "fingerprint.json").exists() and output.exists() and output.stat().st_size > 0:
        raise ConfigError(
            f"{output} already exists and is not the output of {made_by} (there is no {sidecar.name}/ "
            "beside it); choose another output file, or add --restart to overwrite it"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    sidecar.mkdir(exist_ok=True)
    return take_lock(sidecar / "lock")


def read_fingerprint(path: Path, *, start_over: str) -> Any:
    """The fingerprint saved at ``path``, or None without one; unreadable JSON is an ``InputError`` naming the way out."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}); add --restart to {start_over}") from e


def rewrite_lines(path: Path, keep: Callable[[int], bool]) -> None:
    """Rewrite ``path`` atomically with only its lines whose start offset ``keep`` accepts."""
    tmp = path.with_name(path.name + ".tmp")
    with path.open("rb") as src, tmp.open("wb") as dst:
        offset = 0
        for raw in src:
            if keep(offset):
                dst.write(raw)
            offset += len(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class WriteFailed(Exception):
    """A run file could not be written. Not a RunError: the engine must not take it for one prompt's failure."""


class GroupLog:
    """An append-only file of lines, made durable in groups without blocking the event loop.

    ``append`` queues one line and returns once the line is on disk (written and fsynced).
    Lines queued while a group is being written form the next group: one write and one
    ``fsync`` per group, in a worker thread. So however many prompts finish a step at once,
    they share an ``fsync``, and the model requests in flight never wait for the disk. A
    write that fails is taken back (the file is truncated to where the group began), then
    that line's group and every later line fail with ``WriteFailed``: nothing is ever
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
                    offset, job_result = await asyncio.to_thread(
                        self._write_group, b"".join(d for d, _, _ in group), job
                    )
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
            self._failure = WriteFailed(f"could not write {self.path}: a write was interrupted")
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
        try:
            f = self.open()
        except OSError as e:
            raise WriteFailed(f"could not write {self.path}: {e.strerror or e}") from e
        offset = os.fstat(f.fileno()).st_size
        try:
            _append(f, data)
        except OSError as e:
            try:
                f.truncate(offset)
                f.flush()
            except OSError as e2:  # the file may end in half a line now; the next start cuts or reports it
                raise WriteFailed(
                    f"could not write {self.path}: {e}; the partial write could not be undone either ({e2})"
                ) from e
            raise WriteFailed(f"could not write {self.path}: {e}") from e
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

    def open(self) -> IO[bytes]:
        """The file, opened for appending; open it before the first append to find out early that it cannot be written."""
        if self._f is None:
            self._f = self.path.open("ab")
        return self._f

    def close(self) -> None:
        """Close the file (after ``drain``: a group in flight would fail)."""
        if self._f is not None:
            self._f.close()
            self._f = None
