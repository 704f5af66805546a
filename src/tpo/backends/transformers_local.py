"""A policy backend that generates with a Hugging Face Transformers causal LM in this process.

Requests with the same sampling settings share one left-padded ``model.generate`` call with
``num_return_sequences=n``; calls run in a worker thread, one at a time::

    policy = TransformersPolicy.from_spec("HuggingFaceTB/SmolLM2-360M-Instruct", device="cuda")

Reproducibility: ``generate`` takes no ``torch.Generator``, so each call seeds torch's global
RNG inside ``torch.random.fork_rng`` (the caller's RNG state is restored afterwards) with a
seed derived from the seeds of the requests in that call. The same requests batched the same
way therefore give the same samples; a request's samples may change when it shares a call
with different requests, because one random stream drives the whole call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .._guard import check_real_request_allowed
from .._local import refuse_loading_options
from .._local.torch import LoadOptions, dtype_keyword, resolve_device, resolve_dtype
from ..errors import BackendError, ConfigError, MissingDependencyError, TPOError
from ..options import integer, option
from ..types import Generation, GenerationRequest, Message, TokenLogprob

__all__ = ["TransformersOptions", "TransformersPolicy"]

_OWNER = "the hf policy backend"
#: Options that only ``from_spec`` uses, to load the model.
_LOADING = LoadOptions.names()


@dataclass(frozen=True)
class TransformersOptions(LoadOptions):
    """The options of ``TransformersPolicy`` (``--policy-option NAME=VALUE``); the first three are for loading."""

    owner: ClassVar[str] = _OWNER

    batch_size: int = option(16, integer(min=1), "sequences (prompts x n) per generate() call")
    max_batch_tokens: int | None = option(None, integer(min=1), "cap on sequences x (longest prompt + new tokens)")


#: Tokenizers report this (or larger) as ``model_max_length`` when they do not know.
_UNKNOWN_LENGTH = 10**7


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package in ("torch", "transformers"):
            raise MissingDependencyError(package, "hf", "The hf policy backend") from e
        raise BackendError(f"torch/transformers is installed but could not be imported: {e}", backend="hf") from e
    return torch, transformers


@dataclass(frozen=True)
class _Item:
    """One request of a batch, with its position in the batch and its prompt's token ids."""

    index: int
    request: GenerationRequest
    ids: list[int]


