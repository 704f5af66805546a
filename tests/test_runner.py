"""The batch runner in-process: output lines, resume at step granularity, fingerprints, torn lines, failures, compaction."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import tpo.batch.durable as durable_module
from conftest import hash_score, pure_reply, strip_timings
from tpo import BackendError, ConfigError, GenerationRequest, InputError, RunError, TPOConfig, TPOResult
from tpo.batch.datasets import read_prompts
from tpo.batch.runner import BatchObserver, BatchRun, BatchState, BatchSummary, run_batch, sidecar_dir
from tpo.testing import FunctionReward, ScriptedPolicy

CONFIG = TPOConfig(width=2, depth=2, seed=5, max_concurrent_prompts=3)
CALLS_PER_PROMPT = 1 + 3 * CONFIG.depth  # sample, then loss, gradient and update per step


class Crash(BaseException):
    """Stands in for the process dying: nothing catches it, nothing cleans up after it."""


def rows(n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"q{i:02d}", "prompt": f"Question {i}?", "ref": str(i), "cat": "even" if i % 2 == 0 else "odd"}
        for i in range(n)
    ]


class Policy(ScriptedPolicy):
    """A scripted policy with pure replies that logs every answered call and can crash or fail on cue."""

    def __init__(self, *, crash_after: int | None = None, fail: Any = None) -> None:
        self.log: list[tuple[str, int, str]] = []
        self.crash_after = crash_after
        self.fail = fail or (lambda request: False)
        super().__init__(self._reply)

    def _reply(self, request: GenerationRequest) -> list[str]:
        if self.crash_after is not None and len(self.log) >= self.crash_after:
            raise Crash()
        if self.fail(request):
            raise BackendError("the server is down", backend="scripted")
        self.log.append((request.prompt_id, request.step, request.purpose))
        return pure_reply(request)


def reward() -> FunctionReward:
    return FunctionReward(hash_score, name="hash")


class Notes(BatchObserver):
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.states: list[tuple[int, int, dict[int, int]]] = []
        self.summary: BatchSummary | None = None

    def on_note(self, message: str) -> None:
        self.notes.append(message)

    def on_step(self, partial: TPOResult, state: BatchState) -> None:
        assert partial.status == "partial"
        self.states.append((state.done, len(state.running), state.at_step()))

    def on_end(self, summary: BatchSummary) -> None:
        self.summary = summary


_READ_OPTIONS = ("prompt_field", "id_field", "limit", "shuffle", "seed", "skip_invalid")


def batch(data: Any, out: Path, policy: ScriptedPolicy | None = None, **kwargs: Any) -> BatchSummary:
    kwargs.setdefault("config", CONFIG)
    read = {k: kwargs.pop(k) for k in _READ_OPTIONS if k in kwargs}
    read.setdefault("id_field", "id")
    dataset = read_prompts(data, **read)
    return run_batch(dataset, out, policy=policy or Policy(), reward=kwargs.pop("reward", reward()), **kwargs)


def read_output(out: Path) -> list[dict[str, Any]]:
    raw = out.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]


def checkpoint_steps(out: Path) -> dict[str, int]:
    """The latest checkpoint's step count of every prompt, as the file holds them."""
    steps: dict[str, int] = {}
    path = sidecar_dir(out) / "checkpoints.jsonl"
    for line in path.read_text().splitlines():
        d = json.loads(line)
        steps[d["prompt_id"]] = len(d["steps"])
    return steps


