"""What the in-process torch plugins (the hf policy and the hf reward) share: the loading options and one device and dtype rule.

torch and Transformers are never imported here. The callers import them (each with its own
missing-extra message) and pass the modules in, so this module imports without either
installed. ``check_device`` and ``check_dtype`` need neither and can check options before a
slow import or load; the ``resolve_*`` functions ask torch what the machine has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..options import Check, PluginOptions, custom, flag, option

__all__ = [
    "DEVICE_CHOICES",
    "DEVICE_OPTION",
    "DTYPE_CHOICES",
    "DTYPE_OPTION",
    "LoadOptions",
    "check_device",
    "check_dtype",
    "dtype_keyword",
    "resolve_device",
    "resolve_dtype",
]

#: What ``device`` may be, as error messages and docs spell it.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"

#: The canonical dtype names ``check_dtype`` returns.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")

_DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

#: ``from_pretrained`` takes ``dtype`` from this Transformers release on; before it only ``torch_dtype``.
_DTYPE_KEYWORD_SINCE = (4, 56)


def check_device(value: Any, *, owner: str) -> str:
    """``value`` as a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); ``ConfigError`` if it is none.

    A ``torch.device`` is taken by its name. Whether the machine has that device is
    ``resolve_device``'s question.
    """
    name = _torch_object_name(value)
    if name is None or not _DEVICE.fullmatch(name):
        raise ConfigError(f"{owner}: device must be {DEVICE_CHOICES}, got {value!r}")
    return name


def check_dtype(value: Any, *, owner: str) -> str:
    """``value`` as one of ``DTYPE_CHOICES``, its aliases (``bf16``, ``fp16``, ``half``, ...) resolved.

    Case does not matter, and a ``torch.float16`` (or its name, ``"torch.float16"``) is taken
    by its name. Anything else is a ``ConfigError``.
    """
    name = _torch_object_name(value)
    canonical = _DTYPE_ALIASES.get(name.lower().removeprefix("torch.")) if name is not None else None
    if canonical is None:
        raise ConfigError(
            f"{owner}: dtype must be one of {', '.join(DTYPE_CHOICES)} (or bf16, fp16, half, fp32), got {value!r}"
        )
    return canonical


def resolve_device(torch: Any, value: Any, *, owner: str) -> Any:
    """The ``torch.device`` that ``value`` names on this machine; ``ConfigError`` if the machine lacks it.

    ``auto`` is the first CUDA GPU, else Apple's MPS, else the CPU.
    """
    name = check_device(value, owner=owner)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _has_mps(torch) else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{owner}: device {name!r} was asked for, but torch sees no CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{owner}: device {name!r} was asked for, but torch sees {count} CUDA GPU(s), numbered 0 to {count - 1}"
            )
    if device.type == "mps" and not _has_mps(torch):
        raise ConfigError(f"{owner}: device 'mps' was asked for, but this torch has no MPS (Apple GPU) support here")
    return device


def resolve_dtype(torch: Any, value: Any, device: Any, *, owner: str) -> Any:
    """The ``torch.dtype`` for ``value`` on ``device`` (a ``torch.device``).

    ``auto`` is bfloat16 on a CUDA GPU that computes in it natively (compute capability 8 or
    later, or any ROCm GPU), float16 on an older one, and float32 on the CPU and on MPS.
    """
    name = check_dtype(value, owner=owner)
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_has_bf16(torch, device) else torch.float16
    # float32 on MPS, as on the CPU: most current checkpoints are trained in bfloat16 and can overflow
    # float16's range (inf or NaN logits: garbage text from a policy, silently wrong scores from a reward),
    # and bfloat16 on MPS needs macOS 14 and is emulated, slowly, on M1/M2. float32 is right everywhere;
    # dtype=float16 is one option away for a model known to tolerate it.
    return torch.float32


def dtype_keyword(transformers: Any) -> str:
    """The ``from_pretrained`` keyword that sets the dtype: ``dtype`` from Transformers 4.56, ``torch_dtype`` before.

    A version whose leading ``MAJOR.MINOR`` cannot be read gets ``torch_dtype``: every release
    understands it (newer ones as a deprecated alias, with a warning), while ``dtype`` given to
    a release before 4.56 would not set the dtype at all.
    """
    match = re.match(r"\s*(\d+)\.(\d+)", str(getattr(transformers, "__version__", "")))
    if match is None:
        return "torch_dtype"
    return "dtype" if (int(match[1]), int(match[2])) >= _DTYPE_KEYWORD_SINCE else "torch_dtype"


def _torch_object_name(value: Any) -> str | None:
    """A string as it is, a ``torch.device`` or ``torch.dtype`` by its name, anything else ``None``."""
    if isinstance(value, str):
        return value
    if type(value).__module__ == "torch" and type(value).__name__ in ("device", "dtype"):
        return str(value)
    return None


def _has_mps(torch: Any) -> bool:
    mps = getattr(torch.backends, "mps", None)  # absent from some torch builds
    return mps is not None and bool(mps.is_available())


def _cuda_has_bf16(torch: Any, device: Any) -> bool:
    # Not torch.cuda.is_bf16_supported(): it answers for the current GPU rather than ``device``, and since
    # torch 2.3 it says yes to pre-Ampere GPUs that only emulate bfloat16, much slower than float16.
    if getattr(torch.version, "hip", None):
        return True
    major, _minor = torch.cuda.get_device_capability(device)
    return int(major) >= 8


#: The ``device`` option of both hf plugins, declared (``tpo.options``): ``check_device``'s rule.
DEVICE_OPTION: Check = custom(
    lambda value: check_device(value, owner=""), kind="device", description=DEVICE_CHOICES, constraint=DEVICE_CHOICES
)
#: The ``dtype`` option of both hf plugins, declared (``tpo.options``): ``check_dtype``'s rule, stored canonical.
DTYPE_OPTION: Check = custom(
    lambda value: check_dtype(value, owner=""),
    kind="dtype",
    description=f"one of {', '.join(DTYPE_CHOICES)} (or bf16, fp16, half, fp32)",
    constraint=f"{', '.join(DTYPE_CHOICES)} (or bf16, fp16, half, fp32)",
)


@dataclass(frozen=True)
class LoadOptions(PluginOptions):
    """The options both hf plugins take to load their model (their own options extend these).

    Only ``from_spec`` uses them; a constructor given a loaded model refuses them
    (``tpo._local.refuse_loading_options``).
    """

    device: str = option("auto", DEVICE_OPTION, "where the model runs (auto: CUDA, else MPS, else the CPU)")
    dtype: str = option("auto", DTYPE_OPTION, "the weights' dtype (auto: bfloat16 on a recent GPU, float32 elsewhere)")
    trust_remote_code: bool = option(False, flag(), "run the model repository's own code")
