"""A stand-in for the ``vllm`` package that records what tpo hands to vLLM and answers in vLLM's shapes.

There is no GPU on the test machines, so tests put this module's fake in ``sys.modules``
for the duration of one test; never import it as ``vllm``::

    vllm_stub = load_stub("tpo_tests_vllm_stub", "vllm_stub.py")   # from tests/stubs/__init__.py

    def test_something(monkeypatch):
        fake = vllm_stub.install(monkeypatch, max_model_len=2048)
        policy = VLLMPolicy.from_spec("some/model", tensor_parallel_size=2)
        ...
        assert fake.engines[0].engine_args["tensor_parallel_size"] == 2
        assert len(fake.calls_to("chat")) == 1

What it mirrors (checked against vLLM's ``vllm/entrypoints/llm.py``, ``vllm/outputs.py``,
``vllm/sampling_params.py`` and ``vllm/logprobs.py``, 0.10-0.11 era and main):

* ``LLM(model, **engine_args)``: engine arguments are recorded; a name that vLLM's
  ``EngineArgs`` does not know raises ``TypeError`` as the real constructor does
  (``accept_any_engine_arg=True`` turns that off). ``llm.model_config.max_model_len`` and
  ``llm.llm_engine.model_config.max_model_len`` hold the context window.
* ``LLM.chat(messages, sampling_params=None, use_tqdm=True, ...)``: one conversation or a
  list of them; one ``SamplingParams`` for all or a list of the same length. Returns one
  ``RequestOutput`` per conversation with ``n`` ``CompletionOutput`` s (``text``,
  ``token_ids``, ``finish_reason`` "stop"/"length", ``logprobs`` as a list of
  ``{token_id: Logprob}`` per generated token when ``SamplingParams.logprobs`` is set).
* ``LLM.reward`` (``PoolingRequestOutput``, ``.outputs.data`` a tensor), ``LLM.classify``
  (``.outputs.probs``), ``LLM.embed`` (``.outputs.embedding``), ``LLM.score`` (``.outputs.score``).
* ``llm.get_tokenizer()``: the whitespace tokenizer of ``vllm_base.py`` (no BOS in its template).

Every method call is recorded in ``fake.calls`` (method name, positional and keyword
arguments). Behaviour is scripted with functions passed to ``install``; ``fake.fail_next``
makes the next call of a method raise.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stubs.vllm_base import (
    Engine,
    FakeTokenizer,
    ModelConfig,
    allow_real_requests,
    break_import,
    hide,
    install_module,
)

__all__ = [
    "KNOWN_ENGINE_ARGS",
    "Call",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "FakeTokenizer",
    "FakeVLLM",
    "Logprob",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "RequestOutput",
    "SamplingParams",
    "ScoringOutput",
    "ScoringRequestOutput",
    "allow_real_requests",
    "break_import",
    "hide",
    "install",
]

#: Names vLLM's ``LLM``/``EngineArgs`` accept (a representative subset of the real, much longer list).
KNOWN_ENGINE_ARGS = frozenset(
    {
        "model",
        "runner",
        "convert",
        "task",
        "tokenizer",
        "tokenizer_mode",
        "skip_tokenizer_init",
        "trust_remote_code",
        "allowed_local_media_path",
        "allowed_media_domains",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "dtype",
        "quantization",
        "revision",
        "tokenizer_revision",
        "seed",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "swap_space",
        "cpu_offload_gb",
        "enforce_eager",
        "disable_custom_all_reduce",
        "hf_token",
        "hf_overrides",
        "mm_processor_kwargs",
        "pooler_config",
        "override_pooler_config",
        "compilation_config",
        "structured_outputs_config",
        "attention_config",
        "logits_processors",
        "max_model_len",
        "enable_prefix_caching",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_chunked_prefill",
        "kv_cache_dtype",
        "block_size",
        "max_logprobs",
        "logprobs_mode",
        "load_format",
        "download_dir",
        "distributed_executor_backend",
        "disable_log_stats",
        "generation_config",
        "served_model_name",
        "max_seq_len_to_capture",
        "enable_lora",
        "max_lora_rank",
        "max_loras",
        "speculative_config",
        "limit_mm_per_prompt",
        "worker_cls",
        "num_gpu_blocks_override",
        "calculate_kv_scales",
    }
)


# ---------------------------------------------------------------------------- vLLM's value types


@dataclass
class SamplingParams:
    """vLLM's ``SamplingParams``: the fields tpo may set, with vLLM's names, defaults and checks."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # The same ranges vLLM validates (it raises a ValueError subclass).
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs < -1:
            raise ValueError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")


