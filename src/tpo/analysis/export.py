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
* **Arena-Hard-Auto** (``data/arena-hard-v2.0/model_answer/MODEL.jsonl``, likewise for
  ``arena-hard-v0.1``): arena-hard-auto has read every benchmark version in one answer schema
  since April 2025, the ``current`` one: a line per question with ``uid``, ``ans_id``,
  ``model``, ``messages`` (the last one the assistant's, its ``content`` an object
  ``{"answer": TEXT}``), ``tstamp`` and ``metadata`` (``token_len`` first, then header, list
  and bold counts, the order its style control reads them in). The ``legacy`` schema is the
  v0.1 layout of older checkouts: ``question_id``, ``answer_id``, ``model_id``, ``choices``
  (``index`` and ``turns`` of ``content`` and ``token_len``), ``tstamp`` and ``conv_metadata``.
  The benchmark version (``v0.1``, ``v2.0``) does not change the file; it is checked against
  the folder written to, and the legacy schema exists for v0.1 only.

Arena-Hard-Auto names a model after its answer file, so the file is ``MODEL.jsonl`` and the
records carry the same name. ``token_len`` is counted with tiktoken in the encoding
Arena-Hard-Auto uses when tiktoken is installed (the ``arena`` extra) and its encoding file can
be loaded; otherwise it is an estimate (about four characters a token), and the export says so.
Only Arena-Hard's length control reads it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..engine.store import answer_id
from ..errors import ConfigError, InputError
from ..result import TPOResult, dumps_json

__all__ = [
    "ARENA_HARD_BENCHMARKS",
    "ARENA_HARD_SCHEMAS",
    "FORMATS",
    "ExportResult",
    "TokenCounter",
    "alpaca_eval_records",
    "arena_hard_records",
    "arena_hard_token_counter",
    "default_model_name",
    "estimate_token_len",
    "export_results",
    "jsonl_records",
    "markdown_counts",
    "resolve_arena_hard_benchmark",
]

Format = Literal["alpaca-eval", "arena-hard", "jsonl"]
FORMATS: tuple[Format, ...] = ("alpaca-eval", "arena-hard", "jsonl")
#: Answer-file schemas: ``current`` (what arena-hard-auto reads for every benchmark since April 2025)
#: and ``legacy`` (the v0.1 layout of the checkouts before it).
ARENA_HARD_SCHEMAS = ("current", "legacy")
#: Benchmark versions, as arena-hard-auto names its data folders (``data/arena-hard-v0.1``); ``auto``
#: takes the version from the folder written to, if it names one.
ARENA_HARD_BENCHMARKS = ("auto", "v0.1", "v2.0")

