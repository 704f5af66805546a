"""Reads the prompts of a batch run from JSONL, JSON, CSV, Parquet or a Hugging Face dataset, validating every row.

``read_prompts`` scans the whole input once and checks each row (a prompt field that holds
text or a conversation, a usable id, JSON-ready extra fields, no duplicate ids); the prompts
are then read again, lazily, when the run asks for them. What stays in memory meanwhile
depends on the format:

* JSON Lines and CSV/TSV: the byte offset of each valid row, never the rows;
* Parquet: the row-group boundaries, plus the one row group being read;
* a Hugging Face dataset: the ``datasets`` object, whose Arrow table is memory-mapped from disk;
* a JSON list: the parsed list (JSON gives no way to find one item without parsing the rest);
* rows given from Python: the rows themselves.

Every problem names the file and the line (or row) it is on.
"""

from __future__ import annotations

import bisect
import csv
import datetime as _dt
import decimal
import hashlib
import itertools
import json
import math
import os
import random
import re
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, Union

from ..errors import ConfigError, InputError, MissingDependencyError
from ..types import Message, Prompt, to_messages

__all__ = [
    "AUTO",
    "AUTO_ID_FIELDS",
    "FORMATS",
    "MAX_LISTED_PROBLEMS",
    "InputFormat",
    "PromptDataset",
    "RowProblem",
    "read_prompts",
]

InputFormat = Literal["jsonl", "json", "csv", "tsv", "parquet", "hf"]
FORMATS: tuple[InputFormat, ...] = ("jsonl", "json", "csv", "tsv", "parquet", "hf")

#: ``read_prompts(id_field=AUTO)``: take the prompt ids from whichever of ``AUTO_ID_FIELDS`` every row has.
AUTO = "auto"
#: The fields ``AUTO`` looks for, in order: used when every row has exactly one of them, the same one.
AUTO_ID_FIELDS = ("id", "question_id", "uid")

#: How many problems an error message lists before it says "and N more".
MAX_LISTED_PROBLEMS = 20

#: Field names that often hold the prompt, suggested when the chosen field is missing.
_LIKELY_PROMPT_FIELDS = ("prompt", "instruction", "messages", "question", "problem", "input", "query", "conversation")