class PoolingParams:
    """vLLM's ``PoolingParams``: keyword fields, recorded as given."""

    def __init__(self, **fields: Any) -> None:
        self.fields = dict(fields)
        for k, v in fields.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"PoolingParams({self.fields!r})"


@dataclass
class Logprob:
    """vLLM's ``Logprob``: one token's log-probability, its rank in the vocabulary and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vLLM's ``CompletionOutput``: one of the ``n`` sequences of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """vLLM's ``RequestOutput``: what ``LLM.chat``/``LLM.generate`` return per prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int | None = None


@dataclass
class PoolingOutput:
    """vLLM's ``PoolingOutput``: ``data`` is a tensor."""

    data: Any


@dataclass
class EmbeddingOutput:
    """vLLM's ``EmbeddingOutput``."""

    embedding: list[float]


@dataclass
class ClassificationOutput:
    """vLLM's ``ClassificationOutput``: class probabilities."""

    probs: list[float]


@dataclass
class ScoringOutput:
    """vLLM's ``ScoringOutput``: one similarity/relevance score."""

    score: float


@dataclass
class PoolingRequestOutput:
    """vLLM's ``PoolingRequestOutput`` (and, by subclass, the embedding/classification/scoring ones)."""

    request_id: str
    outputs: Any
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = True


class EmbeddingRequestOutput(PoolingRequestOutput):
    """vLLM's ``EmbeddingRequestOutput``."""


class ClassificationRequestOutput(PoolingRequestOutput):
    """vLLM's ``ClassificationRequestOutput``."""


class ScoringRequestOutput(PoolingRequestOutput):
    """vLLM's ``ScoringRequestOutput``."""


# ---------------------------------------------------------------------------- the engine