#: Metadata keys that hold a benchmark's own question id, in the order they are tried.
_ID_KEYS = {"current": ("uid", "question_id"), "legacy": ("question_id", "uid")}
#: The model whose tiktoken encoding arena-hard-auto counts ``token_len`` with: ``gen_answer.py``
#: and ``utils/add_markdown_info.py`` use gpt-4o (o200k_base) now, gpt-3.5-turbo (cl100k_base) before.
_TIKTOKEN_MODEL = {"current": "gpt-4o", "legacy": "gpt-3.5-turbo"}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what it left out."""

    format: str
    path: Path
    exported: int
    #: ``(prompt id, why)`` for every prompt left out.
    skipped: tuple[tuple[str, str], ...] = ()
    model_name: str | None = None
    #: Arena-Hard only: the answer schema written, ``current`` or ``legacy``.
    arena_hard_schema: str | None = None
    #: Arena-Hard only: ``v0.1`` or ``v2.0`` when given or named by the folder, else None.
    arena_hard_benchmark: str | None = None
    #: Arena-Hard only: how ``token_len`` was counted (``TokenCounter.method``).
    token_len: str | None = None
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


_BENCHMARK_FOLDER = re.compile(r"arena-hard-(v\d+(?:\.\d+)*)")


def resolve_arena_hard_benchmark(out: str | Path, benchmark: str = "auto", *, schema: str = "current") -> str | None:
    """The benchmark version (``v0.1``, ``v2.0``) an answer file written to ``out`` is for, or None if unknown.

    ``auto`` takes it from a folder in ``out`` named as arena-hard-auto names its data folders
    (``data/arena-hard-v2.0/model_answer``). A version that the folder contradicts would have its
    answers judged against another benchmark's questions, and the legacy schema exists for v0.1
    only: both are a ``ConfigError``.
    """
    if benchmark not in ARENA_HARD_BENCHMARKS:
        raise ConfigError(f"Arena-Hard benchmark must be one of {', '.join(ARENA_HARD_BENCHMARKS)}, not {benchmark!r}")
    _check_schema(schema)
    folders = [m.group(1) for part in Path(out).parts if (m := _BENCHMARK_FOLDER.fullmatch(part))]
    folder = folders[-1] if folders else None
    if benchmark != "auto" and folder is not None and folder != benchmark:
        raise ConfigError(
            f"the benchmark {benchmark} (--arena-hard-benchmark) does not match the folder arena-hard-{folder} in {out}: "
            f"arena-hard-auto would judge these answers against {folder}'s questions"
        )
    resolved = folder if benchmark == "auto" else benchmark
    if schema == "legacy" and resolved not in (None, "v0.1"):
        raise ConfigError(
            f"the legacy answer schema exists for arena-hard-v0.1 only (arena-hard-auto's layout before {resolved}); "
            f"write {resolved} answers in the current schema (the default)"
        )
    return resolved


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


@dataclass(frozen=True)
class TokenCounter:
    """How ``token_len`` is counted: tiktoken, as arena-hard-auto counts it, or an estimate."""

    #: ``"tiktoken o200k_base"`` (the encoding's name) or ``"estimate"``.
    method: str
    count: Callable[[str], int]
    #: Why the count is an estimate; None when it is tiktoken's.
    why_estimate: str | None = None


def _check_schema(schema: str) -> None:
    if schema not in ARENA_HARD_SCHEMAS:
        raise ConfigError(f"Arena-Hard answer schema must be one of {', '.join(ARENA_HARD_SCHEMAS)}, not {schema!r}")


def arena_hard_token_counter(schema: str = "current") -> TokenCounter:
    """tiktoken in the encoding arena-hard-auto uses for ``schema``, or the estimate where that cannot load.

    tiktoken downloads its encoding file on first use and caches it (in ``TIKTOKEN_CACHE_DIR``
    when that is set); on a machine with neither the network nor a cached file, or without
    tiktoken (the ``arena`` extra), the count is :func:`estimate_token_len` and
    ``why_estimate`` says why.
    """
    _check_schema(schema)
    model = _TIKTOKEN_MODEL[schema]
    try:
        import tiktoken
    except ImportError:
        return TokenCounter("estimate", estimate_token_len, "tiktoken is not installed (pip install 'tpo[arena]')")
    try:
        encoding = tiktoken.encoding_for_model(model)
    except Exception as e:  # tiktoken fetches the file over HTTP: any failure there only means no exact count
        reason = (str(e).splitlines() or [""])[0][:160]
        return TokenCounter(
            "estimate",
            estimate_token_len,
            f"tiktoken could not load the {model} encoding ({type(e).__name__}: {reason}); "
            "its file is downloaded on first use, or read from TIKTOKEN_CACHE_DIR",
        )

    def count(text: str) -> int:
        # As arena-hard-auto counts: text such as "<|endoftext|>" is ordinary text, not an error.
        return len(encoding.encode(text, disallowed_special=()))

    return TokenCounter(f"tiktoken {encoding.name}", count)


#: arena-hard-auto's code-block pattern: a fence, text without a backtick, a fence. Only the text
#: between the fences is captured, so the fences themselves stay in the answer.
_CODE_BLOCK = re.compile("```([^`]*)```")


def _without_code(text: str) -> str:
    """``text`` less its code blocks' contents, as arena-hard-auto's ``remove_pattern`` leaves it.

    Its quirks are kept, since the counts are compared with those it computed for the baseline's
    answers: a block whose code holds a backtick is not matched, so the pattern pairs that
    block's closing fence with the next opening one and removes the prose between them instead;
    and each matched text is removed wherever else it occurs in the answer too.
    """
    for block in _CODE_BLOCK.findall(text):
        text = text.replace(block, "")
    return text


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Headers, list items and bold spans outside code blocks, counted as Arena-Hard's style control counts them."""
    prose = _without_code(text)
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
    results: Sequence[TPOResult],
    *,
    model_name: str,
    schema: str = "current",
    timestamp: float | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """Arena-Hard-Auto answer records in ``schema`` (``current`` or ``legacy``), sorted by question id as its tools leave them.

    ``count_tokens`` counts ``token_len`` (default: :func:`arena_hard_token_counter`'s). Two
    prompts with the same question id are an ``InputError``: Arena-Hard keeps one answer per
    question, so one of them would silently not be judged.
    """
    _check_schema(schema)
    count = count_tokens or arena_hard_token_counter(schema).count
    tstamp = time.time() if timestamp is None else timestamp
    key = "uid" if schema == "current" else "question_id"
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for r in results:
        qid = _question_id(r, _ID_KEYS[schema])
        if str(qid) in seen:
            raise InputError(
                f"prompts {seen[str(qid)]!r} and {r.prompt_id!r} have the same question id {qid!r}: "
                "Arena-Hard keeps one answer per question; export them separately"
            )
        seen[str(qid)] = r.prompt_id
        text = r.answer or ""
        token_len = count(text)
        # The final candidate's id is a content hash: stable across exports of the same run.
        ans_id = r.best_id or answer_id(text)
        stats = {"token_len": token_len, **markdown_counts(text)}
        if schema == "legacy":
            out.append(
                {
                    key: qid,
                    "answer_id": ans_id,
                    "model_id": model_name,
                    "choices": [{"index": 0, "turns": [{"content": text, "token_len": token_len}]}],
                    "tstamp": tstamp,
                    "conv_metadata": stats,
                }
            )
        else:
            messages: list[dict[str, Any]] = [dict(m) for m in r.messages]
            messages.append({"role": "assistant", "content": {"answer": text}})
            out.append(
                {
                    key: qid,
                    "ans_id": ans_id,
                    "model": model_name,
                    "messages": messages,
                    "tstamp": tstamp,
                    "metadata": stats,
                }
            )
    out.sort(key=lambda rec: str(rec[key]))
    return out


