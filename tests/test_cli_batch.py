"""`tpo batch` from the command line, with scripted models in place of the real ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import tpo.cli.batch as batch_cli
from conftest import hash_score, pure_reply
from tpo import BackendError, GenerationRequest, Models
from tpo.batch.runner import sidecar_dir
from tpo.cli import cli
from tpo.testing import FunctionReward, ScriptedPolicy


class Models_:
    """What the patched ``build_models`` hands out, and what it was asked for."""

    def __init__(self) -> None:
        self.fail_ids: set[str] = set()
        self.interrupt_after: int | None = None
        self.built: list[dict[str, Any]] = []
        self.calls = 0

    def reply(self, request: GenerationRequest) -> list[str]:
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        if request.prompt_id in self.fail_ids:
            raise BackendError("connection refused")
        return pure_reply(request)

    def build(self, params: dict[str, Any]) -> Models:
        self.built.append(params)
        return Models(ScriptedPolicy(self.reply), None, FunctionReward(hash_score, name="hash"))


@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch) -> Models_:
    fake = Models_()
    monkeypatch.setattr(batch_cli, "build_models", fake.build)
    return fake


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"qid": f"q{i}", "prompt": f"Question {i}?", "answer": str(i)}) + "\n" for i in range(5))
    )
    return path


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(cli, ["batch", *map(str, args)], catch_exceptions=False)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def saved_config(out: Path) -> dict[str, Any]:
    return json.loads((sidecar_dir(out) / "config.json").read_text())  # type: ignore[no-any-return]


def test_a_run_writes_the_output_and_a_summary(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    result = invoke(
        data, "-o", out, "--id-field", "qid", "-n", 2, "-d", 1, "--policy", "openai:m", "--policy-option", "n_ctx=512"
    )
    assert result.exit_code == 0, result.output
    got = lines(out)
    assert sorted(d["prompt_id"] for d in got) == [f"q{i}" for i in range(5)]
    assert all(d["status"] == "complete" and d["metadata"] == {"answer": d["prompt_id"][1:]} for d in got)
    assert all(len(d["steps"]) == 2 and len(d["candidates"]) >= 2 for d in got)
    assert "5 of 5 prompts complete" in result.stderr
    assert result.stderr.count("] done q") == 5  # the plain log: stderr is not a terminal here
    assert models.built[0]["policy_spec"] == "openai:m"
    config = saved_config(out)
    assert config["method"]["width"] == 2 and config["models"]["policy_options"] == {"n_ctx": 512}
    assert config["options"]["id_field"] == "qid" and config["tpo_version"]


def test_failures_stay_local_and_set_the_exit_status(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    models.fail_ids = {"q1", "q3"}
    result = invoke(data, "-o", out, "--id-field", "qid", "-n", 2, "-d", 1)
    assert result.exit_code == 1
    assert "3 of 5 prompts complete, 2 failed (q1, q3)" in result.stderr
    assert "FAILED q1: BackendError" in result.stderr
    by_id = {d["prompt_id"]: d for d in lines(out)}
    assert by_id["q1"]["status"] == "failed" and "connection refused" in by_id["q1"]["error"]
    # Running again retries them; with the backend back, all complete.
    models.fail_ids = set()
    again = invoke(data, "-o", out, "--id-field", "qid", "-n", 2, "-d", 1)
    assert again.exit_code == 0, again.output
    assert "retrying 2 prompt(s)" in again.stderr
    assert sorted(d["status"] for d in lines(out)) == ["complete"] * 5


def test_a_finished_run_does_not_load_models_again(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    assert invoke(data, "-o", out, "-n", 2, "-d", 0).exit_code == 0
    result = invoke(data, "-o", out, "-n", 2, "-d", 0)
    assert result.exit_code == 0 and len(models.built) == 1
    assert "5 of 5 prompts complete" in result.stderr and "This session" not in result.stderr


def test_invalid_input_stops_before_any_model_work(tmp_path: Path, models: Models_) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": ""}\n{oops\n\xff\xfe\n')
    out = tmp_path / "out.jsonl"
    result = invoke(path, "-o", out)
    assert result.exit_code == 2
    for expected in (
        "in.jsonl line 2: the prompt field 'prompt' is empty",
        "in.jsonl line 3: not valid JSON",
        "in.jsonl line 4: not valid UTF-8 text",
        "3 of 4 rows are invalid; nothing was run",
    ):
        assert expected in result.stderr
    assert models.built == [] and not out.exists() and not sidecar_dir(out).exists()
    lenient = invoke(path, "-o", out, "--skip-invalid", "-n", 1, "-d", 0)
    assert lenient.exit_code == 0, lenient.output
    assert "skipped 3 invalid row(s)" in lenient.stderr and len(lines(out)) == 1
    assert "1 of 1 prompts complete; 3 invalid input row(s) skipped" in lenient.stderr


def test_a_changed_configuration_is_refused_until_restart(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    assert invoke(data, "-o", out, "-n", 2, "-d", 1).exit_code == 0
    refused = invoke(data, "-o", out, "-n", 3, "-d", 1, "--reward", "hf:rm")
    assert refused.exit_code == 2
    assert "method.width: 2 → 3" in refused.stderr and "models.reward" in refused.stderr
    assert "--restart" in refused.stderr and len(models.built) == 1
    restarted = invoke(data, "-o", out, "-n", 3, "-d", 1, "--reward", "hf:rm", "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert f"removed {out} (5 finished prompts)" in restarted.stderr
    assert len(lines(out)) == 5 and saved_config(out)["method"]["width"] == 3


def test_config_file_yaml_with_command_line_override(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(
        "width: 3\ndepth: 1\nid-field: qid\nlimit: 2\nreward: [hf:rm-a, judge]\nreward_weights: '0.7,0.3'\n"
        "policy-option: {n_ctx: 1024, flash: true}\nno-retry-failed: true\nlog: quiet\n"
    )
    result = invoke(data, "-o", out, "--config", config, "--width", 2)
    assert result.exit_code == 0, result.output
    saved = saved_config(out)
    assert saved["method"]["width"] == 2 and saved["method"]["depth"] == 1  # command line over file
    assert saved["input"]["limit"] == 2 and saved["input"]["id_field"] == "qid"
    assert saved["models"]["reward"] == ["hf:rm-a", "judge"] and saved["models"]["reward_weights"] == "0.7,0.3"
    assert saved["models"]["policy_options"] == {"n_ctx": 1024, "flash": True}
    assert saved["retry_failed"] is False and saved["options"]["config_file"] == str(config)
    assert len(lines(out)) == 2 and "] done" not in result.stderr  # quiet


def test_config_file_toml_and_its_errors(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    config = tmp_path / "run.toml"
    config.write_text(f'width = 1\ndepth = 0\nshuffle = true\nshuffle_seed = 4\nlimit = 3\noutput = "{out}"\n')
    result = CliRunner().invoke(cli, ["batch", str(data), "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert saved_config(out)["input"]["shuffle_seed"] == 4 and len(lines(out)) == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("widht = 3\n")
    result = invoke(data, "-o", out, "--config", bad)
    assert result.exit_code == 2 and "unknown option 'widht'" in result.stderr
    bad.write_text("width = [\n")
    result = invoke(data, "-o", out, "--config", bad)
    assert result.exit_code == 2 and "is not valid TOML" in result.stderr
    other = tmp_path / "run.ini"
    other.write_text("[x]\n")
    result = invoke(data, "-o", out, "--config", other)
    assert result.exit_code == 2 and "expected a .yaml, .yml or .toml file" in result.stderr


def test_interrupting_says_how_to_continue_and_the_next_run_does(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    models.interrupt_after = 6
    result = invoke(data, "-o", out, "-n", 2, "-d", 1, "--concurrency", 1)
    assert result.exit_code == 130
    assert "Interrupted:" in result.stderr and "Run the same command again to continue" in result.stderr
    before = len(lines(out))
    assert 0 < before < 5
    models.interrupt_after = None
    models.calls = 0
    again = invoke(data, "-o", out, "-n", 2, "-d", 1, "--concurrency", 1)
    assert again.exit_code == 0, again.output
    assert f"resuming: {before} of 5 prompts already finished" in again.stderr
    assert len(lines(out)) == 5 and len({d["prompt_id"] for d in lines(out)}) == 5
    # Only what was not checkpointed is computed: fewer calls than a whole run (5 prompts x 4 calls).
    assert models.calls < 5 * 4 - before * 4 + 4


def test_help_names_the_line_format() -> None:
    result = CliRunner().invoke(cli, ["batch", "--help"])
    assert result.exit_code == 0 and "docs/batch.md" in result.output and "--skip-invalid" in result.output


def test_rich_progress_display_runs(tmp_path: Path, data: Path, models: Models_) -> None:
    models.fail_ids = {"q2"}
    result = invoke(data, "-o", tmp_path / "out.jsonl", "--id-field", "qid", "-n", 2, "-d", 1, "--log", "rich")
    assert result.exit_code == 1
    assert "starting: 5 prompts" in result.stderr and "FAILED q2" in result.stderr
    assert "4 of 5 prompts complete, 1 failed (q2)" in result.stderr


# ---------------------------------------------------------------------------- the fingerprint


@pytest.mark.parametrize(
    "first, second, expected",
    [
        (["--max-tokens", "100"], ["--max-tokens", "200"], "method.max_tokens: 100 → 200"),
        (["--critic-max-tokens", "50"], ["--critic-max-tokens", "60"], "method.critic_max_tokens: 50 → 60"),
        (
            ["--policy-option", "tokenizer=a"],
            ["--policy-option", "tokenizer=b"],
            "models.policy_options.tokenizer: 'a' → 'b'",
        ),
        (
            ["--reward-option", "max_tokens=10"],
            ["--reward-option", "max_tokens=20"],
            "models.reward_options.max_tokens: 10 → 20",
        ),
        (
            ["--critic", "openai:c", "--critic-option", "temperature=0.1"],
            ["--critic", "openai:c", "--critic-option", "temperature=0.9"],
            "models.critic_options.temperature: 0.1 → 0.9",
        ),
        (
            ["--reward", "hf:a", "--reward", "hf:b"],
            ["--reward", "hf:a", "--reward", "hf:b", "--reward-normalize", "zscore"],
            "models.reward_normalize: 'none' → 'zscore'",
        ),
    ],
)
def test_every_option_that_changes_results_is_fingerprinted(
    tmp_path: Path, data: Path, models: Models_, first: list[str], second: list[str], expected: str
) -> None:
    out = tmp_path / "out.jsonl"
    assert invoke(data, "-o", out, "-n", 1, "-d", 0, *first).exit_code == 0
    refused = invoke(data, "-o", out, "-n", 1, "-d", 0, *second)
    assert refused.exit_code == 2, refused.output
    assert expected in refused.stderr
    assert "***" not in (sidecar_dir(out) / "fingerprint.json").read_text()


def test_options_that_change_no_result_may_change_between_sessions(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    assert invoke(data, "-o", out, "-n", 1, "-d", 0, "--limit", 2).exit_code == 0
    again = invoke(
        data,
        "-o",
        out,
        "-n",
        1,
        "-d",
        0,
        "--limit",
        2,
        "--concurrency",
        3,
        "--log",
        "quiet",
        "--base-url",
        "http://other:9000/v1",
        "--api-key-env",
        "OTHER_KEY",
        "--no-retry-failed",
        "--skip-invalid",
    )
    assert again.exit_code == 0, again.output


def test_secrets_are_masked_by_whole_name_only(tmp_path: Path, data: Path, models: Models_) -> None:
    out = tmp_path / "out.jsonl"
    result = invoke(
        data,
        "-o",
        out,
        "-n",
        1,
        "-d",
        0,
        "--max-tokens",
        77,
        "--policy-option",
        "api_key=sk-secret",
        "--policy-option",
        "tokenizer=tok/one",
        "--reward-option",
        "hf_token=hf_secret",
        "--base-url",
        "https://user:pa55@host/v1",
    )
    assert result.exit_code == 0, result.output
    for name in ("config.json", "fingerprint.json"):
        text = (sidecar_dir(out) / name).read_text()
        assert "sk-secret" not in text and "hf_secret" not in text and "pa55" not in text
    saved = saved_config(out)
    assert saved["models"]["policy_options"] == {"api_key": "***", "tokenizer": "tok/one"}
    assert saved["models"]["reward_options"] == {"hf_token": "***"}
    assert saved["method"]["max_tokens"] == 77 and saved["options"]["max_tokens"] == 77
    assert saved["options"]["base_url"] == "https://user:***@host/v1"


def test_a_new_option_is_fingerprinted_unless_declared_not_to_matter() -> None:
    params = {
        "policy_spec": "p",
        "reward_specs": (),
        "width": 3,
        "prompt_field": "q",
        "concurrency": 4,
        "some_new_option": "x",
    }
    fp = batch_cli._models_fingerprint(params)
    assert fp["some_new_option"] == "x" and fp["policy"] == "p" and fp["reward"] == ["judge"]
    assert "width" not in fp and "prompt_field" not in fp and "concurrency" not in fp
    # Every option of the command is either fingerprinted here, fingerprinted elsewhere, or declared harmless.
    names = {p.name for p in batch_cli.batch_command.params if p.name not in ("input_path", "output")}
    assert set(batch_cli.NOT_FINGERPRINTED) <= names


# ---------------------------------------------------------------------------- prompt ids


def test_an_id_field_every_row_has_is_used_and_said(tmp_path: Path, models: Models_) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    result = invoke(path, "-o", out, "-n", 1, "-d", 0)
    assert result.exit_code == 0, result.output
    assert sorted(d["prompt_id"] for d in lines(out)) == ["p0", "p1", "p2"]
    assert "note: prompt ids are the field 'id', which every row has" in result.stderr
    assert saved_config(out)["input"]["id_field"] == "id"
    # --id-field none: hashes of the rows, whatever they hold.
    hashed = tmp_path / "hashed.jsonl"
    result = invoke(path, "-o", hashed, "-n", 1, "-d", 0, "--id-field", "none")
    assert result.exit_code == 0, result.output
    assert all(len(d["prompt_id"]) == 16 for d in lines(hashed)) and "prompt ids are" not in result.stderr
    # A run that began with row hashes keeps them when resumed without the option (not "a different run").
    again = invoke(path, "-o", hashed, "-n", 1, "-d", 0)
    assert again.exit_code == 0, again.output
    assert "3 of 3 prompts complete" in again.stderr and "different configuration" not in again.stderr
    # Duplicate ids are caught now, with where they are.
    path.write_text(path.read_text() + json.dumps({"id": "p1", "prompt": "Another question?"}) + "\n")
    result = invoke(path, "-o", tmp_path / "dup.jsonl", "-n", 1, "-d", 0)
    assert result.exit_code == 2
    assert "in.jsonl line 4: repeats the id 'p1' of line 2" in result.stderr


def test_a_lone_surrogate_is_an_invalid_row_not_a_backend_error(tmp_path: Path, models: Models_) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "broken \\ud800"}\n')
    out = tmp_path / "out.jsonl"
    result = invoke(path, "-o", out, "-n", 1, "-d", 0)
    assert result.exit_code == 2 and models.built == []
    assert "in.jsonl line 2: field 'prompt' holds a lone UTF-16 surrogate (U+D800 at character 8)" in result.stderr
    lenient = invoke(path, "-o", out, "-n", 1, "-d", 0, "--skip-invalid")
    assert lenient.exit_code == 0, lenient.output
    assert [d["status"] for d in lines(out)] == ["complete"]
    assert "1 of 1 prompts complete; 1 invalid input row(s) skipped" in lenient.stderr


# ---------------------------------------------------------------------------- exit statuses and files


def test_a_run_locked_by_another_process_exits_2_also_through_a_symlink(
    tmp_path: Path, data: Path, models: Models_
) -> None:
    from tpo.batch.durable import take_lock

    out, link = tmp_path / "out.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(out)
    assert invoke(data, "-o", out, "-n", 1, "-d", 0, "--limit", 2).exit_code == 0
    held = take_lock(sidecar_dir(out) / "lock")  # as the other process would hold it
    try:
        for target in (out, link):
            result = invoke(data, "-o", target, "-n", 1, "-d", 0, "--limit", 2)
            assert result.exit_code == 2, (target, result.output)
            assert "Error: another process is writing this run right now" in result.stderr
    finally:
        held.close()
    assert len(lines(out)) == 2 and not (tmp_path / "link.jsonl.tpo").exists()


def test_an_output_folder_that_is_a_file_is_a_one_line_error(tmp_path: Path, data: Path, models: Models_) -> None:
    (tmp_path / "taken").write_text("a file\n")
    result = invoke(data, "-o", tmp_path / "taken" / "out.jsonl", "-n", 1, "-d", 0)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: cannot write {tmp_path / 'taken' / 'out.jsonl'}: {tmp_path / 'taken'} is a file, not a folder"
    )


class Unhandled(BaseException):
    """SIGTERM reached the test's own handler: the command did not handle it."""


