"""Declared plugin options (``tpo.options``): each constraint kind, the one message style, every built-in plugin."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from tpo import ConfigError, TPOConfig
from tpo.cli import cli
from tpo.options import (
    OptionInfo,
    PluginOptions,
    check_fields,
    check_value,
    custom,
    describe_options,
    flag,
    integer,
    mapping,
    number,
    one_of,
    option,
    string,
)
from tpo.registry import (
    BACKENDS_GROUP,
    REWARDS_GROUP,
    list_plugins,
    load_plugin,
    policy_from_spec,
    reward_from_spec,
    take_options,
)
from tpo.testing import ScriptedPolicy

PLUGIN_DIR = Path(__file__).parent / "plugin_fixture"


@dataclass(frozen=True)
class DemoOptions(PluginOptions):
    """Options of a made-up plugin, one of each kind."""

    owner: ClassVar[str] = "demo"

    n_ctx: int | None = option(None, integer(min=256), "context window")
    top_k: int = option(40, integer(min=0, max=100), "top-k")
    min_p: float = option(0.05, number(0, 1), "min-p")
    timeout_s: float = option(10.0, number(0, min_open=True), "seconds")
    verbose: bool = option(False, flag(), "logging")
    mode: str = option("fast", one_of("fast", "slow"), "speed")
    name: str | None = option(None, string(), "a name")
    headers: dict[str, str] | None = option(None, mapping(str), "headers")


def refused(options: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        DemoOptions.from_options(options)
    return str(info.value)


# ---------------------------------------------------------------------- the constraint kinds


@pytest.mark.parametrize(
    ("check", "good"),
    [
        (integer(), [-3, 0, 10**20]),
        (integer(min=256), [256, 4096]),
        (integer(min=1, max=3), [1, 3]),
        (number(), [-1e300, 0, 2.5]),
        (number(0, 1), [0, 0.5, 1]),
        (number(0, 1, min_open=True, max_open=True), [1e-9, 0.999]),
        (number(finite=False), [math.inf, -math.inf]),
        (flag(), [True, False]),
        (one_of("a", "b"), ["a", "b"]),
        (string(), ["x", " chatml "]),
        (mapping(), [{}, {"k": [1, 2]}]),
        (mapping(str), [{"X-Team": "rm"}]),
    ],
)
def test_each_kind_accepts_what_it_says(check: Any, good: list[Any]) -> None:
    for value in good:
        assert check.coerce(value) == value


@pytest.mark.parametrize(
    ("check", "bad", "described"),
    [
        (integer(), ["7", 7.0, 2.5, True, None, [1]], "an integer"),
        (integer(min=256), [255, -1, "abc", 256.0], "an integer >= 256"),
        (integer(max=9), [10], "an integer <= 9"),
        (integer(min=1, max=3), [0, 4], "an integer in [1, 3]"),
        (number(), [math.nan, math.inf, -math.inf, "0.5", False, None], "a finite number"),
        (number(finite=False), [math.nan, "1"], "a number"),
        (number(0, 1), [-0.01, 1.01, math.inf, True], "a number in [0, 1]"),
        (number(0, 5), [5.5], "a number in [0, 5]"),
        (number(0, 1, min_open=True), [0, 0.0, 2], "a number in (0, 1]"),
        (number(0, 10, max_open=True), [10], "a number in [0, 10)"),
        (number(0, min_open=True), [0, -1], "a number > 0"),
        (number(0.5), [0.25], "a number >= 0.5"),
        (number(max=1, max_open=True), [1], "a number < 1"),
        (flag(), ["true", "yes", 1, 0, None], "true or false"),
        (one_of("auto", "chat"), ["pair", "AUTO", 1, None], "one of auto, chat"),
        (string(), ["", "   ", 5, None, b"x"], "a non-empty string"),
        (mapping(), ["a=1", [("a", 1)], {1: "x"}, None], "a mapping"),
        (mapping(str), [{"a": 1}, {"a": None}], "a mapping of strings"),
    ],
)
def test_each_kind_refuses_the_rest_with_its_description(check: Any, bad: list[Any], described: str) -> None:
    assert check.describe() == described
    for value in bad:
        with pytest.raises(ConfigError) as info:
            check_value("opt", value, check, owner="demo")
        assert str(info.value) == f"demo: opt must be {described}, got {value!r}"


def test_values_are_stored_as_their_kind() -> None:
    numpy = pytest.importorskip("numpy")
    assert type(check_value("x", numpy.int64(5), integer())) is int
    assert type(check_value("x", 1, number())) is float
    assert type(check_value("x", numpy.float32(0.5), number(0, 1))) is float
    source = {"a": "b"}
    stored = check_value("x", source, mapping())
    assert stored == source and type(stored) is dict and stored is not source


def test_a_custom_check_gives_the_standard_message() -> None:
    def even(value: Any) -> int:
        if not isinstance(value, int) or value % 2:
            raise ValueError("odd")
        return value

    check = custom(even, kind="even", description="an even integer", constraint="even")
    assert check_value("n", 4, check, owner="demo") == 4
    with pytest.raises(ConfigError, match=re.escape("demo: n must be an even integer, got 3")):
        check_value("n", 3, check, owner="demo")

    def refuses(value: Any) -> Any:
        raise ConfigError("a message of its own")

    other = custom(refuses, kind="x", description="acceptable")
    with pytest.raises(ConfigError, match=r"^n must be acceptable, got 1$"):
        check_value("n", 1, other)


def test_a_long_value_is_cut_in_the_message() -> None:
    message = refused({"headers": {"k" * 200: 1}})
    assert message.startswith("demo: headers must be a mapping of strings, got {'kkk")
    assert message.endswith("...") and len(message) < 160


# ---------------------------------------------------------------------- a declared options class


def test_the_message_style_names_the_plugin_the_option_the_rule_and_the_value() -> None:
    assert refused({"n_ctx": "abc"}) == "demo: n_ctx must be an integer >= 256, got 'abc'"
    assert refused({"min_p": 2}) == "demo: min_p must be a number in [0, 1], got 2"
    assert refused({"verbose": "yes"}) == "demo: verbose must be true or false, got 'yes'"
    assert refused({"mode": "medium"}) == "demo: mode must be one of fast, slow, got 'medium'"


def test_unknown_options_are_refused_with_the_list_of_known_ones_in_declaration_order() -> None:
    known = "n_ctx, top_k, min_p, timeout_s, verbose, mode, name, headers"
    assert refused({"n_cxt": 512}) == f"demo: unknown option 'n_cxt'; it takes: {known}"
    two = refused({"n_cxt": 512, "top_p": 1, "top_k": 5})
    assert two == f"demo: unknown options 'n_cxt', 'top_p'; it takes: {known}"
    # An unknown option is reported even when its value is a bad value for some other option.
    assert "unknown option 'zz'" in refused({"zz": "abc", "n_ctx": "abc"})


def test_none_counts_as_not_given() -> None:
    opts = DemoOptions.from_options({"n_ctx": None, "top_k": None, "unknown_but_none": None})
    assert opts == DemoOptions() and opts.top_k == 40 and opts.n_ctx is None
    base = DemoOptions.from_options({"top_k": 5, "n_ctx": 1024})
    assert base.replace(top_k=None, n_ctx=None) == base
    assert DemoOptions.from_options({"top_k": None}, base=base).top_k == 5
    # Built directly, a None in an option with a default is that default.
    assert DemoOptions(top_k=None).top_k == 40  # type: ignore[arg-type]


def test_options_are_checked_however_they_are_built() -> None:
    with pytest.raises(ConfigError, match=re.escape("demo: top_k must be an integer in [0, 100], got 101")):
        DemoOptions(top_k=101)
    with pytest.raises(ConfigError, match=re.escape("demo: top_k must be an integer in [0, 100], got -1")):
        DemoOptions().replace(top_k=-1)
    with pytest.raises(ConfigError, match=re.escape("demo: top_k must be an integer in [0, 100], got 'x'")):
        dataclasses.replace(DemoOptions(), top_k="x")
    with pytest.raises(ConfigError, match="demo: options must be a DemoOptions, got dict"):
        DemoOptions.from_options({}, base={"top_k": 1})  # type: ignore[arg-type]


def test_options_are_frozen_and_plain() -> None:
    opts = DemoOptions.from_options({"min_p": 0, "headers": {"A": "b"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.top_k = 3  # type: ignore[misc]
    assert opts.min_p == 0.0 and isinstance(opts.min_p, float)
    assert opts.to_dict() == {
        "n_ctx": None,
        "top_k": 40,
        "min_p": 0.0,
        "timeout_s": 10.0,
        "verbose": False,
        "mode": "fast",
        "name": None,
        "headers": {"A": "b"},
    }
    assert DemoOptions.names() == tuple(opts.to_dict())


def test_describe_lists_kind_constraint_default_and_help() -> None:
    info = {o.name: o for o in DemoOptions.describe()}
    assert list(info) == list(DemoOptions.names())
    assert info["n_ctx"] == OptionInfo("n_ctx", "integer", ">= 256", None, "context window")
    assert info["min_p"].description == "number in [0, 1]"
    assert (info["timeout_s"].kind, info["timeout_s"].constraint, info["timeout_s"].default) == ("number", "> 0", 10.0)
    assert (info["verbose"].kind, info["verbose"].constraint) == ("flag", "")
    assert (info["mode"].kind, info["mode"].constraint) == ("choice", "fast, slow")
    assert (info["headers"].kind, info["headers"].constraint) == ("mapping", "of strings")
    assert describe_options(TPOConfig)[0].name == "mode"  # any dataclass of option fields


def test_check_fields_can_refuse_none_where_a_default_is_not_none() -> None:
    @dataclass(frozen=True)
    class Config:
        width: int = option(5, integer(min=1))
        limit: int | None = option(None, integer(min=1))

        def __post_init__(self) -> None:
            check_fields(self, none_means_default=False)

    assert Config(limit=None).limit is None
    with pytest.raises(ConfigError, match=r"^width must be an integer >= 1, got None$"):
        Config(width=None)  # type: ignore[arg-type]


def test_option_needs_a_check() -> None:
    with pytest.raises(TypeError, match="needs a Check"):
        option(1, int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one choice"):
        one_of()


def test_the_run_configuration_speaks_the_same_style() -> None:
    with pytest.raises(ConfigError, match=re.escape("top_p must be a number in (0, 1], got 0")):
        TPOConfig(top_p=0)
    with pytest.raises(ConfigError, match=re.escape("unknown option 'widht'; it takes: mode, width, depth,")):
        TPOConfig().with_options(widht=3)


def test_take_options_still_works_for_undeclared_plugins() -> None:
    allowed = {"latency_s": 0.02, "mode": None}
    assert take_options({"latency_s": 0.5, "mode": None}, allowed, owner="x") == {"latency_s": 0.5, "mode": None}
    assert take_options({}, allowed, owner="x") == allowed
    message = "the scripted backend: unknown option 'lag'; it takes: latency_s, mode"
    with pytest.raises(ConfigError, match=re.escape(message)):
        take_options({"lag": 1}, allowed, owner="the scripted backend")


# ---------------------------------------------------------------------- every built-in plugin

#: A spec for each built-in plugin, a bad value for one of its options, and the message it must give.
BUILTINS: dict[tuple[str, str], tuple[str, dict[str, Any], str]] = {
    (BACKENDS_GROUP, "llamacpp"): ("llamacpp", {"n_ctx": "abc"}, "llamacpp: n_ctx must be an integer >= 16, got 'abc'"),
    (BACKENDS_GROUP, "openai"): ("openai:m", {"timeout_s": 0}, "openai: timeout_s must be a number > 0, got 0"),
    (BACKENDS_GROUP, "hf"): (
        "hf:org/model",
        {"batch_size": "8"},
        "the hf policy backend: batch_size must be an integer >= 1, got '8'",
    ),
    (BACKENDS_GROUP, "vllm"): (
        "vllm:m",
        {"gpu_memory_utilization": 0},
        "the vllm policy backend: gpu_memory_utilization must be a number in (0, 1], got 0",
    ),
    (REWARDS_GROUP, "judge"): ("judge", {"temperature": 9}, "judge: temperature must be a number in [0, 5], got 9"),
    (REWARDS_GROUP, "hf"): (
        "hf:org/model",
        {"input_format": "xml"},
        "the hf reward: input_format must be one of auto, chat, pair, got 'xml'",
    ),
    (REWARDS_GROUP, "vllm"): ("vllm:rm", {"index": -1}, "the vllm reward: index must be an integer >= 0, got -1"),
    (REWARDS_GROUP, "http"): (
        "http:http://127.0.0.1:9/score",
        {"batched": "yes"},
        "the http reward: batched must be true or false, got 'yes'",
    ),
    (REWARDS_GROUP, "math"): ("math", {"timeout_s": 0}, "the math reward: timeout_s must be a number > 0, got 0"),
    (REWARDS_GROUP, "python"): (
        "python:mod:fn",
        {"concurrency": 0},
        "the python reward: concurrency must be an integer >= 1, got 0",
    ),
}


def build(group: str, spec: str, **options: Any) -> Any:
    if group == BACKENDS_GROUP:
        return policy_from_spec(spec, **options)
    return reward_from_spec(spec, policy=ScriptedPolicy(), **options)


#: Every built-in plugin installed: the ones above, and any wrapper (``ray``) that declares options of its own.
INSTALLED = sorted(
    (g, ep.name) for g in (BACKENDS_GROUP, REWARDS_GROUP) for ep in entry_points(group=g) if ep.value.startswith("tpo.")
)


def test_the_table_covers_the_plugins_that_take_their_options_themselves() -> None:
    assert set(BUILTINS) <= set(INSTALLED)


@pytest.mark.parametrize(("group", "name"), INSTALLED)
def test_every_built_in_plugin_declares_its_options(group: str, name: str) -> None:
    cls = load_plugin(group, name)
    declared = cls.options_class
    assert issubclass(declared, PluginOptions) and dataclasses.is_dataclass(declared)
    assert declared.owner, "messages must name the plugin"
    infos = declared.describe()
    assert infos and all(o.help for o in infos)
    assert {p.name: p for p in list_plugins(group)}[name].options == infos
    # The defaults live in the declaration only: the constructor does not list the options again.
    params = set(inspect.signature(cls.__init__).parameters) - {"prefer"}  # the judge's rubric may come second
    assert not params & set(declared.names()), f"{cls.__name__}.__init__ repeats options"


@pytest.mark.parametrize(("group", "name"), sorted(BUILTINS))
def test_every_built_in_plugin_refuses_an_unknown_option(group: str, name: str) -> None:
    spec, _, _ = BUILTINS[(group, name)]
    declared = load_plugin(group, name).options_class
    with pytest.raises(ConfigError) as info:
        build(group, spec, no_such_option=1)
    assert str(info.value) == (
        f"{declared.owner}: unknown option 'no_such_option'; it takes: {', '.join(declared.names())}"
    )


@pytest.mark.parametrize(("group", "name"), sorted(BUILTINS))
def test_every_built_in_plugin_refuses_a_bad_value_with_the_standard_message(group: str, name: str) -> None:
    spec, options, message = BUILTINS[(group, name)]
    with pytest.raises(ConfigError) as info:
        build(group, spec, **options)
    assert str(info.value) == message


def test_constructors_check_keyword_options_through_the_same_declaration() -> None:
    from tpo.backends.llamacpp import LlamaCppPolicy
    from tpo.backends.openai_server import OpenAIOptions, OpenAIPolicy
    from tpo.backends.transformers_local import TransformersPolicy
    from tpo.rewards.function import PythonReward
    from tpo.rewards.http_server import HTTPReward
    from tpo.rewards.judge import JudgeOptions, JudgeReward
    from tpo.rewards.sequence_classifier import SequenceClassifierReward
    from tpo.rewards.verifier import MathReward
    from tpo.rewards.vllm_pooling import VLLMReward

    cases = [
        (lambda: LlamaCppPolicy("x.gguf", n_ctx="abc"), "llamacpp: n_ctx must be an integer >= 16, got 'abc'"),
        (lambda: OpenAIPolicy("m", timeout_s=0), "openai: timeout_s must be a number > 0, got 0"),
        (
            lambda: TransformersPolicy(None, None, batch_size="8"),
            "the hf policy backend: batch_size must be an integer >= 1, got '8'",
        ),
        (lambda: JudgeReward(ScriptedPolicy(), temperature=9), "judge: temperature must be a number in [0, 5], got 9"),
        (
            lambda: SequenceClassifierReward(None, None, input_format="xml"),
            "the hf reward: input_format must be one of auto, chat, pair, got 'xml'",
        ),
        (lambda: VLLMReward(None, index=-1), "the vllm reward: index must be an integer >= 0, got -1"),
        (
            lambda: HTTPReward("http://127.0.0.1:9/score", batched="yes"),
            "the http reward: batched must be true or false, got 'yes'",
        ),
        (lambda: MathReward(timeout_s=0), "the math reward: timeout_s must be a number > 0, got 0"),
        (lambda: PythonReward(len, concurrency=0), "the python reward: concurrency must be an integer >= 1, got 0"),
        (
            lambda: PythonReward(len, concurency=2),
            "the python reward: unknown option 'concurency'; it takes: batched, concurrency",
        ),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError) as info:
            make()
        assert str(info.value) == message

    # An options object and keywords on top of it: the keywords win, both checked.
    judge = JudgeReward(ScriptedPolicy(), options=JudgeOptions(max_tokens=8, seed=3), seed=4)
    assert (judge.max_tokens, judge.seed, judge.temperature) == (8, 4, 0.2)
    policy = OpenAIPolicy("m", options=OpenAIOptions(base_url="http://127.0.0.1:9/v1", max_concurrency=3))
    assert policy.max_concurrency == 3 and policy.options.max_concurrency == 3


def test_options_for_loading_are_refused_by_constructors_that_take_a_loaded_model() -> None:
    from tpo.backends.transformers_local import TransformersPolicy
    from tpo.rewards.judge import JudgeReward
    from tpo.rewards.sequence_classifier import SequenceClassifierReward
    from tpo.rewards.vllm_pooling import VLLMReward

    with pytest.raises(ConfigError, match="device apply when from_spec loads the model"):
        TransformersPolicy(None, None, device="cpu")
    with pytest.raises(ConfigError, match="dtype, trust_remote_code apply when from_spec loads the model"):
        SequenceClassifierReward(None, None, dtype="float16", trust_remote_code=True)
    with pytest.raises(ConfigError, match="max_model_len apply when from_spec loads the engine"):
        VLLMReward(None, max_model_len=512)
    with pytest.raises(ConfigError, match="backend_options are for from_spec"):
        JudgeReward(ScriptedPolicy(), backend_options={"n_ctx": 512})


# ---------------------------------------------------------------------- tpo backends --verbose


def test_tpo_backends_verbose_lists_each_plugins_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))  # the `scripted` test plugin, which declares no options
    result = CliRunner().invoke(cli, ["backends", "--verbose"], env={"COLUMNS": "250"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "llamacpp (policy) options" in out and "judge (reward) options" in out
    rows = {" ".join(cell.strip() for cell in line.split("│")[1:-1]) for line in out.splitlines() if "│" in line}
    assert any(row.startswith("n_ctx integer >= 16 -") for row in rows)
    assert any(row.startswith("min_p number in [0, 1] 0.05") for row in rows)
    assert any(row.startswith("verbose flag - false") for row in rows)
    assert any(row.startswith("input_format choice auto, chat, pair auto") for row in rows)
    assert "scripted (policy): no declared options" in out

    plain = CliRunner().invoke(cli, ["backends"], env={"COLUMNS": "250"}, catch_exceptions=False)
    assert plain.exit_code == 0 and "options" not in plain.output and "llamacpp" in plain.output
