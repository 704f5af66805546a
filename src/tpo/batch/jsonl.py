"""Reads tpo's files of results, one JSON object per line keyed by ``prompt_id``: batch outputs and their checkpoints.

One reader, one set of rules, for ``tpo batch`` resuming a run and for ``tpo eval`` / ``tpo
export`` reading it:

* A line is one JSON object with a string ``prompt_id``. Blank lines are skipped.
* **Torn last line.** tpo writes each line, newline included, with one write. A last line
  without its newline that is not a whole JSON object is a write cut short by a kill: it is
  ignored and reported (``torn_bytes``). A last line that is whole but lacks its newline
  counts like any other (``unterminated`` says so). The reader never changes the file; a
  writer that goes on appending cuts the torn line off first (``tpo.batch.runner`` does).
* **Malformed line.** Any other line that is not a result raises ``InputError`` naming the
  file and the line, or, with ``skip_malformed``, is left out and listed.
* **Duplicates.** When a prompt id appears on several lines, the *last* line counts: lines
  are appended in the order results are made, so the last one is the newest (a checkpoint
  file holds every step of a prompt, the latest last). The earlier lines are listed in
  ``superseded``; results keep the order of their counting lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..errors import InputError

__all__ = ["ResultLine", "ResultLines", "Superseded", "is_whole_object", "read_result_lines"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ResultLine(Generic[T]):
    """The line that counts for one prompt id: where it is, and what ``parse`` made of it."""

    prompt_id: str
    lineno: int
    #: Byte offset of the line's start, and its length in bytes (its newline included, when it has one).
    offset: int
    length: int
    value: T


@dataclass(frozen=True, slots=True)
class Superseded:
    """An earlier line of a prompt id that a later line replaces."""

    prompt_id: str
    lineno: int
    offset: int
    length: int
    #: The line number of the line that replaces it.
    by_lineno: int


@dataclass
class ResultLines(Generic[T]):
    """What ``read_result_lines`` found in one file."""

    path: Path
    #: Prompt id → the line that counts (the last one), in the order of those lines.
    lines: dict[str, ResultLine[T]] = field(default_factory=dict)
    superseded: list[Superseded] = field(default_factory=list)
    #: (line number, why) of every line left out with ``skip_malformed``.
    malformed: list[tuple[int, str]] = field(default_factory=list)
    #: Bytes of a torn last line that was ignored (0 when there is none), and its line number.
    torn_bytes: int = 0
    torn_lineno: int = 0
    #: The last line counted has no newline at its end.
    unterminated: bool = False

    def warnings(self) -> list[str]:
        """One message per torn, malformed or superseded line, naming the file and the line."""
        out = [f"{self.path}:{lineno}: {why}; skipped" for lineno, why in self.malformed]
        out += [
            f"{self.path}:{s.by_lineno}: prompt {s.prompt_id!r} appears again (first on line {s.lineno}); "
            "the later line is used"
            for s in self.superseded
        ]
        if self.torn_bytes:
            out.append(
                f"{self.path}:{self.torn_lineno}: the last line is incomplete (a run in progress, or killed?); skipped"
            )
        return out


def is_whole_object(raw: bytes) -> bool:
    """True when ``raw`` (one line, without its newline) is a complete JSON object, i.e. not a write cut short."""
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return False


def read_result_lines(
    path: str | Path,
    parse: Callable[[Mapping[str, Any]], T],
    *,
    skip_malformed: bool = False,
    hint: str = "",
) -> ResultLines[T]:
    """Read every result line of ``path`` by the rules in the module docstring.

    ``parse`` turns one line's JSON object (which has a string ``prompt_id``) into the value
    kept for it: the whole ``TPOResult``, or just the few fields a caller needs, so a large
    file need not be held in memory. A ``ValueError``, ``KeyError``, ``TypeError`` or
    ``AttributeError`` from it makes the line malformed. ``hint`` is appended to the
    ``InputError`` raised for a malformed line (say, how to repair the file).
    """
    p = Path(path)
    out: ResultLines[T] = ResultLines(p)
    try:
        handle = p.open("rb")
    except OSError as e:
        raise InputError(f"{p}: cannot be read: {e.strerror or e}") from e
    offset = 0
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):  # the last line, without its newline
                if not is_whole_object(raw):
                    if raw.strip():
                        out.torn_bytes, out.torn_lineno = len(raw), lineno
                    break
                out.unterminated = True
            if not raw.strip():
                continue
            try:
                pid, value = _parse_line(raw, parse)
            except _Malformed as e:
                if not skip_malformed:
                    raise InputError(f"{p}:{lineno}: {e}{hint}") from None
                out.malformed.append((lineno, str(e)))
                continue
            earlier = out.lines.pop(pid, None)
            if earlier is not None:
                out.superseded.append(Superseded(pid, earlier.lineno, earlier.offset, earlier.length, lineno))
            out.lines[pid] = ResultLine(pid, lineno, start, len(raw), value)
    return out


class _Malformed(Exception):
    """Why one line is not a result."""


def _parse_line(raw: bytes, parse: Callable[[Mapping[str, Any]], T]) -> tuple[str, T]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise _Malformed(f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt_id"), str):
        raise _Malformed("not a tpo result (expected an object with 'prompt_id', 'candidates', 'steps', ...)")
    try:
        value = parse(data)
    except ValueError as e:  # InputError is one: a schema_version this tpo does not read
        raise _Malformed(str(e)) from None
    except (KeyError, TypeError, AttributeError) as e:
        raise _Malformed(f"a malformed tpo result ({type(e).__name__}: {e})") from None
    return data["prompt_id"], value
