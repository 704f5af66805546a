"""``tpo run``: options, progress, JSON output and errors with scripted models; then the real bundled model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner, Result

import tpo
import tpo.models
from tpo import GenerationRequest, derive_seed
from tpo.cli import cli
from tpo.cli.run import DEMO_MAX_TOKENS
from tpo.rewards.judge import DEFAULT_RUBRIC
from tpo.testing import ScriptedPolicy, default_reply


def judged_reply(request: GenerationRequest) -> list[str]:
    """Default replies; the judge rates an answer by the first number in it, plus two (at most 10)."""
    if request.purpose == "judge":
        answer = request.messages[-1].content.rsplit("Reply:", 1)[-1]
        numbers = [int(n) for n in re.findall(r"\d+", answer)]
        return [f"Rating: {min(10, 2 + (numbers[0] if numbers else 0))}"]
    return default_reply(request)


class Built:
    """What the command built: the policy specs and options it asked for, and the scripted policy."""

    def __init__(self) -> None:
        self.specs: list[tuple[str, dict[str, Any]]] = []
        self.policy: ScriptedPolicy | None = None


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Built:
    """Replace policy construction with a scripted policy; the reward (the judge) is built for real."""
    record = Built()

    def fake_policy_from_spec(spec: str, **options: Any) -> ScriptedPolicy:
        record.specs.append((spec, options))
        record.policy = ScriptedPolicy(judged_reply, batching=True, name=f"fake:{spec}")
        return record.policy

    monkeypatch.setattr(tpo.models, "policy_from_spec", fake_policy_from_spec)
    return record


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files("tpo").joinpath("result.schema.json").read_text(encoding="utf-8"))
    return data


# ---------------------------------------------------------------------- scripted models


def test_progress_steps_and_the_best_answer(built: Built) -> None:
    result = run("Count to ten.", "--depth", "1", "--width", "2")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "SmolLM2-135M-Instruct" in err and "demonstration" in err  # the demo notice
    assert "tpo width 2, depth 1, seed 0" in err
    assert re.search(r"^sample$", err, re.MULTILINE) and re.search(r"^step 1: tpo$", err, re.MULTILINE)
    assert "rewrote the best answer" in err
    assert "best answer · score" in err
    assert err.index("sample") < err.index("step 1: tpo") < err.index("best answer")
    # Without a terminal the best answer alone also goes to standard output.
    [line] = result.stdout.splitlines()
    assert line.startswith("Improved answer") or line.startswith("Answer")
    assert line in err


def test_model_text_that_looks_like_markup_is_shown_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["[/INST] 7 is arr[i] [bold]x[/bold]", "[/0] 3 closing tag first"]

    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "sample":
            return texts[: request.n]
        return judged_reply(request)

    monkeypatch.setattr(
        tpo.models, "policy_from_spec", lambda spec, **options: ScriptedPolicy(reply, batching=True, name="fake")
    )
    result = run("Q", "--depth", "0", "--width", "2")
    assert result.exit_code == 0, result.output
    assert "[/INST] 7 is arr[i] [bold]x[/bold]" in result.output  # the best answer, verbatim in the panel


def test_json_output_parses_and_follows_the_schema(built: Built, schema: dict[str, Any]) -> None:
    result = run("Count to ten.", "--json", "-d", "1", "-n", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.Draft202012Validator(schema).validate(data)
    assert data["status"] == "complete" and data["answer"] and data["score"] is not None
    assert {c["id"] for c in data["candidates"]} >= {data["best_id"]}
    assert [s["step"] for s in data["steps"]] == [0, 1]
    assert data["config"]["width"] == 2 and data["config"]["depth"] == 1
    # What the judge said is kept with each candidate.
    details = [c["score_details"] for c in data["candidates"]]
    assert all(d["method"] == "parsed" and d["reply"] == f"Rating: {d['rating']}" for d in details)
    assert result.stderr == ""  # no progress and no notice in JSON mode


def test_no_options_means_tpo_d2_n5_on_the_bundled_model_with_the_judge(built: Built) -> None:
    result = run("Count to ten.", "--json")
    assert result.exit_code == 0, result.output
    assert built.specs == [("llamacpp", {})]  # the bundled model, no options
    data = json.loads(result.stdout)
    config = data["config"]
    assert (config["mode"], config["width"], config["depth"]) == ("tpo", 5, 2)
    # The paper's sampling settings, with fewer new tokens for the tiny demonstration model.
    assert (config["temperature"], config["top_p"], config["max_tokens"]) == (0.7, 0.95, DEMO_MAX_TOKENS)
    assert data["reward"] == "judge:fake:llamacpp" and data["policy"] == "fake:llamacpp"
    assert [s["kind"] for s in data["steps"]] == ["sample", "tpo", "tpo"]
    assert len(data["candidates"]) == 15
    assert built.policy is not None
    assert len(built.policy.requests_for("judge")) == 15


def test_the_demo_token_limit_gives_way_to_max_tokens_and_to_other_models(built: Built) -> None:
    given = json.loads(run("Hi", "--json", "-d", "0", "--max-tokens", "2048").stdout)
    assert given["config"]["max_tokens"] == 2048
    other = json.loads(run("Hi", "--json", "-d", "0", "--policy", "openai:some-model").stdout)
    assert other["config"]["max_tokens"] == 2048
    assert built.specs[-1] == ("openai:some-model", {})
    shown = run("Hi", "-d", "0", "-n", "1")
    assert f"limited to {DEMO_MAX_TOKENS} new tokens" in " ".join(shown.stderr.split())


def test_mode_revision(built: Built) -> None:
    result = run("Count to ten.", "--json", "--mode", "revision", "-d", "2", "-n", "3")
    data = json.loads(result.stdout)
    assert [s["kind"] for s in data["steps"]] == ["sample", "revision", "revision"]
    assert all(s["rejected_id"] is None for s in data["steps"])


def test_seed_temperature_and_max_tokens_reach_the_requests(built: Built) -> None:
    result = run(
        "Count to ten.", "--json", "-d", "0", "-n", "2", "--seed", "42", "--temperature", "0.3", "--max-tokens", "64"
    )
    data = json.loads(result.stdout)
    assert data["seed"] == 42
    assert built.policy is not None
    [sample] = built.policy.requests_for("sample")
    assert sample.sampling.seed == derive_seed(42, "0", 0, "sample")
    assert sample.sampling.temperature == 0.3 and sample.sampling.max_tokens == 64
    assert sample.n == 2


def test_prefer_sets_the_judges_rubric(built: Built, tmp_path: Path) -> None:
    run("Count to ten.", "-d", "0", "-n", "1", "--prefer", "Answers that use Roman numerals.")
    assert built.policy is not None
    [judge] = built.policy.requests_for("judge")
    assert "Answers that use Roman numerals." in judge.messages[0].content
    assert DEFAULT_RUBRIC not in judge.messages[0].content

    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Replies no longer than ten words.\n", encoding="utf-8")
    run("Count to ten.", "-d", "0", "-n", "1", "--prefer-file", str(rubric))
    [judge] = built.policy.requests_for("judge")
    assert "Replies no longer than ten words." in judge.messages[0].content


def test_a_judge_that_never_rates_fails_the_run_with_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(request: GenerationRequest) -> list[str]:
        return ["I will not rate that."] if request.purpose == "judge" else default_reply(request)

    monkeypatch.setattr(tpo.models, "policy_from_spec", lambda spec, **o: ScriptedPolicy(never))
    result = run("Count to ten.", "-d", "1", "-n", "2")
    assert result.exit_code == 1
    assert "Failed:" in result.stderr and "no rating from 1 to 10" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "0"], "Invalid value for '--width'"),
        (["--depth", "-1"], "Invalid value for '--depth'"),
        (["--mode", "greedy"], "Invalid value for '--mode'"),
        (["--max-tokens", "many"], "Invalid value for '--max-tokens'"),
        (["--temperature", "9"], "temperature must be a number in [0, 5], got 9.0"),
        (["--top-p", "0"], "top_p must be a number in (0, 1], got 0.0"),
        (["--prefer", " "], "judge: prefer must be a non-empty string, got ' '"),
        (["--reward-option", "temprature=0.1"], "judge: unknown option 'temprature'; it takes: prefer,"),
        (["--policy-option", "broken"], "is not KEY=VALUE"),
    ],
)
def test_bad_options_exit_with_status_2_and_say_what_is_wrong(built: Built, args: list[str], message: str) -> None:
    result = run("Count to ten.", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_prompt_is_required(built: Built) -> None:
    result = run()
    assert result.exit_code == 2 and "give a PROMPT argument or --messages FILE" in result.stderr
    assert built.specs == []


def test_bad_llamacpp_options_fail_before_loading_the_model() -> None:
    # Real model requests are forbidden in this test, so reaching the model would fail differently.
    result = run("Hi", "--policy-option", "n_ctx=tiny")
    assert result.exit_code == 2 and "llamacpp: n_ctx must be an integer >= 16, got 'tiny'" in result.stderr
    result = run("Hi", "--policy", "llamacpp:/nowhere/model.gguf")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_config_file_gives_defaults_that_the_command_line_overrides(built: Built, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "prompt: Count to ten.\nwidth: 3\ndepth: 1\nseed: 7\njson: true\n"
        "policy: openai:some-model\npolicy-option: {timeout_s: 30}\n"
    )
    result = run("--config", str(config), "--width", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["config"]["width"], data["config"]["depth"], data["seed"]) == (2, 1, 7)  # the command line wins
    assert data["messages"] == [{"role": "user", "content": "Count to ten."}]
    assert built.specs == [("openai:some-model", {"timeout_s": 30})]
    # A prompt on the command line replaces the file's.
    assert json.loads(run("--config", str(config), "Say hi.").stdout)["messages"][0]["content"] == "Say hi."


def test_config_file_toml_with_the_demo_model_and_messages(built: Built, tmp_path: Path) -> None:
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "From the file."}]), encoding="utf-8")
    config = tmp_path / "run.toml"
    config.write_text(f'messages = "{conversation.as_posix()}"\nmax_tokens = 100\ndepth = 0\nwidth = 1\njson = true\n')
    data = json.loads(run("--config", str(config)).stdout)
    assert data["messages"][0]["content"] == "From the file."
    # A value from the file is the user's choice, not a default: the demo's token limit gives way to it.
    assert data["config"]["max_tokens"] == 100 and built.specs == [("llamacpp", {})]


def test_config_file_errors_exit_with_status_2(built: Built, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("widht: 3\n")
    result = run("Hi", "--config", str(bad))
    assert result.exit_code == 2 and "unknown option 'widht'" in result.stderr and "messages" in result.stderr
    bad.write_text("width: [1, 2]\n")
    result = run("Hi", "--config", str(bad))
    assert result.exit_code == 2 and "'width' takes a single value, not a list" in result.stderr
    assert built.specs == []
    assert "--config FILE" in run("--help").output


# ---------------------------------------------------------------------- the command group


def test_version_as_V_or_version() -> None:
    for flag in ("-V", "--version"):
        result = CliRunner().invoke(cli, [flag], prog_name="tpo")
        assert result.exit_code == 0 and result.output == f"tpo, version {tpo.__version__}\n"


def tpo_main(**env: str) -> subprocess.CompletedProcess[str]:
    """The ``tpo`` entry point (``tpo.cli:main``) in a fresh process, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", "from tpo.cli import main; main()"],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_script_is_produced(shell: str) -> None:
    # The README's `eval "$(_TPO_COMPLETE=bash_source tpo)"`, and its zsh and fish twins.
    done = tpo_main(_TPO_COMPLETE=f"{shell}_source")
    assert done.returncode == 0, done.stderr
    assert f"_TPO_COMPLETE={shell}_complete" in done.stdout and "tpo" in done.stdout


