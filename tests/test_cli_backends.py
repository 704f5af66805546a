"""``tpo run`` with each policy backend and reward kind, built from the command line's specs through the plugin registry.

Every test invokes the real ``tpo`` command in-process. Models that need hardware this machine
lacks are stand-ins: the ``vllm`` module (``tests/stubs``), a JSON scoring server on
127.0.0.1, and the test plugin policy ``scripted`` (``tests/plugin_fixture``, found through
its entry point like any installed plugin). The Transformers backends load tiny random-weight
models saved once per module.
"""

from __future__ import annotations

import importlib
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import tpo
import tpo.models
from servers.stand_in import Reply, StandIn
from stubs import load_stub
from tiny_models import build_tokenizer, save_reward_model
from tpo import GenerationRequest
from tpo.cli import cli
from tpo.registry import policy_from_spec, reward_from_spec

vllm_stub = load_stub("tpo_tests_vllm_stub", "vllm_stub.py")
vllm_reward_stub = load_stub("tpo_tests_vllm_reward_stub", "vllm_reward_stub.py")

PLUGIN_DIR = Path(__file__).parent / "plugin_fixture"
CALL_LOG_ENV = "TPO_TEST_CALL_LOG"  # read by tests/plugin_fixture/tpo_test_plugin.py
QUESTION = "What is 6 times 7?"
TAG = "improved_reply"
BUILTIN_POLICIES = ("hf", "llamacpp", "openai", "vllm")
BUILTIN_REWARDS = ("hf", "http", "judge", "math", "python", "vllm")


def tpo_run(*args: str, width: int = 2) -> Result:
    """``tpo run QUESTION`` at width ``width``, depth 1, 4 new tokens, JSON output, then ``args``."""
    command = ["run", QUESTION, "--width", str(width), "--depth", "1", "--max-tokens", "4", "--json", *args]
    return CliRunner().invoke(cli, command, catch_exceptions=False)


def completed(result: Result) -> dict[str, Any]:
    """The JSON result of a run that exited 0 and completed."""
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    assert data["status"] == "complete", data["error"]
    assert data["error"] is None
    return data


def texts_and_scores(data: dict[str, Any]) -> list[tuple[str, float | None]]:
    return [(c["text"], c["score"]) for c in data["candidates"]]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def plugin_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``scripted`` plugin policy installed for this test: its entry point is found on ``sys.path``."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))


