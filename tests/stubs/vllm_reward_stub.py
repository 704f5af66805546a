"""A stand-in for ``vllm``'s pooling side (``LLM.classify``, ``LLM.reward``), recording what tpo hands it.

There is no GPU on the test machines, so tests put this fake at ``sys.modules["vllm"]`` for
one test (``install(monkeypatch, ...)``). It plays three generations of vLLM's API, checked
against vLLM's sources (``vllm/entrypoints/llm.py``, ``vllm/pooling_params.py``,
``vllm/config/pooler.py``, ``vllm/model_executor/layers/pooler``) and docs
(``docs/models/pooling_models``):

``"current"`` (0.11.1 and later)
    ``LLM(model, runner="pooling", pooler_config=...)``; ``PoolingParams(use_activation=...)``.
``"0.10"``
    ``runner="pooling"``; ``PoolingParams(activation=...)`` for classify and
    ``PoolingParams(softmax=...)`` for reward; no ``use_activation``.
``"0.8"``
    ``LLM(model, task="classify"|"reward", override_pooler_config=PoolerConfig(softmax=...))``;
    ``PoolingParams`` has no activation switch at all.

The model is a "reward model" whose logits are computed from the token ids handed to it, so
a test can predict every number: label ``k`` of a sequence is ``len(ids) / 10 + k`` plus
``bonus(answer)`` for the assistant's text. As in vLLM, ``classify`` returns the sequence's
logits after the activation (sigmoid for one label, softmax for more) unless the request or
the pooler config switches it off, and ``reward`` returns one row per token (the last row is
the sequence's), with the same activation rule. Asking a version for a parameter it does
not have raises ``TypeError``, as the real classes do.

The tokenizer is ``vllm_base.py``'s whitespace one, with a Llama-3-like template that writes
``<bos>`` itself (``bos_in_template=True``, the default here) or a Qwen-like one without any
BOS (``bos_token_id=None``). Load this file with ``load_stub`` (``tests/stubs/__init__.py``).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, make_dataclass
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

__all__ = ["VERSIONS", "Call", "FakeTokenizer", "FakeVLLM", "allow_real_requests", "break_import", "hide", "install"]

VERSIONS = ("current", "0.10", "0.8")


class FakeTensor:
    """Just enough of a torch tensor: ``tolist()``."""

    def __init__(self, values: Any) -> None:
        self._values = values

    def tolist(self) -> Any:
        return self._values


@dataclass
class PoolingOutput:
    data: Any


@dataclass
class ClassificationOutput:
    probs: list[float]


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: Any
    prompt_token_ids: list[int]
    finished: bool = True


class ClassificationRequestOutput(PoolingRequestOutput):
    pass


@dataclass
class Call:
    method: str
    prompts: list[Any]
    kwargs: dict[str, Any]


@dataclass
class FakeVLLM:
    """The state of one installed stand-in."""

    module: types.ModuleType
    version: str
    num_labels: int
    max_model_len: int
    bonus: Callable[[str], float]
    tokenizer_kwargs: dict[str, Any]
    engines: list[Any] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    fail_next: list[BaseException] = field(default_factory=list)

    def logits(self, llm: Any, ids: Sequence[int]) -> list[float]:
        """The raw logits the fake model gives a sequence of token ids."""
        text = llm.get_tokenizer().decode(ids)
        answer = text.rsplit("<|assistant|>", 1)[-1].replace("<|end|>", "").strip() if "<|assistant|>" in text else ""
        base = len(ids) / 10 + self.bonus(answer)
        return [base + k for k in range(self.num_labels)]


def _activate(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [1 / (1 + math.exp(-v)) for v in values]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _make_classes(state: FakeVLLM) -> dict[str, Any]:
    version = state.version
    pp_fields: tuple[str, ...]
    pooler_fields: tuple[str, ...]
    if version == "current":
        pp_fields = ("truncate_prompt_tokens", "dimensions", "normalize", "use_activation")
        engine_names = {"runner", "convert", "pooler_config", "override_pooler_config"}
        pooler_fields = ("pooling_type", "use_activation", "logit_mean", "logit_sigma")
    elif version == "0.10":
        pp_fields = ("truncate_prompt_tokens", "dimensions", "normalize", "activation", "softmax")
        engine_names = {"runner", "convert", "override_pooler_config"}
        pooler_fields = ("pooling_type", "normalize", "activation", "softmax")
    else:
        pp_fields = ("dimensions", "additional_data")
        engine_names = {"task", "override_pooler_config"}
        pooler_fields = ("pooling_type", "normalize", "softmax")

    PoolingParams = make_dataclass("PoolingParams", [(n, Any, field(default=None)) for n in pp_fields], kw_only=True)
    PoolerConfig = make_dataclass("PoolerConfig", [(n, Any, field(default=None)) for n in pooler_fields], kw_only=True)
    common = {
        "model",
        "tokenizer",
        "trust_remote_code",
        "tensor_parallel_size",
        "dtype",
        "seed",
        "gpu_memory_utilization",
        "max_model_len",
        "enforce_eager",
        "max_num_seqs",
        "disable_log_stats",
    }
    EngineArgs = make_dataclass("EngineArgs", [(n, Any, field(default=None)) for n in sorted(common | engine_names)])

    class LLM:
        """The stand-in ``vllm.LLM`` for pooling models."""

        def __init__(self, model: str, **kwargs: Any) -> None:
            if state.fail_next:
                raise state.fail_next.pop(0)
            known = {f.name for f in fields(EngineArgs)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
            self.model = model
            self.engine_args = dict(kwargs)
            self._tokenizer = FakeTokenizer(**state.tokenizer_kwargs)
            config = ModelConfig(kwargs.get("max_model_len") or state.max_model_len)
            self.llm_engine = Engine(config, self._tokenizer)
            if version != "0.8":  # ``LLM.model_config`` came with 0.10
                self.model_config = config
            pooler = kwargs.get("pooler_config") or kwargs.get("override_pooler_config")
            self._pooler = pooler
            state.engines.append(self)

        def get_tokenizer(self) -> FakeTokenizer:
            return self._tokenizer

        def _activation_on(self, method: str, params: Any) -> bool:
            if version == "current":
                flag = getattr(params, "use_activation", None)
                if flag is None and self._pooler is not None:
                    flag = self._pooler.use_activation
                return flag is not False
            if version == "0.10":
                name = "activation" if method == "classify" else "softmax"
                flag = getattr(params, name, None)
                if flag is None and self._pooler is not None:
                    flag = getattr(self._pooler, name, None)
                return flag is not False
            if method == "reward":
                return False  # 0.8: the reward pooler returns the hidden states/logits as they are
            flag = self._pooler.softmax if self._pooler is not None else None
            return flag is not False

        def _check_runner(self, method: str) -> None:
            if version == "0.8":
                if self.engine_args.get("task") != method:
                    raise ValueError(f"LLM.{method}() is only supported for task={method!r} models")
            elif self.engine_args.get("runner") != "pooling":
                raise ValueError("LLM.encode() is only supported for pooling models. Try passing `--runner pooling`")

        def _run(self, method: str, prompts: Any, pooling_params: Any, use_tqdm: Any) -> list[Any]:
            self._check_runner(method)
            seq = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
            state.calls.append(Call(method, seq, {"pooling_params": pooling_params, "use_tqdm": use_tqdm}))
            if state.fail_next:
                raise state.fail_next.pop(0)
            if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
                raise TypeError(f"pooling_params must be PoolingParams, got {type(pooling_params).__name__}")
            out: list[Any] = []
            for i, prompt in enumerate(seq):
                ids = list(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else self._tokenizer.encode(prompt)
                if len(ids) > self.llm_engine.model_config.max_model_len:
                    raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length")
                on = self._activation_on(method, pooling_params)
                if method == "classify":
                    values = state.logits(self, ids)
                    out.append(
                        ClassificationRequestOutput(
                            str(i), ClassificationOutput(_activate(values) if on else values), ids
                        )
                    )
                else:
                    rows = [state.logits(self, ids[: t + 1]) for t in range(len(ids))]
                    rows = [_activate(r) if on else r for r in rows]
                    out.append(PoolingRequestOutput(str(i), PoolingOutput(FakeTensor(rows)), ids))
            return out

        def classify(
            self, prompts: Any, /, *, pooling_params: Any = None, use_tqdm: Any = True, lora_request: Any = None
        ) -> list[Any]:
            return self._run("classify", prompts, pooling_params, use_tqdm)

        def _reward_0_8(
            self, prompts: Any, /, *, truncate_prompt_tokens: Any = None, use_tqdm: Any = True, lora_request: Any = None
        ) -> list[Any]:
            return self._run("reward", prompts, None, use_tqdm)

        def _reward(
            self,
            prompts: Any,
            /,
            *,
            pooling_params: Any = None,
            truncate_prompt_tokens: Any = None,
            use_tqdm: Any = True,
            lora_request: Any = None,
        ) -> list[Any]:
            return self._run("reward", prompts, pooling_params, use_tqdm)

        # 0.8's LLM.reward takes no pooling parameters: passing them is a TypeError there.
        reward = _reward_0_8 if version == "0.8" else _reward

    return {"LLM": LLM, "PoolingParams": PoolingParams, "PoolerConfig": PoolerConfig, "EngineArgs": EngineArgs}


def install(
    monkeypatch: Any,
    *,
    version: str = "current",
    num_labels: int = 1,
    max_model_len: int = 4096,
    bonus: Callable[[str], float] | None = None,
    bos_in_template: bool = True,
    bos_token_id: int | None = 1,
) -> FakeVLLM:
    """Put a fresh stand-in at ``sys.modules["vllm"]`` (with ``vllm.config``) for one test."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}")
    module = types.ModuleType("vllm", "A test stand-in for vllm's pooling API (tests/stubs/vllm_reward_stub.py).")
    state = FakeVLLM(
        module,
        version,
        num_labels,
        max_model_len,
        bonus or (lambda answer: 0.0),
        {"bos_in_template": bos_in_template, "bos_token_id": bos_token_id},
    )
    classes = _make_classes(state)
    version_name = {"current": "0.12.0+stub", "0.10": "0.10.1+stub", "0.8": "0.8.5+stub"}[version]
    exported = {name: classes[name] for name in ("LLM", "PoolingParams", "EngineArgs")}
    install_module(
        monkeypatch,
        module,
        {**exported, "__version__": version_name},
        {"config": {"PoolerConfig": classes["PoolerConfig"]}},
    )
    return state
