"""Several real servers of one model on loopback: simulated OpenAI-compatible servers (benchmarks/sim_server.py)
for the policy, small JSON scoring servers for the ``http:`` reward.

Work is spread by load; a server killed mid-run has its work finished by the others, with
the results of a run that lost nothing; all of them killed is a clear failure naming each;
``tpo batch`` shows each server's share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tpo
from conftest import strip_timings
from servers.stand_in import Reply, StandIn
from tpo import TPOConfig
from tpo._http.replicas import ReplicatedPolicy, ReplicatedReward
from tpo.api import apreflight
from tpo.errors import BackendError
from tpo.registry import policy_from_spec, reward_from_spec
from tpo.testing import FunctionReward

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / "benchmarks" / "sim_server.py"
TPO = Path(sys.executable).parent / "tpo"
CONFIG = TPOConfig(width=3, depth=2, seed=3, max_tokens=16, max_concurrent_prompts=16)
#: Fast retries: a test should not wait out real backoffs.
FAST = {"backoff_s": 0.02, "max_backoff_s": 0.05, "max_retries": 3}


class Sim:
    """benchmarks/sim_server.py in a process of its own: 4 slots, 16-token answers, about 30 ms a sequence."""

    def __init__(self, slots: int = 4) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(SIM),
                "--port",
                str(self.port),
                "--slots",
                str(slots),
                "--answer-tokens",
                "16",
                "--time-scale",
                "20",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError("the simulated server did not start")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
            return dict(json.loads(r.read())["stats"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    servers: list[Sim] = []
    try:
        for _ in range(3):
            servers.append(Sim())  # one that fails to start leaves none of the others running
        yield servers
    finally:
        for s in servers:
            s.kill()


def _prompts(n: int) -> list[str]:
    return [f"Question {i}: how do tides work?" for i in range(n)]


def _reward() -> FunctionReward:
    return FunctionReward(lambda messages, answer: float(sum(map(ord, answer)) % 97), name="checksum")


async def _optimize(policy: Any, prompts: list[str], *, kill: Sim | None = None, after: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        async for r in tpo.aoptimize_many(prompts, policy=policy, reward=_reward(), config=CONFIG):
            assert r.status == "complete", r.error
            out[r.prompt_id] = strip_timings(r.to_dict())
            if kill is not None and len(out) == after:
                kill.kill()
    finally:
        await policy.aclose()
    return out


def test_requests_are_spread_by_load_over_several_servers(sims: list[Sim]) -> None:
    urls = ",".join(s.url for s in sims)
    policy = policy_from_spec("openai:sim", base_url=urls, max_concurrency=8, **FAST)
    assert isinstance(policy, ReplicatedPolicy) and policy.name == "openai:sim"
    prompts = _prompts(24)
    results = asyncio.run(_optimize(policy, prompts))
    assert len(results) == 24
    served = [s.stats() for s in sims]
    reports = policy.replica_reports()
    assert [r.requests for r in reports] == [s["requests"] for s in served]
    assert [r.sequences for r in reports] == [s["sequences"] for s in served]
    total = sum(s["sequences"] for s in served)
    assert all(s["sequences"] > total / 6 for s in served), served  # each did a fair part
    assert all(s["peak_concurrency"] <= 4 for s in served)
    # The same seeds on one server give the same results: where a request went changes nothing.
    one = policy_from_spec("openai:sim", base_url=sims[0].url, max_concurrency=8, **FAST)
    assert asyncio.run(_optimize(one, prompts)) == results


def test_a_server_killed_mid_run_has_its_work_finished_by_the_others(sims: list[Sim]) -> None:
    prompts = _prompts(30)
    reference = asyncio.run(_optimize(policy_from_spec("openai:sim", base_url=sims[0].url, **FAST), prompts))
    policy = policy_from_spec("openai:sim", base_url=",".join(s.url for s in sims), max_concurrency=8, **FAST)
    results = asyncio.run(_optimize(policy, prompts, kill=sims[1], after=4))
    assert results == reference  # every prompt, once, as if nothing had happened
    killed = policy.replica_reports()[1]
    assert killed.state == "cooling off" and killed.failures >= 3
    assert "could not connect" in (killed.last_error or "") or "probe" in (killed.last_error or "")
    assert all(s.stats()["requests"] > 0 for s in (sims[0], sims[2]))


def test_all_servers_killed_fails_naming_each(sims: list[Sim]) -> None:
    policy = policy_from_spec("openai:sim", base_url=",".join(s.url for s in sims), probe_timeout_s=2, **FAST)
    for s in sims:
        s.kill()
    started = time.monotonic()
    with pytest.raises(BackendError, match="no replica is left of 3") as caught:
        asyncio.run(policy.generate([tpo.GenerationRequest((tpo.Message("user", "Hi"),))]))
    assert time.monotonic() - started < 20
    for s in sims:
        assert f"127.0.0.1:{s.port}/v1: probe: " in str(caught.value)
        assert "cannot be reached" in str(caught.value)


def test_preflight_sets_a_dead_server_aside_and_the_run_goes_on(sims: list[Sim]) -> None:
    sims[2].kill()
    policy = policy_from_spec("openai:sim", base_url=",".join(s.url for s in sims), probe_timeout_s=2, **FAST)

    async def main() -> dict[str, Any]:
        await apreflight(policy)
        assert [r.state for r in policy.replica_reports()] == ["up", "up", "cooling off"]
        return await _optimize(policy, _prompts(6))

    assert len(asyncio.run(main())) == 6
    assert policy.replica_reports()[2].requests == 0


def _score_by_length(path: str, body: Any, n: int) -> Reply:
    return Reply(json={"score": float(len(body["answer"]))}, delay_s=0.005)


def test_an_http_reward_on_several_servers_survives_losing_one() -> None:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(StandIn(_score_by_length)) for _ in range(2)]
        urls = [f"{s.url}/score" for s in servers]
        reward = reward_from_spec(f"http:{urls[0]},{urls[1]}", **FAST)
        assert isinstance(reward, ReplicatedReward) and reward.name == f"http:{urls[0]},{urls[1]}"
        requests = [tpo.ScoreRequest((tpo.Message("user", "q"),), "x" * i) for i in range(1, 41)]

        async def main() -> list[tpo.Score]:
            first = await reward.score(requests[:20])
            servers[1].stop()  # refused connections from now on
            return first + await reward.score(requests[20:])

        scores = asyncio.run(main())
        assert [s.value for s in scores] == [float(i) for i in range(1, 41)]
        reports = reward.replica_reports()
        assert reports[1].state == "cooling off" and reports[0].requests + reports[1].requests == 40
        assert len(servers[0].seen) >= 30


def test_tpo_batch_with_several_base_urls_shows_each_server(sims: list[Sim], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(8)))
    env = {**os.environ, "OPENAI_BASE_URL": f"{sims[0].url},{sims[1].url}", "OPENAI_API_KEY": "sk-test"}

    def batch(output: str, *base_urls: str) -> list[str]:
        command = [
            str(TPO),
            "batch",
            str(prompts),
            "-o",
            str(tmp_path / output),
            "--policy",
            "openai:sim",
            "--reward",
            f"python:{ROOT / 'tests' / 'plugin_fixture' / 'reward.py'}:score",
            "--width",
            "2",
            "--depth",
            "1",
            "--max-tokens",
            "16",
            "--log",
            "plain",
        ]
        for url in base_urls:
            command += ["--base-url", url]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stderr.splitlines() if line.startswith("policy replica ")]

    # --base-url, repeated, wins over OPENAI_BASE_URL, as it does for one server.
    lines = batch("a.jsonl", sims[0].url, sims[2].url)
    assert len(lines) == 2 and f":{sims[0].port}/v1: " in lines[0] and f":{sims[2].port}/v1: " in lines[1]
    assert sims[1].stats()["requests"] == 0
    lines = batch("b.jsonl")  # OPENAI_BASE_URL, comma-separated
    assert len(lines) == 2
    for sim, line in zip(sims[:2], lines, strict=True):
        assert f"127.0.0.1:{sim.port}/v1: " in line and ", up" in line and sim.stats()["requests"] > 0


def test_tpo_run_shows_each_server(sims: list[Sim]) -> None:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    env.pop("OPENAI_BASE_URL", None)
    out = subprocess.run(
        [
            str(TPO),
            "run",
            "Why is the sea salty?",
            "--policy",
            "openai:sim",
            "--base-url",
            f"{sims[0].url},{sims[1].url}",
            "--reward",
            f"python:{ROOT / 'tests' / 'plugin_fixture' / 'reward.py'}:score",
            "--width",
            "2",
            "--depth",
            "1",
            "--max-tokens",
            "16",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip().startswith("policy replica ")]
    assert len(lines) == 2 and all(", up" in line for line in lines), out.stderr
