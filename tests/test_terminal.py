"""Control sequences in model, server and dataset text are shown on a terminal, never obeyed; files keep them.

An answer or a server's error can carry ``ESC]0;title BEL`` (retitles the window), CSI
sequences (clear the screen, recolour), a bare ``\\r`` (overwrites the line) or a C1 control
(``\\x9b`` is a one-byte CSI). Every command prints such text through ``for_terminal``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import tpo.cli.batch as batch_cli
import tpo.models
from tpo import BackendError, GenerationRequest, Models
from tpo.cli import cli
from tpo.cli._terminal import for_terminal
from tpo.testing import FunctionReward, ScriptedPolicy, default_reply

HOSTILE = "pwn\x1b]0;owned\x07 \x1b[2J\x1b[31mred\rover \x9b31mc1\x85 \x00nul\x7f"
#: What a terminal must never receive from data: C0 controls but \n and \t, DEL and C1.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    "text, shown",
    [
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("\x1b[2J\x1b[1;31mred", "\\x1b[2J\\x1b[1;31mred"),
        ("progress\rdone", "progress\\rdone"),
        ("line one\r\nline two", "line one\nline two"),
        ("\x9b2J and \x85", "\\x9b2J and \\x85"),
        ("tabs\tand\nnewlines stay, as does ü, é and 中文", "tabs\tand\nnewlines stay, as does ü, é and 中文"),
        ("\x00\x7f", "\\x00\\x7f"),
    ],
)
def test_control_characters_are_written_out(text: str, shown: str) -> None:
    assert for_terminal(text) == shown
    assert not RAW_CONTROL.search(for_terminal(text))


# ---------------------------------------------------------------------- tpo batch


@pytest.fixture
def failing_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dataset of three prompts whose backend fails one with an error full of escape sequences."""

    def reply(request: GenerationRequest) -> list[str]:
        if request.prompt_id == "q1":
            raise BackendError(f"the server said: {HOSTILE}")
        return default_reply(request)

    def build(params: dict[str, Any]) -> Models:
        return Models(ScriptedPolicy(reply), None, FunctionReward(lambda m, a: float(len(a)), name="len"))

    monkeypatch.setattr(batch_cli, "build_models", build)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    return data


@pytest.mark.parametrize("log", ["plain", "quiet", "rich"])
def test_batch_progress_shows_errors_without_obeying_them(failing_batch: Path, tmp_path: Path, log: str) -> None:
    out = tmp_path / "out.jsonl"
    result = invoke("batch", failing_batch, "-o", out, "--id-field", "id", "-n", 1, "-d", 0, "--log", log)
    assert result.exit_code == 1, result.output
    assert "FAILED q1" in result.stderr
    assert not RAW_CONTROL.search(result.stderr), repr(result.stderr)
    assert "\\x1b]0;owned\\x07" in result.stderr.replace("\n", "")
    # The file keeps the error exactly as the backend gave it.
    [failed] = [json.loads(line) for line in out.read_text().split("\n") if '"q1"' in line]
    assert HOSTILE in failed["error"]


def test_eval_shows_errors_without_obeying_them(failing_batch: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    invoke("batch", failing_batch, "-o", out, "--id-field", "id", "-n", 1, "-d", 0, "--log", "quiet")
    result = invoke("eval", out)
    assert result.exit_code == 0, result.output
    assert "failed prompt" in result.output
    assert not RAW_CONTROL.search(result.output), repr(result.output)


def test_error_messages_of_any_command_are_shown_without_being_obeyed(tmp_path: Path) -> None:
    bad = tmp_path / f"in{HOSTILE.replace(chr(0), '')[:12]}.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n')
    result = invoke("batch", bad, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert "Error:" in result.stderr and not RAW_CONTROL.search(result.stderr), repr(result.stderr)


# ---------------------------------------------------------------------- tpo run


def test_run_shows_answers_without_obeying_them_and_keeps_them_exact_in_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "sample":
            return [f"Answer {i}: {HOSTILE}" for i in range(request.n)]
        if request.purpose == "judge":
            return ["Rating: 7"]
        return default_reply(request)

    monkeypatch.setattr(
        tpo.models,
        "policy_from_spec",
        lambda spec, **options: ScriptedPolicy(reply, batching=True, name=f"fake\x1b[2J{spec}"),
    )
    shown = invoke("run", "Q", "-d", "0", "-n", "2")
    assert shown.exit_code == 0, shown.output
    assert not RAW_CONTROL.search(shown.stderr), repr(shown.stderr)
    assert "\\x1b]0;owned\\x07" in shown.stderr and "best answer" in shown.stderr
    # Standard output is not a terminal here: the answer goes there exactly, for `> answer.txt`.
    assert HOSTILE in shown.stdout
    as_json = invoke("run", "Q", "-d", "0", "-n", "2", "--json")
    assert as_json.exit_code == 0 and HOSTILE in json.loads(as_json.stdout)["answer"]
    assert "\x1b" not in as_json.stdout  # JSON escapes control characters itself
