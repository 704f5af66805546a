"""Writes batch outputs in the formats other evaluators read: AlpacaEval, Arena-Hard-Auto, plain JSONL.

Only finished prompts are exported: a prompt whose result is ``failed`` (or a ``partial``
checkpoint) is skipped and reported, or, with ``strict=True``, stops the export before
anything is written. Evaluators compare answer sets prompt by prompt, so a silently missing
answer would skew them; a skipped one is at least named.

Layouts followed (checked against the evaluators' own loaders):

* **AlpacaEval** (``alpaca_eval --model_outputs FILE.json``): a JSON list of records with
  ``instruction``, ``output`` and ``generator`` (one value for the whole file: AlpacaEval
  names the model after it), plus ``dataset`` when the prompt's metadata has one.
  AlpacaEval reads a ``.json`` path with ``pandas.read_json`` and pairs the answers with its
  reference outputs by ``instruction`` text, so the original instruction is used when the
  metadata carries it.
* **Arena-Hard-Auto v0.1** (``data/arena-hard-v0.1/model_answer/MODEL.jsonl``): one line per
  question with ``question_id``, ``answer_id``, ``model_id``, ``choices`` (``index`` and
  ``turns`` of ``content`` and ``token_len``), ``tstamp`` and ``conv_metadata`` (token and
  markdown counts, read by its style control).
* **Arena-Hard-Auto v2** (``data/arena-hard-v2.0/model_answer/MODEL.jsonl``): one line per
  question with ``uid``, ``ans_id``, ``model``, ``messages`` (the last one the assistant's,
  its ``content`` an object ``{"answer": TEXT}``), ``tstamp`` and ``metadata``
  (``token_len`` first, then header, list and bold counts, the order its style control
  reads them in).

Arena-Hard-Auto names a model after its answer file, so the file is ``MODEL.jsonl`` and the
records carry the same name. ``token_len`` is estimated (about four characters a token);
Arena-Hard's own tiktoken count only matters for its length-controlled scores.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, InputError
from .result import TPOResult, dumps_json
from .store import answer_id

__all__ = [
    "ARENA_HARD_VERSIONS",
    "FORMATS",
    "ExportResult",
    "alpaca_eval_records",
    "arena_hard_records",
    "default_model_name",
    "estimate_token_len",
    "export_results",
    "jsonl_records",
    "markdown_counts",
    "resolve_arena_hard_version",
]

Format = Literal["alpaca-eval", "arena-hard", "jsonl"]
FORMATS: tuple[Format, ...] = ("alpaca-eval", "arena-hard", "jsonl")
ARENA_HARD_VERSIONS = ("auto", "v0.1", "v2")

#: Metadata keys that hold a benchmark's own question id, in the order they are tried.
_V2_ID_KEYS = ("uid", "question_id")
_V01_ID_KEYS = ("question_id", "uid")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it left out."""

    format: str
    path: Path
    exported: int
    #: ``(prompt id, why)`` for every prompt left out.
    skipped: tuple[tuple[str, str], ...] = ()
    model_name: str | None = None
    arena_hard_version: str | None = None
    warnings: tuple[str, ...] = ()


def default_model_name(results: Sequence[TPOResult]) -> str:
    """A file-safe name from the policy and the method, e.g. ``Llama-3.1-8B-Instruct-tpo-d2-n5``."""
    first = results[0] if results else None
    config: Mapping[str, Any] = first.config if first else {}
    mode, width, depth = config.get("mode", "tpo"), config.get("width"), config.get("depth")
    method = f"bon-{width}" if mode == "bon" else f"{mode}-d{depth}-n{width}"
    policy = (first.policy or "") if first else ""
    # "openai:meta-llama/Llama-3.1-8B-Instruct" -> "Llama-3.1-8B-Instruct"
    short = re.split(r"[:/\\]", policy)[-1] if policy else ""
    name = f"{short}-{method}" if short else f"tpo-{method}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "tpo"