@pytest.fixture
def scripted(plugin_installed: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The ``scripted`` plugin policy, installed; return the file it logs its calls to."""
    log = tmp_path / "policy-calls.tsv"
    monkeypatch.setenv(CALL_LOG_ENV, str(log))
    return log


def logged_purposes(log: Path) -> list[str]:
    """The purpose of every call the scripted policy answered, in order."""
    return [line.split("\t")[3] for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


def math_reply(request: GenerationRequest) -> list[str]:
    """Replies for the math reward: half the answers say 42 (right), the others 41 or 48 (wrong)."""
    if request.purpose == "sample":
        return [f"The product is {(42, 41)[i % 2]}." for i in range(request.n)]
    if request.purpose == "loss":
        return ["The first answer multiplies correctly; the second does not."]
    if request.purpose == "gradient":
        return ["Keep the arithmetic of the first answer."]
    return [f"<{TAG}>Checked again, it is {(42, 48)[i % 2]}.</{TAG}>" for i in range(request.n)]


@pytest.fixture
def scripted_math(scripted: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ``scripted`` plugin, replying with ``math_reply``; return its call log."""
    plugin = importlib.import_module("tpo_test_plugin")  # the module its entry point names
    monkeypatch.setattr(plugin, "reply", math_reply)
    return scripted


@pytest.fixture
def length_reward(tmp_path: Path) -> str:
    """A ``python:`` reward spec: the answer's length in characters, or -1 if the conversation is not QUESTION."""
    path = tmp_path / "length_rm.py"
    path.write_text(
        textwrap.dedent(
            f'''
            def length(messages, answer):
                """The answer's length, or -1 when the reward is shown another conversation."""
                return float(len(answer)) if messages == [{{"role": "user", "content": {QUESTION!r}}}] else -1.0
            '''
        ),
        encoding="utf-8",
    )
    return f"python:{path}:length"


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama causal LM with a ChatML tokenizer trained offline, saved as a checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-causal-lm")
    tokenizer = build_tokenizer("chatml")
    # The prompt templates take many tokens with this small vocabulary: leave the critic room.
    tokenizer.model_max_length = 8192
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        # The end token never wins, so every reply runs to --max-tokens and is never empty.
        model.lm_head.weight[tokenizer.eos_token_id].fill_(0.0)
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama sequence-classification reward model, saved as a checkpoint."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return save_reward_model(tmp_path_factory.mktemp("tiny-rm"), "llama")


@pytest.fixture
def score_server() -> Iterator[StandIn]:
    """A JSON scoring endpoint on 127.0.0.1: ``{"score": len(answer)}``; every request kept."""
    with StandIn(lambda path, body, n: Reply(json={"score": float(len(body["answer"]))})) as server:
        yield server


# ---------------------------------------------------------------------------- policies


@pytest.mark.usefixtures("allow_real_requests")
def test_hf_policy_runs_from_the_cli_as_from_the_api(causal_lm_dir: Path, length_reward: str) -> None:
    data = completed(tpo_run("--policy", f"hf:{causal_lm_dir}", "--reward", length_reward))
    assert (data["policy"], data["critic"], data["reward"]) == (f"hf:{causal_lm_dir}",) * 2 + (length_reward,)
    samples = [c for c in data["candidates"] if c["step"] == 0]
    assert len(samples) == 2 and {c["finish_reason"] for c in samples} == {"length"}
    # The reward saw the question and scored each answer by its length.
    assert all(c["score"] == float(len(c["text"])) for c in data["candidates"])
    assert 0 < data["usage"]["completion_tokens"] <= 4 * data["usage"]["sequences"]
    assert data["steps"][1]["critique"]  # the tiny model wrote the critique too

    # The same run through the Python API, from the same specs, gives the same answers and scores.
    api = tpo.optimize(
        QUESTION,
        policy=policy_from_spec(f"hf:{causal_lm_dir}"),
        reward=reward_from_spec(length_reward),
        width=2,
        depth=1,
        max_tokens=4,
    )
    assert texts_and_scores(api.to_dict()) == texts_and_scores(data)
    assert [s.critique for s in api.steps] == [s["critique"] for s in data["steps"]]


def test_vllm_policy_gets_its_engine_options_and_the_chat_calls(
    monkeypatch: pytest.MonkeyPatch, length_reward: str
) -> None:
    fake = vllm_stub.install(monkeypatch)
    data = completed(
        tpo_run(
            "--policy",
            "vllm:some/model",
            "--policy-option",
            "tensor_parallel_size=2",
            "--policy-option",
            "max_model_len=8192",
            "--reward",
            length_reward,
        )
    )
    assert (data["policy"], data["critic"]) == ("vllm:some/model", "vllm:some/model")
    [engine] = fake.engines  # one engine: the critic is the policy, not a second load
    assert engine.model == "some/model"
    assert engine.engine_args["tensor_parallel_size"] == 2 and engine.engine_args["max_model_len"] == 8192
    chats = fake.calls_to("chat")
    assert len(chats) == data["usage"]["policy_calls"] >= 4  # sample, critique, feedback, rewrites
    first = chats[0]
    assert first.args[0] == [[{"role": "user", "content": QUESTION}]]
    [params] = first.kwargs["sampling_params"]
    assert (params.n, params.max_tokens, params.temperature, params.top_p) == (2, 4, 0.7, 0.95)
    samples = sorted(c["text"] for c in data["candidates"] if c["step"] == 0)
    assert [t.split(" seed ")[0] for t in samples] == ["sample 0", "sample 1"]  # the stand-in's replies


# ---------------------------------------------------------------------------- rewards


@pytest.mark.usefixtures("allow_real_requests")
def test_hf_reward_with_its_batch_option(
    scripted: Path, reward_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tpo.rewards.sequence_classifier import SequenceClassifierReward

    batch_rows: list[int] = []
    real_init = SequenceClassifierReward.__init__

    def spying_init(self: SequenceClassifierReward, model: Any, tokenizer: Any, **options: Any) -> None:
        real_init(self, model, tokenizer, **options)
        forward = model.forward

        def counted(*args: Any, **kwargs: Any) -> Any:
            batch_rows.append(int(kwargs["input_ids"].shape[0]))
            return forward(*args, **kwargs)

        model.forward = counted

    monkeypatch.setattr(SequenceClassifierReward, "__init__", spying_init)
    data = completed(
        tpo_run(
            "--policy",
            "scripted",
            "--policy-option",
            "latency_s=0",
            "--reward",
            f"hf:{reward_model_dir}",
            "--reward-option",
            "max_batch_size=4",
            width=5,
        )
    )
    assert (data["policy"], data["reward"]) == ("scripted", f"hf:{reward_model_dir}")
    assert logged_purposes(scripted) == ["sample", "loss", "gradient", "update"]
    # Five answers per step, at most four per forward pass.
    assert max(batch_rows) == 4 and sum(batch_rows) == len(data["candidates"]) == 10

    # The scores are the model's: the same reward built from the API scores the same texts alike.
    direct = reward_from_spec(f"hf:{reward_model_dir}").score_pairs(
        [data["messages"]] * len(data["candidates"]), [c["text"] for c in data["candidates"]]
    )
    assert [c["score"] for c in data["candidates"]] == pytest.approx([s.value for s in direct], rel=1e-4, abs=1e-4)
    assert len({round(c["score"], 4) for c in data["candidates"]}) > 1


def test_vllm_reward_scores_with_the_pooling_runner(scripted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bonus(answer: str) -> float:
        return 100.0 if answer.startswith("Answer 1 ") else 0.0

    fake = vllm_reward_stub.install(monkeypatch, bonus=bonus)
    data = completed(
        tpo_run(
            "--policy",
            "scripted",
            "--policy-option",
            "latency_s=0",
            "--reward",
            "vllm:some/rm",
            "--reward-option",
            "tensor_parallel_size=2",
        )
    )
    assert (data["policy"], data["reward"]) == ("scripted", "vllm:some/rm")
    [engine] = fake.engines
    assert engine.model == "some/rm"
    assert engine.engine_args == {"runner": "pooling", "tensor_parallel_size": 2}
    assert {c.method for c in fake.calls} == {"classify"}
    assert sum(len(c.prompts) for c in fake.calls) == len(data["candidates"]) == 4

    tokenizer = vllm_reward_stub.FakeTokenizer(**fake.tokenizer_kwargs)
    for c in data["candidates"]:
        text = tokenizer.apply_chat_template(
            [*data["messages"], {"role": "assistant", "content": c["text"]}], tokenize=False
        )
        length = len(tokenizer.encode(text, add_special_tokens=False))
        assert c["score"] == pytest.approx(length / 10 + bonus(c["text"]))
    # The stand-in's bonus decided the winner: the reward's numbers drove the selection.
    assert data["answer"].startswith("Answer 1 ") and data["score"] > 100


def test_http_reward_against_a_loopback_server(scripted: Path, score_server: StandIn) -> None:
    pytest.importorskip("httpx")
    data = completed(
        tpo_run(
            "--policy",
            "scripted",
            "--policy-option",
            "latency_s=0",
            "--reward",
            f"http:{score_server.url}/score",
            "--metadata",
            "topic=arithmetic",
        )
    )
    assert data["policy"] == "scripted"
    assert data["reward"].startswith("http:") and "127.0.0.1" in data["reward"]
    requests = [(seen.path, seen.body) for seen in score_server.seen]
    preflight = [r for r in requests if r[1].get("prompt_id") == "tpo-preflight"]
    scored = [r for r in requests if r[1].get("prompt_id") != "tpo-preflight"]
    assert len(preflight) == 1  # one trivial call checks the server before any prompt runs
    assert len(scored) == len(data["candidates"]) == 4
    for path, body in scored:
        assert path == "/score"
        assert body["messages"] == [{"role": "user", "content": QUESTION}]
        assert body["metadata"] == {"topic": "arithmetic"}
        assert body["prompt_id"] == data["prompt_id"]
    assert sorted(body["answer"] for _, body in scored) == sorted(c["text"] for c in data["candidates"])
    assert all(c["score"] == float(len(c["text"])) for c in data["candidates"])


def test_math_reward_checks_answers_against_the_metadata(scripted_math: Path) -> None:
    pytest.importorskip("math_verify")
    data = completed(
        tpo_run("--policy", "scripted", "--policy-option", "latency_s=0", "--reward", "math", "--metadata", "answer=42")
    )
    assert (data["reward"], data["metadata"]) == ("math", {"answer": "42"})
    scores = {c["text"]: c["score"] for c in data["candidates"]}
    assert scores == {
        "The product is 42.": 1.0,
        "The product is 41.": 0.0,
        "Checked again, it is 42.": 1.0,
        "Checked again, it is 48.": 0.0,
    }
    assert data["score"] == 1.0 and "42" in data["answer"]
    assert {c["score_details"]["field"] for c in data["candidates"]} == {"answer"}


def test_several_rewards_with_weights_and_per_reward_options(scripted_math: Path, length_reward: str) -> None:
    pytest.importorskip("math_verify")
    data = completed(
        tpo_run(
            "--policy",
            "scripted",
            "--policy-option",
            "latency_s=0",
            "--reward",
            length_reward,
            "--reward",
            "math",
            "--reward-weights",
            "0.5,0.5",
            "--reward-normalize",
            "none",
            "--reward-option",
            "math.field=answer",
            "--metadata",
            "answer=42",
        )
    )
    # math.field=answer reached the math reward alone (it is named after its field); the python reward took no option.
    assert data["reward"] == f"0.5*{length_reward} + 0.5*math:answer"
    assert len(data["candidates"]) == 4
    for c in data["candidates"]:
        right = 1.0 if "42" in c["text"] else 0.0
        assert c["score"] == pytest.approx(0.5 * len(c["text"]) + 0.5 * right)
        parts = c["score_details"]["components"]
        assert [(p["name"], p["weight"], p["value"]) for p in parts] == [
            (length_reward, 0.5, float(len(c["text"]))),
            ("math:answer", 0.5, right),
        ]


# ---------------------------------------------------------------------------- the critic


@pytest.mark.usefixtures("allow_real_requests")
def test_a_critic_on_another_backend_writes_critiques_and_rewrites(
    scripted: Path, causal_lm_dir: Path, length_reward: str
) -> None:
    data = completed(
        tpo_run(
            "--policy",
            "scripted",
            "--policy-option",
            "latency_s=0",
            "--critic",
            f"hf:{causal_lm_dir}",
            "--reward",
            length_reward,
        )
    )
    assert (data["policy"], data["critic"], data["reward"]) == ("scripted", f"hf:{causal_lm_dir}", length_reward)
    # The policy only sampled; the critique, the feedback and the rewrites came from the tiny model.
    assert logged_purposes(scripted) == ["sample"]
    step = data["steps"][1]
    assert step["critique"] and not step["critique"].startswith("Critique of step")
    assert step["feedback"] and not step["feedback"].startswith("Advice for step")
    rewrites = [c for c in data["candidates"] if c["step"] == 1]
    assert rewrites and all(not c["text"].startswith("Rewrite") for c in rewrites)
    assert {c["finish_reason"] for c in rewrites} == {"length"}  # 4 tokens of a model that never stops
    assert all(c["text"].startswith("Answer ") for c in data["candidates"] if c["step"] == 0)


# ---------------------------------------------------------------------------- mistakes


def installed_names(stderr: str) -> set[str]:
    """The names after "installed:" in an unknown-plugin error."""
    assert "installed: " in stderr, stderr
    listed = stderr.split("installed: ", 1)[1].splitlines()[0]
    return {name.strip() for name in listed.split(",")}


def test_an_unknown_policy_backend_lists_the_installed_ones() -> None:
    result = tpo_run("--policy", "nosuch:model")
    assert result.exit_code == 2
    assert "unknown policy backend 'nosuch'" in result.stderr
    assert set(BUILTIN_POLICIES) <= installed_names(result.stderr)
    assert result.stdout == ""


@pytest.mark.usefixtures("plugin_installed")
def test_an_unknown_reward_lists_the_installed_ones() -> None:
    result = tpo_run("--policy", "scripted", "--reward", "nosuch")
    assert result.exit_code == 2
    assert "unknown reward 'nosuch'" in result.stderr
    assert set(BUILTIN_REWARDS) <= installed_names(result.stderr)
    assert result.stdout == ""


def test_an_option_the_hf_policy_does_not_take_is_named(causal_lm_dir: Path, length_reward: str) -> None:
    # No allow_real_requests: the option must be refused before any attempt to load the model.
    result = tpo_run("--policy", f"hf:{causal_lm_dir}", "--policy-option", "beam_width=3", "--reward", length_reward)
    assert result.exit_code == 2
    assert "the hf policy backend: unknown option 'beam_width'; it takes:" in result.stderr
    assert "batch_size" in result.stderr  # and it says what it does take
    assert result.stdout == ""


def test_the_math_reward_without_a_reference_fails_the_run_and_names_the_field(scripted_math: Path) -> None:
    pytest.importorskip("math_verify")
    result = tpo_run("--policy", "scripted", "--policy-option", "latency_s=0", "--reward", "math")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "failed" and data["answer"] is None
    assert data["error"].startswith("no answer could be scored")
    assert "has no reference answer" in data["error"] and "'answer'" in data["error"]
    assert all(c["score"] is None and "'answer'" in c["score_error"] for c in data["candidates"])
    assert logged_purposes(scripted_math) == ["sample"]  # no critique of answers nobody could score


def test_models_built_before_a_failing_one_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpo.cli import _common
    from tpo.errors import ConfigError
    from tpo.testing import ScriptedPolicy

    closed: list[str] = []

    class Closing(ScriptedPolicy):
        async def aclose(self) -> None:
            closed.append(self.name)

    monkeypatch.setattr(tpo.models, "build_policy", lambda spec, options, server: Closing(name=spec))
    with pytest.raises(ConfigError, match="unknown reward 'nosuch'"):
        _common.build_models({"policy_spec": "p", "critic_spec": "c", "reward_specs": ["nosuch"]})
    assert closed == ["c", "p"]


def test_base_url_reaches_a_judge_on_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpo.cli import _common
    from tpo.testing import ScriptedPolicy

    made: list[tuple[str, dict[str, object]]] = []

    def fake(spec: str, **options: object) -> ScriptedPolicy:
        made.append((spec, options))
        return ScriptedPolicy(name=spec)

    monkeypatch.setattr(tpo.models, "policy_from_spec", fake)
    monkeypatch.setattr("tpo.rewards.judge.policy_from_spec", fake)
    _common.build_models(
        {
            "policy_spec": "openai:m",
            "reward_specs": ["judge:openai:j"],
            "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": "MY_KEY",
        }
    )
    assert made == [
        ("openai:m", {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY"}),
        ("openai:j", {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY"}),
    ]


def test_plugin_text_is_shown_verbatim_not_as_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpo.cli import plugins
    from tpo.registry import PluginInfo

    infos = [
        PluginInfo("br", "g", "m:C", "Scores [bold]answers[/bold] with [x] and [/]", {"batching": True}),
        PluginInfo("broken", "g", "m:D", "", {}, error="ImportError: needs pkg[extra]"),
    ]
    monkeypatch.setattr(plugins, "list_plugins", lambda group: infos)
    result = CliRunner().invoke(cli, ["backends", "--verbose"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Scores [bold]answers[/bold] with [x] and [/]" in result.output
    assert "needs pkg[extra]" in result.output
