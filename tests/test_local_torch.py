"""The device, dtype and dtype-keyword rules the hf policy and the hf reward share (``tpo._local.torch``).

There is no GPU here: CUDA and MPS are made "available" by monkeypatching torch's own
availability checks, and the loads are stopped before any model is read. The checks of names
and versions need neither package (the first test proves the module imports without them);
the file as a whole needs both, to compare the two plugins.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tpo._local.torch import check_device, check_dtype, dtype_keyword, resolve_device, resolve_dtype  # noqa: E402
from tpo.backends.transformers_local import TransformersPolicy  # noqa: E402
from tpo.errors import BackendError, ConfigError  # noqa: E402
from tpo.rewards.sequence_classifier import SequenceClassifierReward  # noqa: E402

OWNER = "the test plugin"


# ---------------------------------------------------------------------------- without torch


def test_the_module_imports_and_checks_names_without_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "from tpo._local.torch import check_device, check_dtype, dtype_keyword\n"
        "assert check_device('cuda:1', owner='x') == 'cuda:1'\n"
        "assert check_dtype('BF16', owner='x') == 'bfloat16'\n"
        "class T: __version__ = '4.57.1'\n"
        "assert dtype_keyword(T) == 'dtype'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_that_are_taken(name: str) -> None:
    assert check_device(name, owner=OWNER) == name


@pytest.mark.parametrize("value", ["tpu", "CPU", "cuda:", "cuda:x", "cuda:-1", " cpu", "gpu", "", 0, None])
def test_device_names_that_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        check_device(value, owner=OWNER)
    assert str(info.value) == f"{OWNER}: device must be auto, cpu, cuda, cuda:N or mps, got {value!r}"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("auto", "auto"),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
        ("FLOAT32", "float32"),
        ("bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        ("half", "float16"),
    ],
)
def test_dtype_names_and_aliases(value: str, canonical: str) -> None:
    assert check_dtype(value, owner=OWNER) == canonical


@pytest.mark.parametrize("value", ["int8", "float64", "fp8", "", "torch.", 16, None])
def test_dtype_names_that_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        check_dtype(value, owner=OWNER)
    assert str(info.value) == (
        f"{OWNER}: dtype must be one of auto, float32, bfloat16, float16 (or bf16, fp16, half, fp32), got {value!r}"
    )


@pytest.mark.parametrize(
    ("version", "keyword"),
    [
        ("4.45.2", "torch_dtype"),
        ("4.55.9", "torch_dtype"),
        ("4.56.0", "dtype"),
        ("4.57.0.dev0", "dtype"),
        ("5.0.0rc1", "dtype"),
        ("10.1", "dtype"),
        # Unparsable: torch_dtype, which every release understands.
        ("", "torch_dtype"),
        ("unknown", "torch_dtype"),
        ("v4.60.0", "torch_dtype"),
        ("4", "torch_dtype"),
        (None, "torch_dtype"),
    ],
)
def test_dtype_keyword_follows_the_transformers_version(version: str | None, keyword: str) -> None:
    module = SimpleNamespace() if version is None else SimpleNamespace(__version__=version)
    assert dtype_keyword(module) == keyword


# ---------------------------------------------------------------------------- with torch, GPUs simulated


def simulate(
    monkeypatch: pytest.MonkeyPatch,
    *,
    cuda: int = 0,
    capability: tuple[int, int] = (8, 0),
    mps: bool = False,
    hip: str | None = None,
) -> list[Any]:
    """Make torch report ``cuda`` CUDA GPUs of ``capability`` and MPS; returns the devices asked about."""
    asked: list[Any] = []

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return asked


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(0, False, "cpu"), (0, True, "mps"), (1, True, "cuda"), (2, False, "cuda")],
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch, cuda: int, mps: bool, expected: str
) -> None:
    simulate(monkeypatch, cuda=cuda, mps=mps)
    assert resolve_device(torch, "auto", owner=OWNER) == torch.device(expected)


def test_named_devices_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, cuda=2, mps=True)
    assert resolve_device(torch, "cpu", owner=OWNER) == torch.device("cpu")
    assert resolve_device(torch, "cuda", owner=OWNER) == torch.device("cuda")
    assert resolve_device(torch, "cuda:1", owner=OWNER) == torch.device("cuda", 1)
    assert resolve_device(torch, "mps", owner=OWNER) == torch.device("mps")
    assert resolve_device(torch, torch.device("cuda:1"), owner=OWNER) == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("cuda", "name", "message"),
    [
        (0, "cuda", "the test plugin: device 'cuda' was asked for, but torch sees no CUDA GPU"),
        (0, "cuda:0", "the test plugin: device 'cuda:0' was asked for, but torch sees no CUDA GPU"),
        (2, "cuda:2", "the test plugin: device 'cuda:2' was asked for, but torch sees 2 CUDA GPU(s), numbered 0 to 1"),
        (2, "mps", "the test plugin: device 'mps' was asked for, but this torch has no MPS (Apple GPU) support here"),
    ],
)
def test_devices_the_machine_lacks_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, cuda: int, name: str, message: str
) -> None:
    simulate(monkeypatch, cuda=cuda, mps=False)
    with pytest.raises(ConfigError) as info:
        resolve_device(torch, name, owner=OWNER)
    assert str(info.value) == message


def test_a_torch_built_without_mps_support(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch)
    monkeypatch.delattr(torch.backends, "mps")
    assert resolve_device(torch, "auto", owner=OWNER) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no MPS"):
        resolve_device(torch, "mps", owner=OWNER)


def test_auto_dtype_is_float32_on_the_cpu_and_on_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, mps=True)
    assert resolve_dtype(torch, "auto", torch.device("cpu"), owner=OWNER) == torch.float32
    assert resolve_dtype(torch, "auto", torch.device("mps"), owner=OWNER) == torch.float32


@pytest.mark.parametrize(
    ("capability", "hip", "expected"),
    [((8, 0), None, "bfloat16"), ((9, 0), None, "bfloat16"), ((7, 5), None, "float16"), ((6, 0), "6.2", "bfloat16")],
)
def test_auto_dtype_on_cuda_is_bfloat16_where_the_gpu_computes_in_it(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], hip: str | None, expected: str
) -> None:
    simulate(monkeypatch, cuda=2, capability=capability, hip=hip)
    assert resolve_dtype(torch, "auto", torch.device("cuda:1"), owner=OWNER) == getattr(torch, expected)


def test_auto_dtype_asks_about_the_chosen_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = simulate(monkeypatch, cuda=2, capability=(8, 6))
    resolve_dtype(torch, "auto", torch.device("cuda:1"), owner=OWNER)
    assert asked == [torch.device("cuda:1")]


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", "float32"), ("bf16", "bfloat16"), ("half", "float16"), (torch.float16, "float16")],
)
def test_an_explicit_dtype_is_kept_on_every_device(
    monkeypatch: pytest.MonkeyPatch, device: str, name: Any, expected: str
) -> None:
    simulate(monkeypatch, cuda=1, capability=(7, 0), mps=True)
    assert resolve_dtype(torch, name, torch.device(device), owner=OWNER) == getattr(torch, expected)


def test_a_bad_dtype_is_refused_whatever_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch)
    with pytest.raises(ConfigError, match=r"the test plugin: dtype must be one of .* got 'int8'"):
        resolve_dtype(torch, "int8", torch.device("cpu"), owner=OWNER)
    with pytest.raises(ConfigError, match=r"got torch\.int8$"):
        resolve_dtype(torch, torch.int8, torch.device("cpu"), owner=OWNER)


# ---------------------------------------------------------------------------- both users, same decisions

PLUGINS = ("policy", "reward")


def loaded_transformers() -> Any:
    """The ``transformers`` the plugins import now: earlier tests may have had it imported afresh."""
    return importlib.import_module("transformers")


class _Stop(Exception):
    """Ends a load once the model would be moved to its device: nothing is read or placed."""


class _FakeModel:
    def __init__(self, seen: dict[str, Any]) -> None:
        self._seen = seen

    def to(self, device: Any) -> None:
        self._seen["device"] = device
        raise _Stop


def load(plugin: str, monkeypatch: pytest.MonkeyPatch, **options: Any) -> dict[str, Any]:
    """What ``plugin``'s ``from_spec`` hands to ``from_pretrained`` and to ``model.to``."""
    seen: dict[str, Any] = {}
    transformers = loaded_transformers()

    def from_pretrained(target: str, **kwargs: Any) -> Any:
        seen.update({k: v for k, v in kwargs.items() if k in ("dtype", "torch_dtype")})
        model = _FakeModel(seen)
        return (model, {"missing_keys": []}) if kwargs.get("output_loading_info") else model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: SimpleNamespace())
    if plugin == "policy":
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
        with pytest.raises(BackendError) as info:
            TransformersPolicy.from_spec("org/model", **options)
        assert isinstance(info.value.__cause__, _Stop)
    else:
        monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
        with pytest.raises(_Stop):
            SequenceClassifierReward.from_spec("org/model", **options)
    return seen


