"""``tpo export``: AlpacaEval, Arena-Hard-Auto (v0.1 and v2) and plain JSONL, loaded the way those tools load them.

The loaders were checked in the tools' sources: AlpacaEval reads ``--model_outputs X.json``
with ``pandas.read_json`` and takes the model's name from the single value of its
``generator`` column (``alpaca_eval/utils.py``: ``load_or_convert_to_dataframe``,
``get_generator_name``); Arena-Hard-Auto reads ``model_answer/*.jsonl`` keyed by
``question_id`` (v0.1, ``choices[0]["turns"][0]["content"]``) or ``uid`` (v2,
``messages[-1]["content"]["answer"]``), and its style control reads the token and markdown
counts (``gen_answer.py``, ``gen_judgment.py``, ``show_result.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tpo
from tpo import ConfigError, GenerationRequest, InputError, TPOResult
from tpo.cli import cli
from tpo.evaluate import read_results
from tpo.export import (
    alpaca_eval_records,
    arena_hard_records,
    default_model_name,
    estimate_token_len,
    export_results,
    markdown_counts,
    resolve_arena_hard_version,
)
from tpo.testing import FunctionReward, ScriptedPolicy, default_reply

# Both evaluators read answer files with pandas; so does this test (it comes with tpo[data]).
pd = pytest.importorskip("pandas")

FINAL = "## Plan\n\n1. **First** step\n2. Second step\n- a point\n\n```python\n# not a header\n- not a list\n```\n"


#: Prompts whose rewrites are the markdown answer above (it is the longest, so it wins).
MARKDOWN_IDS = {"a4md", "row-2", "r1"}


def reply(request: GenerationRequest) -> list[str]:
    out = default_reply(request)
    if request.purpose == "update" and request.prompt_id in MARKDOWN_IDS:
        return [f"<{tpo.DEFAULT_PROMPTS.tag}>{FINAL}</{tpo.DEFAULT_PROMPTS.tag}>"] * request.n
    return out


def reward(messages: Any, answer: str) -> float:
    if "cannot be scored" in messages[-1].content:
        raise ValueError("no score for this one")
    return float(len(answer))


def run_file(path: Path, prompts: list[tpo.Prompt], *, policy_name: str = "scripted", **options: Any) -> Path:
    options = {"width": 2, "depth": 1, **options}
    with path.open("w", encoding="utf-8") as f:
        for result in tpo.optimize_many(prompts, policy=ScriptedPolicy(reply, name=policy_name),
                                        reward=FunctionReward(reward), **options):
            f.write(result.to_json() + "\n")
    return path


@pytest.fixture
def alpaca_run(tmp_path: Path) -> Path:
    prompts = [
        tpo.Prompt.of("What is the capital of France?", id="a1", metadata={"dataset": "helpful_base"}),
        # A benchmark row whose prompt was templated: the original instruction is in the metadata.
        tpo.Prompt.of([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: name a prime\nA:"}],
                      id="a2", metadata={"instruction": "Name a prime.", "dataset": "koala"}),
        tpo.Prompt.of("This prompt cannot be scored", id="a3"),
        tpo.Prompt.of("Write a plan md", id="a4md"),
    ]
    return run_file(tmp_path / "run.jsonl", prompts, policy_name="openai:meta-llama/Llama-3.1-8B-Instruct")


# --------------------------------------------------------------------------- AlpacaEval


def test_alpaca_eval_export_loads_as_alpaca_eval_reads_it(alpaca_run: Path, tmp_path: Path) -> None:
    results, _ = read_results(alpaca_run)
    out = tmp_path / "outputs.json"
    report = export_results(results, "alpaca-eval", out)

    # AlpacaEval: `pd.read_json(path)` for a .json path, one row per instruction.
    df = pd.read_json(out)
    assert set(df.columns) == {"instruction", "output", "generator", "dataset"}
    assert len(df) == 3 and report.exported == 3
    assert all(isinstance(v, str) for col in ("instruction", "output", "generator") for v in df[col])
    # One generator for the file: AlpacaEval names the model after it.
    assert df["generator"].unique().tolist() == ["Llama-3.1-8B-Instruct-tpo-d1-n2"]
    by_instruction = {row.instruction: row for row in df.itertuples()}
    assert set(by_instruction) == {"What is the capital of France?", "Name a prime.", "Write a plan md"}
    assert by_instruction["Name a prime."].dataset == "koala"
    finals = {r.prompt_id: r.answer for r in results}
    assert by_instruction["What is the capital of France?"].output == finals["a1"]
    # The failed prompt is skipped and named.
    assert [pid for pid, _ in report.skipped] == ["a3"]
    assert "failed" in report.skipped[0][1]
    assert report.warnings == ()


def test_alpaca_eval_records_without_dataset_and_with_a_chosen_name(alpaca_run: Path) -> None:
    results, _ = read_results(alpaca_run)
    records = alpaca_eval_records([r for r in results if r.prompt_id == "a4md"], model_name="my-model")
    assert records == [{"instruction": "Write a plan md", "output": FINAL.strip(), "generator": "my-model"}]


def test_alpaca_eval_export_warns_about_the_suffix_and_earlier_turns(tmp_path: Path) -> None:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "And now?"}]
    results, _ = read_results(run_file(tmp_path / "r.jsonl", [tpo.Prompt.of(conversation, id="t")]))
    report = export_results(results, "alpaca-eval", tmp_path / "outputs.jsonl")
    assert any("expects .json" in w for w in report.warnings)
    assert any("earlier turns" in w for w in report.warnings)
    assert json.loads((tmp_path / "outputs.jsonl").read_text())[0]["instruction"] == "And now?"


# --------------------------------------------------------------------------- strict and skipping


def test_strict_export_refuses_unfinished_prompts_and_writes_nothing(alpaca_run: Path, tmp_path: Path) -> None:
    results, _ = read_results(alpaca_run)
    out = tmp_path / "outputs.json"
    with pytest.raises(InputError, match=r"1 of 4 prompts did not finish: 'a3'"):
        export_results(results, "alpaca-eval", out, strict=True)
    assert not out.exists()

    finished = [r for r in results if r.status == "complete"]
    assert export_results(finished, "alpaca-eval", out, strict=True).exported == 3


# --------------------------------------------------------------------------- Arena-Hard-Auto


@pytest.fixture
def arena_results(tmp_path: Path) -> list[TPOResult]:
    prompts = [
        tpo.Prompt.of("Explain quicksort md", id="row-2", metadata={"question_id": "q-b", "category": "arena-hard-v0.1"}),
        tpo.Prompt.of("Explain heapsort", id="row-1", metadata={"question_id": "q-a", "category": "arena-hard-v0.1"}),
        tpo.Prompt.of("This prompt cannot be scored", id="row-3", metadata={"question_id": "q-c"}),
    ]
    results, _ = read_results(run_file(tmp_path / "arena.jsonl", prompts))
    return results


def load_answers(answer_dir: Path, key: str) -> dict[str, dict[str, Any]]:
    """Arena-Hard-Auto's own loader, restated: one file per model, named after it, keyed by question."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(answer_dir.glob("*.jsonl")):
        out[path.name[: -len(".jsonl")]] = {rec[key]: rec for rec in map(json.loads, path.read_text().splitlines())}
    return out


