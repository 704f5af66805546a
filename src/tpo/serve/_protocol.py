"""The OpenAI chat-completions protocol: a request body checked into a prompt and a method; results into replies."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import MODES, TPOConfig
from ..engine.store import Candidate
from ..errors import ConfigError, InputError
from ..result import TPOResult
from ..types import Message, Prompt, to_messages
from ._errors import bad_request, model_not_found
from ._limits import ServeLimits
from ._rubrics import RUBRIC_KEY

#: The keys of the ``tpo`` extension object.
TPO_KEYS = ("mode", "width", "depth", "seed", "prefer", "metadata")

#: OpenAI parameters tpo cannot honour: a request that sets one to anything but its neutral value gets 400.
_UNSUPPORTED = {
    "tools": "tool calls",
    "functions": "function calls",
    "function_call": "function calls",
    "tool_choice": "tool calls",
    "response_format": "structured output (response_format)",
    "logprobs": "log-probabilities",
    "top_logprobs": "log-probabilities",
    "logit_bias": "logit_bias",
    "stop": "stop sequences",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "modalities": "output modalities other than text",
    "reasoning_effort": "reasoning_effort",
    "web_search_options": "web search",
}
#: OpenAI parameters that change nothing here and are accepted as they are.
_IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key")
_KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "tpo",
    *_IGNORED,
    *_UNSUPPORTED,
}


@dataclass(frozen=True)
class ChatRequest:
    """One checked chat-completions request: what to optimise, how, and how to answer."""

    model: str
    prompt: Prompt
    config: TPOConfig
    n: int
    stream: bool
    include_usage: bool


def parse_chat_request(
    body: Any, presets: Mapping[str, TPOConfig], limits: ServeLimits, *, rubrics: str | None
) -> ChatRequest:
    """Check a request body; raise ``APIError`` (400, or 404 for an unknown model) saying what is wrong and where.

    ``rubrics``: None when per-request ``tpo.prefer`` is possible, else why it is not.
    """
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(body)}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise bad_request(f"unrecognized request argument: {unknown[0]}", unknown[0], "unknown_parameter")
    for key, what in _UNSUPPORTED.items():
        if key in body and not _neutral(key, body[key]):
            raise bad_request(f"{key}: tpo serve does not support {what}", key, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: the name of one of the served presets (GET /v1/models)", "model")
    if model not in presets:
        raise model_not_found(model, presets)
    base = presets[model]
    ext = body.get("tpo")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict):
        raise bad_request(f"tpo must be an object of method parameters, not {_kind(ext)}", "tpo")
    for key in ext:
        if key not in TPO_KEYS:
            raise bad_request(
                f"tpo.{key} is not a method parameter; known: {', '.join(TPO_KEYS)}", f"tpo.{key}", "unknown_parameter"
            )

    options: dict[str, Any] = {}
    if ext.get("mode") is not None:
        if ext["mode"] not in MODES:
            raise bad_request(f"tpo.mode must be one of {', '.join(MODES)}, not {ext['mode']!r}", "tpo.mode")
        options["mode"] = ext["mode"]
    for key, limit, low in (("width", limits.max_width, 1), ("depth", limits.max_depth, 0)):
        if ext.get(key) is not None:
            options[key] = _int_in(ext[key], f"tpo.{key}", low, limit, f"--max-{key}")
    seed = _seed(body, ext)
    if seed is not None:
        options["seed"] = seed
    if body.get("temperature") is not None:
        options["temperature"] = _number_in(body["temperature"], "temperature", 0.0, 2.0)
    if body.get("top_p") is not None:
        top_p = _number_in(body["top_p"], "top_p", 0.0, 1.0)
        if top_p == 0:
            raise bad_request("top_p must be greater than 0", "top_p")
        options["top_p"] = top_p
    max_tokens = _max_tokens(body, limits.request_tokens(base))
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    try:
        config = base.with_options(**options) if options else base
    except ConfigError as e:
        raise bad_request(str(e), "tpo") from e

    n = 1 if body.get("n") is None else _int_in(body["n"], "n", 1, limits.max_n, "--max-n")
    most = config.width * (config.depth + 1)
    if n > most:
        raise bad_request(
            f"n is {n}, but width {config.width} and depth {config.depth} find at most {most} answers", "n"
        )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, not {stream!r}", "stream")
    include_usage = _include_usage(body.get("stream_options"), stream)

    metadata = _metadata(ext)
    if ext.get("prefer") is not None:
        prefer = ext["prefer"]
        if not isinstance(prefer, str) or not prefer.strip():
            raise bad_request("tpo.prefer must be the judge's rubric as non-empty text", "tpo.prefer")
        if rubrics is not None:
            raise bad_request(f"tpo.prefer cannot be used here: {rubrics}", "tpo.prefer")
        metadata[RUBRIC_KEY] = prefer.strip()
    messages = _messages(body.get("messages"))
    prompt = Prompt(prompt_id(messages, metadata), messages, metadata)
    return ChatRequest(model, prompt, config, n, stream, include_usage)


def prompt_id(messages: Sequence[Message], metadata: Mapping[str, Any]) -> str:
    """A content id for a prompt: the same conversation and metadata always get the same id.

    Seeds derive from the prompt id, so the same request with the same seed gets the same
    answer, streamed or not, on any server with the same models.
    """
    data = json.dumps(
        {"messages": [m.as_dict() for m in messages], "metadata": metadata},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "p" + hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _messages(value: Any) -> tuple[Message, ...]:
    if value is None:
        raise bad_request("messages is required: the conversation to optimise the answer to", "messages")
    if not isinstance(value, list):
        raise bad_request(f"messages must be a list of messages, not {_kind(value)}", "messages")
    items: list[Any] = []
    for item in value:
        # Newer clients send the system turn as "developer"; tpo knows it as "system".
        if isinstance(item, dict) and item.get("role") == "developer":
            item = {**item, "role": "system"}
        items.append(item)
    try:
        return to_messages(items, where="messages")
    except InputError as e:
        raise bad_request(str(e), "messages") from e


def _metadata(ext: Mapping[str, Any]) -> dict[str, Any]:
    metadata = ext.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise bad_request(f"tpo.metadata must be an object, not {_kind(metadata)}", "tpo.metadata")
    if RUBRIC_KEY in metadata:
        raise bad_request(
            f"tpo.metadata may not hold {RUBRIC_KEY!r}; give the judge's rubric as tpo.prefer", "tpo.metadata"
        )
    return dict(metadata)


def _seed(body: Mapping[str, Any], ext: Mapping[str, Any]) -> int | None:
    seeds = {}
    for key, value in (("seed", body.get("seed")), ("tpo.seed", ext.get("seed"))):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad_request(f"{key} must be an integer, not {value!r}", key)
            seeds[key] = value
    if len(set(seeds.values())) > 1:
        raise bad_request(f"seed {seeds['seed']} and tpo.seed {seeds['tpo.seed']} differ; give one", "tpo.seed")
    return next(iter(seeds.values()), None)


def _max_tokens(body: Mapping[str, Any], limit: int) -> int | None:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for key, value in given.items():
        _int_in(value, key, 1, limit, "--max-request-tokens")
    if len(set(given.values())) > 1:
        raise bad_request("max_tokens and max_completion_tokens differ; give one", "max_tokens")
    return next(iter(given.values()), None)


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, not {_kind(options)}", "stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise bad_request(
            f"stream_options.include_usage must be true or false, not {value!r}", "stream_options.include_usage"
        )
    return value


def _int_in(value: Any, name: str, low: int, high: int, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, not {value!r}", name)
    if value < low:
        raise bad_request(f"{name} must be at least {low}, not {value}", name)
    if value > high:
        raise bad_request(f"{name} is {value}, over this server's limit of {high} ({option})", name, "over_limit")
    return value


def _number_in(value: Any, name: str, low: float, high: float) -> float:
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float (10**400)
        finite = False
    if not finite:
        shown = repr(value) if not isinstance(value, int) or value.bit_length() < 64 else "a huge integer"
        raise bad_request(f"{name} must be a number, not {shown}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be from {low:g} to {high:g}, not {value}", name)
    return float(value)


def _neutral(key: str, value: Any) -> bool:
    """True when an unsupported parameter is given its do-nothing value (clients often send those)."""
    if value is None or value is False or value == 0 or value in ("", [], {}):
        return True
    if key == "tool_choice":
        return value in ("none", "auto")
    if key == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    if key == "modalities":
        return bool(value == ["text"])
    return False


_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- replies


def ranked_answers(result: TPOResult, n: int) -> list[Candidate]:
    """The final answer first, then the next best distinct scored answers, up to ``n``."""
    best = result.best
    if best is None:
        return []
    others = sorted((c for c in result.candidates if c.score is not None and c.id != best.id), key=lambda c: -c.score)  # type: ignore[operator]  # only scored candidates
    return [best, *others][:n]


def finish_reason(candidate: Candidate) -> str:
    """``"length"`` when the answer was cut by the token limit, else ``"stop"``."""
    return "length" if candidate.finish_reason == "length" else "stop"


def usage_of(result: TPOResult) -> dict[str, int]:
    """OpenAI usage: every token of every policy and critic call the optimisation made."""
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def tpo_extension(result: TPOResult, trace_id: str, answers: Sequence[Candidate]) -> dict[str, Any]:
    """The ``tpo`` field of a reply: scores, the best score after each step, and the trace to fetch."""
    cfg = result.config
    return {
        "trace_id": trace_id,
        "prompt_id": result.prompt_id,
        "score": result.score,
        "scores": [c.score for c in answers],
        "step_best_scores": [s.best_score for s in result.steps],
        "mode": cfg.get("mode"),
        "width": cfg.get("width"),
        "depth": cfg.get("depth"),
        "seed": result.seed,
        "stopped_early": result.stopped_early,
        "usage": result.usage.to_dict(),
    }


def completion_body(result: TPOResult, request: ChatRequest, trace_id: str, created: int) -> dict[str, Any]:
    """The ``chat.completion`` object for a finished result."""
    answers = ranked_answers(result, request.n)
    return {
        "id": trace_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(c),
            }
            for i, c in enumerate(answers)
        ],
        "usage": usage_of(result),
        "tpo": tpo_extension(result, trace_id, answers),
    }


_PIECE = re.compile(r"\s*\S+|\s+$")


def split_text(text: str, words_per_piece: int = 4) -> list[str]:
    """The answer in pieces of a few words, whitespace kept, that join back to exactly ``text``."""
    words = _PIECE.findall(text)
    if "".join(words) != text:  # never lose a character to the split
        return [text]
    return ["".join(words[i : i + words_per_piece]) for i in range(0, len(words), words_per_piece)] or [text]
