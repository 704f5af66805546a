"""Credentials inside a server URL (``?api_key=``, ``user:password@``) reach the server and no message or file.

A key in ``--base-url``'s query string used to be shown in every prompt's error, on stderr, in
``tpo eval``, in the HTML report and in ``tpo run --json``, and the query itself was glued into
the request path. These tests run the real commands against a fake server on loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from servers.fake_openai import Call, FakeOpenAIServer, Reply
from tpo import ConfigError, GenerationRequest, Message, SamplingParams, ScoreRequest
from tpo._redact import mask_secrets_in_text, mask_url, redact, url_secrets
from tpo.backends.openai_server import OpenAIPolicy
from tpo.cli import cli
from tpo.rewards.http_server import HTTPReward

SECRET = "sk-SECRET-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def request(text: str = "Hi") -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", text),), n=1, sampling=SamplingParams(max_tokens=8, seed=1))


# ---------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"http://h:8000/v1?api_key={SECRET}&region=eu", "http://h:8000/v1?api_key=***&region=eu"),
        (f"https://h/v1?key={SECRET}", "https://h/v1?key=***"),
        (f"https://h/v1?x=1&sig={SECRET}", "https://h/v1?x=1&sig=***"),
        (f"https://h/v1?api%5Fkey={SECRET}", "https://h/v1?api%5Fkey=***"),
        (f"https://user:{SECRET}@h/v1", "https://user:***@h/v1"),
        (f"https://{SECRET}@h/v1", "https://***@h/v1"),
        (
            f"ConnectError: 'http://127.0.0.1:9/v1/models?token={SECRET}' refused",
            "ConnectError: 'http://127.0.0.1:9/v1/models?token=***' refused",
        ),
        ("http://h:8000/v1?region=eu&max_tokens=5", "http://h:8000/v1?region=eu&max_tokens=5"),
    ],
)
def test_credentials_in_urls_are_masked_in_any_text(text: str, shown: str) -> None:
    assert mask_secrets_in_text(text) == shown
    assert SECRET not in redact({"base_url": text})["base_url"]


def test_url_secrets_are_also_masked_where_a_server_echoes_them() -> None:
    url = f"http://h/v1?api_key={SECRET}&region=eu"
    assert url_secrets(url) == [SECRET]
    assert mask_secrets_in_text(f"unknown key {SECRET}", url_secrets(url)) == "unknown key ***"
    assert mask_url(f"h:1/v1?token={SECRET}") == "h:1/v1?token=***"
    assert mask_secrets_in_text("eu", ["eu"]) == "eu"  # too short to mask without garbling the text


# ---------------------------------------------------------------------- the query reaches the server


def test_the_base_urls_query_goes_on_every_request_and_never_into_the_path(
    server: FakeOpenAIServer, allow_real_requests: None
) -> None:
    server.reset(routes={"/v1/models": Reply(body={"data": [{"id": "m", "max_model_len": 4096}]})})
    policy = OpenAIPolicy("m", base_url=f"{server.base_url}/?api_key={SECRET}&api-version=2024")

    async def go() -> None:
        try:
            await policy.preflight()
            assert await policy.context_window() == 4096
            (gen,) = await policy.generate([request()])
            assert gen.texts == ("answer 0 (seed 1)",)
        finally:
            await policy.aclose()

    asyncio.run(go())
    assert policy.base_url == server.base_url and policy.base_query == {"api_key": SECRET, "api-version": "2024"}
    assert [c.path for c in server.calls] == ["/v1/models", "/v1/models", "/v1/chat/completions"]
    assert {c.query for c in server.calls} == {f"api_key={SECRET}&api-version=2024"}
    assert SECRET not in repr(policy) and "api_key=***" in repr(policy)


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://h/v1?a=1&a=2", "gives the query parameter 'a' twice"),
        ("http://h/v1#frag", "has a #fragment"),
        ("http://h/v1?novalue", "is not NAME=VALUE pairs"),
        (f"http://h:port/v1?key={SECRET}", "is not a valid URL"),
    ],
)
def test_a_base_url_that_cannot_be_kept_whole_is_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        OpenAIPolicy("m", base_url=url)
    assert SECRET not in str(caught.value)


def test_the_http_rewards_query_reaches_the_server_and_not_its_messages(
    server: FakeOpenAIServer, allow_real_requests: None
) -> None:
    server.reset(routes={"/score": Reply(body={"score": 0.5}), "/fail": Reply(400, {"error": f"bad key {SECRET}"})})
    good = HTTPReward(f"{server.root_url}/score?key={SECRET}", max_retries=0)
    bad = HTTPReward(f"{server.root_url}/fail?key={SECRET}", max_retries=0)
    req = ScoreRequest((Message("user", "Hi"),), "Hello")

    async def go() -> tuple[float | None, str | None]:
        try:
            (ok,) = await good.score([req])
            (failed,) = await bad.score([req])
            return ok.value, failed.error
        finally:
            await good.aclose()
            await bad.aclose()

    value, error = asyncio.run(go())
    assert value == 0.5 and error is not None
    assert {c.query for c in server.calls} == {f"key={SECRET}"}
    assert "HTTP 400" in error and "key=***" in error and SECRET not in error
    assert SECRET not in good.name and "key=***" in good.name


# ---------------------------------------------------------------------- no command shows it


def refuse_chat(call: Call) -> Reply:
    # A server that echoes the request URL, key included, in its error.
    return Reply(400, {"error": {"message": f"invalid request to /v1/chat/completions?api_key={SECRET}"}})


def test_no_output_of_any_command_contains_the_key(
    server: FakeOpenAIServer, tmp_path: Path, allow_real_requests: None
) -> None:
    server.reset(refuse_chat, routes={"/v1/models": Reply(body={"data": [{"id": "m"}]})})
    base_url = f"{server.base_url}?api_key={SECRET}"
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    rm = tmp_path / "rm.py"
    rm.write_text("def score(messages, answer):\n    return float(len(answer))\n")
    out = tmp_path / "out.jsonl"
    model = [
        "--policy",
        "openai:m",
        "--base-url",
        base_url,
        "--reward",
        f"python:{rm}:score",
        "-n",
        1,
        "-d",
        0,
        "--policy-option",
        "max_retries=0",
    ]

    batch = invoke("batch", data, "-o", out, "--id-field", "id", "--log", "plain", *model)
    assert batch.exit_code == 1, batch.output
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 3 and all(r["status"] == "failed" for r in results)
    # The error names the server, masked, and what it said, masked too.
    assert all("at http://127.0.0.1:" in r["error"] and "api_key=***" in r["error"] for r in results)
    assert all(c.query == f"api_key={SECRET}" for c in server.calls)

    evaluated = invoke("eval", out)
    report = invoke("report", out, "-o", tmp_path / "report.html")
    single = invoke("run", "Question?", "--json", *model)
    assert evaluated.exit_code == 0 and report.exit_code == 0, evaluated.output + report.output
    assert single.exit_code == 1 and json.loads(single.stdout)["status"] == "failed"
    shown = {
        "output": out.read_text(),
        "batch stderr": batch.output,
        "eval": evaluated.output,
        "report command": report.output,
        "report": (tmp_path / "report.html").read_text(),
        "run --json": single.output,
        **{p.name: p.read_text() for p in (tmp_path / "out.jsonl.tpo").iterdir() if p.is_file()},
    }
    leaked = [name for name, text in shown.items() if SECRET in text]
    assert leaked == []
    assert "api_key=***" in single.stdout and "api_key=***" in evaluated.output