def _exportable(results: Sequence[TPOResult]) -> tuple[list[TPOResult], list[tuple[str, str]]]:
    keep, skipped = [], []
    for r in results:
        if r.status != "complete":
            skipped.append((r.prompt_id, f"{r.status}: {r.error}" if r.error else r.status))
        elif r.answer is None:
            skipped.append((r.prompt_id, "no answer"))
        else:
            keep.append(r)
    return keep, skipped


def _last_user(result: TPOResult) -> str:
    for m in reversed(result.messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _instruction(result: TPOResult) -> str:
    original = result.metadata.get("instruction")
    return original if isinstance(original, str) and original.strip() else _last_user(result)


def alpaca_eval_records(results: Sequence[TPOResult], *, model_name: str) -> list[dict[str, Any]]:
    """AlpacaEval model outputs (``instruction``, ``output``, ``generator``, and ``dataset`` when known).

    ``results`` should all be complete; their final answers are exported.
    """
    out = []
    for r in results:
        record: dict[str, Any] = {"instruction": _instruction(r), "output": r.answer or "", "generator": model_name}
        dataset = r.metadata.get("dataset")
        if isinstance(dataset, str):
            record["dataset"] = dataset
        out.append(record)
    return out


def jsonl_records(results: Sequence[TPOResult]) -> list[dict[str, Any]]:
    """``id``, ``prompt`` and ``answer`` per prompt.

    ``prompt`` is the user's text when the conversation is a single user message, else the
    list of messages.
    """
    out = []
    for r in results:
        msgs = [dict(m) for m in r.messages]
        prompt: Any = msgs[0]["content"] if len(msgs) == 1 and msgs[0].get("role") == "user" else msgs
        out.append({"id": r.prompt_id, "prompt": prompt, "answer": r.answer})
    return out


def resolve_arena_hard_version(results: Sequence[TPOResult], version: str = "auto") -> tuple[str, list[str]]:
    """``v0.1`` or ``v2``: as given, or guessed from the metadata (v2 questions have ``uid``, v0.1 ``question_id``)."""
    if version not in ARENA_HARD_VERSIONS:
        raise ConfigError(f"Arena-Hard version must be one of {', '.join(ARENA_HARD_VERSIONS)}, not {version!r}")
    if version != "auto":
        return version, []
    if any("uid" in r.metadata for r in results):
        return "v2", []
    if any("question_id" in r.metadata for r in results):
        return "v0.1", []
    return "v2", [
        "no prompt has a 'uid' or 'question_id' in its metadata: wrote Arena-Hard v2 answers keyed by tpo's prompt ids; "
        "they must match the uids in the question file (use --arena-hard-version v0.1 for the older layout)"
    ]


def _question_id(result: TPOResult, keys: Sequence[str]) -> Any:
    for key in keys:
        value = result.metadata.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return value
    return result.prompt_id


def estimate_token_len(text: str) -> int:
    """About four characters a token for ASCII text, one a character otherwise."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


_FENCED = re.compile(r"```.*?```", re.DOTALL)


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Headers, list items and bold spans outside fenced code, in the shape Arena-Hard's style control reads."""
    prose = _FENCED.sub("", text)
    headers = {f"h{level}": len(re.findall(rf"^#{{{level}}}\s", prose, re.MULTILINE)) for level in range(1, 7)}
    return {
        "header_count": headers,
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", prose, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", prose, re.MULTILINE)),
        },
        "bold_count": {
            "**": len(re.findall(r"\*\*[^*\n]+\*\*", prose)),
            "__": len(re.findall(r"__[^_\n]+__", prose)),
        },
    }