@dataclass
class Call:
    """One call of an ``LLM`` method: its name, positional and keyword arguments, and the engine."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    engine: Any = None


#: ``reply(conversation, params, index) -> text`` or ``(text, finish_reason)``.
ReplyFn = Callable[[list[dict[str, Any]], SamplingParams, int], Any]
#: ``values(prompt) -> list[float]`` for the pooling methods (prompt as given to vLLM).
PoolFn = Callable[[Any], Sequence[float]]


def default_reply(conversation: list[dict[str, Any]], params: SamplingParams, index: int) -> str:
    """A distinct, predictable reply: the sample index, the seed and the last user words."""
    last = str(conversation[-1].get("content", "")).split()
    return f"sample {index} seed {params.seed} says " + " ".join(last[:6])


def default_pool(prompt: Any) -> list[float]:
    """A score that depends on the prompt only: its length in characters, scaled."""
    text = prompt if isinstance(prompt, str) else str(prompt)
    return [len(text) / 100.0]


@dataclass
class FakeVLLM:
    """The state behind one installed stand-in: every engine built and every call made."""

    module: types.ModuleType
    max_model_len: int = 4096
    reply: ReplyFn = default_reply
    pool: PoolFn = default_pool
    accept_any_engine_arg: bool = False
    engines: list[Any] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    _failures: dict[str, list[BaseException]] = field(default_factory=dict)

    def calls_to(self, method: str) -> list[Call]:
        """The calls of one method (``"chat"``, ``"reward"``, ``"classify"``, ...), in order."""
        return [c for c in self.calls if c.method == method]

    def fail_next(self, method: str, error: BaseException) -> None:
        """Make the next call of ``method`` (or of the constructor, ``"__init__"``) raise ``error``."""
        self._failures.setdefault(method, []).append(error)

    def _maybe_fail(self, method: str) -> None:
        queue = self._failures.get(method)
        if queue:
            raise queue.pop(0)


def _tensor(values: Sequence[float]) -> Any:
    try:
        import torch
    except ImportError:  # pooling outputs are tensors in vLLM; fall back to a list without torch
        return list(values)
    return torch.tensor(list(values), dtype=torch.float32)


def _make_llm_class(state: FakeVLLM) -> type:
    class LLM:
        """The stand-in ``vllm.LLM``."""

        def __init__(self, model: str, **engine_args: Any) -> None:
            state._maybe_fail("__init__")
            if not state.accept_any_engine_arg:
                unknown = sorted(set(engine_args) - KNOWN_ENGINE_ARGS)
                if unknown:
                    raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
            self.model = model
            self.engine_args = dict(engine_args)
            window = engine_args.get("max_model_len") or state.max_model_len
            self._tokenizer = FakeTokenizer()
            self.model_config = ModelConfig(window)
            self.llm_engine = Engine(self.model_config, self._tokenizer)
            self._next_request = 0
            state.engines.append(self)

        def get_tokenizer(self) -> FakeTokenizer:
            return self._tokenizer

        def _record(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state.calls.append(Call(method, args, kwargs, self))
            state._maybe_fail(method)

        # -------------------------------------------------------------- generation

        def chat(
            self,
            messages: Any,
            sampling_params: SamplingParams | list[SamplingParams] | None = None,
            use_tqdm: Any = True,
            lora_request: Any = None,
            chat_template: str | None = None,
            chat_template_content_format: str = "auto",
            add_generation_prompt: bool = True,
            continue_final_message: bool = False,
            tools: Any = None,
            chat_template_kwargs: dict[str, Any] | None = None,
            tokenization_kwargs: dict[str, Any] | None = None,
            mm_processor_kwargs: dict[str, Any] | None = None,
        ) -> list[RequestOutput]:
            self._record(
                "chat",
                (messages,),
                {
                    "sampling_params": sampling_params,
                    "use_tqdm": use_tqdm,
                    "lora_request": lora_request,
                    "chat_template": chat_template,
                    "chat_template_content_format": chat_template_content_format,
                    "add_generation_prompt": add_generation_prompt,
                    "continue_final_message": continue_final_message,
                    "tools": tools,
                    "chat_template_kwargs": chat_template_kwargs,
                    "tokenization_kwargs": tokenization_kwargs,
                    "mm_processor_kwargs": mm_processor_kwargs,
                },
            )
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a conversation or a non-empty list of conversations")
            conversations = messages if isinstance(messages[0], list) else [messages]
            params = self._params_for(sampling_params, len(conversations))
            prompts = [
                (self._tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt), c)
                for c in conversations
            ]
            return [self._complete(text, conv, p) for (text, conv), p in zip(prompts, params, strict=True)]

        def _params_for(self, sampling_params: Any, count: int) -> list[SamplingParams]:
            if sampling_params is None:
                return [SamplingParams()] * count
            if isinstance(sampling_params, SamplingParams):
                return [sampling_params] * count
            params = list(sampling_params)
            if len(params) != count:
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
            for p in params:
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"expected SamplingParams, got {type(p).__name__}")
            return params

        def _complete(
            self, prompt_text: str, conversation: list[dict[str, Any]], params: SamplingParams
        ) -> RequestOutput:
            prompt_ids = self._tokenizer.encode(prompt_text, add_special_tokens=False)
            outputs = []
            for i in range(params.n):
                got = state.reply(conversation, params, i)
                text, finish = (got, "stop") if isinstance(got, str) else got
                ids = self._tokenizer.encode(text, add_special_tokens=False)
                limit = params.max_tokens if params.max_tokens is not None else len(ids)
                if len(ids) > limit:
                    ids, finish = ids[:limit], "length"
                    text = self._tokenizer.decode(ids)
                logprobs = self._logprobs(ids, params.logprobs) if params.logprobs is not None else None
                cumulative = (
                    sum(pos[t].logprob for pos, t in zip(logprobs, ids, strict=True)) if logprobs is not None else None
                )
                outputs.append(CompletionOutput(i, text, ids, cumulative, logprobs, finish))
            request_id = str(self._next_request)
            self._next_request += 1
            return RequestOutput(request_id, prompt_text, prompt_ids, None, outputs, True, 0)

        def _logprobs(self, ids: list[int], k: int) -> list[dict[int, Logprob]]:
            # The sampled token always appears; it is rank 1 here, followed by k-1 made-up rivals.
            out = []
            for pos, tid in enumerate(ids):
                entry = {tid: Logprob(-0.25, 1, self._tokenizer.decode([tid]))}
                for r in range(2, max(k, 1) + 1):
                    rival = 10_000 + r
                    entry[rival] = Logprob(-0.25 - r - pos / 10, r, f"alt{r}")
                out.append(entry)
            return out

        # -------------------------------------------------------------- pooling

        def reward(
            self,
            prompts: Any,
            /,
            *,
            pooling_params: Any = None,
            truncate_prompt_tokens: int | None = None,
            use_tqdm: Any = True,
            lora_request: Any = None,
            tokenization_kwargs: dict[str, Any] | None = None,
        ) -> list[PoolingRequestOutput]:
            self._record(
                "reward",
                (prompts,),
                {
                    "pooling_params": pooling_params,
                    "use_tqdm": use_tqdm,
                    "truncate_prompt_tokens": truncate_prompt_tokens,
                },
            )
            return self._pool(prompts, lambda v: PoolingOutput(_tensor(v)), PoolingRequestOutput)

        def classify(
            self,
            prompts: Any,
            /,
            *,
            pooling_params: Any = None,
            use_tqdm: Any = True,
            lora_request: Any = None,
            tokenization_kwargs: dict[str, Any] | None = None,
        ) -> list[ClassificationRequestOutput]:
            self._record("classify", (prompts,), {"pooling_params": pooling_params, "use_tqdm": use_tqdm})
            return self._pool(prompts, lambda v: ClassificationOutput(list(v)), ClassificationRequestOutput)

        def embed(
            self,
            prompts: Any,
            /,
            *,
            truncate_prompt_tokens: int | None = None,
            use_tqdm: Any = True,
            pooling_params: Any = None,
            lora_request: Any = None,
            tokenization_kwargs: dict[str, Any] | None = None,
        ) -> list[EmbeddingRequestOutput]:
            self._record("embed", (prompts,), {"pooling_params": pooling_params, "use_tqdm": use_tqdm})
            return self._pool(prompts, lambda v: EmbeddingOutput(list(v)), EmbeddingRequestOutput)

        def score(
            self,
            data_1: Any,
            data_2: Any,
            /,
            *,
            use_tqdm: Any = True,
            pooling_params: Any = None,
            lora_request: Any = None,
            tokenization_kwargs: dict[str, Any] | None = None,
            chat_template: str | None = None,
        ) -> list[ScoringRequestOutput]:
            self._record("score", (data_1, data_2), {"pooling_params": pooling_params, "use_tqdm": use_tqdm})
            left = [data_1] if isinstance(data_1, (str, dict)) else list(data_1)
            right = [data_2] if isinstance(data_2, (str, dict)) else list(data_2)
            if len(left) == 1:
                left = left * len(right)
            if len(left) != len(right):
                raise ValueError("data_1 and data_2 must have the same length, or data_1 one item")
            out = []
            for a, b in zip(left, right, strict=True):
                value = float(state.pool((a, b))[0])
                out.append(ScoringRequestOutput(str(self._next_request), ScoringOutput(value), []))
                self._next_request += 1
            return out

        def _pool(self, prompts: Any, wrap: Callable[[Sequence[float]], Any], cls: type) -> list[Any]:
            seq = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
            out = []
            for prompt in seq:
                values = [float(v) for v in state.pool(prompt)]
                if any(math.isnan(v) for v in values):
                    raise ValueError("the pool function returned NaN")
                text = prompt if isinstance(prompt, str) else str(prompt)
                ids = self._tokenizer.encode(text, add_special_tokens=False)
                out.append(cls(str(self._next_request), wrap(values), ids))
                self._next_request += 1
            return out

    return LLM


# ---------------------------------------------------------------------------- installing


def install(
    monkeypatch: Any,
    *,
    max_model_len: int = 4096,
    reply: ReplyFn | None = None,
    pool: PoolFn | None = None,
    accept_any_engine_arg: bool = False,
) -> FakeVLLM:
    """Put a fresh stand-in at ``sys.modules["vllm"]`` (and its submodules) for one test.

    ``reply`` scripts the generated texts, ``pool`` the numbers of the pooling methods.
    ``monkeypatch`` (pytest's fixture) restores the real state afterwards.
    """
    module = types.ModuleType("vllm", "A test stand-in for vllm (tests/stubs/vllm_stub.py).")
    state = FakeVLLM(
        module,
        max_model_len=max_model_len,
        reply=reply or default_reply,
        pool=pool or default_pool,
        accept_any_engine_arg=accept_any_engine_arg,
    )
    exported = {
        "LLM": _make_llm_class(state),
        "SamplingParams": SamplingParams,
        "PoolingParams": PoolingParams,
        "RequestOutput": RequestOutput,
        "CompletionOutput": CompletionOutput,
        "PoolingRequestOutput": PoolingRequestOutput,
        "EmbeddingRequestOutput": EmbeddingRequestOutput,
        "ClassificationRequestOutput": ClassificationRequestOutput,
        "ScoringRequestOutput": ScoringRequestOutput,
        "__version__": "0.11.0+stub",
    }
    submodules = {
        "outputs": (
            RequestOutput,
            CompletionOutput,
            PoolingOutput,
            PoolingRequestOutput,
            EmbeddingOutput,
            EmbeddingRequestOutput,
            ClassificationOutput,
            ClassificationRequestOutput,
            ScoringOutput,
            ScoringRequestOutput,
        ),
        "sampling_params": (SamplingParams,),
        "pooling_params": (PoolingParams,),
        "logprobs": (Logprob,),
    }
    install_module(
        monkeypatch, module, exported, {sub: {c.__name__: c for c in classes} for sub, classes in submodules.items()}
    )
    return state