def refusal(plugin: str, **options: Any) -> str:
    """``plugin``'s error message for ``options``, without the plugin's name in front."""
    build = TransformersPolicy.from_spec if plugin == "policy" else SequenceClassifierReward.from_spec
    with pytest.raises(ConfigError) as info:
        build("org/model", **options)
    owner, _, message = str(info.value).partition(": ")
    assert owner in ("the hf policy backend", "the hf reward")
    return message


@pytest.mark.usefixtures("allow_real_requests")
@pytest.mark.parametrize(
    ("machine", "options", "device", "dtype"),
    [
        ({}, {}, "cpu", "float32"),
        ({"mps": True}, {}, "mps", "float32"),  # the two used to disagree here (float16 / float32)
        ({"mps": True}, {"dtype": "auto", "device": "mps"}, "mps", "float32"),
        ({"mps": True}, {"dtype": "fp16"}, "mps", "float16"),
        ({"cuda": 1, "capability": (8, 0)}, {}, "cuda", "bfloat16"),
        ({"cuda": 1, "capability": (7, 5)}, {}, "cuda", "float16"),
        ({"cuda": 2, "capability": (7, 5)}, {"device": "cuda:1", "dtype": "bf16"}, "cuda:1", "bfloat16"),
        ({"cuda": 1, "mps": True}, {"device": "cpu"}, "cpu", "float32"),
        ({}, {"dtype": "half"}, "cpu", "float16"),
        ({}, {"dtype": "BFloat16"}, "cpu", "bfloat16"),
    ],
)
def test_the_policy_and_the_reward_load_alike(
    monkeypatch: pytest.MonkeyPatch, machine: dict[str, Any], options: dict[str, Any], device: str, dtype: str
) -> None:
    simulate(monkeypatch, **machine)
    monkeypatch.setattr(loaded_transformers(), "__version__", "4.57.1")
    loads = [load(plugin, monkeypatch, **options) for plugin in PLUGINS]
    assert loads[0] == loads[1] == {"dtype": getattr(torch, dtype), "device": torch.device(device)}