@pytest.fixture
def reference(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """The results of an uninterrupted run over rows(10)."""
    out = tmp_path / "reference.jsonl"
    assert batch(rows(10), out).ok
    return {d["prompt_id"]: strip_timings(d) for d in read_output(out)}


# ---------------------------------------------------------------------------- a run


def test_one_line_per_prompt_with_its_fields_and_trace(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    observer = Notes()
    policy = Policy()
    summary = batch(rows(7), out, policy, observer=observer)
    assert summary.ok and summary.total == summary.complete == 7 and summary.failed == 0
    assert summary.finished_before == 0 and summary.usage.policy_calls == 7 * CALLS_PER_PROMPT
    lines = read_output(out)
    assert sorted(d["prompt_id"] for d in lines) == [f"q{i:02d}" for i in range(7)]
    for d in lines:
        i = int(d["prompt_id"][1:])
        assert d["status"] == "complete" and d["error"] is None
        assert d["messages"] == [{"role": "user", "content": f"Question {i}?"}]
        assert d["metadata"] == {"ref": str(i), "cat": "even" if i % 2 == 0 else "odd"}
        assert len(d["steps"]) == CONFIG.depth + 1 and d["answer"] and d["score"] is not None
        assert d["seed"] == CONFIG.seed and d["config"]["width"] == CONFIG.width
        TPOResult.from_dict(d)  # the engine's schema, readable back
    assert Counter(policy.log) == Counter({k: 1 for k in policy.log})
    side = sidecar_dir(out)
    config = json.loads((side / "config.json").read_text())
    assert config["tpo_version"] == __import__("tpo").__version__
    assert config["method"]["depth"] == CONFIG.depth and config["models"]["policy"] == "scripted"
    fingerprint = json.loads((side / "fingerprint.json").read_text())
    assert fingerprint["input"]["id_field"] == "id" and "max_concurrent_prompts" not in fingerprint["method"]
    assert (side / "checkpoints.jsonl").stat().st_size == 0  # every prompt finished: nothing left to resume
    # Progress: at most the configured number of prompts in flight, and each step reported.
    assert len(observer.states) == 7 * (CONFIG.depth + 1)
    assert max(running for _, running, _ in observer.states) <= CONFIG.max_concurrent_prompts
    assert observer.summary == summary


def test_running_a_finished_run_again_does_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch(rows(4), out)
    before = out.read_bytes()
    policy = Policy()
    summary = batch(rows(4), out, policy)
    assert policy.log == [] and out.read_bytes() == before
    assert summary.ok and summary.finished_before == 4 and summary.usage.policy_calls == 0


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("crash_after", [0, 1, 5, 13, 29, 50])
def test_a_crash_at_any_call_resumes_from_the_last_finished_step(
    tmp_path: Path, reference: dict[str, dict[str, Any]], crash_after: int
) -> None:
    out = tmp_path / "out.jsonl"
    first = Policy(crash_after=crash_after)
    with pytest.raises(Crash):
        batch(rows(10), out, first)
    finished = {d["prompt_id"] for d in read_output(out)}
    checkpointed = {pid: n for pid, n in checkpoint_steps(out).items() if pid not in finished}

    second = Policy()
    summary = batch(rows(10), out, second)
    assert summary.ok and summary.finished_before == len(finished)
    lines = read_output(out)
    assert sorted(d["prompt_id"] for d in lines) == sorted(reference)  # none lost, none twice
    for d in lines:
        assert strip_timings(d) == reference[d["prompt_id"]]
    # The second run computed exactly the steps the first had not checkpointed, once each.
    expected = Counter()
    for pid in reference:
        if pid in finished:
            continue
        done = checkpointed.get(pid, 0)
        if done == 0:
            expected[(pid, 0, "sample")] += 1
        for step in range(max(done, 1), CONFIG.depth + 1):
            for purpose in ("loss", "gradient", "update"):
                expected[(pid, step, purpose)] += 1
    assert Counter(second.log) == expected
    if 5 <= crash_after < 50:
        assert checkpointed, crash_after  # the crash did land mid-run, with work to resume


def test_repeated_crashes_converge_without_repeating_finished_steps(
    tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    out = tmp_path / "out.jsonl"
    total: Counter[tuple[str, int, str]] = Counter()
    for crash_after in (3, 7, 2, 11, 5):
        policy = Policy(crash_after=crash_after)
        with pytest.raises(Crash):
            batch(rows(10), out, policy)
        total.update(policy.log)
    policy = Policy()
    batch(rows(10), out, policy)
    total.update(policy.log)
    assert {d["prompt_id"]: strip_timings(d) for d in read_output(out)} == reference
    # Each crash can cost at most the steps in flight; finished steps never run twice.
    assert sum(total.values()) - len(total) <= 5 * CONFIG.max_concurrent_prompts * 3
    assert len(total) == 10 * CALLS_PER_PROMPT


@pytest.mark.parametrize(
    "target, at_write",
    [
        ("out.jsonl", 1),
        ("out.jsonl", 4),
        ("checkpoints.jsonl", 1),
        ("checkpoints.jsonl", 6),
        ("fingerprint.json.tmp", 1),
        ("config.json.tmp", 1),
    ],
)
def test_a_write_torn_by_a_kill_is_cut_off_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, dict[str, Any]], target: str, at_write: int
) -> None:
    out = tmp_path / "out.jsonl"
    real_append = durable_module._append
    writes = 0
    dead = False

    def torn_append(f: Any, data: bytes) -> None:
        nonlocal writes, dead
        if dead:  # other prompts of the dead process write nothing more
            raise Crash()
        if Path(f.name).name == target:
            writes += 1
            if writes == at_write:
                # The process dies half-way through the last line of the write (a group may hold several).
                last = data.rstrip(b"\n").rfind(b"\n") + 1
                f.write(data[: last + (len(data) - last) // 2])
                f.flush()
                dead = True
                raise Crash()
        real_append(f, data)

    monkeypatch.setattr(durable_module, "_append", torn_append)
    with pytest.raises(Crash):
        batch(rows(10), out)
    monkeypatch.setattr(durable_module, "_append", real_append)
    torn_file = out if target == "out.jsonl" else sidecar_dir(out) / target
    assert not torn_file.read_bytes().endswith(b"\n")
    observer = Notes()
    summary = batch(rows(10), out, observer=observer)
    assert summary.ok
    if target.endswith(".jsonl"):
        assert any(n.startswith("repaired") and target in n for n in observer.notes)
    assert {d["prompt_id"]: strip_timings(d) for d in read_output(out)} == reference


def test_a_failed_write_is_taken_back_so_later_lines_stay_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, dict[str, Any]]
) -> None:
    out = tmp_path / "out.jsonl"
    real_append = durable_module._append
    failed = False

    def disk_full_once(f: Any, data: bytes) -> None:
        nonlocal failed
        if not failed and Path(f.name).name == "checkpoints.jsonl" and f.tell() > 0:
            failed = True
            f.write(data[:100])
            f.flush()
            raise OSError(28, "No space left on device")
        real_append(f, data)

    monkeypatch.setattr(durable_module, "_append", disk_full_once)
    with pytest.raises(RunError, match=r"could not write .*checkpoints.jsonl: \[Errno 28\] No space left"):
        batch(rows(10), out)
    monkeypatch.setattr(durable_module, "_append", real_append)
    for line in (sidecar_dir(out) / "checkpoints.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole, including those other prompts wrote after the failure
    assert batch(rows(10), out).ok
    assert {d["prompt_id"]: strip_timings(d) for d in read_output(out)} == reference


def test_a_corrupt_line_inside_the_output_is_reported_not_guessed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch(rows(3), out)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(lines[0] + b"\nnot json\n" + b"\n".join(lines[1:]))
    with pytest.raises(InputError, match=r"out.jsonl:2: not valid JSON .*Fix or remove that line, or add --restart"):
        batch(rows(3), out)


def test_compaction_keeps_the_checkpoints_as_small_as_the_work_in_flight(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    path = sidecar_dir(out) / "checkpoints.jsonl"
    sizes: list[int] = []
    longest = 0

    class Watch(BatchObserver):
        def on_step(self, partial: TPOResult, state: BatchState) -> None:
            nonlocal longest
            longest = max(longest, len(partial.to_json()) + 1)
            sizes.append(path.stat().st_size)

    min_bytes = 4000
    batch(rows(40), out, observer=Watch(), compact_min_bytes=min_bytes)
    # Compaction is decided before each group is written, so at its largest the file holds the live
    # checkpoints (one per prompt in flight), dead ones up to the threshold (the live size or min_bytes)
    # plus one more group that went dead after the check, and the group being written: four groups.
    bound = 4 * CONFIG.max_concurrent_prompts * longest + min_bytes
    assert max(sizes) <= bound
    assert sum(1 for _ in range(len(sizes))) == 40 * (CONFIG.depth + 1)
    # Without compaction the file would have held every checkpoint of every prompt.
    assert 40 * (CONFIG.depth + 1) * longest / 3 > bound
    assert path.stat().st_size == 0


# ---------------------------------------------------------------------------- fingerprints


def test_a_different_configuration_is_refused_with_what_differs(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        batch(rows(6), out, Policy(crash_after=10))
    with pytest.raises(ConfigError) as e:
        batch(rows(6), out, config=CONFIG.with_options(width=3, temperature=0.5))
    message = str(e.value)
    assert "method.width: 2 → 3" in message and "method.temperature: 0.7 → 0.5" in message
    assert "--restart" in message
    with pytest.raises(ConfigError, match=r"input.rows_sha256: the input rows changed"):
        batch([*rows(5), {"id": "q05", "prompt": "Another question", "ref": "5", "cat": "odd"}], out)
    with pytest.raises(ConfigError, match=r"input.limit: null → 3"):
        batch(rows(6), out, limit=3)
    with pytest.raises(ConfigError, match=r"models.reward: 'hash' → 'other'"):
        batch(rows(6), out, reward=FunctionReward(hash_score, name="other"))
    with pytest.raises(ConfigError, match=r"models.policy_options.n_ctx"):
        batch(rows(6), out, models={"policy": "scripted", "policy_options": {"n_ctx": 512}})
    # Operational settings do not count: more prompts at once resumes the same run.
    assert batch(rows(6), out, config=CONFIG.with_options(max_concurrent_prompts=5)).ok


def test_restart_discards_the_old_run_and_says_what_it_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch(rows(4), out)
    observer = Notes()
    policy = Policy()
    summary = batch(rows(4), out, policy, config=CONFIG.with_options(width=3), restart=True, observer=observer)
    assert summary.ok and summary.finished_before == 0 and len(policy.log) == 4 * CALLS_PER_PROMPT
    assert any("removed" in n and "out.jsonl (4 finished prompts)" in n for n in observer.notes)
    assert any("removed" in n and "out.jsonl.tpo/" in n for n in observer.notes)
    assert all(len(d["candidates"]) >= 3 for d in read_output(out))
    assert len(read_output(out)) == 4


def test_a_run_that_finished_nothing_takes_the_new_configuration(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        batch(rows(3), out, Policy(crash_after=0))
    assert batch(rows(3), out, config=CONFIG.with_options(width=3)).ok


def test_an_output_from_elsewhere_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"something": "else"}\n')
    with pytest.raises(ConfigError, match=r"already exists and is not the output of a tpo batch run"):
        batch(rows(2), out)
    assert out.read_text() == '{"something": "else"}\n'
    assert not sidecar_dir(out).exists()
    assert batch(rows(2), out, restart=True).ok


def test_the_input_file_cannot_be_the_output(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(2)))
    with pytest.raises(ConfigError, match=r"is the input file"):
        batch(path, path, restart=True)


def test_two_processes_cannot_write_one_run(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    dataset = read_prompts(rows(2), id_field="id")
    first = BatchRun(dataset, out, config=CONFIG, models={"policy": "a"})
    first.open()
    try:
        second = BatchRun(dataset, out, config=CONFIG, models={"policy": "a"})
        # The caller's to sort out (wait, or choose another output), not a failure that retrying fixes.
        with pytest.raises(ConfigError, match=r"another process is writing this run"):
            second.open()
    finally:
        first.close()
    summary = BatchRun(dataset, out, config=CONFIG, models={"policy": "a"}).run(Policy(), reward())
    assert summary.ok


def test_a_symlink_to_the_output_is_the_same_run_with_the_same_lock(tmp_path: Path) -> None:
    out, link = tmp_path / "out.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(out.name)  # dangling until a run creates out.jsonl
    dataset = read_prompts(rows(3), id_field="id")
    first = BatchRun(dataset, out, config=CONFIG, models={"policy": "a"})
    first.open()
    try:
        second = BatchRun(dataset, link, config=CONFIG, models={"policy": "a"})
        with pytest.raises(ConfigError, match=r"another process is writing this run"):
            second.open()
    finally:
        first.close()
    assert not sidecar_dir(link).name.startswith("link") and not (tmp_path / "link.jsonl.tpo").exists()
    # Through the link the run resumes (here: retries its failed prompt) beside the target; the link stays a link.
    assert batch(rows(3), out, Policy(fail=lambda r: r.prompt_id == "q01")).failed == 1
    notes = Notes()
    summary = batch(rows(3), link, observer=notes)
    assert summary.ok and summary.finished_before == 2 and summary.output == out
    assert link.is_symlink() and sorted(d["prompt_id"] for d in read_output(out)) == ["q00", "q01", "q02"]
    assert any(f"{link} leads to {out}" in n for n in notes.notes)
    assert not (tmp_path / "link.jsonl.tpo").exists()


def test_secrets_are_not_saved(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch(
        rows(1),
        out,
        models={"policy": "openai:m", "policy_options": {"api_key": "sk-123", "api_key_env": "MY_KEY"}},
        settings={"token": "abc", "width": 2},
    )
    for name in ("config.json", "fingerprint.json"):
        text = (sidecar_dir(out) / name).read_text()
        assert "sk-123" not in text and "abc" not in text
    config = json.loads((sidecar_dir(out) / "config.json").read_text())
    assert config["models"]["policy_options"] == {"api_key": "***", "api_key_env": "MY_KEY"}


# ---------------------------------------------------------------------------- failures


def test_a_failing_prompt_is_written_with_its_error_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    policy = Policy(fail=lambda r: r.prompt_id == "q03" and r.step == 1)
    summary = batch(rows(6), out, policy)
    assert not summary.ok and summary.complete == 5 and summary.failed == 1 and summary.failed_ids == ("q03",)
    by_id = {d["prompt_id"]: d for d in read_output(out)}
    assert len(by_id) == 6
    assert by_id["q03"]["status"] == "failed" and "server is down" in by_id["q03"]["error"]
    assert len(by_id["q03"]["steps"]) == 1  # the sampling step it did finish is kept
    assert all(d["status"] == "complete" for pid, d in by_id.items() if pid != "q03")


def test_failed_prompts_are_retried_from_their_last_finished_step(
    tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    out = tmp_path / "out.jsonl"
    batch(rows(10), out, Policy(fail=lambda r: r.prompt_id in ("q02", "q07") and r.step == 2))
    kept = Policy()
    assert batch(rows(10), out, kept, retry_failed=False).failed == 2
    assert kept.log == []
    observer = Notes()
    retry = Policy()
    summary = batch(rows(10), out, retry, observer=observer)
    assert summary.ok and summary.finished_before == 8
    assert any("retrying 2 prompt(s)" in n for n in observer.notes)
    assert sorted(retry.log) == sorted((pid, 2, p) for pid in ("q02", "q07") for p in ("loss", "gradient", "update"))
    lines = read_output(out)
    assert sorted(d["prompt_id"] for d in lines) == sorted(reference)
    by_id = {d["prompt_id"]: strip_timings(d) for d in lines}
    for pid in ("q02", "q07"):
        # Same answers as an uninterrupted run; the usage of the failed attempt's half-step is not counted.
        got, want = by_id[pid], reference[pid]
        assert {k: v for k, v in got.items() if k != "usage"} == {k: v for k, v in want.items() if k != "usage"}


def test_a_prompt_with_nothing_scored_is_retried_from_scratch(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    broken = FunctionReward(lambda m, a: (_ for _ in ()).throw(ValueError("no")) if "q01" in a else 1.0, name="r")
    summary = batch(rows(3), out, reward=broken)
    assert summary.failed_ids == ("q01",)
    policy = Policy()
    fixed = FunctionReward(lambda m, a: 1.0, name="r")
    assert batch(rows(3), out, policy, reward=fixed).ok
    assert ("q01", 0, "sample") in policy.log and {pid for pid, _, _ in policy.log} == {"q01"}


def test_skipped_rows_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\nnope\n')
    observer = Notes()
    summary = batch(path, tmp_path / "out.jsonl", skip_invalid=True, observer=observer)
    assert summary.ok and summary.total == 1 and summary.invalid_rows == 2
    assert any("skipped 2 invalid row(s)" in n and "in.jsonl line 2" in n for n in observer.notes)
    with pytest.raises(InputError, match=r"in.jsonl line 3: not valid JSON"):
        batch(path, tmp_path / "strict.jsonl")
    assert not (tmp_path / "strict.jsonl").exists()


def test_shuffle_and_limit_pick_a_reproducible_subset(tmp_path: Path) -> None:
    one = batch(rows(20), tmp_path / "a.jsonl", shuffle=True, seed=7, limit=4)
    two = batch(rows(20), tmp_path / "b.jsonl", shuffle=True, seed=7, limit=4)
    ids_a = sorted(d["prompt_id"] for d in read_output(tmp_path / "a.jsonl"))
    ids_b = sorted(d["prompt_id"] for d in read_output(tmp_path / "b.jsonl"))
    assert one.total == two.total == 4 and ids_a == ids_b != [f"q{i:02d}" for i in range(4)]
    fingerprint = json.loads((sidecar_dir(tmp_path / "a.jsonl") / "fingerprint.json").read_text())
    assert fingerprint["input"]["shuffle_seed"] == 7 and fingerprint["input"]["limit"] == 4


def test_a_whole_last_line_missing_only_its_newline_is_kept(
    tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        batch(rows(10), out, Policy(crash_after=40))
    raw = out.read_bytes()
    assert raw.count(b"\n") >= 2
    out.write_bytes(raw[:-1])  # killed just before the newline: the result itself is whole
    kept = {d["prompt_id"] for d in map(json.loads, raw.decode().splitlines())}
    policy = Policy()
    observer = Notes()
    summary = batch(rows(10), out, policy, observer=observer)
    assert summary.ok and summary.finished_before == len(kept)
    assert not any(pid in kept for pid, _, _ in policy.log)  # not computed again
    assert not any(n.startswith("repaired") for n in observer.notes)
    assert {d["prompt_id"]: strip_timings(d) for d in read_output(out)} == reference


def test_a_repeated_id_in_the_output_counts_its_last_line_as_tpo_eval_does(tmp_path: Path) -> None:
    from tpo.analysis.evaluate import read_results

    out = tmp_path / "out.jsonl"
    assert batch(rows(3), out).ok
    lines = out.read_bytes().splitlines(keepends=True)
    first = json.loads(lines[0])
    failed = {**first, "status": "failed", "error": "RewardError: down"}
    out.write_bytes(b"".join(lines) + (json.dumps(failed) + "\n").encode())
    results, warnings = read_results(out)
    assert {r.prompt_id: r.status for r in results}[first["prompt_id"]] == "failed"
    assert any("appears again" in w for w in warnings)
    # The runner reads the same file the same way: the later (failed) line counts, so the prompt is retried.
    observer = Notes()
    policy = Policy()
    summary = batch(rows(3), out, policy, observer=observer)
    assert summary.ok and {pid for pid, _, _ in policy.log} <= {first["prompt_id"]}
    assert any("appears again" in n and "the later line counts" in n for n in observer.notes)
    assert any("retrying 1 prompt(s)" in n for n in observer.notes)
    final = read_output(out)
    assert sorted(d["prompt_id"] for d in final) == [f"q{i:02d}" for i in range(3)]  # every copy replaced by one line


# ---------------------------------------------------------------------------- durability without blocking the loop


def test_checkpoints_are_fsynced_in_groups_off_the_event_loop_before_the_chain_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, dict[str, Any]]
) -> None:
    import threading

    out = tmp_path / "out.jsonl"
    real_append = durable_module._append
    writes: list[tuple[str, bool, int]] = []  # (file, on the main thread, lines)
    durable: set[tuple[str, int]] = set()  # (prompt, steps) whose checkpoint is on disk

    def watched_append(f: Any, data: bytes) -> None:
        real_append(f, data)
        name = Path(f.name).name
        writes.append((name, threading.current_thread() is threading.main_thread(), data.count(b"\n")))
        if name == "checkpoints.jsonl":
            for line in data.splitlines():
                d = json.loads(line)
                durable.add((d["prompt_id"], len(d["steps"])))

    early: list[tuple[str, int, str]] = []

    class Checked(Policy):
        def _reply(self, request: GenerationRequest) -> list[str]:
            # Step s of a prompt starts only once its s finished steps are durable.
            if request.step > 0 and (request.prompt_id, request.step) not in durable:
                early.append((request.prompt_id, request.step, request.purpose))
            return super()._reply(request)

    monkeypatch.setattr(durable_module, "_append", watched_append)
    config = CONFIG.with_options(max_concurrent_prompts=10)
    assert batch(rows(10), out, Checked(), config=config).ok
    assert early == []
    appends = [w for w in writes if w[0] in ("checkpoints.jsonl", "out.jsonl")]
    assert appends and not any(on_main for _, on_main, _ in appends)  # no fsync on the event loop's thread
    checkpoint_lines = sum(n for name, _, n in appends if name == "checkpoints.jsonl")
    checkpoint_groups = sum(1 for name, _, _ in appends if name == "checkpoints.jsonl")
    assert checkpoint_lines == 10 * (CONFIG.depth + 1)
    # Ten prompts finish each step together: their checkpoints share fsyncs.
    assert checkpoint_groups <= checkpoint_lines // 2
    for d in read_output(out):  # the same results (the recorded config differs in max_concurrent_prompts)
        assert {k: v for k, v in strip_timings(d).items() if k != "config"} == {
            k: v for k, v in reference[d["prompt_id"]].items() if k != "config"
        }


# ---------------------------------------------------------------------------- rewards with per-prompt state


def normalizing_reward() -> Any:
    from tpo.rewards.combine import WeightedReward

    length = FunctionReward(lambda messages, answer: float(len(answer)), name="length")
    return WeightedReward([reward(), length], weights=[0.7, 0.3], normalize="zscore")


def test_a_normalising_reward_restarts_partially_done_prompts_instead_of_mixing_scales(tmp_path: Path) -> None:
    assert normalizing_reward().per_prompt_state is True
    uninterrupted = tmp_path / "reference.jsonl"
    assert batch(rows(8), uninterrupted, reward=normalizing_reward()).ok
    reference = {d["prompt_id"]: strip_timings(d) for d in read_output(uninterrupted)}

    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        batch(rows(8), out, Policy(crash_after=25), reward=normalizing_reward())
    finished = {d["prompt_id"] for d in read_output(out)}
    partial = {pid for pid, steps in checkpoint_steps(out).items() if pid not in finished and steps > 0}
    assert finished and partial  # the crash left both kinds

    observer = Notes()
    policy = Policy()
    summary = batch(rows(8), out, policy, reward=normalizing_reward(), observer=observer)
    assert summary.ok and summary.restarted == len(partial) and summary.finished_before == len(finished)
    assert any(f"{len(partial)} prompt(s) with finished steps start over" in n for n in observer.notes)
    # Every partly done prompt ran again from its samples; finished prompts were left alone.
    assert {pid for pid, step, purpose in policy.log if step == 0} >= partial
    assert not any(pid in finished for pid, _, _ in policy.log)
    # So every score is on the scale of its prompt's own first samples, as in an uninterrupted run.
    got = {d["prompt_id"]: strip_timings(d) for d in read_output(out)}
    for pid, d in got.items():
        want = reference[pid]
        assert {k: v for k, v in d.items() if k != "usage"} == {k: v for k, v in want.items() if k != "usage"}, pid


def test_without_per_prompt_state_partial_prompts_resume_mid_way(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        batch(rows(8), out, Policy(crash_after=25))
    policy = Policy()
    summary = batch(rows(8), out, policy)
    assert summary.ok and summary.restarted == 0
    assert any(step > 0 for _, step, _ in policy.log)
    resumed = {pid for pid, _, _ in policy.log} - {pid for pid, step, _ in policy.log if step == 0}
    assert resumed  # some prompts went on from a later step


# ---------------------------------------------------------------------------- the API


def test_run_batch_inside_a_running_event_loop_is_a_user_error(tmp_path: Path) -> None:
    import asyncio

    from tpo import UserError

    async def inside() -> None:
        batch(rows(1), tmp_path / "out.jsonl")

    with pytest.raises(
        UserError, match=r"run_batch\(\) was called inside a running event loop; use 'await .*arun_batch"
    ):
        asyncio.run(inside())
    run = BatchRun(read_prompts(rows(1), id_field="id"), tmp_path / "o.jsonl", config=CONFIG, models={})

    async def run_inside() -> None:
        run.run(Policy(), reward())

    with pytest.raises(UserError, match=r"BatchRun.run\(\) was called inside a running event loop"):
        asyncio.run(run_inside())
    assert not (tmp_path / "out.jsonl").exists()


def test_a_path_is_read_with_the_default_options(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    summary = run_batch(path, tmp_path / "out.jsonl", policy=Policy(), reward=reward(), config=CONFIG)
    assert summary.ok and summary.total == 3
    assert all(len(d["prompt_id"]) == 16 for d in read_output(tmp_path / "out.jsonl"))  # derived ids


def test_an_unreadable_checkpoint_restarts_its_prompt_and_says_so(
    tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        batch(rows(10), out, Policy(crash_after=13))
    path = sidecar_dir(out) / "checkpoints.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = json.loads(lines[-1])
    damaged["schema_version"] = 99  # a checkpoint this tpo cannot read
    lines[-1] = (json.dumps(damaged) + "\n").encode()
    path.write_bytes(b"".join(lines))
    notes = Notes()
    summary = batch(rows(10), out, Policy(), observer=notes)
    assert summary.ok
    assert any(f"checkpoint of prompt {damaged['prompt_id']!r} cannot be read" in n for n in notes.notes), notes.notes
    assert {d["prompt_id"]: strip_timings(d) for d in read_output(out)} == reference


def test_secrets_in_url_queries_are_not_saved(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch(
        rows(1), out, models={"policy": "openai:m", "policy_options": {"base_url": "https://h/v1?key=sk-9&region=eu"}}
    )
    text = (sidecar_dir(out) / "config.json").read_text()
    assert "sk-9" not in text and "region=eu" in text