def test_shell_completion_completes_commands_options_and_choices() -> None:
    done = tpo_main(_TPO_COMPLETE="bash_complete", COMP_WORDS="tpo ex", COMP_CWORD="1")
    assert done.stdout.split() == ["plain,export"]
    done = tpo_main(_TPO_COMPLETE="bash_complete", COMP_WORDS="tpo run --conf", COMP_CWORD="2")
    assert done.stdout.split() == ["plain,--config"]
    done = tpo_main(_TPO_COMPLETE="bash_complete", COMP_WORDS="tpo run --mode ", COMP_CWORD="3")
    assert done.stdout.split() == ["plain,tpo", "plain,revision", "plain,bon"]


# ---------------------------------------------------------------------- the real bundled model


def tpo_script() -> str:
    script = Path(sys.executable).with_name("tpo")
    if not script.exists():
        pytest.skip("the tpo console script is not installed next to this Python")
    return str(script)


@pytest.mark.slow
@pytest.mark.real_model
def test_a_real_run_on_the_bundled_model() -> None:
    done = subprocess.run(
        [tpo_script(), "run", "What is the capital of France?", "--depth", "1", "--width", "2", "--max-tokens", "48"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "demonstration" in err
    assert re.search(r"^sample$", err, re.MULTILINE) and re.search(r"^step 1: (tpo|revision)", err, re.MULTILINE)
    assert "best answer · score" in err
    assert done.stdout.strip()  # the best answer, for redirection
    assert not re.search(r"llama_|ggml_|llm_load", err)  # llama.cpp stays quiet


@pytest.mark.slow
@pytest.mark.real_model
def test_the_real_default_is_d2_n5_with_the_judge_reward() -> None:
    # Sixteen new tokens per reply keep the whole D2-N5 run to seconds (about 15-70 s on a
    # shared two-core machine); everything else is what `tpo run PROMPT` does.
    result = run("Name a fruit.", "--max-tokens", "16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["config"]["mode"], data["config"]["width"], data["config"]["depth"]) == ("tpo", 5, 2)
    assert data["policy"].startswith("llamacpp:SmolLM2-135M-Instruct")
    assert data["reward"] == "judge:" + data["policy"]
    assert [s["step"] for s in data["steps"]] == [0, 1, 2]
    assert data["status"] == "complete" and data["answer"]
    scored = [c for c in data["candidates"] if c["score"] is not None]
    assert all(1.0 <= c["score"] <= 10.0 for c in scored) and len(scored) >= 10
    assert all(c["score_details"]["method"] == "logprobs" for c in scored)
