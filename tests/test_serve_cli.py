"""``tpo serve`` from the command line: the checks before it listens, and a real process that drains on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from servers.fake_openai import Call, FakeOpenAIServer, Reply, completion, free_port
from tpo.analysis.evaluate import read_results
from tpo.cli import cli

KEY = "sk-cli-serve-key-0123456789"


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, ["serve", *args], env=env)


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--host", "0.0.0.0"], {}, "refusing to listen on 0.0.0.0 without API keys"),
        (["--host", "192.168.1.20"], {}, "--auth-keys-env NAME"),
        (["--auth-keys-env", "TPO_TEST_NO_SUCH_VAR"], {}, "TPO_TEST_NO_SUCH_VAR is not set"),
        (["--auth-keys-env", "TPO_TEST_KEYS"], {"TPO_TEST_KEYS": " , "}, "holds no key"),
        (["--auth-keys-env", "TPO_TEST_KEYS"], {"TPO_TEST_KEYS": "short"}, "shorter than 8"),
        (["--auth-keys-env", "TPO_TEST_KEYS", "--no-auth"], {"TPO_TEST_KEYS": KEY}, "contradict"),
        (["--max-width", "2"], {}, "width 5 is over its own limit of 2"),
        (["--max-request-tokens", "100", "--max-tokens", "200"], {}, "max_tokens 200 is over its own limit of 100"),
    ],
)
def test_settings_that_cannot_work_stop_it_before_any_model_loads(
    args: list[str], env: dict[str, str], words: str
) -> None:
    result = invoke(*args, env=env)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "Loading models" not in result.output
    assert KEY not in result.output


def test_without_the_serve_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "tpo.serve" or m.startswith("tpo.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    result = invoke("--port", "8123")
    assert result.exit_code == 2, result.output
    assert "pip install 'tpo[serve]'" in result.output and "uvicorn" in result.output


def test_help_lists_the_server_options() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for option in (
        "--auth-keys-env",
        "--no-auth",
        "--max-width",
        "--max-depth",
        "--max-request-tokens",
        "--max-concurrent",
        "--max-queue",
        "--max-body-bytes",
        "--request-timeout-s",
        "--grace-s",
        "--trace-log",
        "--policy",
        "--reward",
        "--width",
        "--prompts",
    ):
        assert option in result.output


def test_the_limit_options_default_to_the_serve_limits() -> None:
    """The command line cannot import ``tpo.serve`` (an optional extra) for its defaults, so this pins the copy."""
    from tpo.cli.serve import serve_command
    from tpo.serve import ServeLimits

    defaults = ServeLimits()
    options = {p.name: p.default for p in serve_command.params if p.name is not None and hasattr(defaults, p.name)}
    assert len(options) == 9
    for name, default in options.items():
        assert default == getattr(defaults, name), name


@pytest.mark.slow
def test_sigterm_stops_accepting_lets_the_request_in_flight_finish_and_exits_0(tmp_path: Path) -> None:
    def slow_upstream(call: Call) -> Reply:
        n = call.n
        return Reply(body=completion([f"upstream answer {i}" for i in range(n)]), delay_s=0.4)

    (tmp_path / "rm.py").write_text("def score(messages, answer):\n    return float(len(answer))\n")
    port = free_port()
    trace_log = tmp_path / "traces.jsonl"
    with FakeOpenAIServer(slow_upstream) as upstream:
        env = {**os.environ, "TPO_SERVE_KEYS": f"{KEY},another-key-123456", "OPENAI_API_KEY": "sk-upstream"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tpo",
                "serve",
                "--policy",
                "openai:up",
                "--base-url",
                upstream.base_url,
                "--reward",
                f"python:{tmp_path / 'rm.py'}:score",
                "--width",
                "2",
                "--depth",
                "1",
                "--port",
                str(port),
                "--auth-keys-env",
                "TPO_SERVE_KEYS",
                "--grace-s",
                "20",
                "--trace-log",
                str(trace_log),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "tpo serve did not start"
                time.sleep(0.1)
            answers: list[Any] = []
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
            asking = threading.Thread(
                target=lambda: answers.append(
                    client.chat.completions.create(model="tpo", messages=[{"role": "user", "content": "Hi"}])
                )
            )
            asking.start()
            deadline = time.monotonic() + 30
            while not upstream.chat_calls():  # the request is being worked on
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    assert proc.stdout is not None
                    pytest.fail(f"tpo serve made no upstream call (exit code {proc.wait()}):\n{proc.stdout.read()}")
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(f"{base}/health", timeout=2)
            asking.join(timeout=30)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            output = proc.communicate()[0]
    assert answers and answers[0].choices[0].message.content.startswith("upstream answer"), output
    assert len(upstream.chat_calls()) == 4  # the whole optimisation ran: sample, loss, gradient, update
    results, _ = read_results(trace_log)
    assert [r.answer for r in results] == [answers[0].choices[0].message.content]
    assert KEY not in output and "another-key" not in output and "sk-upstream" not in output
