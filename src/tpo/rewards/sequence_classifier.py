"""Scores answers with a Transformers sequence-classification reward model (``--reward hf:MODEL_OR_PATH``).

Works with the paper's reward models (``sfairXC/FsfairX-LLaMA3-RM-v0.1``,
``allenai/Llama-3.1-Tulu-3-8B-RM``), small modern ones (``Skywork/Skywork-Reward-V2-Qwen3-0.6B``)
and text-pair models without a chat template (``OpenAssistant/reward-model-deberta-v3-large-v2``).

How an input is built
    ``input_format="chat"``: the tokenizer's chat template over the conversation with the
    answer as the final assistant turn, rendered as text and tokenized without adding special
    tokens a second time. The BOS token appears exactly once: the template's own when it writes
    one, otherwise the tokenizer's when it normally adds one, and none for tokenizers without
    one (Qwen). ``input_format="pair"``: ``tokenizer(question, answer)`` where the question is
    the user's message (or, for a longer conversation, its turns as ``Role: text`` paragraphs).
    ``"auto"`` picks ``chat`` when the tokenizer has a chat template.

The score
    The raw output logit at ``output_index`` (no softmax). Inputs are sorted by length and
    packed into batches of at most ``max_batch_tokens`` padded tokens and ``max_batch_size``
    rows. The default budget is 16,384 tokens on a GPU and 2,048 elsewhere: on a CPU a
    forward pass is compute-bound already, and larger batches only add cache misses.

    Rows are always padded on the right, whatever the tokenizer's padding side. In
    Transformers 5, Llama and Qwen3 number positions ``0..n-1`` whatever the padding (left
    padding would shift them) and their classification head reads the rightmost token that
    is not the pad id, while encoders such as DeBERTa pool the first token; with right
    padding every real token keeps its position and each head reads the token it reads in a
    batch of one, so a score does not depend on what it was batched with. When neither the
    model config nor the tokenizer has a pad id, the EOS id is used (common for Llama reward
    models) and set on the model config; if an input itself ends with that id, the head reads
    the token before it, alone or batched alike.

Truncation (inputs longer than ``max_length`` tokens)
    The answer and the latest user turn are kept; the oldest turns are dropped first (a
    leading system message stays); then the system message is shortened (and dropped if
    nothing is left); then the latest user turn is shortened, keeping its beginning and end,
    down to a quarter of ``max_length``. If the answer alone still does not fit, its beginning
    is kept and its end cut: a reward model has to judge something, and the opening of an
    answer is what a reader meets first. All of it is recorded in ``Score.details``, e.g.
    ``{"truncated": True, "dropped_turns": 2, "prompt_tokens_removed": 0,
    "answer_tokens_removed": 0, "input_tokens": 4096}``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .._guard import check_real_request_allowed
from .._local import refuse_loading_options
from .._local.torch import LoadOptions, dtype_keyword, resolve_device, resolve_dtype
from ..errors import ConfigError, InputError, MissingDependencyError, RewardError
from ..options import integer, one_of, option
from ..types import Message, Score, ScoreRequest, to_messages

__all__ = ["SequenceClassifierOptions", "SequenceClassifierReward"]

InputFormat = Literal["auto", "chat", "pair"]
_FORMATS = ("auto", "chat", "pair")
#: Cap of the default ``max_length``: long enough for real answers, short enough for a CPU.
DEFAULT_MAX_LENGTH = 4096
#: Default padded-token budget of one forward pass, on a GPU and elsewhere.
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 2048
_MIN_MAX_LENGTH = 16
_MIDDLE_MARKER = " … "
_PURPOSE = "The hf: reward model"
_OWNER = "the hf reward"
#: Options that only ``from_spec`` uses, to load the model.
_LOADING = LoadOptions.names()


@dataclass(frozen=True)
class SequenceClassifierOptions(LoadOptions):
    """The options of ``SequenceClassifierReward`` (``--reward-option NAME=VALUE``); see the module docstring."""

    owner: ClassVar[str] = _OWNER

    max_batch_tokens: int | None = option(
        None, integer(min=1), "padded tokens per forward pass (default: 16384 on a GPU, else 2048)"
    )
    max_batch_size: int = option(64, integer(min=1), "rows per forward pass")
    max_length: int | None = option(
        None, integer(min=_MIN_MAX_LENGTH), "input tokens kept (default: the model's limit, at most 4096)"
    )
    output_index: int = option(0, integer(min=0), "which output logit is the score")
    input_format: InputFormat = option("auto", one_of(*_FORMATS), "chat template or text pair (auto: chat if any)")


@dataclass
class _Encoded:
    """One request turned into model input, or the reason it could not be."""

    ids: list[int]
    type_ids: list[int] | None = None
    details: dict[str, Any] | None = None
    error: str | None = None


def _require() -> tuple[Any, Any]:
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("torch", "hf", _PURPOSE) from e
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("transformers", "hf", _PURPOSE) from e
    return torch, transformers


class SequenceClassifierReward:
    """A reward model from ``AutoModelForSequenceClassification``: the score is the raw logit.

    Build it with ``from_spec("MODEL_OR_PATH", device=..., dtype=...)`` (which loads the model),
    or pass an already loaded model and tokenizer to the constructor. ``score`` takes whole
    batches (``batching = True``) and runs the model in a worker thread; ``score_pairs`` is a
    synchronous convenience. See the module docstring for inputs, batching and truncation.
    """

    name: str = "hf"
    batching = True
    supports_n = False
    supports_logprobs = False
    description = "A Transformers sequence-classification reward model (FsfairX, Tulu-3 RM, Skywork-Reward, DeBERTa)."
    options_class = SequenceClassifierOptions

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "hf",
        options: SequenceClassifierOptions | None = None,
        **kwargs: Any,
    ) -> None:
        """Wrap a loaded model and tokenizer (the model's config gets a pad id if it lacks one).

        The options other than ``device``, ``dtype`` and ``trust_remote_code`` (which are for
        loading) come as keywords or in ``options``.
        """
        refuse_loading_options(kwargs, _LOADING, owner=_OWNER, loads="model")
        opts = self.options = SequenceClassifierOptions.from_options(kwargs, base=options)
        self.name = name
        max_batch_tokens = opts.max_batch_tokens
        if max_batch_tokens is None:
            on_gpu = any(p.device.type == "cuda" for p in model.parameters())
            max_batch_tokens = GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = opts.max_batch_size
        input_format, output_index = opts.input_format, opts.output_index
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if input_format == "chat" and not has_template:
            raise ConfigError(
                f"{name}: input_format='chat' but the tokenizer has no chat template; use input_format='pair'"
            )
        self.input_format: Literal["chat", "pair"] = (
            ("chat" if has_template else "pair") if input_format == "auto" else input_format
        )
        config = model.config
        num_labels = int(getattr(config, "num_labels", 1))
        if output_index >= num_labels:
            raise ConfigError(
                f"hf reward option output_index={output_index!r} is out of range: the model has {num_labels} output(s), "
                f"so it must be an integer from 0 to {num_labels - 1}"
            )
        self.output_index = output_index
        self.max_length = self._resolve_max_length(model, tokenizer, opts.max_length)

        self._model = model
        self._tokenizer = tokenizer
        self.pad_token_id = self._resolve_pad(model, tokenizer)
        self._bos_id = self._leading_bos(tokenizer)
        accepted = inspect.signature(model.forward).parameters
        self._accepts_use_cache = "use_cache" in accepted
        self._use_type_ids = (
            self.input_format == "pair"
            and "token_type_ids" in accepted
            and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        )
        self._lock = threading.Lock()  # one forward at a time; fast tokenizers are not re-entrant either

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> SequenceClassifierReward:
        """Load ``target`` (a Hub id or a local directory) with the options of ``--reward-option``.

        Options: ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), ``dtype``
        (``auto``: bfloat16 on CUDA, or float16 on a GPU without native bfloat16, float32 on the
        CPU and MPS; or ``float32``, ``bfloat16``, ``float16``), ``max_batch_tokens``,
        ``max_batch_size``, ``max_length``, ``output_index``, ``input_format`` (``auto``, ``chat``, ``pair``), ``trust_remote_code``.
        """
        # Every option is checked here, before the (slow) load.
        opts = SequenceClassifierOptions.from_options(options)
        target = os.fspath(target).strip() if target else ""
        if not target:
            raise ConfigError(
                "hf reward: give a model, e.g. hf:Skywork/Skywork-Reward-V2-Qwen3-0.6B or hf:./my-reward-model"
            )
        source = _locate(target)

        torch, transformers = _require()
        device = resolve_device(torch, opts.device, owner=_OWNER)
        torch_dtype = resolve_dtype(torch, opts.dtype, device, owner=_OWNER)
        load_kwargs: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code}
        if source != target:  # a local directory: never ask the Hub
            load_kwargs["local_files_only"] = True
        check_real_request_allowed("the hf reward")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **load_kwargs)
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                source, output_loading_info=True, **{dtype_keyword(transformers): torch_dtype}, **load_kwargs
            )
        except (OSError, ValueError, KeyError, ImportError) as e:  # ImportError: a tokenizer's own optional package
            raise ConfigError(f"hf reward: cannot load {target!r} as a sequence-classification model: {e}") from e
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise ConfigError(
                f"hf reward: {target!r} has no trained weights for {', '.join(missing[:4])}"
                f"{' …' if len(missing) > 4 else ''}; it is not a sequence-classification reward model "
                "(a language model would get a randomly initialised score head)"
            )
        try:
            model.to(device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"hf reward: cannot move {target!r} to {device}: {e}") from e
        model.eval()
        return cls(model, tokenizer, name=f"hf:{target}", options=opts)

    @staticmethod
    def _resolve_max_length(model: Any, tokenizer: Any, max_length: int | None) -> int:
        positions = getattr(model.config, "max_position_embeddings", None)
        positions = positions if isinstance(positions, int) and positions > 0 else None
        if max_length is not None:
            if positions is not None and max_length > positions:
                raise ConfigError(
                    f"hf reward option max_length={max_length} exceeds the model's {positions} position embeddings"
                )
            return max_length
        limits = [DEFAULT_MAX_LENGTH]
        if positions is not None:
            limits.append(positions)
        tokenizer_limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and _MIN_MAX_LENGTH <= tokenizer_limit < 1_000_000:
            limits.append(tokenizer_limit)  # tokenizers without a limit report a huge sentinel
        return min(limits)

    @staticmethod
    def _resolve_pad(model: Any, tokenizer: Any) -> int:
        configs = [model.config]
        text_config = getattr(model.config, "get_text_config", None)
        if callable(text_config) and text_config() is not model.config:
            configs.append(text_config())
        pad: Any = next(
            (c.pad_token_id for c in reversed(configs) if getattr(c, "pad_token_id", None) is not None), None
        )
        if pad is None:
            pad = tokenizer.pad_token_id
        if pad is None:
            eos = (
                tokenizer.eos_token_id
                if tokenizer.eos_token_id is not None
                else getattr(model.config, "eos_token_id", None)
            )
            pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if pad is None:
            pad = 0  # right padding behind an attention mask: the id itself is never attended to
        pad_id = int(pad)
        for c in configs:
            c.pad_token_id = pad_id  # the classification head finds the sequence end through it
        return pad_id

    @staticmethod
    def _leading_bos(tokenizer: Any) -> int | None:
        """The BOS id when the tokenizer puts one in front of every encoded text, else None."""
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            return None
        probe = tokenizer("x")["input_ids"]
        return int(bos) if probe and probe[0] == bos else None

    # ------------------------------------------------------------------ scoring

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score every request in as few forward passes as the batch limits allow."""
        if not requests:
            return []
        check_real_request_allowed(self.name)
        return await asyncio.to_thread(self._score_sync, list(requests))

    def score_pairs(self, messages_list: Sequence[Any], answers: Sequence[str]) -> list[Score]:
        """Synchronous scoring of (conversation, answer) pairs, for scripts and benchmarks.

        A conversation is a string (one user turn) or an OpenAI-style list of messages.
        """
        if len(messages_list) != len(answers):
            raise InputError(f"score_pairs got {len(messages_list)} conversations and {len(answers)} answers")
        requests = [
            ScoreRequest(to_messages(m, where=f"conversation {i}"), a)
            for i, (m, a) in enumerate(zip(messages_list, answers, strict=True))
        ]
        return self._score_sync(requests) if requests else []

    async def aclose(self) -> None:
        """Drop the model so its memory can be freed."""
        self._model = None

    def _score_sync(self, requests: list[ScoreRequest]) -> list[Score]:
        torch, _ = _require()
        with self._lock:
            if self._model is None:
                raise RewardError(f"{self.name} was closed")
            encoded = self._encode_all(requests)
            values: list[float | None] = [None] * len(encoded)
            ready = [i for i, e in enumerate(encoded) if e.error is None]
            with torch.inference_mode():
                for batch in _plan([len(encoded[i].ids) for i in ready], self.max_batch_tokens, self.max_batch_size):
                    rows = [ready[j] for j in batch]
                    for i, v in zip(rows, self._forward(torch, [encoded[i] for i in rows]), strict=True):
                        values[i] = v
        return [
            Score.failed(enc.error, enc.details) if enc.error is not None else Score(value, details=enc.details)
            for enc, value in zip(encoded, values, strict=True)
        ]

    def _forward(self, torch: Any, items: list[_Encoded]) -> list[float]:
        width = max(len(e.ids) for e in items)
        ids = [e.ids + [self.pad_token_id] * (width - len(e.ids)) for e in items]
        mask = [[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in items]
        device = next(self._model.parameters()).device
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
        }
        if self._use_type_ids:
            types = [(e.type_ids or [0] * len(e.ids)) + [0] * (width - len(e.ids)) for e in items]
            inputs["token_type_ids"] = torch.tensor(types, dtype=torch.long, device=device)
        if self._accepts_use_cache:
            inputs["use_cache"] = False
        try:
            logits = self._model(**inputs).logits
        except RuntimeError as e:
            if "out of memory" in str(e).lower() and len(items) > 1:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(items) // 2
                return self._forward(torch, items[:half]) + self._forward(torch, items[half:])
            raise RewardError(f"{self.name} failed on a batch of {len(items)}: {type(e).__name__}: {e}") from e
        except Exception as e:  # a third-party failure, wrapped at the boundary
            raise RewardError(f"{self.name} failed on a batch of {len(items)}: {type(e).__name__}: {e}") from e
        column = logits[:, self.output_index].float().cpu().tolist()
        return [float(v) for v in column]

    # ------------------------------------------------------------------ inputs

    def _encode_all(self, requests: list[ScoreRequest]) -> list[_Encoded]:
        """Encode every request, in one tokenizer call for all that fit, then fit the rest one by one."""
        out: list[_Encoded] = [_Encoded([]) for _ in requests]
        if self.input_format == "chat":
            texts: list[str] = []
            slots: list[int] = []
            for i, r in enumerate(requests):
                try:
                    texts.append(self._render_chat(r.messages, r.answer))
                    slots.append(i)
                except Exception as e:  # a template that rejects this conversation: that pair fails
                    out[i] = _Encoded([], error=f"the chat template failed: {type(e).__name__}: {e}")
            if texts:
                tokenized = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
                for i, ids in zip(slots, tokenized, strict=True):
                    out[i] = _Encoded(self._with_bos(ids))
        else:
            questions = [_question(r.messages) for r in requests]
            enc = self._tokenizer(questions, [r.answer for r in requests], add_special_tokens=True)
            types = enc.get("token_type_ids") if self._use_type_ids else None
            for i, ids in enumerate(enc["input_ids"]):
                out[i] = _Encoded(list(ids), list(types[i]) if types is not None else None)
        for i, enc in enumerate(out):
            if enc.error is None and len(enc.ids) > self.max_length:
                out[i] = self._fit(requests[i].messages, requests[i].answer)
        return out

    def _render_chat(self, messages: Sequence[Message], answer: str) -> str:
        conversation = [m.as_dict() for m in messages] + [{"role": "assistant", "content": answer}]
        text = self._tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    def _with_bos(self, ids: Sequence[int]) -> list[int]:
        """Exactly one BOS when the tokenizer uses one; the template may already have written it."""
        ids = list(ids)
        if self._bos_id is not None and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def _encode_one(self, messages: Sequence[Message], answer: str) -> _Encoded:
        if self.input_format == "chat":
            ids = self._tokenizer(self._render_chat(messages, answer), add_special_tokens=False)["input_ids"]
            return _Encoded(self._with_bos(ids))
        enc = self._tokenizer(_question(messages), answer, add_special_tokens=True)
        types = enc.get("token_type_ids") if self._use_type_ids else None
        return _Encoded(list(enc["input_ids"]), list(types) if types is not None else None)

    def _count(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cut(self, text: str, keep_tokens: int, *, middle: bool) -> str:
        """``text`` shortened to about ``keep_tokens`` tokens: its beginning, or its beginning and end."""
        if keep_tokens <= 0:
            return ""
        try:
            offsets = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: cut by characters
            n = max(1, self._count(text))
            per = len(text) / n
            offsets = [(round(k * per), round((k + 1) * per)) for k in range(n)]
        n = len(offsets)
        if keep_tokens >= n:
            return text
        if not middle:
            return text[: offsets[keep_tokens - 1][1]]
        head = (keep_tokens + 1) // 2
        tail = keep_tokens - head
        left = text[: offsets[head - 1][1]] if head else ""
        right = text[offsets[n - tail][0] :] if tail else ""
        return left + _MIDDLE_MARKER + right

    def _fit(self, messages: Sequence[Message], answer: str) -> _Encoded:
        """Shorten one over-long input to ``max_length`` (see the module docstring for the order)."""
        limit = self.max_length
        system = messages[0] if messages and messages[0].role == "system" else None
        body = list(messages[1:] if system is not None else messages)
        dropped = 0
        prompt_removed = 0
        answer_removed = 0

        def build(sys_msg: Message | None, turns: list[Message], ans: str) -> _Encoded:
            return self._encode_one(([sys_msg] if sys_msg is not None else []) + turns, ans)

        try:
            enc = build(system, body, answer)
            # 1. the oldest turns, a whole exchange at a time so the conversation still opens with a user turn
            while len(enc.ids) > limit and len(body) > 1:
                body.pop(0)
                dropped += 1
                while len(body) > 1 and body[0].role != "user":
                    body.pop(0)
                    dropped += 1
                enc = build(system, body, answer)

            def shrink(
                text: str, floor: int, middle: bool, rebuild: Callable[[str], _Encoded]
            ) -> tuple[str, _Encoded, int]:
                """Cut ``text`` until the input fits or ``text`` is down to ``floor`` tokens."""
                nonlocal enc
                total = self._count(text)
                keep, slack, current = total, 2, text
                while len(enc.ids) > limit and keep > floor:
                    keep = max(floor, min(keep - 1, keep - (len(enc.ids) - limit) - slack))
                    current = self._cut(text, keep, middle=middle)
                    enc = rebuild(current)
                    slack *= 2
                return current, enc, total - keep

            # 2. the system message, then the latest user turn down to a quarter of the limit
            if len(enc.ids) > limit and system is not None:
                sys_msg = system
                text, enc, removed = shrink(
                    sys_msg.content, 0, True, lambda t: build(Message("system", t) if t else None, body, answer)
                )
                prompt_removed += removed
                system = Message("system", text) if text else None
            if len(enc.ids) > limit and body:
                last = body[-1]
                floor = min(self._count(last.content), limit // 4)
                text, enc, removed = shrink(
                    last.content, floor, True, lambda t: build(system, [*body[:-1], Message(last.role, t)], answer)
                )
                prompt_removed += removed
                body[-1] = Message(last.role, text)
            # 3. the end of the answer
            if len(enc.ids) > limit:
                answer, enc, answer_removed = shrink(answer, 1, False, lambda t: build(system, body, t))
        except Exception as e:  # a template that rejects the shortened conversation
            return _Encoded([], error=f"could not shorten the input to {limit} tokens: {type(e).__name__}: {e}")
        details: dict[str, Any] = {
            "truncated": True,
            "dropped_turns": dropped,
            "prompt_tokens_removed": prompt_removed,
            "answer_tokens_removed": answer_removed,
            "input_tokens": len(enc.ids),
        }
        if len(enc.ids) > limit:
            return _Encoded(
                [], details=details, error=f"the input does not fit in max_length={limit} tokens even when shortened"
            )
        enc.details = details
        return enc


def _question(messages: Sequence[Message]) -> str:
    """The first text of a text pair: the user's message, or the whole conversation as paragraphs."""
    if len(messages) == 1:
        return messages[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages)


def _plan(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Positions grouped into batches, longest first; a batch's padded size stays within the token budget.

    An input longer than the budget on its own gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and (len(current) >= max_batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        if not current:
            width = lengths[i]  # sorted longest first: the first row sets the padded width
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _locate(target: str) -> str:
    """A local directory as an absolute path, or the Hub id unchanged; a missing local path is a ConfigError."""
    expanded = os.path.expanduser(target)
    path = Path(expanded)
    looks_local = (
        target.startswith((".", "/", "~", "\\"))
        or path.is_absolute()
        or "\\" in target
        or target.count("/") > 1
        or path.exists()
    )
    if not looks_local:
        return target
    if not path.exists():
        raise ConfigError(f"hf reward: no such model directory {target!r}")
    if not path.is_dir():
        raise ConfigError(
            f"hf reward: {target!r} is a file; give the directory that holds config.json and the tokenizer"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"hf reward: {target!r} has no config.json; it is not a saved Transformers model")
    return str(path.resolve())