_EXTENSIONS: dict[str, InputFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "hf",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

Source = Union[str, "os.PathLike[str]", Iterable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why one row (or the whole input, when ``where`` names only the file) cannot be used."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class _FileProblem(Exception):
    """A problem that stops reading the input altogether (not valid JSON, not a Parquet file, ...)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.problem = RowProblem(where, message)


# ---------------------------------------------------------------------------- readers


class _Reader(Protocol):
    format: str

    def scan(self) -> Iterator[tuple[int, str, Mapping[str, Any] | RowProblem]]:
        """Every row in input order: (row index, where it is, the row or why it is unreadable)."""
        ...

    def fetch(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """The rows at these indices (in this order), with where they are."""
        ...


def _check_not_binary(path: Path, name: str, fmt: str) -> None:
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise _FileProblem(name, f"looks like a binary file (it contains NUL bytes), not {fmt}")


def _decode_line(raw: bytes, where: str) -> str | RowProblem:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowProblem(where, f"not valid UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def _parse_object(text: str, where: str) -> Mapping[str, Any] | RowProblem:
    try:
        value = json.loads(text)
    except ValueError as e:
        return RowProblem(where, f"not valid JSON ({e})")
    if not isinstance(value, dict):
        return RowProblem(where, f"expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


class _JsonlReader:
    """One JSON object per line; rows are found again by their byte offset."""

    format = "jsonl"

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._offsets: list[int] = []
        self._lines: list[int] = []

    def scan(self) -> Iterator[tuple[int, str, Mapping[str, Any] | RowProblem]]:
        _check_not_binary(self.path, self.name, "JSON Lines")
        offset = 0
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some editors add
                    raw, start = raw[3:], start + 3
                if not raw.strip():
                    continue  # blank lines, a trailing newline
                where = f"{self.name} line {lineno}"
                index = len(self._offsets)
                self._offsets.append(start)
                self._lines.append(lineno)
                text = _decode_line(raw, where)
                yield index, where, text if isinstance(text, RowProblem) else _parse_object(text, where)

    def fetch(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        with self.path.open("rb") as f:
            for i in indices:
                f.seek(self._offsets[i])
                where = f"{self.name} line {self._lines[i]}"
                row = _parse_object(f.readline().decode("utf-8"), where)
                if isinstance(row, RowProblem):  # the file changed since it was checked
                    raise InputError(f"{row}; the input changed during the run")
                yield where, row


class _ListReader:
    """Rows already in memory: a parsed JSON list, or rows handed over from Python."""

    def __init__(self, format: str, rows: list[tuple[str, Mapping[str, Any] | RowProblem]]) -> None:
        self.format = format
        self._rows = rows

    def scan(self) -> Iterator[tuple[int, str, Mapping[str, Any] | RowProblem]]:
        for i, (where, row) in enumerate(self._rows):
            yield i, where, row

    def fetch(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for i in indices:
            where, row = self._rows[i]
            if isinstance(row, RowProblem):
                raise RuntimeError(f"asked for the invalid row {row}")
            yield where, row


def _read_json_list(path: Path, name: str) -> _ListReader | _JsonlReader:
    _check_not_binary(path, name, "JSON")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _FileProblem(f"{name} line {line}", f"not valid UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(pos: int) -> int:
        return bisect.bisect_right(newlines, pos - 1) + 1

    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return _ListReader("json", [])
    if text[pos] != "[":
        # Many files named .json hold one object per line.
        first, _, _ = text.partition("\n")
        if text[pos] == "{" and "\n" in text.strip() and isinstance(_parse_object(first, ""), dict):
            return _JsonlReader(path, name)
        try:
            value = json.loads(text)
        except ValueError as e:
            raise _FileProblem(name, f"not valid JSON ({e})") from None
        raise _FileProblem(name, f"expected a JSON list of objects (or one object per line), got {_json_type(value)}")
    rows: list[tuple[str, Mapping[str, Any] | RowProblem]] = []
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return _ListReader("json", rows)
    while True:
        where = f"{name} line {line_of(pos)} (item {len(rows) + 1})"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as e:
            raise _FileProblem(where, f"not valid JSON ({e}); the rest of the file cannot be read") from None
        rows.append(
            (
                where,
                value
                if isinstance(value, dict)
                else RowProblem(where, f"expected a JSON object, got {_json_type(value)}"),
            )
        )
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and _skip_ws(text, pos + 1) == len(text):
            return _ListReader("json", rows)
        raise _FileProblem(
            f"{name} line {line_of(pos)}", "not valid JSON (expected ',' or the closing ']' of the list)"
        )


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _Lines:
    """The lines of a binary file from an offset on, decoded for ``csv.reader``, remembering where the next one starts."""

    def __init__(self, f: IO[bytes], offset: int) -> None:
        if offset == 0:
            f.seek(0)
            if f.read(3) == b"\xef\xbb\xbf":  # a byte-order mark some editors add
                offset = 3
        f.seek(offset)
        self._f = f
        self.position = offset

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = self._f.readline()
        if not raw:
            raise StopIteration
        self.position += len(raw)
        # surrogateescape lets one row with undecodable bytes be reported (and skipped) on its own.
        return raw.decode("utf-8", "surrogateescape")


class _CsvReader:
    """A header row, then one record per row; records are found again by the byte offset where they start."""

    def __init__(self, path: Path, name: str, delimiter: str) -> None:
        self.path, self.name, self.delimiter = path, name, delimiter
        self.format: str = "tsv" if delimiter == "\t" else "csv"
        self._names: list[str] = []
        self._offsets: list[int] = []
        self._lines: list[int] = []

    def scan(self) -> Iterator[tuple[int, str, Mapping[str, Any] | RowProblem]]:
        _check_not_binary(self.path, self.name, "CSV")
        with self.path.open("rb") as f:
            lines = _Lines(f, 0)
            reader = csv.reader(lines, delimiter=self.delimiter)
            try:
                header = next(reader, None)
            except csv.Error as e:
                raise _FileProblem(f"{self.name} line 1", f"not valid CSV ({e})") from None
            if header is None:
                return
            if any(_has_surrogates(h) for h in header):
                raise _FileProblem(f"{self.name} line 1", "the header is not valid UTF-8 text")
            names = [h.strip() for h in header]
            if len(set(names)) != len(names) or "" in names:
                raise _FileProblem(
                    f"{self.name} line 1", f"the header needs distinct, non-empty column names; got {header}"
                )
            self._names = names
            last_line = reader.line_num
            while True:
                start = lines.position  # csv.reader takes lines one at a time: no read-ahead
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise _FileProblem(f"{self.name} line {reader.line_num}", f"not valid CSV ({e})") from None
                where = f"{self.name} line {last_line + 1}"
                lineno, last_line = last_line + 1, reader.line_num
                if not record or all(not cell.strip() for cell in record):
                    continue
                index = len(self._offsets)
                self._offsets.append(start)
                self._lines.append(lineno)
                yield index, where, self._row(record, where)

    def _row(self, record: list[str], where: str) -> Mapping[str, Any] | RowProblem:
        if any(_has_surrogates(cell) for cell in record):
            return RowProblem(where, "not valid UTF-8 text")
        if len(record) != len(self._names):
            return RowProblem(where, f"has {len(record)} columns; the header has {len(self._names)}")
        return dict(zip(self._names, record, strict=True))

    def fetch(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        with self.path.open("rb") as f:
            for i in indices:
                where = f"{self.name} line {self._lines[i]}"
                try:
                    record = next(csv.reader(_Lines(f, self._offsets[i]), delimiter=self.delimiter), None)
                except csv.Error:
                    record = None
                row = self._row(record, where) if record is not None else RowProblem(where, "not a CSV record")
                if isinstance(row, RowProblem):  # the file changed since it was checked
                    raise InputError(f"{row}; the input changed during the run")
                yield where, row


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


class _TableReader:
    """Rows of a Hugging Face dataset (a memory-mapped Arrow table), read by index."""

    def __init__(self, format: str, name: str, length: int, row_at: Any) -> None:
        self.format, self.name = format, name
        self._length = length
        self._row_at = row_at

    def _where(self, i: int) -> str:
        return f"{self.name} row {i + 1}"

    def scan(self) -> Iterator[tuple[int, str, Mapping[str, Any] | RowProblem]]:
        for i in range(self._length):
            yield i, self._where(i), self._row_at(i)

    def fetch(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for i in indices:
            yield self._where(i), self._row_at(i)


class _ParquetReader:
    """A Parquet file read one row group at a time: rows are found again by their row group."""

    format = "parquet"

    def __init__(self, path: Path, name: str) -> None:
        try:
            import pyarrow.parquet as pq  # optional and heavy: imported on use
        except ImportError as e:
            raise MissingDependencyError("pyarrow", "data", "Reading Parquet files") from e
        self.name = name
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            raise _FileProblem(name, f"not a readable Parquet file ({type(e).__name__}: {e})") from None
        metadata = self._file.metadata
        #: The index of the first row of every row group.
        self._starts = list(
            itertools.accumulate((metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)), initial=0)
        )[:-1]
        self._cached: tuple[int, list[dict[str, Any]]] | None = None

    def _group(self, g: int) -> list[dict[str, Any]]:
        if self._cached is None or self._cached[0] != g:
            try:
                rows = self._file.read_row_group(g).to_pylist()
            except Exception as e:  # a corrupt row group
                raise _FileProblem(self.name, f"row group {g} cannot be read ({type(e).__name__}: {e})") from None
            self._cached = (g, rows)
        return self._cached[1]

    def _where(self, i: int) -> str:
        return f"{self.name} row {i + 1}"

    def scan(self) -> Iterator[tuple[int, str, Mapping[str, Any] | RowProblem]]:
        for g, start in enumerate(self._starts):
            for j, row in enumerate(self._group(g)):
                yield start + j, self._where(start + j), row

    def fetch(self, indices: Sequence[int]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for i in indices:
            g = bisect.bisect_right(self._starts, i) - 1
            try:
                rows = self._group(g)
            except _FileProblem as e:
                raise InputError(f"{e}; the input changed during the run") from None
            yield self._where(i), rows[i - self._starts[g]]


def _read_hf(source: str, name: str, split: str | None, *, local: bool) -> _TableReader:
    try:
        import datasets  # optional and heavy: imported on use
    except ImportError as e:
        raise MissingDependencyError("datasets", "data", "Reading Hugging Face datasets") from e
    try:
        path = Path(source)
        if local and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded: Any = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source, split=split)
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot load this"
        where = "the local dataset" if local else "the Hugging Face Hub dataset"
        raise _FileProblem(name, f"could not load {where} ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            if len(splits) != 1:
                raise _FileProblem(name, f"has the splits {', '.join(splits)}; choose one with --split")
            split = splits[0]
        if split not in loaded:
            raise _FileProblem(name, f"has no split {split!r}; it has {', '.join(splits)}")
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise _FileProblem(name, f"loaded as a {type(loaded).__name__}, not a dataset of rows")
    dataset = loaded
    label = f"{name} [{split}]" if split else name
    return _TableReader("hf", label, len(dataset), lambda i: dataset[i])


def _open(source: str, name: str, fmt: InputFormat | None, split: str | None) -> _Reader:
    path = Path(source)
    if fmt is None:
        if path.is_dir():
            fmt = "hf"
        elif path.exists():
            fmt = _EXTENSIONS.get(path.suffix.lower())
            if fmt is None:
                raise ConfigError(
                    f"{name}: cannot tell the format from the extension {path.suffix!r}; "
                    f"name the format ({', '.join(FORMATS)}) with --input-format"
                )
        elif _HUB_NAME.match(source) and path.suffix.lower() not in _EXTENSIONS:
            fmt = "hf"
        else:
            raise InputError(f"{name}: no such file or directory")
    if split is not None and fmt != "hf":
        raise ConfigError(f"--split applies to Hugging Face datasets, not to a {fmt} file like {name}")
    if fmt == "hf":
        return _read_hf(source, name, split, local=path.exists())
    if not path.is_file():
        raise InputError(f"{name}: no such file")
    if fmt == "jsonl":
        return _JsonlReader(path, name)
    if fmt == "json":
        return _read_json_list(path, name)
    if fmt in ("csv", "tsv"):
        return _CsvReader(path, name, "\t" if fmt == "tsv" else ",")
    return _ParquetReader(path, name)


# ---------------------------------------------------------------------------- rows to prompts


def _jsonable(value: Any, where: str) -> Any:
    """The value as plain JSON data; NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(value, str):
        return _text(value, f"field {where!r}")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_text(str(k), f"a field name in {where!r}"): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return _jsonable(float(value), where)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"field {where!r} holds binary data that is not UTF-8 text") from None
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _jsonable(tolist(), where)
    raise ValueError(f"field {where!r} holds a {type(value).__name__}, which cannot be written as JSON")


#: A UTF-16 surrogate code point: a JSON escape like "\ud800" can produce one alone, which no UTF-8 text can hold.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str, what: str) -> str:
    """``value``, unless it holds a lone surrogate (it could never be sent to a model or written out)."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise ValueError(
            f"{what} holds a lone UTF-16 surrogate (U+{ord(found.group()):04X} at character {found.start() + 1}), "
            "which is not valid Unicode text"
        )
    return value


def _canonical(row: Mapping[str, Any]) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8", "surrogatepass"
    )


def _suggest(field: str, row: Mapping[str, Any]) -> str:
    fields = ", ".join(repr(k) for k in row) or "none"
    likely = [k for k in _LIKELY_PROMPT_FIELDS if k in row and k != field]
    hint = f"; did you mean --prompt-field {likely[0]}?" if likely else "; choose one with --prompt-field"
    return f"has no field {field!r} (its fields: {fields}){hint}"


def _id_value(value: Any) -> str | None:
    """The prompt id an id field's (JSON-ready) value gives, or None when it cannot be one."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        return None
    return str(value).strip()


def _bad_id(value: Any, id_field: str) -> str:
    return f"the id field {id_field!r} must be a non-empty string or an integer, not {value!r}"


@dataclass(frozen=True, slots=True)
class _Checked:
    id: str
    digest: bytes
    prompt: Prompt


def _check_row(
    row: Mapping[str, Any], where: str, prompt_field: str, id_field: str | None, fmt: str
) -> _Checked | RowProblem:
    try:
        clean = {_text(str(k), "a field name"): _jsonable(v, str(k)) for k, v in row.items()}
    except ValueError as e:
        return RowProblem(where, str(e))
    if prompt_field not in clean:
        return RowProblem(where, _suggest(prompt_field, clean))
    value = clean[prompt_field]
    if value is None or (isinstance(value, str) and not value.strip()) or value == []:
        return RowProblem(where, f"the prompt field {prompt_field!r} is empty")
    if fmt in ("csv", "tsv") and isinstance(value, str) and value.lstrip().startswith("[{"):
        # A CSV cell can only hold a conversation as JSON text.
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            try:
                value = _jsonable(parsed, prompt_field)
            except ValueError as e:
                return RowProblem(where, str(e))
    if not isinstance(value, (str, list)):
        return RowProblem(
            where, f"the prompt field {prompt_field!r} holds {_json_type(value)}; expected text or a list of messages"
        )
    digest = hashlib.sha256(_canonical(clean)).digest()
    if id_field is None:
        prompt_id = digest.hex()[:16]
    else:
        if id_field not in clean:
            fields = ", ".join(repr(k) for k in clean)
            return RowProblem(where, f"has no id field {id_field!r} (its fields: {fields})")
        found = _id_value(clean[id_field])
        if found is None:
            return RowProblem(where, _bad_id(clean[id_field], id_field))
        prompt_id = found
    try:
        messages: tuple[Message, ...] = to_messages(value, where=f"field {prompt_field!r}")
    except InputError as e:
        return RowProblem(where, str(e))
    metadata = {k: v for k, v in clean.items() if k != prompt_field and k != id_field}
    return _Checked(prompt_id, digest, Prompt(prompt_id, messages, metadata))


# ---------------------------------------------------------------------------- the dataset


class PromptDataset:
    """The valid prompts of one input, in run order (after ``shuffle`` and ``limit``).

    Holds each prompt's id and where its row lives; iterating reads the rows again and
    yields ``tpo.Prompt`` objects whose ``metadata`` is every field of the row except the
    prompt (and id) field. ``problems`` lists the first invalid rows (when they were
    skipped); ``problem_count`` counts all of them.
    """

    def __init__(
        self,
        *,
        reader: _Reader,
        source: str,
        order: list[tuple[int, str]],
        rows_sha256: str,
        settings: Mapping[str, Any],
        problems: Sequence[RowProblem],
        problem_count: int,
        rows_read: int,
        id_note: str | None = None,
    ) -> None:
        self._reader = reader
        self._order = order
        self.source = source
        #: One of ``FORMATS``, or ``"rows"`` for rows given from Python.
        self.format: str = reader.format
        self.rows_sha256 = rows_sha256
        self.settings = dict(settings)
        self.problems = tuple(problems)
        self.problem_count = problem_count
        self.rows_read = rows_read
        #: With ``id_field="auto"``, which field the ids were taken from, or why none was (None: no row has one).
        self.id_note = id_note

    @property
    def id_field(self) -> str | None:
        """The field the prompt ids come from (None: derived from each row), as chosen or found."""
        return self.settings["id_field"]  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self._order)

    @property
    def ids(self) -> list[str]:
        """The prompt ids, in run order."""
        return [pid for _, pid in self._order]

    def __iter__(self) -> Iterator[Prompt]:
        return self.prompts()

    def prompts(self, *, skip: Container[str] = ()) -> Iterator[Prompt]:
        """The prompts in run order, read lazily, leaving out the ids in ``skip``."""
        wanted = [(index, pid) for index, pid in self._order if pid not in skip]
        rows = self._reader.fetch([index for index, _ in wanted])
        for _, pid in wanted:
            try:
                where, row = next(rows)
            except OSError as e:  # the file was removed or made unreadable since it was checked
                raise InputError(f"cannot read {e.filename or self.source}: {e.strerror or e}") from e
            checked = _check_row(row, where, self.settings["prompt_field"], self.settings["id_field"], self.format)
            if isinstance(checked, RowProblem) or checked.id != pid:
                raise InputError(f"{where}: the row changed since the input was checked; start the run again")
            yield checked.prompt

    def describe(self) -> dict[str, Any]:
        """What was read and how, for the run's fingerprint: the source, the options and a hash of the rows."""
        return {
            "source": self.source,
            "format": self.format,
            **self.settings,
            "prompts": len(self),
            "rows_sha256": self.rows_sha256,
        }


