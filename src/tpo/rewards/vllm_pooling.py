"""A reward model run by vLLM's pooling runner in this process: a whole batch of answers in one call.

::

    reward = VLLMReward.from_spec("Skywork/Skywork-Reward-V2-Llama-3.1-8B")       # --reward vllm:...

What vLLM does, checked in its sources and docs (``vllm/entrypoints/llm.py``,
``vllm/pooling_params.py``, ``vllm/config/pooler.py``, ``docs/models/pooling_models/``):

* The model is loaded with ``LLM(model, runner="pooling")`` (0.10 and later); releases
  before that take ``task="classify"`` or ``task="reward"`` instead, which is used when the
  installed ``vllm.EngineArgs`` has no ``runner``.
* ``method="classify"`` (the default) calls ``LLM.classify``: the sequence classifier's head
  at the last token, one vector per answer (``outputs.probs``). That is the paper's kind of
  reward model (``*ForSequenceClassification``: FsfairX, Tulu-3 RM, Skywork-Reward).
* ``method="reward"`` calls ``LLM.reward``: one vector per *token* (the ``token_classify``
  task; process and token reward models such as ``Qwen2ForRewardModel``); the last token's
  vector is the answer's.
* vLLM applies an activation to both by default: sigmoid when the head has one output,
  softmax over the outputs otherwise. With ``raw=True`` (the default) tpo switches it off so
  that the score is the raw logit, as ``AutoModelForSequenceClassification`` gives and as the
  ``hf:`` reward returns: ``PoolingParams(use_activation=False)`` (0.11.1 and later),
  ``PoolingParams(activation=False)`` / ``(softmax=False)`` (0.10-0.11.0), or
  ``override_pooler_config=PoolerConfig(softmax=False)`` (before 0.10). ``raw=False`` keeps
  vLLM's probabilities. The sigmoid keeps the order of answers, so selection is the same
  either way with a one-output head; weights in a combined reward are not.

The input is the model's chat template applied to the conversation plus the answer as the
assistant's turn (``add_generation_prompt=False``), tokenised here and handed to vLLM as
token ids, so a template that writes the beginning-of-sequence token itself does not get a
second one, and a tokenizer that prepends one to every text gets exactly one, as in the
``hf:`` reward. A conversation too long for ``max_model_len`` loses its oldest turns first
(recorded in the score's details); an answer that does not fit even then fails alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .._local import refuse_loading_options
from .._local import vllm as _vllm
from ..errors import ConfigError, RewardError
from ..options import flag, integer, one_of, option
from ..types import Score, ScoreRequest

__all__ = ["METHODS", "VLLMReward", "VLLMRewardOptions"]

#: The vLLM methods a reward can be read from.
METHODS = ("classify", "reward")

_OWNER = "the vllm reward"


@dataclass(frozen=True)
class VLLMRewardOptions(_vllm.EngineOptions):
    """The options of ``VLLMReward`` (``--reward-option NAME=VALUE``): its own three, then vLLM engine options."""

    owner: ClassVar[str] = _OWNER

    method: str = option("classify", one_of(*METHODS), "LLM.classify (a sequence classifier) or LLM.reward (per token)")
    index: int = option(0, integer(min=0), "which output of the head is the score")
    raw: bool = option(True, flag(), "raw logits rather than vLLM's sigmoid or softmax")


class VLLMReward:
    """Scores answers with a reward model in an in-process ``vllm.LLM``; a batch is one vLLM call.

    ``llm`` is a ready ``vllm.LLM`` loaded with the pooling runner; ``from_spec`` builds one.
    ``pooling_params`` is what every call passes to vLLM (``None``: vLLM's defaults), and
    ``raw`` only says, for the record, whether those return raw logits. ``index`` picks the
    output of a head with several. Calls run in a worker thread, one at a time.
    """

    name = "vllm"
    batching = True
    supports_n = False
    supports_logprobs = False
    description = "A reward model in vLLM's pooling runner in this process (GPU): LLM.classify or LLM.reward, batched."
    options_class = VLLMRewardOptions

    def __init__(
        self,
        llm: Any,
        *,
        options: VLLMRewardOptions | None = None,
        pooling_params: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Wrap a loaded engine; ``method``, ``index`` and ``raw`` as keywords or in ``options``."""
        refuse_loading_options(kwargs, _vllm.EngineOptions.names(), owner=_OWNER, loads="engine")
        opts = self.options = VLLMRewardOptions.from_options(kwargs, base=options)
        method, index, raw = opts.method, opts.index, opts.raw
        if not callable(getattr(llm, method, None)):
            raise ConfigError(
                f"{_OWNER}: this vLLM has no LLM.{method}(); choose the other method ({' or '.join(METHODS)})"
            )
        self._llm: Any = llm
        self.method = method
        self.index = index
        self.raw = raw
        self._pooling_params = pooling_params
        self._tokenizer: Any = None
        self._bos_id: int | None = None
        # A thread lock, not an asyncio one: callers may drive us from several event loops.
        self._lock = threading.Lock()
        if name is not None:
            self.name = name

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> VLLMReward:
        """Load ``target`` (a model id or a local path) into a new ``vllm.LLM`` with the pooling runner.

        Options: ``method`` (``classify`` or ``reward``), ``index``, ``raw`` (default true: raw
        logits), ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
        ``dtype``, ``seed``, ``trust_remote_code``, and ``engine_args``: a mapping of any
        further ``vllm.EngineArgs``.
        """
        if not target.strip():
            raise ConfigError("the vllm reward needs a model: --reward vllm:MODEL_OR_PATH")
        opts = VLLMRewardOptions.from_options(options)
        method, raw = opts.method, opts.raw
        engine_kwargs = _vllm.engine_kwargs(opts, options)
        vllm = _vllm.import_vllm("The vllm reward", RewardError)
        engine_kwargs.update(_runner_kwargs(vllm, method, engine_kwargs))
        pooling_params = None
        if raw:
            pooling_params = _raw_pooling_params(vllm, method)
            if pooling_params is None and method == "classify":
                engine_kwargs.update(_raw_pooler_config(vllm, engine_kwargs))
        name = f"vllm:{target}"
        llm = _vllm.load_llm(vllm, target, engine_kwargs, name=name, error=RewardError)
        return cls(llm, options=opts, pooling_params=pooling_params, name=name)

    # ------------------------------------------------------------------ the protocol

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """One vLLM call for every answer that fits; one score each, in order."""
        if not requests:
            return []
        return await asyncio.to_thread(self._score_sync, list(requests))

    async def aclose(self) -> None:
        """Drop the engine so that its GPU memory can be freed."""
        with self._lock:
            self._llm = None
            self._tokenizer = None
        gc.collect()

    # ------------------------------------------------------------------ scoring

    def _score_sync(self, requests: list[ScoreRequest]) -> list[Score]:
        with self._lock:
            llm = self._llm
            if llm is None:
                raise RewardError(f"{self.name} was closed")
            limit = _vllm.max_model_len(llm)
            tokenizer = self._get_tokenizer(llm)
            out: list[Score | None] = [None] * len(requests)
            prompts: list[dict[str, list[int]]] = []
            rows: list[int] = []
            dropped: dict[int, int] = {}
            for i, r in enumerate(requests):
                try:
                    ids, cut = self._encode(tokenizer, r, limit)
                except _TooLong as e:
                    out[i] = Score.failed(str(e))
                    continue
                except Exception as e:  # a template that rejects this conversation: that answer fails
                    out[i] = Score.failed(f"the chat template failed: {type(e).__name__}: {e}")
                    continue
                prompts.append({"prompt_token_ids": ids})
                rows.append(i)
                if cut:
                    dropped[i] = cut
            if prompts:
                outputs = self._call(llm, prompts)
                for i, output in zip(rows, outputs, strict=True):
                    score = self._read(output)
                    if i in dropped and score.value is not None:
                        score = Score(score.value, details={"dropped_turns": dropped[i]})
                    out[i] = score
        return [s if s is not None else Score.failed("not scored") for s in out]

    def _call(self, llm: Any, prompts: list[dict[str, list[int]]]) -> list[Any]:
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self._pooling_params is not None:
            kwargs["pooling_params"] = self._pooling_params
        try:
            outputs = list(getattr(llm, self.method)(prompts, **kwargs))
        except Exception as e:
            raise RewardError(f"vLLM failed on a batch of {len(prompts)} answers: {type(e).__name__}: {e}") from e
        if len(outputs) != len(prompts):
            raise RewardError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} answers")
        return outputs

    def _read(self, output: Any) -> Score:
        result = getattr(output, "outputs", None)
        values = getattr(result, "probs", None) if self.method == "classify" else None
        if values is None:
            values = getattr(result, "data", None)
        if values is None:
            return Score.failed(f"vLLM returned an output without probs or data: {type(result).__name__}")
        values = values.tolist() if hasattr(values, "tolist") else values
        if self.method == "reward":
            # Token-wise: one row per token, or one number per token; the last token's is the answer's.
            prompt_ids = getattr(output, "prompt_token_ids", None)
            if values and isinstance(values[-1], list):
                values = values[-1]
            elif prompt_ids is not None and len(values) == len(prompt_ids):
                values = values[-1:]
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            return Score.failed(f"vLLM returned {str(values)[:80]}, not a vector of numbers")
        if self.index >= len(values):
            return Score.failed(f"the model has {len(values)} output(s); index {self.index} is out of range")
        value = float(values[self.index])
        if not math.isfinite(value):
            return Score.failed(f"the model returned {value} for this answer")
        return Score(value)

    def _encode(self, tokenizer: Any, request: ScoreRequest, limit: int | None) -> tuple[list[int], int]:
        """Token ids of the rendered conversation and answer, and how many old messages were dropped to fit."""
        messages = [m.as_dict() for m in request.messages]
        answer = {"role": "assistant", "content": request.answer}
        # The oldest user/assistant pair goes first; a system message and the last user turn stay.
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        body = messages[len(head) :]
        dropped = 0
        while True:
            text = tokenizer.apply_chat_template([*head, *body, answer], tokenize=False, add_generation_prompt=False)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if self._bos_id is not None and (not ids or ids[0] != self._bos_id):
                ids.insert(0, self._bos_id)
            if limit is None or len(ids) <= limit:
                return ids, dropped
            if len(body) <= 1:
                raise _TooLong(
                    f"the answer and its prompt take {len(ids)} tokens, more than the model's {limit} "
                    f"(max_model_len) even without earlier turns"
                )
            kept = body[2:] if len(body) > 2 else body[-1:]
            dropped += len(body) - len(kept)  # messages, as the hf reward counts them
            body = kept

    def _get_tokenizer(self, llm: Any) -> Any:
        if self._tokenizer is None:
            tokenizer = _vllm.engine_tokenizer(llm)
            if tokenizer is None:
                # The chat template is rendered here, so an engine without a tokenizer cannot score.
                raise RewardError(f"{self.name}: the vLLM engine has no tokenizer (built with skip_tokenizer_init?)")
            bos = getattr(tokenizer, "bos_token_id", None)
            # Prepended only when the tokenizer puts it in front of every text it encodes.
            try:
                probe = list(tokenizer.encode("x", add_special_tokens=True)) if bos is not None else []
            except Exception as e:
                raise RewardError(f"{self.name}: the vLLM engine's tokenizer failed: {type(e).__name__}: {e}") from e
            self._bos_id = int(bos) if bos is not None and probe and probe[0] == bos else None
            self._tokenizer = tokenizer
        return self._tokenizer