def test_arena_hard_v01_answer_file(arena_results: list[TPOResult], tmp_path: Path) -> None:
    answer_dir = tmp_path / "data" / "arena-hard-v0.1" / "model_answer"
    report = export_results(arena_results, "arena-hard", answer_dir, model_name="tpo-llama", arena_hard_version="auto")

    assert report.arena_hard_version == "v0.1"  # the questions carry question_id
    assert report.path == answer_dir / "tpo-llama.jsonl"
    assert [pid for pid, _ in report.skipped] == ["row-3"]
    answers = load_answers(answer_dir, "question_id")
    assert list(answers) == ["tpo-llama"]
    assert list(answers["tpo-llama"]) == ["q-a", "q-b"]  # sorted, as Arena-Hard writes them
    finals = {r.metadata["question_id"]: r for r in arena_results}
    for qid, rec in answers["tpo-llama"].items():
        assert set(rec) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"}
        assert rec["model_id"] == "tpo-llama"
        assert rec["answer_id"] == finals[qid].best_id
        assert isinstance(rec["tstamp"], float)
        turn = rec["choices"][0]["turns"][0]
        assert rec["choices"][0]["index"] == 0 and turn["content"] == finals[qid].answer
        assert turn["token_len"] == rec["conv_metadata"]["token_len"] == estimate_token_len(turn["content"])
    style = answers["tpo-llama"]["q-b"]["conv_metadata"]
    assert (sum(style["header_count"].values()), style["list_count"], sum(style["bold_count"].values())) == (
        1, {"ordered": 2, "unordered": 1}, 1)