def arena_hard_records(
    results: Sequence[TPOResult], *, model_name: str, version: str, timestamp: float | None = None
) -> list[dict[str, Any]]:
    """Arena-Hard-Auto answer records (``version`` ``"v0.1"`` or ``"v2"``), sorted by question id as its tools write them."""
    if version not in ("v0.1", "v2"):
        raise ConfigError(f"Arena-Hard version must be 'v0.1' or 'v2' here, not {version!r}")
    tstamp = time.time() if timestamp is None else timestamp
    out = []
    for r in results:
        text = r.answer or ""
        token_len = estimate_token_len(text)
        # The final candidate's id is a content hash: stable across exports of the same run.
        ans_id = r.best_id or answer_id(text)
        stats = {"token_len": token_len, **markdown_counts(text)}
        if version == "v0.1":
            out.append({
                "question_id": _question_id(r, _V01_ID_KEYS),
                "answer_id": ans_id,
                "model_id": model_name,
                "choices": [{"index": 0, "turns": [{"content": text, "token_len": token_len}]}],
                "tstamp": tstamp,
                "conv_metadata": stats,
            })
        else:
            messages: list[dict[str, Any]] = [dict(m) for m in r.messages]
            messages.append({"role": "assistant", "content": {"answer": text}})
            out.append({
                "uid": _question_id(r, _V2_ID_KEYS),
                "ans_id": ans_id,
                "model": model_name,
                "messages": messages,
                "tstamp": tstamp,
                "metadata": stats,
            })
    key = "question_id" if version == "v0.1" else "uid"
    out.sort(key=lambda rec: str(rec[key]))
    return out


def export_results(
    results: Sequence[TPOResult],
    fmt: str,
    out: str | Path,
    *,
    model_name: str | None = None,
    strict: bool = False,
    arena_hard_version: str = "auto",
) -> ExportResult:
    """Write ``results`` as ``fmt`` (``alpaca-eval``, ``arena-hard`` or ``jsonl``) to ``out``.

    For ``arena-hard``, ``out`` is either the answer file (``.../model_answer/NAME.jsonl``,
    which then also names the model) or a directory to write ``MODEL.jsonl`` into. With
    ``strict`` a prompt that did not finish raises ``InputError`` before anything is written.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out_path = Path(out)
    keep, skipped = _exportable(results)
    if strict and skipped:
        listed = ", ".join(f"{pid!r} ({why})" for pid, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise InputError(
            f"{len(skipped)} of {len(results)} prompts did not finish: {listed}{more}; "
            "resume or rerun them, or export without --strict to skip them"
        )
    if fmt == "jsonl":
        _write_lines(out_path, jsonl_records(keep))
        return ExportResult(fmt, out_path, len(keep), tuple(skipped))
    warnings: list[str] = []
    if fmt == "alpaca-eval":
        name = model_name or default_model_name(results)
        if out_path.suffix != ".json":
            warnings.append(f"alpaca_eval reads model outputs by file suffix and expects .json, not {out_path.name!r}")
        multi_turn = sum(1 for r in keep if sum(1 for m in r.messages if m.get("role") == "user") > 1)
        if multi_turn:
            warnings.append(
                f"{multi_turn} prompt(s) have earlier turns; AlpacaEval judges single instructions, so only the last is exported"
            )
        _write_text(out_path, dumps_json(alpaca_eval_records(keep, model_name=name), indent=2) + "\n")
        return ExportResult(fmt, out_path, len(keep), tuple(skipped), name, warnings=tuple(warnings))
    version, notes = resolve_arena_hard_version(keep or results, arena_hard_version)
    warnings.extend(notes)
    if out_path.suffix == ".jsonl":
        if model_name is not None and model_name != out_path.stem:
            raise ConfigError(
                f"Arena-Hard-Auto names a model after its answer file: --model-name {model_name!r} "
                f"does not match {out_path.name!r}; give a directory, or a file named {model_name}.jsonl"
            )
        name = out_path.stem
        file_path = out_path
    else:
        name = model_name or default_model_name(results)
        file_path = out_path / f"{name}.jsonl"
    if not name or re.search(r"[/\\]", name) or name in (".", ".."):
        raise ConfigError(f"the model name {name!r} cannot be a file name; choose one without slashes")
    _write_lines(file_path, arena_hard_records(keep, model_name=name, version=version))
    return ExportResult(fmt, file_path, len(keep), tuple(skipped), name, version, tuple(warnings))


def _write_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    _write_text(path, "".join(dumps_json(rec) + "\n" for rec in records))


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so an interrupted export never leaves half a file behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from e