class TransformersPolicy:
    """Generates with a Transformers causal LM and its tokenizer's chat template.

    ``model`` and ``tokenizer`` are loaded objects (``from_spec`` loads them from a model id
    or a local directory). ``batch_size`` caps the sequences (prompts x ``n``) of one
    ``generate`` call; ``max_batch_tokens`` optionally caps sequences x (longest prompt + new
    tokens). Settings the requests do not carry (top-k, repetition penalty) come from the
    checkpoint's ``generation_config``. Log-probabilities are those of the model's raw
    distribution, before temperature and top-p.
    """

    name = "hf"
    description = "Hugging Face Transformers in the same process: batched, left-padded generate() on CPU or GPU"
    batching = True
    supports_n = True
    supports_logprobs = True
    counts_tokens = True
    knows_context_window = True
    options_class = TransformersOptions

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        options: TransformersOptions | None = None,
        **kwargs: Any,
    ) -> None:
        """Wrap a loaded model and tokenizer; ``batch_size`` and ``max_batch_tokens`` as keywords or in ``options``."""
        refuse_loading_options(kwargs, _LOADING, owner=_OWNER, loads="model")
        opts = self.options = TransformersOptions.from_options(kwargs, base=options)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"{_OWNER}: the tokenizer has no chat template; tpo needs a chat (instruct) model "
                "whose tokenizer_config.json or chat_template.jinja defines one"
            )
        self._torch, _ = _import_torch_transformers()
        self._model = model
        self._tokenizer = tokenizer
        self._batch_size = opts.batch_size
        self._max_batch_tokens = opts.max_batch_tokens
        self._eos_ids = _eos_ids(model, tokenizer)
        if not self._eos_ids:
            raise ConfigError(
                f"{_OWNER}: neither the tokenizer nor the model's generation config names an end-of-sequence token"
            )
        pad = getattr(tokenizer, "pad_token_id", None)
        # Padding is on the left and masked out, so any id works; the end-of-sequence token is the usual choice.
        self._pad_id: int = pad if isinstance(pad, int) else self._eos_ids[0]
        self._lock = threading.Lock()
        if name is not None:
            self.name = name

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> TransformersPolicy:
        """Load ``target`` (a model id or a local directory) with ``AutoModelForCausalLM`` and ``AutoTokenizer``.

        Options: ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``), ``dtype``
        (``auto``: bfloat16 on CUDA, or float16 on a GPU without native bfloat16, float32 on the
        CPU and MPS; or ``float32``, ``float16``, ``bfloat16``), ``trust_remote_code``,
        ``batch_size``, ``max_batch_tokens``.
        """
        if not target.strip():
            raise ConfigError("the hf policy backend needs a model: --policy hf:MODEL_OR_PATH")
        opts = TransformersOptions.from_options(options)
        torch, transformers = _import_torch_transformers()
        device = resolve_device(torch, opts.device, owner=_OWNER)
        dtype = resolve_dtype(torch, opts.dtype, device, owner=_OWNER)
        trust = opts.trust_remote_code
        check_real_request_allowed(_OWNER)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(target, trust_remote_code=trust)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                target, trust_remote_code=trust, **{dtype_keyword(transformers): dtype}
            )
        except (OSError, ValueError, KeyError) as e:  # no such model or path, or not a causal LM
            raise ConfigError(f"{_OWNER}: could not load {target!r} as a causal language model: {e}") from e
        except Exception as e:
            raise BackendError(f"could not load {target!r}: {type(e).__name__}: {e}", backend=f"hf:{target}") from e
        try:
            model.to(device)
        except Exception as e:  # e.g. out of GPU memory
            raise BackendError(
                f"could not move {target!r} to {device}: {type(e).__name__}: {e}", backend=f"hf:{target}"
            ) from e
        model.eval()
        return cls(model, tokenizer, name=f"hf:{target}", options=opts)

    # ------------------------------------------------------------------ the protocol

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Answer every request; requests with equal sampling settings share ``generate`` calls."""
        if not requests:
            return []
        check_real_request_allowed(self.name)
        return await asyncio.to_thread(self._generate_all, list(requests))

    async def context_window(self) -> int | None:
        """The model's maximum positions, or the tokenizer's ``model_max_length`` if that is smaller."""
        config = getattr(self._model, "config", None)
        candidates = []
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and 0 < value < _UNKNOWN_LENGTH:
                candidates.append(value)
                break
        tok_max = getattr(self._tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < _UNKNOWN_LENGTH:
            candidates.append(tok_max)
        return min(candidates) if candidates else None

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """The length of the prompt ``generate`` feeds the model for this conversation."""
        try:
            return len(self._prompt_ids(messages))
        except Exception:  # a template that rejects the conversation: generate() reports it
            return None

    async def aclose(self) -> None:
        """Drop the model (and free its GPU memory)."""
        with self._lock:
            self._model = None
        torch = self._torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ batching

    def _prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )
        # The template already holds the special tokens it wants (Transformers' own tokenize=True does the same).
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _generate_all(self, requests: list[GenerationRequest]) -> list[Generation]:
        with self._lock:
            if self._model is None:
                raise BackendError("the hf policy backend was closed", backend=self.name)
            try:
                items = [_Item(i, r, self._prompt_ids(r.messages)) for i, r in enumerate(requests)]
            except Exception as e:
                raise BackendError(
                    f"the chat template could not render a request: {type(e).__name__}: {e}", backend=self.name
                ) from e
            groups: dict[tuple[Any, ...], list[_Item]] = {}
            for item in items:
                groups.setdefault(_group_key(item.request), []).append(item)
            out: list[Generation | None] = [None] * len(requests)
            for group in groups.values():
                for chunk in self._chunks(group):
                    try:
                        generations = self._run(chunk)
                    except TPOError:
                        raise
                    except Exception as e:
                        raise BackendError(
                            f"generate() failed on {len(chunk)} requests: {type(e).__name__}: {e}", backend=self.name
                        ) from e
                    for item, gen in zip(chunk, generations, strict=True):
                        out[item.index] = gen
            return [g for g in out if g is not None]

    def _chunks(self, group: list[_Item]) -> Iterator[list[_Item]]:
        """Split requests of one setting into calls of at most ``batch_size`` sequences (and the token cap)."""
        # Similar lengths together waste less padding.
        ordered = sorted(group, key=lambda it: -len(it.ids))
        rows_each = _rows(ordered[0].request)
        new_tokens = ordered[0].request.sampling.max_tokens
        chunk: list[_Item] = []
        longest = 0
        for item in ordered:
            longest_if = max(longest, len(item.ids))
            rows_if = (len(chunk) + 1) * rows_each
            too_many = rows_if > self._batch_size
            too_big = (
                self._max_batch_tokens is not None and rows_if * (longest_if + new_tokens) > self._max_batch_tokens
            )
            if chunk and (too_many or too_big):
                yield chunk
                chunk, longest_if = [], len(item.ids)
            chunk.append(item)
            longest = longest_if
        if chunk:
            yield chunk

    def _run(self, chunk: list[_Item]) -> list[Generation]:
        torch = self._torch
        model = self._model
        first = chunk[0].request
        sampling, n = first.sampling, first.n
        greedy = sampling.temperature <= 0
        rows_each = _rows(first)
        device = _model_device(torch, model)
        width = max(len(it.ids) for it in chunk)
        input_ids = torch.tensor([[self._pad_id] * (width - len(it.ids)) + it.ids for it in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(it.ids)) + [1] * len(it.ids) for it in chunk], device=device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "max_new_tokens": sampling.max_tokens,
            "do_sample": not greedy,
            "num_return_sequences": rows_each,
            "pad_token_id": self._pad_id,
            "eos_token_id": list(self._eos_ids),
            "return_dict_in_generate": True,
        }
        if not greedy:
            kwargs["temperature"] = sampling.temperature
            kwargs["top_p"] = sampling.top_p
        if first.logprobs is not None:
            kwargs["output_logits"] = True
        if sampling.stop:
            kwargs["stop_strings"] = list(sampling.stop)
            kwargs["tokenizer"] = self._tokenizer
        seed = _batch_seed([it.request.sampling.seed for it in chunk]) if not greedy else None
        with torch.inference_mode(), _seeded(torch, device, seed):
            out = model.generate(**kwargs)
        new = out.sequences[:, width:].tolist()
        logprobs = self._logprobs(out, new, first.logprobs) if first.logprobs is not None else None
        gens = []
        for k, item in enumerate(chunk):
            texts, reasons, lps = [], [], []
            used = 0
            for j in range(rows_each):
                row = k * rows_each + j
                text, reason, count = self._finish(new[row], sampling.max_tokens, sampling.stop)
                texts.append(text)
                reasons.append(reason)
                used += count
                if logprobs is not None:
                    lps.append(logprobs[row][:count])
            copies = n // rows_each  # greedy decoding is deterministic: one row stands for all n
            gens.append(
                Generation(
                    texts=tuple(texts * copies),
                    prompt_tokens=len(item.ids),
                    completion_tokens=used * copies,
                    finish_reasons=tuple(reasons * copies),
                    logprobs=tuple(tuple(lp) for lp in lps) * copies if logprobs is not None else None,
                )
            )
        return gens

    def _finish(self, tokens: list[int], max_new: int, stop: Sequence[str]) -> tuple[str, str, int]:
        """Text, finish reason and token count of one generated row (padding and end token removed)."""
        cut = next((i for i, t in enumerate(tokens) if t in self._eos_ids), None)
        if cut is not None:
            body, count, reason = tokens[:cut], cut + 1, "stop"
        else:
            count = len(tokens)
            while count and tokens[count - 1] == self._pad_id:  # rows that ended early on a stop string are padded
                count -= 1
            body = tokens[:count]
            reason = "length" if count >= max_new else "stop"
        text = self._tokenizer.decode(body, skip_special_tokens=True)
        if stop:
            hits = [i for i in (text.find(s) for s in stop) if i >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
        return text, reason, count

    def _logprobs(self, out: Any, new: list[list[int]], k: int) -> list[list[TokenLogprob]]:
        torch = self._torch
        rows: list[list[TokenLogprob]] = [[] for _ in new]
        texts: dict[int, str] = {}

        def text_of(token_id: int) -> str:
            if token_id not in texts:
                texts[token_id] = self._tokenizer.decode([token_id])
            return texts[token_id]

        for t, logits in enumerate(out.logits):
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            chosen = torch.tensor([row[t] for row in new], device=log_probs.device)
            chosen_lp = log_probs.gather(1, chosen[:, None])[:, 0].tolist()
            top_lp, top_id = log_probs.topk(k, dim=-1) if k > 0 else (None, None)
            for r, row in enumerate(new):
                top: tuple[tuple[str, float], ...] = ()
                if top_lp is not None and top_id is not None:
                    top = tuple(
                        (text_of(int(i)), float(v)) for i, v in zip(top_id[r].tolist(), top_lp[r].tolist(), strict=True)
                    )
                rows[r].append(TokenLogprob(text_of(row[t]), float(chosen_lp[r]), top))
        return rows


# ---------------------------------------------------------------------------- helpers


def _group_key(request: GenerationRequest) -> tuple[Any, ...]:
    s = request.sampling
    greedy = s.temperature <= 0
    # Greedy calls ignore temperature and top-p, so they batch together whatever those say.
    return (
        request.n,
        greedy,
        None if greedy else s.temperature,
        None if greedy else s.top_p,
        s.max_tokens,
        s.stop,
        request.logprobs,
    )


def _rows(request: GenerationRequest) -> int:
    """Sequences one request takes in a call: ``n``, or 1 under greedy decoding (its copies are identical)."""
    return 1 if request.sampling.temperature <= 0 else request.n


def _batch_seed(seeds: Sequence[int | None]) -> int | None:
    if all(s is None for s in seeds):
        return None
    text = ",".join("-" if s is None else str(s) for s in seeds)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF


@contextlib.contextmanager
def _seeded(torch: Any, device: Any, seed: int | None) -> Iterator[None]:
    """Seed torch's global RNG for one call and restore the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        module = getattr(torch, device.type)
        fork = torch.random.fork_rng(devices=list(range(module.device_count())), device_type=device.type)
    with fork:
        torch.manual_seed(seed)
        yield


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return tuple(ids)


def _model_device(torch: Any, model: Any) -> Any:
    device = getattr(model, "device", None)
    return device if device is not None else torch.device("cpu")
