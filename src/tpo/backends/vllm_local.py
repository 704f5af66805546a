"""A policy backend that runs vLLM in this process and hands it every request of a step in one call.

vLLM schedules what it is given with continuous batching and shares the KV cache of common
prefixes (prefix caching is switched on here), so the engine's batching dispatcher gives it
every prompt's requests of a step at once and vLLM keeps the GPU full::

    policy = VLLMPolicy.from_spec("Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2)

Written against vLLM's offline API as of 0.10/0.11 and main (checked in ``vllm/entrypoints/llm.py``):
``LLM.chat(list_of_conversations, sampling_params=list_of_SamplingParams, use_tqdm=False)``
returns one ``RequestOutput`` per conversation, in order, each with ``n`` ``CompletionOutput``
(``text``, ``token_ids``, ``finish_reason``, ``logprobs``). Releases since 0.8 (the oldest the
``vllm`` extra allows) take the same call; where an attribute moved between versions the code
says so. Log-probabilities are vLLM's default ``raw_logprobs`` (the model's distribution
before temperature and top-p) unless the engine is built with another ``logprobs_mode``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .._local import vllm as _vllm
from ..errors import BackendError, ConfigError
from ..options import flag, option
from ..types import Generation, GenerationRequest, Message, TokenLogprob

__all__ = ["VLLMPolicy", "VLLMPolicyOptions"]

_OWNER = "the vllm policy backend"


@dataclass(frozen=True)
class VLLMPolicyOptions(_vllm.EngineOptions):
    """The options of ``VLLMPolicy.from_spec`` (``--policy-option NAME=VALUE``): vLLM engine options."""

    owner: ClassVar[str] = _OWNER

    enable_prefix_caching: bool = option(True, flag(), "share the KV cache of common prompt prefixes")


def _import_vllm() -> Any:
    return _vllm.import_vllm("The vllm policy backend", functools.partial(BackendError, backend="vllm"))


class VLLMPolicy:
    """Generates with an in-process ``vllm.LLM``; a whole batch of requests is one ``LLM.chat`` call.

    ``llm`` is a ready ``vllm.LLM`` (or anything with the same ``chat``, ``get_tokenizer`` and
    ``model_config``); ``from_spec`` builds one from a model name or path. Each request becomes
    one conversation with its own ``SamplingParams`` (``n``, temperature, top-p, max tokens,
    seed, stop strings, log-probabilities). Calls run in a worker thread, one at a time.
    """

    name = "vllm"
    description = "vLLM in the same process (GPU): every request of a step in one batched call, prefix caching on"
    batching = True
    supports_n = True
    supports_logprobs = True
    counts_tokens = True
    knows_context_window = True
    options_class = VLLMPolicyOptions

    def __init__(self, llm: Any, *, name: str | None = None) -> None:
        self._llm: Any = llm
        self._vllm: Any = None
        self._tokenizer: Any = None
        # A thread lock, not an asyncio one: callers may drive us from several event loops.
        self._lock = threading.Lock()
        if name is not None:
            self.name = name

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> VLLMPolicy:
        """Load ``target`` (a Hugging Face model id or a local path) into a new ``vllm.LLM``.

        Options: ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
        ``dtype``, ``seed`` (the engine's seed; each request brings its own too),
        ``trust_remote_code``, ``enable_prefix_caching`` (default on), and ``engine_args``: a
        mapping of any further ``vllm.EngineArgs`` (``{"max_num_seqs": 256}``).
        """
        if not target.strip():
            raise ConfigError("the vllm policy backend needs a model: --policy vllm:MODEL_OR_PATH")
        opts = VLLMPolicyOptions.from_options(options)
        engine_kwargs = _vllm.engine_kwargs(opts, options)
        vllm = _import_vllm()
        name = f"vllm:{target}"
        llm = _vllm.load_llm(
            vllm, target, engine_kwargs, name=name, error=functools.partial(BackendError, backend=name)
        )
        policy = cls(llm, name=name)
        policy._vllm = vllm
        return policy

    # ------------------------------------------------------------------ the protocol

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One ``LLM.chat`` call for all ``requests``; one ``Generation`` each, in order."""
        if not requests:
            return []
        llm = self._require_llm()
        vllm = self._vllm if self._vllm is not None else _import_vllm()
        self._vllm = vllm
        conversations = [r.messages_as_dicts() for r in requests]
        try:
            params = [vllm.SamplingParams(**_sampling_kwargs(r)) for r in requests]
        except (TypeError, ValueError) as e:
            raise BackendError(f"vLLM rejected the sampling parameters: {e}", backend=self.name) from e
        outputs = await asyncio.to_thread(self._chat, llm, conversations, params)
        if len(outputs) != len(requests):
            raise BackendError(
                f"vLLM returned {len(outputs)} outputs for {len(requests)} conversations", backend=self.name
            )
        return [self._generation(r, out) for r, out in zip(requests, outputs, strict=True)]

    async def context_window(self) -> int | None:
        """``max_model_len`` of the loaded engine."""
        llm = self._llm
        return _vllm.max_model_len(llm) if llm is not None else None

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Prompt tokens of the conversation, rendered with the model's chat template as vLLM does."""
        tokenizer = self._get_tokenizer()
        if tokenizer is None:
            return None
        try:
            text = tokenizer.apply_chat_template(
                [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
            )
            # LLM.chat encodes the rendered template without adding special tokens again.
            return len(tokenizer.encode(text, add_special_tokens=False))
        except Exception:  # a tokenizer without a usable template: let the engine estimate instead
            return None

    async def aclose(self) -> None:
        """Drop the engine so that its GPU memory can be freed."""
        with self._lock:
            self._llm = None
            self._tokenizer = None
        gc.collect()

    # ------------------------------------------------------------------ helpers

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise BackendError("the vllm policy backend was closed", backend=self.name)
        return self._llm

    def _chat(self, llm: Any, conversations: list[list[dict[str, str]]], params: list[Any]) -> list[Any]:
        with self._lock:
            try:
                return list(llm.chat(conversations, sampling_params=params, use_tqdm=False))
            except Exception as e:
                raise BackendError(
                    f"vLLM failed on a batch of {len(conversations)} conversations: {type(e).__name__}: {e}",
                    backend=self.name,
                ) from e

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None and self._llm is not None:
            self._tokenizer = _vllm.engine_tokenizer(self._llm)
        return self._tokenizer

    def _generation(self, request: GenerationRequest, output: Any) -> Generation:
        completions = sorted(getattr(output, "outputs", None) or [], key=lambda c: getattr(c, "index", 0))
        if not completions:
            raise BackendError("vLLM returned a request output with no completions", backend=self.name)
        texts = tuple(str(c.text) for c in completions)
        prompt_ids = getattr(output, "prompt_token_ids", None)
        logprobs = None
        if request.logprobs is not None:
            logprobs = tuple(self._token_logprobs(c, request.logprobs) for c in completions)
        return Generation(
            texts=texts,
            prompt_tokens=len(prompt_ids) if prompt_ids is not None else None,
            completion_tokens=sum(len(c.token_ids or ()) for c in completions),
            finish_reasons=tuple(c.finish_reason for c in completions),
            logprobs=logprobs,
        )

    def _token_logprobs(self, completion: Any, k: int) -> tuple[TokenLogprob, ...] | None:
        """vLLM's per-position ``{token_id: Logprob}`` maps (a list, or ``FlatLogprobs`` from 0.11) → tpo's form.

        Each map holds the top ``k`` tokens and the sampled one (which may rank below ``k``).
        """
        positions = completion.logprobs
        if positions is None:
            return None
        out = []
        for token_id, entries in zip(completion.token_ids, positions, strict=False):
            if not entries:
                continue
            chosen = entries.get(token_id)
            ranked = sorted(
                entries.items(),
                key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob),
            )
            top = tuple((self._token_text(tid, lp), float(lp.logprob)) for tid, lp in ranked[:k])
            if chosen is None:  # not expected from vLLM; keep the position with what we know
                out.append(TokenLogprob(self._token_text(token_id, None), float("-inf"), top))
            else:
                out.append(TokenLogprob(self._token_text(token_id, chosen), float(chosen.logprob), top))
        return tuple(out)

    def _token_text(self, token_id: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        if decoded is not None:
            return str(decoded)
        tokenizer = self._get_tokenizer()
        if tokenizer is None:
            return str(token_id)
        try:
            return str(tokenizer.decode([token_id]))
        except Exception:
            return str(token_id)


def _sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` fields for one request (the same names from vLLM 0.8 through main)."""
    s = request.sampling
    kwargs: dict[str, Any] = {
        "n": request.n,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
        "seed": s.seed,
    }
    if s.stop:
        kwargs["stop"] = list(s.stop)
    if request.logprobs is not None:
        kwargs["logprobs"] = request.logprobs
    return kwargs