@pytest.fixture
def sigterm_guard() -> Any:
    """A SIGTERM the command does not handle fails the test, rather than killing the test process."""
    import signal

    def unhandled(signum: int, frame: object) -> None:
        raise Unhandled("SIGTERM was not handled by the command")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_stops_like_ctrl_c_and_the_next_run_resumes(
    tmp_path: Path, data: Path, models: Models_, sigterm_guard: Any
) -> None:
    import os
    import signal

    out = tmp_path / "out.jsonl"
    real_reply = models.reply

    def terminated_after_six_calls(request: GenerationRequest) -> list[str]:
        if models.calls == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # as docker stop would
        return real_reply(request)

    models.reply = terminated_after_six_calls  # type: ignore[method-assign]
    result = invoke(data, "-o", out, "-n", 2, "-d", 1, "--concurrency", 1)
    assert result.exit_code == 143, result.output
    done = len(lines(out))
    assert 0 < done < 5
    assert f"Stopped by SIGTERM: {done} of 5 prompts are finished in {out}. Run the same command again" in result.stderr
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the command's handler is gone with it
    models.reply = real_reply  # type: ignore[method-assign]
    again = invoke(data, "-o", out, "-n", 2, "-d", 1, "--concurrency", 1)
    assert again.exit_code == 0, again.output
    assert f"resuming: {done} of 5 prompts already finished" in again.stderr and "repaired" not in again.stderr
    ids = [d["prompt_id"] for d in lines(out)]
    assert len(ids) == len(set(ids)) == 5


