"""The results of finished requests: the last few in memory by trace id, and optionally every one in a JSONL file."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from ..batch.durable import GroupLog, dump_line, repair_tail
from ..errors import ConfigError
from ..result import TPOResult

log = logging.getLogger("tpo.serve")


def check_trace_log(log_path: str | Path) -> Path:
    """``log_path`` as a ``Path``; ``ConfigError`` when it is a directory or its directory does not exist."""
    path = Path(log_path)
    if path.is_dir():
        raise ConfigError(f"--trace-log {path}: is a directory, not a file")
    if not path.parent.is_dir():
        raise ConfigError(f"--trace-log {path}: the directory {path.parent} does not exist")
    return path


class Traces:
    """Keeps the ``capacity`` most recent results by trace id; appends every result to ``log_path`` when given.

    The log is a results file as ``tpo batch`` writes it (one result per line, each line written
    whole and made durable), so ``tpo eval`` and ``tpo report`` read it. A log that cannot be
    written is reported once and the server goes on answering.
    """

    def __init__(self, capacity: int, log_path: str | Path | None = None) -> None:
        self.capacity = capacity
        self._results: OrderedDict[str, TPOResult] = OrderedDict()
        self._log: GroupLog | None = None
        self._log_failed = False
        if log_path is not None:
            path = check_trace_log(log_path)
            if path.exists():
                cut = repair_tail(path)  # a server killed mid-write left half a line
                if cut:
                    log.warning("%s: removed an unfinished last line (%d bytes)", path, cut)
            self._log = GroupLog(path)

    def get(self, trace_id: str) -> TPOResult | None:
        return self._results.get(trace_id)

    async def add(self, trace_id: str, result: TPOResult) -> None:
        """Keep ``result`` under ``trace_id`` (forgetting the oldest beyond capacity) and log it."""
        self._results[trace_id] = result
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)
        if self._log is None or self._log_failed:
            return
        try:
            await self._log.append(dump_line(result))
        except Exception as e:  # the answer still goes out: a full disk must not take the server down
            self._log_failed = True
            log.error("the trace log %s cannot be written any more: %s", self._log.path, e)

    async def aclose(self) -> None:
        if self._log is not None:
            await self._log.drain()
            self._log.close()
