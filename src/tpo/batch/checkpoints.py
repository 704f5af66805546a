"""The checkpoint log: the latest partial result of every unfinished prompt, indexed by id and compacted in place."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..result import TPOResult
from .durable import GroupLog, dump_line, fsync_dir, repair_tail
from .jsonl import ResultLines, read_result_lines


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


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    length: int
    steps: int


class _Checkpoints(GroupLog, Mapping[str, TPOResult]):
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
            self.note(
                f"the checkpoint of prompt {prompt_id!r} cannot be read ({type(e).__name__}: {e}); it starts over"
            )
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
        self.open()  # creates it, and finds out now if it cannot be written
        torn = repair_tail(self.path)
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
        fsync_dir(self.path.parent)
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
        data = dump_line(partial)

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