@pytest.mark.usefixtures("allow_real_requests")
@pytest.mark.parametrize(
    ("version", "keyword"),
    [("4.46.3", "torch_dtype"), ("4.56.0", "dtype"), ("5.0.0.dev0", "dtype"), ("custom-build", "torch_dtype")],
)
def test_the_policy_and_the_reward_pass_the_same_dtype_keyword(
    monkeypatch: pytest.MonkeyPatch, version: str, keyword: str
) -> None:
    # The two used to disagree on an unparsable version (torch_dtype / dtype).
    simulate(monkeypatch)
    monkeypatch.setattr(loaded_transformers(), "__version__", version)
    for plugin in PLUGINS:
        assert load(plugin, monkeypatch, dtype="float16") == {keyword: torch.float16, "device": torch.device("cpu")}


@pytest.mark.parametrize(
    ("machine", "options", "message"),
    [
        ({}, {"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ({}, {"device": "cuda:one"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:one'"),
        (
            {},
            {"dtype": "int8"},
            "dtype must be one of auto, float32, bfloat16, float16 (or bf16, fp16, half, fp32), got 'int8'",
        ),
        ({}, {"device": "cuda"}, "device 'cuda' was asked for, but torch sees no CUDA GPU"),
        (
            {"cuda": 2},
            {"device": "cuda:2"},
            "device 'cuda:2' was asked for, but torch sees 2 CUDA GPU(s), numbered 0 to 1",
        ),
        ({}, {"device": "mps"}, "device 'mps' was asked for, but this torch has no MPS (Apple GPU) support here"),
    ],
)
def test_the_policy_and_the_reward_refuse_alike(
    monkeypatch: pytest.MonkeyPatch, machine: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    simulate(monkeypatch, **machine)
    assert [refusal(plugin, **options) for plugin in PLUGINS] == [message, message]