def test_sigterm_before_the_run_starts_exits_143_with_a_message(
    tmp_path: Path, data: Path, models: Models_, monkeypatch: pytest.MonkeyPatch, sigterm_guard: Any
) -> None:
    import os
    import signal

    real = batch_cli.read_prompts

    def read_then_terminated(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_cli, "read_prompts", read_then_terminated)
    result = invoke(data, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 143
    assert "Stopped by SIGTERM before any prompt ran" in result.stderr and models.built == []


# ---------------------------------------------------------------------------- files that cannot be read or written
#
# Root ignores file modes, and these tests run as root: the command runs in a subprocess without the
# capabilities that let root do so (setpriv --bounding-set), so that read-only means read-only.

FIXTURE = Path(__file__).parent / "plugin_fixture"
TPO = Path(sys.executable).parent / "tpo"
_NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
MODEL_ARGS = [
    "--policy",
    "scripted",
    "--policy-option",
    "latency_s=0",
    "--reward",
    f"python:{FIXTURE / 'reward.py'}:score",
    "-n",
    "1",
    "-d",
    "0",
    "--log",
    "plain",
]


def _subprocess_tpo(*args: Any, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = _NO_OVERRIDE if unprivileged and os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(FIXTURE)}
    return subprocess.run(
        [*prefix, str(TPO), "batch", *map(str, args)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def file_modes_apply(tmp_path: Path) -> None:
    """Skip unless a subprocess can be made to respect file modes."""
    if os.name != "posix":
        pytest.skip("file modes are POSIX")
    if os.geteuid() != 0:
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop root's file-permission override")
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    tried = subprocess.run(
        [*_NO_OVERRIDE, sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"],
        capture_output=True,
        text=True,
        check=False,
    )
    probe.chmod(0o755)
    if tried.returncode == 0 or "PermissionError" not in tried.stderr:
        pytest.skip(f"cannot drop root's file-permission override here (setpriv: {tried.stderr.strip()[-200:]!r})")


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _stopped_run(tmp_path: Path, data: Path) -> Path:
    """A run stopped after its first prompt: the output holds one line, and four prompts are left to do."""
    out = tmp_path / "run" / "out.jsonl"
    finished = _subprocess_tpo(data, "-o", out, *MODEL_ARGS)
    assert finished.returncode == 0, finished.stderr
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    return out


def test_a_read_only_output_folder_is_a_one_line_error(tmp_path: Path, data: Path, file_modes_apply: None) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    result = _subprocess_tpo(data, "-o", folder / "out.jsonl", *MODEL_ARGS, unprivileged=True)
    assert _one_line_error(result) == f"Error: cannot write {folder / 'out.jsonl.tpo'}: Permission denied"


def test_a_read_only_output_file_is_a_one_line_error(tmp_path: Path, data: Path, file_modes_apply: None) -> None:
    out = _stopped_run(tmp_path, data)
    before = out.read_bytes()
    out.chmod(0o444)
    result = _subprocess_tpo(data, "-o", out, *MODEL_ARGS, unprivileged=True)
    assert _one_line_error(result) == f"Error: cannot write {out}: Permission denied"
    assert out.read_bytes() == before


def test_a_read_only_sidecar_folder_is_a_one_line_error(tmp_path: Path, data: Path, file_modes_apply: None) -> None:
    out = _stopped_run(tmp_path, data)
    sidecar_dir(out).chmod(0o555)
    result = _subprocess_tpo(data, "-o", out, *MODEL_ARGS, unprivileged=True)
    message = _one_line_error(result)
    assert message.startswith(f"Error: cannot write {sidecar_dir(out)}/") and message.endswith(": Permission denied")


def test_an_unreadable_input_is_a_one_line_error(tmp_path: Path, data: Path, file_modes_apply: None) -> None:
    data.chmod(0o000)
    result = _subprocess_tpo(data, "-o", tmp_path / "out.jsonl", *MODEL_ARGS, unprivileged=True)
    assert _one_line_error(result) == f"Error: cannot read {data}: Permission denied"
    assert not (tmp_path / "out.jsonl").exists()


def test_a_file_error_no_library_call_wrapped_is_still_one_line_naming_the_file() -> None:
    from tpo.cli._common import with_errors

    @click.command()
    @with_errors
    def command() -> None:
        raise PermissionError(13, "Permission denied", "/data/rubric.txt")

    @click.command()
    @with_errors
    def unnamed() -> None:
        raise OSError("no file to name")

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 2 and result.stderr == "Error: cannot use /data/rubric.txt: Permission denied\n"
    with pytest.raises(OSError, match="no file to name"):  # not a file error: a bug to see whole
        CliRunner().invoke(unnamed, [], catch_exceptions=False)
