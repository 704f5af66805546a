"""Only options that can change a result are in a batch run's fingerprint; connection settings may change on resuming.

Raising a timeout after timeouts, or tuning the concurrency, used to be refused unless
``--restart`` discarded every finished result. Plugins declare their connection settings
(``tpo.options.option(..., affects_results=False)``); the fingerprint leaves them out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import tpo.cli.batch as batch_cli
from conftest import hash_score, pure_reply
from tpo import BackendError, GenerationRequest, Models
from tpo.backends.openai_server import OpenAIOptions
from tpo.batch.fingerprint import result_options
from tpo.batch.runner import sidecar_dir
from tpo.cli import cli
from tpo.testing import FunctionReward, ScriptedPolicy

CONNECTION = {
    "timeout_s": 5,
    "max_retries": 0,
    "max_concurrency": 4,
    "backoff_s": 0.1,
    "max_backoff_s": 1,
    "max_retry_after_s": 0,
    "probe_timeout_s": 2,
    "base_url": "http://a:1/v1",
    "api_key_env": "K",
}


def test_the_openai_backend_declares_its_connection_settings() -> None:
    assert OpenAIOptions.not_affecting_results() == frozenset(CONNECTION)
    # What changes answers stays: how n is asked for changes the seeds, the window what fits.
    assert {"native_n", "context_window", "extra_body"}.isdisjoint(OpenAIOptions.not_affecting_results())


def test_result_options_leave_out_what_plugins_declare_harmless() -> None:
    models = {
        "policy": "openai:m",
        "policy_options": {**CONNECTION, "native_n": False, "extra_body": {"top_k": 5}},
        "critic": None,
        "critic_options": {"timeout_s": 9},
        "reward": ["judge:openai:j", "math"],
        "reward_options": {
            "judge.backend_options": {"timeout_s": 3, "context_window": 8192},
            "1.max_tokens": 9,
            "math.field": "gold",
            "9.timeout_s": 1,
        },
        "reward_weights": None,
        "rubric_sha256": None,
    }
    kept = result_options(models)
    assert kept["policy_options"] == {"native_n": False, "extra_body": {"top_k": 5}}
    assert kept["critic_options"] == {}  # the critic is the policy: the openai backend's options apply
    assert kept["reward_options"] == {
        "judge.backend_options": {"context_window": 8192},
        "1.max_tokens": 9,
        "math.field": "gold",
        "9.timeout_s": 1,
    }
    assert {k: v for k, v in kept.items() if not k.endswith("_options")} == {
        k: v for k, v in models.items() if not k.endswith("_options")
    }
    # A plugin tpo cannot load (or one with undeclared options) keeps all its options.
    assert result_options({"policy": "scripted", "policy_options": {"timeout_s": 5}})["policy_options"] == {
        "timeout_s": 5
    }
    http = {
        "timeout_s": 5,
        "max_retries": 1,
        "concurrency": 2,
        "backoff_s": 1,
        "max_backoff_s": 2,
        "max_retry_after_s": 0,
        "api_key_env": "K",
        "index": 1,
        "headers": {"x-model": "v2"},
    }
    assert result_options({"reward": "http:h/pooling", "reward_options": http})["reward_options"] == {
        "index": 1,
        "headers": {"x-model": "v2"},
    }
    assert result_options({"reward": "python:m:f", "reward_options": {"concurrency": 4, "batched": True}})[
        "reward_options"
    ] == {"batched": True}
    # The math reward's timeout fails slow checks: it changes results, and stays.
    assert result_options({"reward": "math", "reward_options": {"timeout_s": 1}})["reward_options"] == {"timeout_s": 1}


class Flaky:
    """Scripted models for the command: prompts in ``failing`` fail, the rest succeed."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def reply(self, request: GenerationRequest) -> list[str]:
        if request.prompt_id in self.failing:
            raise BackendError("no reply within 5 s")
        return pure_reply(request)

    def build(self, params: dict[str, Any]) -> Models:
        return Models(ScriptedPolicy(self.reply), None, FunctionReward(hash_score, name="hash"))


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Flaky:
    fake = Flaky()
    monkeypatch.setattr(batch_cli, "build_models", fake.build)
    return fake


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    return path


def invoke(data: Path, out: Path, *args: object) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "batch",
            str(data),
            "-o",
            str(out),
            "--id-field",
            "id",
            "-n",
            "1",
            "-d",
            "1",
            "--policy",
            "openai:m",
            *map(str, args),
        ],
        catch_exceptions=False,
    )


def test_failed_prompts_are_retried_with_new_connection_settings(tmp_path: Path, data: Path, flaky: Flaky) -> None:
    out = tmp_path / "out.jsonl"
    flaky.failing = {"q1", "q2"}
    first = invoke(
        data,
        out,
        "--policy-option",
        "timeout_s=5",
        "--policy-option",
        "max_concurrency=8",
        "--base-url",
        "http://gpu-a:8000/v1",
    )
    assert first.exit_code == 1, first.output
    flaky.failing = set()
    again = invoke(
        data,
        out,
        "--policy-option",
        "timeout_s=600",
        "--policy-option",
        "max_retries=10",
        "--policy-option",
        "backoff_s=2",
        "--base-url",
        "http://gpu-b:8000/v1",
        "--concurrency",
        2,
    )
    assert again.exit_code == 0, again.output
    assert "retrying 2 prompt(s)" in again.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in results) == ["q0", "q1", "q2", "q3"]
    assert all(r["status"] == "complete" for r in results)
    fingerprint = json.loads((sidecar_dir(out) / "fingerprint.json").read_text())
    assert "timeout_s" not in json.dumps(fingerprint) and "gpu-" not in json.dumps(fingerprint)
    # config.json still records every option of the latest session.
    config = json.loads((sidecar_dir(out) / "config.json").read_text())
    assert config["models"]["policy_options"]["timeout_s"] == 600


def test_options_that_change_results_are_still_refused_without_a_confusing_line(
    tmp_path: Path, data: Path, flaky: Flaky
) -> None:
    out = tmp_path / "out.jsonl"
    assert invoke(data, out, "--policy-option", 'extra_body={"top_k": 5}').exit_code == 0
    refused = invoke(data, out, "--policy-option", "timeout_s=30")
    assert refused.exit_code == 2, refused.output
    assert "models.policy_options.extra_body.top_k: 5 → <unset>" in refused.stderr
    assert "'<unset>' → {}" not in refused.stderr and "{} → '<unset>'" not in refused.stderr
    assert "timeout_s" not in refused.stderr


def test_runs_fingerprinted_with_connection_settings_still_resume(tmp_path: Path, data: Path, flaky: Flaky) -> None:
    out = tmp_path / "out.jsonl"
    flaky.failing = {"q3"}
    assert invoke(data, out, "--policy-option", "timeout_s=5").exit_code == 1
    # A fingerprint written before connection settings were left out still carries them.
    path = sidecar_dir(out) / "fingerprint.json"
    old = json.loads(path.read_text())
    old["models"]["policy_options"] = {"timeout_s": 5, "max_concurrency": 16}
    path.write_text(json.dumps(old))
    flaky.failing = set()
    again = invoke(data, out, "--policy-option", "timeout_s=60")
    assert again.exit_code == 0, again.output