class _TooLong(Exception):
    """An answer that does not fit the model's context even with the conversation cut down."""


# ---------------------------------------------------------------------------- version differences


def _field_names(cls: Any) -> set[str] | None:
    """The constructor fields of a vLLM config class (msgspec struct or dataclass), or None if unknown."""
    if cls is None:
        return None
    struct_fields = getattr(cls, "__struct_fields__", None)
    if struct_fields is not None:
        return set(struct_fields)
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return None


def _runner_kwargs(vllm: Any, method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    if "runner" in given or "task" in given:
        return {}
    names = _field_names(getattr(vllm, "EngineArgs", None))
    if names is not None and "runner" not in names and "task" in names:
        return {"task": method}  # before 0.10
    return {"runner": "pooling"}


def _raw_pooling_params(vllm: Any, method: str) -> Any:
    """Per-request parameters that switch vLLM's activation off, or None when this version has none."""
    cls = getattr(vllm, "PoolingParams", None)
    if cls is None:
        return None
    names = _field_names(cls) or set()
    if "use_activation" in names:
        return cls(use_activation=False)
    legacy = "activation" if method == "classify" else "softmax"
    if legacy in names:
        return cls(**{legacy: False})
    return None


def _raw_pooler_config(vllm: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """An engine-wide pooler config without softmax, for releases whose requests cannot switch it off."""
    if "pooler_config" in given or "override_pooler_config" in given:
        return {}
    try:
        from vllm.config import PoolerConfig
    except ImportError as e:
        raise ConfigError(
            f"{_OWNER}: this vLLM ({getattr(vllm, '__version__', '?')}) offers no way to get raw logits; "
            "set raw=false to use its probabilities"
        ) from e
    names = _field_names(PoolerConfig) or set()
    if "softmax" not in names:
        raise ConfigError(
            f"{_OWNER}: this vLLM ({getattr(vllm, '__version__', '?')}) offers no way to get raw logits; "
            "set raw=false to use its probabilities"
        )
    engine_names = _field_names(getattr(vllm, "EngineArgs", None)) or set()
    key = "pooler_config" if "pooler_config" in engine_names else "override_pooler_config"
    return {key: PoolerConfig(softmax=False)}