def test_arena_hard_v2_answer_file(tmp_path: Path) -> None:
    prompts = [
        tpo.Prompt.of("Write a plan md", id="r1", metadata={"uid": "9f1c", "category": "hard_prompt"}),
        tpo.Prompt.of("Write a poem", id="r2", metadata={"uid": "0a2b", "category": "creative_writing"}),
    ]
    results, _ = read_results(run_file(tmp_path / "v2.jsonl", prompts))
    answer_file = tmp_path / "arena-hard-v2.0" / "model_answer" / "tpo-qwen.jsonl"
    report = export_results(results, "arena-hard", answer_file)

    assert (report.arena_hard_version, report.model_name, report.path) == ("v2", "tpo-qwen", answer_file)
    answers = load_answers(answer_file.parent, "uid")
    assert list(answers["tpo-qwen"]) == ["0a2b", "9f1c"]
    finals = {r.metadata["uid"]: r for r in results}
    for uid, rec in answers["tpo-qwen"].items():
        assert set(rec) == {"uid", "ans_id", "model", "messages", "tstamp", "metadata"}
        # The judge reads the answer from the last message; the leaderboard names the model by `model`.
        assert rec["messages"][-1] == {"role": "assistant", "content": {"answer": finals[uid].answer}}
        assert rec["messages"][0] == {"role": "user", "content": finals[uid].messages[0]["content"]}
        assert rec["model"] == "tpo-qwen"
        # Style control: token_len first, then dicts of counts it sums.
        meta = rec["metadata"]
        assert list(meta) == ["token_len", "header_count", "list_count", "bold_count"]
        assert all(isinstance(v, int) or all(isinstance(n, int) for n in v.values()) for v in meta.values())
    # pandas, as Arena-Hard's show_result reads the files, sees one model and its uids.
    df = pd.read_json(answer_file, lines=True)
    assert df["model"].unique().tolist() == ["tpo-qwen"] and sorted(df["uid"]) == ["0a2b", "9f1c"]


def test_arena_hard_version_guess_and_question_ids(arena_results: list[TPOResult], tmp_path: Path) -> None:
    assert resolve_arena_hard_version(arena_results) == ("v0.1", [])
    plain, _ = read_results(run_file(tmp_path / "plain.jsonl", [tpo.Prompt.of("Hi", id="p-7")]))
    version, notes = resolve_arena_hard_version(plain)
    assert version == "v2" and "prompt ids" in notes[0]
    # Without a benchmark id the prompt id is the question id; v2 records can be forced to v0.1.
    assert arena_hard_records(plain, model_name="m", version="v2")[0]["uid"] == "p-7"
    assert arena_hard_records(plain, model_name="m", version="v0.1", timestamp=5.0)[0]["question_id"] == "p-7"
    with pytest.raises(ConfigError, match=r"v0\.1"):
        resolve_arena_hard_version(plain, "v3")


