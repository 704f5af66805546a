"""``tpo sweep``: the plan, the depth-prefix property, best-of-n from best-of-N, one dispatcher for every
configuration, standard outputs with their own fingerprints, kill -9 and resume, and the command.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tpo
from _kill import finish, kill_and_resume, newlines
from conftest import hash_score, pure_reply, strip_timings
from tpo import ConfigError, GenerationRequest, TPOConfig
from tpo.analysis.evaluate import load_run
from tpo.batch.datasets import read_prompts
from tpo.batch.progress import BatchObserver
from tpo.batch.runner import BatchRun
from tpo.batch.sweep import MANIFEST, Sweep, first_samples, first_steps, plan_sweep
from tpo.cli import cli
from tpo.testing import FunctionReward, ScriptedPolicy

HERE = Path(__file__).parent
DRIVER = HERE / "_sweep_driver.py"


def _prompts(n: int) -> list[tpo.Prompt]:
    return [tpo.Prompt.of(f"Question {i}: why is the sky blue?", id=f"q{i}") for i in range(n)]


def _input(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: why is the sky blue?"}) + "\n")
    return path


def _results(**options: Any) -> list[tpo.TPOResult]:
    return list(
        tpo.optimize_many(_prompts(6), policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), **options)
    )


# --------------------------------------------------------------------------- the plan


def test_the_plan_runs_only_the_deepest_depth_and_the_largest_best_of_n() -> None:
    entries = plan_sweep(
        TPOConfig(seed=3),
        modes=["tpo", "revision", "bon"],
        widths=[10, 2, 5],
        depths=[3, 1, 2],
        bon_widths=[60, 15, 30],
    )
    runs = {e.name for e in entries if e.how == "run"}
    assert runs == {
        "tpo-d3-n2",
        "tpo-d3-n5",
        "tpo-d3-n10",
        "revision-d3-n2",
        "revision-d3-n5",
        "revision-d3-n10",
        "bon-n60",
    }
    derived = {e.name: (e.how, e.source) for e in entries if e.how != "run"}
    assert derived["tpo-d1-n5"] == ("prefix", "tpo-d3-n5")
    assert derived["revision-d2-n10"] == ("prefix", "revision-d3-n10")
    assert derived["bon-n15"] == ("first_samples", "bon-n60") and "bon-n30" in derived
    assert len(entries) == 3 * 3 * 2 + 3
    assert all(e.config.seed == 3 for e in entries)
    (bon,) = [e for e in entries if e.name == "bon-n60"]
    assert bon.config.depth == 0 and bon.file == "bon-n60.jsonl"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"modes": ["dpo"], "widths": [2], "depths": [1]}, "unknown mode 'dpo'"),
        ({"modes": ["tpo"], "widths": [2], "depths": []}, "need at least one --depth"),
        ({"modes": ["tpo"], "widths": [0], "depths": [1]}, "every width must be an integer of at least 1"),
        ({"modes": ["tpo"], "widths": [2], "depths": [0]}, "every depth must be an integer of at least 1"),
        ({"modes": ["tpo"], "widths": [2], "depths": [1], "bon_widths": [4]}, "--bon-width is for --mode bon"),
    ],
)
def test_a_bad_grid_is_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_sweep(TPOConfig(), **options)


# --------------------------------------------------------------------------- deriving


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mode": "revision"},
        {"final_from": "last_step", "rejected_from": "latest"},
        {"early_stop_patience": 1},
    ],
)
def test_a_shallow_run_is_the_first_steps_of_a_deep_run(options: dict[str, Any]) -> None:
    deep = {r.prompt_id: r for r in _results(width=3, depth=3, **options)}
    for depth in (1, 2):
        shallow = _results(width=3, depth=depth, **options)
        for r in shallow:
            derived = first_steps(deep[r.prompt_id], depth)
            assert strip_timings(derived.to_dict()) == strip_timings(r.to_dict()), (depth, r.prompt_id)


def test_the_prefix_holds_for_early_stops_and_failures() -> None:
    def failing_late(request: GenerationRequest) -> list[str]:
        if request.step == 2 and request.purpose == "gradient":
            raise tpo.BackendError("down at step 2")
        return pure_reply(request)

    for options in ({"early_stop_score": 50.0}, {}):
        deep = _results(width=3, depth=3, **options)
        shallow = {r.prompt_id: r for r in _results(width=3, depth=1, **options)}
        for r in deep:
            assert strip_timings(first_steps(r, 1).to_dict()) == strip_timings(shallow[r.prompt_id].to_dict())
    (failed,) = tpo.optimize_many(
        _prompts(1), policy=ScriptedPolicy(failing_late), reward=FunctionReward(hash_score), width=2, depth=3
    )
    assert failed.status == "failed"
    (ok,) = tpo.optimize_many(
        _prompts(1), policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=2, depth=1
    )
    assert strip_timings(first_steps(failed, 1).to_dict()) == strip_timings(ok.to_dict())
    assert first_steps(failed, 2).status == "failed"  # failed within the first two steps: so would depth 2
    with pytest.raises(ConfigError, match="no shallower depth 3"):
        first_steps(failed, 3)


def test_best_of_n_takes_the_first_n_samples_of_best_of_big_n() -> None:
    (big,) = _results(mode="bon", width=8)[:1]
    small = first_samples(big, 3)
    first = big.steps[0].candidate_ids[:3]
    assert small.steps[0].candidate_ids == first
    assert small.config["width"] == 3 and small.config["mode"] == "bon"
    best = max((c for c in big.candidates if c.id in first), key=lambda c: c.score)  # type: ignore[arg-type,return-value]
    assert small.best_id == best.id and small.score == best.score
    assert small.usage.sequences == 3 and small.usage.reward_calls == len(set(first))
    assert small.usage.prompt_tokens == big.usage.prompt_tokens
    assert small.usage.completion_tokens == round(big.usage.completion_tokens * 3 / 8)
    tpo.TPOResult.from_dict(json.loads(small.to_json()))  # valid JSON form
    with pytest.raises(ConfigError, match="between 1 and 7"):
        first_samples(big, 8)


# --------------------------------------------------------------------------- one dispatcher, standard outputs


def test_a_sweep_batches_every_configuration_together_on_one_backend(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.jsonl", 12)
    policy = ScriptedPolicy(pure_reply, batching=True)
    reward = FunctionReward(lambda ms, a: [hash_score(m, x) for m, x in zip(ms, a, strict=True)], batched=True)
    entries = plan_sweep(TPOConfig(seed=1), modes=["tpo", "revision"], widths=[2, 3, 4], depths=[1, 2])
    sweep = Sweep(read_prompts(data, id_field="id"), tmp_path / "grid", entries, models={"policy": "scripted"})
    assert sweep.open() == []
    summary = sweep.run(policy, reward)
    assert summary.ok and set(summary.runs) == {f"{m}-d2-n{w}" for m in ("tpo", "revision") for w in (2, 3, 4)}
    assert policy.violations == []

    # Mixed batches: calls carrying requests of several widths, and of both modes' critiques.
    widths_per_call = [{r.n for r in call if r.purpose in ("sample", "update")} for call in policy.calls]
    assert max(len(w) for w in widths_per_call) == 3
    kinds_per_call = [
        {"tpo" if "reply_B" in r.messages[-1].content else "revision" for r in call if r.purpose == "loss"}
        for call in policy.calls
    ]
    assert any(k == {"tpo", "revision"} for k in kinds_per_call)
    assert len(policy.calls) < sum(len(c) for c in policy.calls) / 10  # real batches, not one request at a time
    assert max(len(c) for c in reward.calls) > 12  # the reward's batches mix configurations too

    # One standard output per configuration, the derived ones included, and a manifest.
    manifest = json.loads((tmp_path / "grid" / MANIFEST).read_text())
    by_name = {c["name"]: c for c in manifest["configurations"]}
    assert len(by_name) == 12 and by_name["tpo-d1-n3"]["how"] == "prefix"
    assert by_name["tpo-d1-n3"]["derived_from"] == "tpo-d2-n3" and by_name["tpo-d2-n3"]["complete"] == 12
    for name in by_name:
        run = load_run(tmp_path / "grid" / f"{name}.jsonl")
        assert len(run.results) == 12 and all(r.status == "complete" for r in run.results)
        assert run.depth == by_name[name]["depth"] and run.width == by_name[name]["width"]

    # A derived configuration equals running it alone.
    alone = tmp_path / "alone.jsonl"
    tpo.batch.runner.run_batch(
        read_prompts(data, id_field="id"),
        alone,
        policy=ScriptedPolicy(pure_reply),
        reward=FunctionReward(hash_score),
        config=TPOConfig(seed=1, mode="revision", width=4, depth=1),
    )
    got = {
        r.prompt_id: strip_timings(r.to_dict()) for r in load_run(tmp_path / "grid" / "revision-d1-n4.jsonl").results
    }
    want = {r.prompt_id: strip_timings(r.to_dict()) for r in load_run(alone).results}
    for d in (*got.values(), *want.values()):
        d.pop("policy"), d.pop("reward"), d.pop("critic")  # the test's objects have other names
    assert got == want


def test_a_sweep_checks_each_model_once_for_all_its_configurations(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.jsonl", 3)
    policy, reward = ScriptedPolicy(pure_reply), FunctionReward(hash_score)
    checks: list[str] = []

    def counting(name: str) -> Any:
        async def preflight() -> None:
            checks.append(name)

        return preflight

    policy.preflight = counting("policy")  # type: ignore[attr-defined]
    reward.preflight = counting("reward")  # type: ignore[attr-defined]
    entries = plan_sweep(TPOConfig(), modes=["tpo", "revision", "bon"], widths=[2, 3], depths=[1])
    sweep = Sweep(read_prompts(data, id_field="id"), tmp_path / "grid", entries, models={})
    sweep.open()
    assert sweep.open() == []  # opening again (arun does) changes nothing
    summary = sweep.run(policy, reward)
    assert summary.ok and len(summary.runs) == 5
    assert sorted(checks) == ["policy", "reward"]

    # Nothing left to do: no check at all.
    checks.clear()
    Sweep(read_prompts(data, id_field="id"), tmp_path / "grid", entries, models={}).run(policy, reward)
    assert checks == []


def test_each_configuration_has_the_fingerprint_tpo_batch_would_give_it(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.jsonl", 3)
    models = {"policy": "scripted", "reward": ["python:score.py"]}
    entries = plan_sweep(TPOConfig(), modes=["tpo"], widths=[2], depths=[1])
    sweep = Sweep(read_prompts(data, id_field="id"), tmp_path / "grid", entries, models=models)
    sweep.run(ScriptedPolicy(pure_reply), FunctionReward(hash_score))
    # `tpo batch` with the same options resumes the sweep's output (nothing left to do) ...
    same = BatchRun(
        read_prompts(data, id_field="id"),
        tmp_path / "grid" / "tpo-d1-n2.jsonl",
        config=TPOConfig(width=2, depth=1),
        models=models,
    )
    same.open()
    assert same.unfinished == 0
    same.close()
    # ... and refuses other options, naming them.
    other = BatchRun(
        read_prompts(data, id_field="id"),
        tmp_path / "grid" / "tpo-d1-n2.jsonl",
        config=TPOConfig(width=2, depth=1, seed=9),
        models=models,
    )
    with pytest.raises(ConfigError, match=r"method\.seed: 0 → 9"):
        other.open()


def test_adding_a_depth_later_turns_a_run_into_a_derived_file_and_back(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.jsonl", 4)

    def sweep(depths: list[int]) -> Sweep:
        s = Sweep(
            read_prompts(data, id_field="id"),
            tmp_path / "grid",
            plan_sweep(TPOConfig(), modes=["tpo"], widths=[2], depths=depths),
            models={},
        )
        s.run(ScriptedPolicy(pure_reply), FunctionReward(hash_score))
        return s

    sweep([1, 2])  # d1 derived from d2
    assert not (tmp_path / "grid" / "tpo-d1-n2.jsonl.tpo").exists()
    sweep([1])  # now d1 runs: the derived file makes way for a real run
    assert (tmp_path / "grid" / "tpo-d1-n2.jsonl.tpo").exists()
    s = sweep([1, 2])  # d1 was run for real: it is kept, not derived again
    assert any("was run by itself earlier" in n for n in s.notes)
    assert len(load_run(tmp_path / "grid" / "tpo-d1-n2.jsonl").results) == 4


# --------------------------------------------------------------------------- kill -9 and resume


def _start(input_path: Path, folder: Path, log: Path | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(input_path), str(folder), str(log or os.devnull)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _lines(folder: Path) -> int:
    return newlines(*(folder / f"{name}.jsonl" for name in ("tpo-d2-n2", "tpo-d2-n3", "bon-n6")))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_a_sweep_then_resume_matches_an_uninterrupted_sweep(tmp_path: Path) -> None:
    prompts = 60
    input_path = _input(tmp_path / "in.jsonl", prompts)
    reference = tmp_path / "reference"
    proc = _start(input_path, reference, None)
    err = finish(proc, 120)
    assert proc.returncode == 0, err

    folder, log = tmp_path / "grid", tmp_path / "calls.tsv"
    rng = random.Random(13)
    kills = 0
    schedule = [
        ("time", rng.uniform(0.3, 0.9)),
        ("more", 20),
        ("time", rng.uniform(0.5, 1.2)),
        ("more", 40),
        ("time", rng.uniform(0.2, 0.8)),
    ]
    for run in kill_and_resume(lambda: _start(input_path, folder, log), lambda: _lines(folder), schedule):
        kills += run.killed
        assert run.returncode in (0, -signal.SIGKILL), run.stderr
    proc = _start(input_path, folder, log)
    err = finish(proc, 120)
    assert proc.returncode == 0, err
    assert kills >= 3

    # Every configuration, run or derived, holds exactly the uninterrupted sweep's results.
    names = [c["name"] for c in json.loads((reference / MANIFEST).read_text())["configurations"]]
    assert len(names) == 6
    for name in names:
        want = {
            d["prompt_id"]: strip_timings(d)
            for d in map(json.loads, (reference / f"{name}.jsonl").read_text().splitlines())
        }
        got = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert len(got) == prompts and {d["prompt_id"]: strip_timings(d) for d in got} == want, name

    # No finished step computed twice: a call repeats only in a later process, for the step in flight when killed.
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    assert all(len(c) == 5 and c[1] != "?" for c in calls)
    segments = list(dict.fromkeys(c[0] for c in calls))
    seen: dict[tuple[str, str, int, str], list[int]] = defaultdict(list)
    last_step: dict[tuple[int, str, str], int] = {}
    for pid, width, prompt, step, purpose in calls:
        seg = segments.index(pid)
        seen[(width, prompt, int(step), purpose)].append(seg)
        last_step[(seg, width, prompt)] = max(last_step.get((seg, width, prompt), -1), int(step))
    repeated = 0
    for (width, prompt, step, purpose), segs in seen.items():
        assert len(segs) == len(set(segs)), f"width {width} {prompt} step {step} {purpose} called twice in one process"
        for seg in segs[:-1]:
            repeated += 1
            assert step == last_step[(seg, width, prompt)], f"width {width} {prompt} step {step} was computed twice"
    per_prompt = 2 * (1 + 3 * 2) + 1  # two TPO D2 configurations and one best-of-6 sampling
    assert len(seen) == prompts * per_prompt and len(calls) == prompts * per_prompt + repeated
    assert len(segments) >= 3


def test_a_sweep_says_what_it_notes_about_its_dataset_once(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.jsonl", 3)
    with data.open("a") as f:
        f.write(json.dumps({"id": "bad", "question": "no prompt field"}) + "\n")
    dataset = read_prompts(data, skip_invalid=True)
    assert dataset.id_note and dataset.problem_count == 1
    shared: list[str] = []
    per_configuration: list[str] = []

    class Notes(BatchObserver):
        def on_note(self, message: str) -> None:
            per_configuration.append(message)

    entries = plan_sweep(TPOConfig(), modes=["tpo", "bon"], widths=[2], depths=[1])
    sweep = Sweep(dataset, tmp_path / "grid", entries, models={}, observer_for=lambda e: Notes(), on_note=shared.append)
    assert sweep.run(ScriptedPolicy(pure_reply), FunctionReward(hash_score)).ok
    assert shared == [dataset.id_note, shared[1]] and shared[1].startswith("skipped 1 invalid row(s)")
    assert per_configuration == []


# --------------------------------------------------------------------------- the command


def test_the_sweep_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _input(tmp_path / "in.jsonl", 5)
    built: list[Any] = []

    def build_models(params: dict[str, Any]) -> tpo.Models:
        built.append(params)
        return tpo.Models(ScriptedPolicy(pure_reply, batching=True), None, FunctionReward(hash_score))

    monkeypatch.setattr("tpo.cli.sweep.build_models", build_models)
    args = [
        "sweep",
        str(data),
        "-o",
        str(tmp_path / "grid"),
        "--mode",
        "tpo,bon",
        "--width",
        "2,3",
        "--depth",
        "1,2",
        "--bon-width",
        "4,8",
        "--seed",
        "4",
        "--log",
        "plain",
        "--policy",
        "scripted",
        "--policy-params",
        "1e9",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(built) == 1
    files = sorted(p.name for p in (tmp_path / "grid").glob("*.jsonl"))
    assert files == [
        "bon-n4.jsonl",
        "bon-n8.jsonl",
        "tpo-d1-n2.jsonl",
        "tpo-d1-n3.jsonl",
        "tpo-d2-n2.jsonl",
        "tpo-d2-n3.jsonl",
    ]
    assert "tpo-d1-n2 (from tpo-d2-n2)" in result.output
    # --policy-params: every result estimates its FLOPs, the derived ones included.
    for name in ("tpo-d2-n2", "tpo-d1-n2", "bon-n4"):
        r = load_run(tmp_path / "grid" / f"{name}.jsonl").results[0]
        assert r.config["policy_params"] == 1e9 and r.usage.flops == pytest.approx(2e9 * r.usage.tokens, rel=0.05), name
    assert (
        result.output.count("prompt ids are the field 'id'") == 1
    )  # a note about the input: once, not per configuration
    # Run again: everything is finished, so no model is loaded.
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert len(built) == 1
    # `tpo eval` reads the folder's files.
    evaluated = CliRunner().invoke(cli, ["eval", *(str(tmp_path / "grid" / f) for f in files), "--json", "-"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["matched_compute"]


def test_the_sweep_command_refuses_a_bad_grid(tmp_path: Path) -> None:
    data = _input(tmp_path / "in.jsonl", 2)
    r = CliRunner().invoke(
        cli, ["sweep", str(data), "-o", str(tmp_path / "g"), "--mode", "tpo", "--width", "2,x", "--depth", "1"]
    )
    assert r.exit_code == 2 and "--width" in r.output and "'x'" in r.output
    r = CliRunner().invoke(
        cli, ["sweep", str(data), "-o", str(tmp_path / "g"), "--mode", "tpo,dpo", "--width", "2", "--depth", "1"]
    )
    assert r.exit_code == 2 and "dpo" in r.output


def test_a_tie_in_the_last_step_is_broken_as_a_run_of_that_depth_breaks_it() -> None:
    """Rewrites that repeat an earlier answer, all scored alike: the derived answer is the real run's."""

    def repeating(request: GenerationRequest) -> list[str]:
        if request.purpose == "sample":
            return ["old answer", "other answer"][: request.n]
        if request.purpose == "update":
            return [f"<improved_reply>{t}</improved_reply>" for t in ("new answer", "old answer")][: request.n]
        return ["Be more specific."]

    def run(depth: int) -> list[tpo.TPOResult]:
        return list(
            tpo.optimize_many(
                _prompts(2),
                policy=ScriptedPolicy(repeating),
                reward=FunctionReward(lambda messages, answer: 1.0),
                width=2,
                depth=depth,
                final_from="last_step",
            )
        )

    deep = {r.prompt_id: r for r in run(3)}
    for r in run(1):
        assert r.answer == "new answer"  # the engine takes the first of the last step's ties
        assert strip_timings(first_steps(deep[r.prompt_id], 1).to_dict()) == strip_timings(r.to_dict())
