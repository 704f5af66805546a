"""The ``ray:`` wrapper: replicas of in-process backends as Ray actors.

Fast tests check what needs no cluster: how batches are cut, the options, and that tpo never
imports Ray unless asked. The slow ones run a real local Ray instance, started once for the
whole test session (``ray.init(num_cpus=2)``), with two replicas of the scripted test policy
(``tests/plugin_fixture``, found by the actors through ``runtime_env``) and of a tiny
Transformers reward model built here: results equal the same run without Ray; every replica
works; a replica killed mid-run (``ray.kill``) loses nothing; a replica that cannot build
fails before any work; and a ``tpo batch`` process using the replicas, killed with SIGKILL
and resumed, ends with the results of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tpo
from _kill import finish, kill_and_resume, newlines, reaped, wait_until
from tpo import TPOConfig
from tpo._ray.pool import CHUNK_FRACTION, next_chunk, split_ray_options
from tpo.errors import BackendError, ConfigError, MissingDependencyError
from tpo.models import build_models

HERE = Path(__file__).parent
FIXTURE = HERE / "plugin_fixture"
TPO = Path(sys.executable).parent / "tpo"
#: Where the actors find the scripted test plugin, as a user points replicas at their own code.
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(FIXTURE)}}
#: An actor holds the CPUs it asks for (Ray's default: one); a quarter lets eight share the two of the test instance.
CPUS = 0.25
CONFIG = TPOConfig(width=3, depth=2, seed=5, max_concurrent_prompts=8)
PROMPTS = [f"Question number {i}: why is the sky blue?" for i in range(16)]


# ---------------------------------------------------------------------------- no cluster needed


def test_chunks_take_large_requests_first_and_shrink_towards_the_end() -> None:
    costs = [float(c) for c in [5, 100, 1, 40, 40, 3, 70, 2] * 8]
    pending = deque(sorted(range(len(costs)), key=lambda i: -costs[i]))
    chunks = []
    while pending:
        chunks.append(next_chunk(pending, costs, replicas=2, cap=None))
    taken = [i for chunk in chunks for i in chunk]
    assert sorted(taken) == list(range(len(costs)))  # every request once
    first = sum(costs[i] for i in chunks[0])
    assert sum(costs) / (CHUNK_FRACTION * 2) <= first < sum(costs) / (CHUNK_FRACTION * 2) + 100
    sizes = [sum(costs[i] for i in c) for c in chunks]
    assert sizes[-1] < sizes[0] / 4  # the tail comes in small pieces
    assert len(chunks) <= 2 * 8 + 8  # but not one round trip per request


def test_chunks_respect_the_cap_and_a_single_replica() -> None:
    costs = [1.0] * 100
    pending = deque(range(100))
    assert len(next_chunk(pending, costs, replicas=1, cap=7)) == 7
    assert len(next_chunk(pending, costs, replicas=1, cap=None)) == 93  # nobody to share with
    assert len(next_chunk(deque(range(3)), [1.0, 1.0, 1.0], replicas=4, cap=None)) == 1


def test_ray_options_are_checked_and_the_rest_go_to_the_model() -> None:
    ours, inner = split_ray_options({"replicas": 3, "num_gpus": 1, "tensor_parallel_size": 2})
    assert (ours.replicas, ours.num_gpus, inner) == (3, 1.0, {"tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="ray: replicas must be an integer >= 1"):
        split_ray_options({"replicas": 0})
    with pytest.raises(ConfigError, match="max_restarts"):
        split_ray_options({"max_restarts": "many"})


def test_ray_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'tpo\[ray\]'"):
        tpo.registry.policy_from_spec("ray:llamacpp", replicas=2)
    with pytest.raises(MissingDependencyError, match=r"tpo\[ray\]"):
        tpo.registry.reward_from_spec("ray:hf:./rm")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ray:", "needs the spec of the model to replicate"),
        ("ray:ray:llamacpp", "replicates a wrapper of replicas"),
    ],
)
def test_bad_inner_specs_fail_before_ray_is_touched(monkeypatch: pytest.MonkeyPatch, spec: str, message: str) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=message):
        tpo.registry.policy_from_spec(spec)


def test_a_judge_cannot_be_replicated_but_its_model_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"judge:ray:vllm:MODEL"):
        tpo.registry.reward_from_spec("ray:judge")


def test_misspelt_inner_options_fail_in_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match="unknown option 'n_cxt'"):
        tpo.registry.policy_from_spec("ray:llamacpp", replicas=2, n_cxt=512)


def test_tpo_never_imports_ray_unless_asked() -> None:
    code = (
        "import sys, tpo, tpo.cli, tpo.models\n"
        "from tpo.registry import list_plugins, BACKENDS_GROUP, REWARDS_GROUP\n"
        "names = [p.name for g in (BACKENDS_GROUP, REWARDS_GROUP) for p in list_plugins(g)]\n"
        "assert 'ray' in names, names\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- a real local Ray instance


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray instance of two CPUs for the whole session; its address, for other processes to join.

    Not loopback-only: Ray's GCS server and raylet listen on every interface (``*:PORT``), and
    ``ray.init`` has no option to bind them to 127.0.0.1. What limits who can use those ports is
    Ray's token authentication (``RAY_AUTH_MODE=token``, Ray 2.52 and later: every external API
    and internal call must carry a shared token), not where they listen.
    """
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-weight Llama-style reward model, saved where every actor on this machine can load it."""
    from tiny_models import save_reward_model

    return str(save_reward_model(tmp_path_factory.mktemp("rm") / "rm", "llama"))


def _run(models: tpo.Models) -> dict[str, Any]:
    results = tpo.optimize_many(PROMPTS, policy=models.policy, reward=models.reward, config=CONFIG)
    return {r.prompt_id: _comparable(r.to_dict()) for r in results}


def _comparable(data: Any) -> Any:
    """A result without wall times, scores rounded: a batch padded differently may move the last float bits."""
    if isinstance(data, dict):
        return {k: _comparable(v) for k, v in data.items() if k != "wall_time_s"}
    if isinstance(data, list):
        return [_comparable(v) for v in data]
    return round(data, 4) if isinstance(data, float) else data


def _ray_models(reward_model: str, **policy_options: Any) -> tpo.Models:
    return build_models(
        "ray:scripted",
        reward=f"ray:hf:{reward_model}",
        policy_options={
            "replicas": 2,
            "num_cpus": CPUS,
            "latency_s": 0.01,
            "runtime_env": RUNTIME_ENV,
            **policy_options,
        },
        reward_options={"replicas": 2, "num_cpus": CPUS, "max_batch_size": 8},
    )


@pytest.fixture(scope="module")
def baseline(reward_model: str) -> dict[str, Any]:
    """The same run without Ray: the scripted plugin and the reward model in this process."""
    sys.path.insert(0, str(FIXTURE))  # where importlib.metadata finds the scripted plugin here
    try:
        models = build_models(
            "scripted",
            reward=f"hf:{reward_model}",
            policy_options={"latency_s": 0.01},
            reward_options={"max_batch_size": 8},
        )
        with_models = _run(models)
        models.close()
    finally:
        sys.path.remove(str(FIXTURE))
    return with_models


@pytest.mark.slow
def test_two_replicas_give_the_results_of_one_process_and_share_the_work(
    ray_address: str, reward_model: str, baseline: dict[str, Any]
) -> None:
    models = _ray_models(reward_model)
    try:
        assert models.policy.name == "scripted" and not models.policy.batching
        assert models.reward.batching  # the reward model's batches are cut into chunks for the replicas
        assert _run(models) == baseline
        for model in (models.policy, models.reward):
            reports = model.replica_reports()  # type: ignore[union-attr]
            assert len(reports) == 2 and all(r.requests > 0 and r.state == "up" for r in reports), reports
            assert len({r.label for r in reports}) == 2
        policy_requests = sum(r.requests for r in models.policy.replica_reports())  # type: ignore[union-attr]
        assert policy_requests == len(PROMPTS) * (1 + 3 * CONFIG.depth)  # none lost, none repeated
    finally:
        models.close()


async def _run_killing(models: tpo.Models, kill: Any, after_requests: int) -> dict[str, Any]:
    """The run, with ``kill()`` called once the replicas have served ``after_requests`` policy requests."""

    async def killer() -> None:
        while sum(r.requests for r in models.policy.replica_reports()) < after_requests:  # type: ignore[union-attr]
            await asyncio.sleep(0.005)
        killed = kill()
        if inspect.isawaitable(killed):
            await killed

    task = asyncio.ensure_future(killer())
    out = {}
    async for r in tpo.aoptimize_many(PROMPTS, policy=models.policy, reward=models.reward, config=CONFIG):
        out[r.prompt_id] = _comparable(r.to_dict())
    assert task.done(), "the run ended before the kill"
    return out


@pytest.mark.slow
def test_a_replica_killed_mid_run_loses_nothing(ray_address: str, reward_model: str, baseline: dict[str, Any]) -> None:
    import ray

    async def main() -> tuple[dict[str, Any], list[Any], list[Any]]:
        models = _ray_models(reward_model)
        try:

            async def kill() -> None:
                # One policy replica (restarted by Ray: max_restarts=3) and one reward replica, each while a
                # call is in flight on it: a replica killed between calls may be back before its next one.
                for pool, i in ((models.policy._pool, 0), (models.reward._pool, 1)):  # type: ignore[union-attr]
                    replica = pool._replicas[i]
                    while replica.in_flight == 0:
                        await asyncio.sleep(0.001)
                    ray.kill(replica.actor, no_restart=False)

            out = await _run_killing(models, kill, after_requests=30)
            return out, models.policy.replica_reports(), models.reward.replica_reports()  # type: ignore[union-attr]
        finally:
            await models.aclose()

    out, policy_reports, reward_reports = asyncio.run(main())
    assert out == baseline  # every prompt, once, as without Ray
    assert policy_reports[0].failures >= 1 and reward_reports[1].failures >= 1
    assert all(r.requests > 0 for r in policy_reports + reward_reports)


@pytest.mark.slow
def test_without_restarts_the_run_finishes_on_the_replica_left_and_fails_when_none_is(
    ray_address: str, reward_model: str, baseline: dict[str, Any]
) -> None:
    import ray

    async def main() -> None:
        models = _ray_models(reward_model, max_restarts=0)
        try:
            policy = models.policy
            actors = [rep.actor for rep in policy._pool._replicas]  # type: ignore[union-attr]
            out = await _run_killing(models, lambda: ray.kill(actors[1]), after_requests=20)
            assert out == baseline
            reports = policy.replica_reports()  # type: ignore[union-attr]
            assert [r.state for r in reports] == ["up", "dead"]
            ray.kill(actors[0])
            left = r"no replica of scripted is left \(replica 1 .*dead.*replica 2 .*dead"
            with pytest.raises(BackendError, match=left):
                await policy.generate([tpo.GenerationRequest((tpo.Message("user", "Hi"),))])
        finally:
            await models.aclose()

    asyncio.run(main())


@pytest.mark.slow
def test_a_replica_that_cannot_build_fails_before_any_work(ray_address: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="nonexistent"):
        build_models(
            "ray:scripted",
            reward=f"ray:hf:{tmp_path / 'nonexistent'}",
            policy_options={"replicas": 2, "num_cpus": CPUS, "runtime_env": RUNTIME_ENV},
            reward_options={"replicas": 2, "num_cpus": CPUS},
        )
    # Not installed in this process nor, without runtime_env, in the actors: they say so.
    with pytest.raises(ConfigError, match="unknown policy backend 'scripted'"):
        tpo.registry.policy_from_spec("ray:scripted", replicas=2, num_cpus=CPUS)
    with pytest.raises(ConfigError, match="no node of the cluster can hold a replica with num_gpus=1"):
        tpo.registry.reward_from_spec(f"ray:hf:{tmp_path}", num_gpus=1)
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------- tpo batch, killed and resumed


def _batch(input_path: Path, output: Path, log: Path | None, ray_address: str | None) -> subprocess.Popen[bytes]:
    """``tpo batch`` with the scripted policy, through two Ray replicas when ``ray_address`` is given."""
    env = {k: v for k, v in os.environ.items() if k not in ("TPO_TEST_CALL_LOG", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(FIXTURE)
    policy = ["--policy", "scripted"]
    if ray_address is not None:
        # Each process's replicas log their calls to a file of its own: what a killed process left undone shows.
        actor_env = {"PYTHONPATH": str(FIXTURE), **({"TPO_TEST_CALL_LOG": str(log)} if log else {})}
        policy = [
            "--policy",
            "ray:scripted",
            "--ray-address",
            ray_address,
            "--policy-option",
            "replicas=2",
            "--policy-option",
            f"num_cpus={CPUS}",
            "--policy-option",
            "runtime_env=" + json.dumps({"env_vars": actor_env}),
        ]
    command = [
        str(TPO),
        "batch",
        str(input_path),
        "-o",
        str(output),
        "--id-field",
        "id",
        *policy,
        "--policy-option",
        "latency_s=0.02",
        "--reward",
        f"python:{FIXTURE / 'reward.py'}:score",
        "--width",
        "3",
        "--depth",
        "2",
        "--seed",
        "11",
        "--concurrency",
        "8",
        "--log",
        "plain",
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_tpo_batch_on_ray_replicas_then_resume_matches_an_uninterrupted_run(
    ray_address: str, tmp_path: Path
) -> None:
    prompts = 40
    input_path = tmp_path / "prompts.jsonl"
    input_path.write_text(
        "".join(json.dumps({"id": f"p{i:03d}", "prompt": f"Question number {i}?"}) + "\n" for i in range(prompts))
    )
    reference = tmp_path / "reference.jsonl"
    with reaped(_batch(input_path, reference, None, None)) as proc:  # without Ray
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""

    output = tmp_path / "out.jsonl"
    logs: list[Path] = []

    def start() -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"calls{len(logs)}.tsv")
        return _batch(input_path, output, logs[-1], ray_address)

    # More results written, then SIGKILL.
    for run in kill_and_resume(start, lambda: newlines(output), [("more", 3), ("more", 8), ("more", 8)], limit_s=60):
        assert run.killed, "the run ended before it was killed"
        assert newlines(output) < prompts, run.stderr
    proc = start()
    err = finish(proc, 120)
    assert proc.returncode == 0, err
    assert "replica" in err  # the replicas and their work are shown

    expected = {d["prompt_id"]: _comparable(d) for d in map(json.loads, reference.read_text().splitlines())}
    got = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(got) == prompts and {d["prompt_id"]: _comparable(d) for d in got} == expected

    # A step finished before a kill is never computed again: a later process repeats only the
    # step its prompt was working on when the earlier one was killed.
    last_step: dict[tuple[int, str], int] = {}
    seen: dict[tuple[str, int, str], list[int]] = {}
    for seg, log in enumerate(logs):
        for line in log.read_text().splitlines() if log.exists() else []:
            _, prompt, step, purpose = line.split("\t")
            seen.setdefault((prompt, int(step), purpose), []).append(seg)
            last_step[(seg, prompt)] = max(last_step.get((seg, prompt), -1), int(step))
    assert len(seen) == prompts * (1 + 3 * 2)
    assert any(len(set(segs)) > 1 for segs in seen.values()) or any(  # some prompt did resume mid-way
        len({seg for (p, _, _), segs in seen.items() if p == prompt for seg in segs}) > 1 for prompt, _, _ in seen
    )
    for (prompt, step, purpose), segs in seen.items():
        for seg in sorted(set(segs))[:-1]:
            assert step == last_step[(seg, prompt)], f"{prompt} step {step} ({purpose}): done in run {seg}, redone"


@pytest.mark.slow
def test_sigterm_still_stops_tpo_batch_cleanly_with_ray_replicas(ray_address: str, tmp_path: Path) -> None:
    """Ray installs a SIGTERM handler of its own when it connects; tpo batch keeps its clean stop (exit 143)."""
    input_path = tmp_path / "prompts.jsonl"
    input_path.write_text(
        "".join(json.dumps({"id": f"p{i:03d}", "prompt": f"Question {i}?"}) + "\n" for i in range(40))
    )
    output = tmp_path / "out.jsonl"
    with reaped(_batch(input_path, output, None, ray_address)) as proc:
        wait_until(proc, lambda _: newlines(output) >= 3, limit_s=60)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        err = finish(proc, 60)
    assert proc.returncode == 143, err
    assert "Stopped by SIGTERM" in err