def test_arena_hard_model_name_must_match_the_file(arena_results: list[TPOResult], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names a model after its answer file"):
        export_results(arena_results, "arena-hard", tmp_path / "x.jsonl", model_name="y")
    with pytest.raises(ConfigError, match="cannot be a file name"):
        export_results(arena_results, "arena-hard", tmp_path, model_name="org/model")
    # The default name is file-safe even for a policy with slashes and colons.
    report = export_results(arena_results, "arena-hard", tmp_path / "answers")
    assert report.path == tmp_path / "answers" / "scripted-tpo-d1-n2.jsonl"


# --------------------------------------------------------------------------- JSONL and helpers


def test_jsonl_export_has_id_prompt_and_answer_only(alpaca_run: Path, tmp_path: Path) -> None:
    results, _ = read_results(alpaca_run)
    out = tmp_path / "answers.jsonl"
    export_results(results, "jsonl", out)
    rows = {row["id"]: row for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}

    assert set(rows) == {"a1", "a2", "a4md"}
    assert all(set(row) == {"id", "prompt", "answer"} for row in rows.values())
    assert rows["a1"]["prompt"] == "What is the capital of France?"
    assert rows["a2"]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: name a prime\nA:"}]
    assert rows["a4md"]["answer"] == FINAL.strip()


def test_default_model_name_and_markdown_counts(alpaca_run: Path, tmp_path: Path) -> None:
    results, _ = read_results(alpaca_run)
    assert default_model_name(results) == "Llama-3.1-8B-Instruct-tpo-d1-n2"
    bon, _ = read_results(run_file(tmp_path / "bon.jsonl", [tpo.Prompt.of("Hi", id="x")], mode="bon", width=4))
    assert default_model_name(bon) == "scripted-bon-4"

    counts = markdown_counts(FINAL)
    assert counts["header_count"]["h2"] == 1 and sum(counts["header_count"].values()) == 1  # not the "#" in code
    assert counts["list_count"] == {"ordered": 2, "unordered": 1}
    assert counts["bold_count"] == {"**": 1, "__": 0}
    assert estimate_token_len("abcd" * 10) == 10 and estimate_token_len("日本") == 2


def test_unknown_format_and_unwritable_output(alpaca_run: Path, tmp_path: Path) -> None:
    results, _ = read_results(alpaca_run)
    with pytest.raises(ConfigError, match="unknown export format"):
        export_results(results, "csv", tmp_path / "x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        export_results(results, "jsonl", blocker / "sub" / "x.jsonl")


# --------------------------------------------------------------------------- the command


def test_export_command_skips_with_a_warning_and_strict_fails(alpaca_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model_outputs.json"
    res = CliRunner().invoke(cli, ["export", str(alpaca_run), "--format", "alpaca-eval", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "skipped 1 prompt(s) that did not finish: a3" in res.output
    assert "Wrote 3 answer(s)" in res.output
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 3

    res = CliRunner().invoke(cli, ["export", str(alpaca_run), "-f", "jsonl", "-o", str(tmp_path / "s.jsonl"), "--strict"])
    assert res.exit_code == 2
    assert "did not finish" in res.output and not (tmp_path / "s.jsonl").exists()

    res = CliRunner().invoke(cli, ["export", str(alpaca_run), "-f", "arena-hard", "-o", str(tmp_path / "ah"),
                                   "--arena-hard-version", "v0.1", "--model-name", "tpo-x"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ah" / "tpo-x.jsonl").exists() and "arena-hard v0.1" in res.output


def test_text_that_utf8_cannot_hold_is_escaped_not_lost(tmp_path: Path) -> None:
    odd = "half an emoji \ud83d, a NUL \x00 and </script>"

    def odd_reply(request: GenerationRequest) -> list[str]:
        return [odd] * request.n

    path = tmp_path / "odd.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in tpo.optimize_many([tpo.Prompt.of("Q", id="o")], policy=ScriptedPolicy(odd_reply),
                                   reward=FunctionReward(lambda m, a: 1.0), mode="bon", width=2):
            f.write(r.to_json() + "\n")
    results, _ = read_results(path)
    for fmt, out in (("jsonl", tmp_path / "o.jsonl"), ("alpaca-eval", tmp_path / "o.json")):
        export_results(results, fmt, out)
        text = out.read_text(encoding="utf-8")
        assert "\\ud83d" in text
    assert json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8"))["answer"] == odd
    assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))[0]["output"] == odd