def export_results(
    results: Sequence[TPOResult],
    fmt: str,
    out: str | Path,
    *,
    model_name: str | None = None,
    strict: bool = False,
    arena_hard_schema: str = "current",
    arena_hard_benchmark: str = "auto",
    count_tokens: TokenCounter | None = None,
) -> ExportResult:
    """Write ``results`` as ``fmt`` (``alpaca-eval``, ``arena-hard`` or ``jsonl``) to ``out``.

    For ``arena-hard``, ``out`` is either the answer file (``.../model_answer/NAME.jsonl``,
    which then also names the model) or a directory to write ``MODEL.jsonl`` into;
    ``arena_hard_schema`` is the file's schema (``current`` for every benchmark version, or
    ``legacy``), ``arena_hard_benchmark`` the benchmark version (see
    :func:`resolve_arena_hard_benchmark`) and ``count_tokens`` counts ``token_len`` (default:
    :func:`arena_hard_token_counter`). With ``strict`` a prompt that did not finish raises
    ``InputError`` before anything is written.
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
    benchmark = resolve_arena_hard_benchmark(file_path, arena_hard_benchmark, schema=arena_hard_schema)
    counter = count_tokens or arena_hard_token_counter(arena_hard_schema)
    records = arena_hard_records(keep, model_name=name, schema=arena_hard_schema, count_tokens=counter.count)
    if not any(key in r.metadata for r in keep or results for key in _ID_KEYS[arena_hard_schema]):
        warnings.append(
            "no prompt has a 'uid' or 'question_id' in its metadata: the answers are keyed by tpo's prompt ids, "
            "which must be the uids of the benchmark's question file (they are when the batch ran with --id-field uid)"
        )
    if counter.why_estimate is not None:
        warnings.append(
            f"token_len is an estimate (about four characters a token), not arena-hard-auto's tiktoken count: "
            f"{counter.why_estimate}; only Arena-Hard's length control reads it"
        )
    _write_lines(file_path, records)
    return ExportResult(
        fmt, file_path, len(keep), tuple(skipped), name, arena_hard_schema, benchmark, counter.method, tuple(warnings)
    )


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
