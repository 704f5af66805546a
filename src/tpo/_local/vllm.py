"""What the in-process vLLM policy and the vLLM reward share: importing vLLM, engine options, loading, the engine's facts.

vLLM itself is imported only inside these functions, never when this module is. A function
that can fail at run time takes ``error``, the caller's exception class (``BackendError`` or
``RewardError``, or a ``functools.partial`` of one that fills in its keyword fields), so each
caller keeps its own place in the error hierarchy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._guard import check_real_request_allowed
from ..errors import ConfigError, MissingDependencyError, RunError
from ..options import PluginOptions, flag, integer, mapping, number, option, string

__all__ = ["EngineOptions", "engine_kwargs", "engine_tokenizer", "import_vllm", "load_llm", "max_model_len"]

#: Builds the caller's run-time error from a message.
ErrorFactory = Callable[[str], RunError]


@dataclass(frozen=True)
class EngineOptions(PluginOptions):
    """The engine options every vLLM plugin takes (its own options extend these); ``None`` leaves vLLM's default."""

    tensor_parallel_size: int | None = option(None, integer(min=1), "GPUs to split the model over")
    gpu_memory_utilization: float | None = option(None, number(0, 1, min_open=True), "share of GPU memory vLLM takes")
    max_model_len: int | None = option(None, integer(min=1), "the context window in tokens")
    dtype: str | None = option(None, string(), "the weights' dtype, as vLLM names it (auto, bfloat16, float16, ...)")
    seed: int | None = option(None, integer(), "the engine's seed")
    trust_remote_code: bool | None = option(None, flag(), "run the model repository's own code")
    engine_args: Mapping[str, Any] | None = option(None, mapping(), 'more vllm.EngineArgs, e.g. {"max_num_seqs": 256}')


#: Options handed to ``vllm.LLM`` under their own name, when a plugin takes them and they are set.
_ENGINE_ARG_NAMES = (
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "dtype",
    "seed",
    "trust_remote_code",
    "enable_prefix_caching",
)


def import_vllm(purpose: str, error: ErrorFactory) -> Any:
    """The ``vllm`` package; ``MissingDependencyError`` naming ``purpose`` if it is not installed.

    An installation that is present but cannot be imported (a CUDA or torch mismatch, a
    missing dependency of vLLM's own) raises ``error`` instead, since installing the extra
    again would not help.
    """
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name is not None and e.name != "vllm" and not e.name.startswith("vllm."):
            raise error(f"vLLM is installed but could not be imported: {e}") from e
        raise MissingDependencyError("vllm", "vllm", purpose) from e
    except ImportError as e:
        raise error(f"vLLM is installed but could not be imported: {e}") from e
    return vllm


def engine_kwargs(opts: EngineOptions, given: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``vllm.LLM`` from a plugin's options (checked already by their declaration).

    ``given`` is what ``from_spec`` received and ``opts`` was built from. The named engine
    options the plugin takes are passed on when set, then every entry of ``engine_args`` on
    top. Giving an option again in ``engine_args`` is a ``ConfigError`` when the user gave it
    (a value other than ``None`` in ``given``), while a plugin's own default (the policy's
    prefix caching, say) may be overridden there.
    """
    owner = opts.owner
    extra = opts.engine_args or {}
    if "model" in extra:
        raise ConfigError(f"{owner}: give the model in the spec (vllm:MODEL), not in engine_args")
    named = {k: getattr(opts, k) for k in _ENGINE_ARG_NAMES if hasattr(opts, k)}
    clash = sorted(k for k in extra if k in named and given.get(k) is not None)
    if clash:
        raise ConfigError(f"{owner}: {', '.join(clash)} given both as an option and in engine_args; give it once")
    kwargs = {k: v for k, v in named.items() if v is not None}
    kwargs.update(extra)
    return kwargs


def load_llm(vllm: Any, target: str, kwargs: Mapping[str, Any], *, name: str, error: ErrorFactory) -> Any:
    """A new ``vllm.LLM`` for ``target``, loaded for the plugin called ``name``.

    Where real model requests are forbidden (``tpo._guard``, as in a test suite) this raises
    ``ConfigError`` before vLLM loads anything. Arguments vLLM refuses are a ``ConfigError``;
    any other failure to load is ``error``.
    """
    check_real_request_allowed(name)
    try:
        return vllm.LLM(model=target, **kwargs)
    except (TypeError, ValueError) as e:  # an engine argument vLLM does not take, or a bad value
        raise ConfigError(f"vLLM rejected the engine arguments for {target!r}: {type(e).__name__}: {e}") from e
    except Exception as e:  # out of GPU memory, no GPU, a model that cannot be loaded, ...
        raise error(f"vLLM could not load {target!r}: {type(e).__name__}: {e}") from e


def max_model_len(llm: Any) -> int | None:
    """The engine's context window in tokens, or ``None`` if it does not say."""
    # ``LLM.model_config`` exists from about 0.10; earlier releases only have it on the engine.
    config = getattr(llm, "model_config", None) or getattr(getattr(llm, "llm_engine", None), "model_config", None)
    window = getattr(config, "max_model_len", None)
    return int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def engine_tokenizer(llm: Any) -> Any:
    """The engine's tokenizer, or ``None`` when it has none (an engine built with ``skip_tokenizer_init``)."""
    try:
        return llm.get_tokenizer()
    except Exception:  # vLLM raises its own error types here, which differ between releases
        return None