def read_prompts(
    source: Source,
    *,
    prompt_field: str = "prompt",
    id_field: str | None = AUTO,
    split: str | None = None,
    input_format: InputFormat | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    skip_invalid: bool = False,
) -> PromptDataset:
    """Read and check every row of ``source``, then select the prompts to run.

    ``source`` is a path (JSONL, JSON list, CSV/TSV, Parquet, a folder written by
    ``datasets.save_to_disk`` or a folder of data files ``datasets.load_dataset`` reads),
    the name of a dataset on the Hugging Face Hub (needs a connection), or an iterable of
    row mappings. ``prompt_field`` holds text or an OpenAI-style list of messages.
    ``id_field`` names the field holding each prompt's id. ``"auto"`` (the default) takes
    the one of ``AUTO_ID_FIELDS`` (``id``, ``question_id``, ``uid``) that every valid row has,
    when every row has exactly that one, and says which in ``id_note``; otherwise, and with
    ``id_field=None``, the id is the first 16 hex digits of the SHA-256 of the row's
    canonical JSON, so identical rows are reported as duplicates. ``id_field`` on the
    returned dataset is the field used.

    Every row is checked before anything is returned. With ``skip_invalid=False`` any
    invalid row raises ``InputError`` listing the first problems with their file and line;
    with ``skip_invalid=True`` invalid rows (and later rows repeating an id) are left out
    and listed in ``problems``. Problems that make the whole input unreadable (not JSON,
    not Parquet, no rows at all) raise in both modes. Then, with ``shuffle``, the valid
    rows are shuffled by ``random.Random(seed)``, and the first ``limit`` are kept.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, not {limit!r}")
    if input_format is not None and input_format not in FORMATS:
        raise ConfigError(f"input format must be one of {', '.join(FORMATS)}, not {input_format!r}")
    if not prompt_field:
        raise ConfigError("the prompt field name is empty")
    if id_field is not None and (not isinstance(id_field, str) or not id_field):
        raise ConfigError(f"the id field must be a field name, {AUTO!r} or None, not {id_field!r}")
    if not isinstance(source, (str, os.PathLike)) and (split is not None or input_format is not None):
        raise ConfigError("split and input_format apply to a path or a dataset name, not to rows given directly")
    name = described = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<rows>"
    try:
        if isinstance(source, (str, os.PathLike)):
            path = Path(name)
            described = str(path.resolve()) if path.exists() else name
            reader: _Reader = _open(name, name, input_format, split)
        else:
            reader = _ListReader("rows", [(f"row {i + 1}", _as_row(r, f"row {i + 1}")) for i, r in enumerate(source)])
        scan = _scan(reader, prompt_field, id_field)
    except _FileProblem as e:
        raise InputError(str(e)) from None
    except OSError as e:  # unreadable, or a folder on the way that cannot be entered
        raise InputError(f"cannot read {e.filename or name}: {e.strerror or e}") from e
    valid, rows_read, count, problems = scan.valid, scan.rows, scan.problems.count, scan.problems.listed
    if rows_read == 0:
        raise InputError(f"{name}: the input has no rows")
    if count and not skip_invalid:
        raise InputError(_problems_message(name, problems, count, rows_read))
    if not valid:
        raise InputError(f"{name}: none of the {rows_read} rows is valid\n{_listing(problems, count)}")
    if shuffle:
        random.Random(seed).shuffle(valid)  # noqa: S311 - a reproducible order, not a secret
    if limit is not None:
        valid = valid[:limit]
    digest = hashlib.sha256()
    for _, _, row_digest in valid:
        digest.update(row_digest)
    settings = {
        "prompt_field": prompt_field,
        "id_field": scan.id_field,
        "split": split,
        "limit": limit,
        "shuffle": shuffle,
        "shuffle_seed": seed if shuffle else None,
    }
    return PromptDataset(
        reader=reader,
        source=described,
        order=[(index, pid) for index, pid, _ in valid],
        rows_sha256=digest.hexdigest(),
        settings=settings,
        problems=problems,
        problem_count=count,
        rows_read=rows_read,
        id_note=scan.id_note,
    )


def _as_row(value: Any, where: str) -> Mapping[str, Any] | RowProblem:
    if isinstance(value, Mapping):
        return value
    return RowProblem(where, f"expected a mapping of field names to values, got {type(value).__name__}")


class _Problems:
    """Invalid rows: how many, and the first ``MAX_LISTED_PROBLEMS`` of them in input order."""

    def __init__(self) -> None:
        self.count = 0
        self._listed: list[tuple[int, str, str]] = []  # (position in the input, where, message)

    def add(self, position: int, problem: RowProblem) -> None:
        # Problems are found in two passes (rows, then ids): keep the first ones by position, not by arrival.
        self.count += 1
        bisect.insort(self._listed, (position, problem.where, problem.message))
        del self._listed[MAX_LISTED_PROBLEMS:]

    @property
    def listed(self) -> list[RowProblem]:
        return [RowProblem(where, message) for _, where, message in self._listed]


@dataclass(frozen=True, slots=True)
class _Kept:
    """A row that passed the checks of its own, before ids are compared."""

    position: int
    index: int
    where: str
    id: str
    digest: bytes
    #: With ``id_field="auto"``: which of ``AUTO_ID_FIELDS`` the row has, and the first one's value.
    id_fields: tuple[str, ...] = ()
    id_value: Any = None


@dataclass(frozen=True, slots=True)
class _Scan:
    valid: list[tuple[int, str, bytes]]
    problems: _Problems
    rows: int
    id_field: str | None
    id_note: str | None


def _scan(reader: _Reader, prompt_field: str, id_field: str | None) -> _Scan:
    auto = id_field == AUTO
    kept: list[_Kept] = []
    problems = _Problems()
    rows = 0
    for position, (index, where, row) in enumerate(reader.scan()):
        rows += 1
        if isinstance(row, RowProblem):
            problems.add(position, row)
            continue
        checked = _check_row(row, where, prompt_field, None if auto else id_field, reader.format)
        if isinstance(checked, RowProblem):
            problems.add(position, checked)
            continue
        if auto:
            names = tuple(name for name in AUTO_ID_FIELDS if name in row and name != prompt_field)
            value = _jsonable(row[names[0]], names[0]) if names else None  # _check_row made sure it converts
            kept.append(_Kept(position, index, where, checked.id, checked.digest, names, value))
        else:
            kept.append(_Kept(position, index, where, checked.id, checked.digest))
    note = None
    if auto:
        id_field, note = _choose_id_field(kept)
    hint = ""
    if auto:
        hint = f" (ids from the field {id_field!r}, found in every row; --id-field none derives ids from the rows)"
    valid: list[tuple[int, str, bytes]] = []
    first_seen: dict[str, str] = {}
    for k in kept:
        prompt_id = k.id
        if auto and id_field is not None:
            found = _id_value(k.id_value)
            if found is None:
                problems.add(k.position, RowProblem(k.where, _bad_id(k.id_value, id_field) + hint))
                continue
            prompt_id = found
        earlier = first_seen.get(prompt_id)
        if earlier is not None:
            if id_field is None:
                what, why = "is identical to", " (give each row a distinct --id-field, or remove the copy)"
            else:
                what, why = f"repeats the id {prompt_id!r} of", hint
            problems.add(k.position, RowProblem(k.where, f"{what} {_relative(earlier, k.where)}{why}"))
            continue
        first_seen[prompt_id] = k.where
        valid.append((k.index, prompt_id, k.digest))
    return _Scan(valid, problems, rows, id_field, note)


def _choose_id_field(kept: Sequence[_Kept]) -> tuple[str | None, str | None]:
    """The field ``id_field="auto"`` takes (when every row has the same one of ``AUTO_ID_FIELDS``), and a note on it."""
    found = sorted({name for k in kept for name in k.id_fields}, key=AUTO_ID_FIELDS.index)
    if not found:
        return None, None
    listed = " or ".join(repr(name) for name in found)
    several = sum(len(k.id_fields) > 1 for k in kept)
    without = sum(not k.id_fields for k in kept)
    if several:
        why = f"{several} of {len(kept)} rows have more than one of the fields {listed}"
    elif len(found) > 1:
        why = f"the rows differ in which of the fields {listed} they have"
    elif without:
        why = f"{without} of {len(kept)} rows have no field {found[0]!r}"
    else:
        return found[0], (
            f"prompt ids are the field {found[0]!r}, which every row has "
            "(--id-field FIELD takes another field; --id-field none derives ids from the rows)"
        )
    return None, f"prompt ids are derived from each row, because {why}; name the id field with --id-field"


def _relative(earlier: str, where: str) -> str:
    """``earlier`` without the file name it shares with ``where``: "line 3", not "data.jsonl line 3"."""
    a, b = earlier.split(" "), where.split(" ")
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    return " ".join(a[max(0, same - 1) :])


def _listing(problems: Sequence[RowProblem], count: int) -> str:
    lines = [f"  {p}" for p in problems]
    if count > len(problems):
        lines.append(f"  … and {count - len(problems)} more")
    return "\n".join(lines)


def _problems_message(name: str, problems: Sequence[RowProblem], count: int, rows: int) -> str:
    noun = "row is" if count == 1 else "rows are"
    return (
        f"{name}: {count} of {rows} {noun} invalid; nothing was run.\n{_listing(problems, count)}\n"
        "Fix the input, or skip invalid rows with --skip-invalid."
    )
