"""``tpo export``: AlpacaEval, Arena-Hard-Auto (current and legacy schema) and plain JSONL, loaded as those tools load them.

The loaders were checked in the tools' sources: AlpacaEval reads ``--model_outputs X.json``
with ``pandas.read_json`` and takes the model's name from the single value of its
``generator`` column (``alpaca_eval/utils.py``: ``load_or_convert_to_dataframe``,
``get_generator_name``). Arena-Hard-Auto (``lmarena/arena-hard-auto``) reads
``model_answer/*.jsonl`` keyed by ``uid`` for every benchmark version
(``utils/completion.py``: ``load_model_answers``), the answer as
``messages[-1]["content"]["answer"]`` (``gen_judgment.py``) and the style features from
``metadata`` by ``model`` and ``uid`` (``show_result.py``); its checkouts before April 2025
read v0.1's ``question_id`` and ``choices[0]["turns"]`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tpo
from tpo import ConfigError, GenerationRequest, InputError, TPOResult
from tpo.analysis.evaluate import read_results
from tpo.analysis.export import (
    TokenCounter,
    alpaca_eval_records,
    arena_hard_records,
    arena_hard_token_counter,
    default_model_name,
    estimate_token_len,
    export_results,
    markdown_counts,
    resolve_arena_hard_benchmark,
)
from tpo.cli import cli
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
        for result in tpo.optimize_many(
            prompts, policy=ScriptedPolicy(reply, name=policy_name), reward=FunctionReward(reward), **options
        ):
            f.write(result.to_json() + "\n")
    return path


@pytest.fixture
def alpaca_run(tmp_path: Path) -> Path:
    prompts = [
        tpo.Prompt.of("What is the capital of France?", id="a1", metadata={"dataset": "helpful_base"}),
        # A benchmark row whose prompt was templated: the original instruction is in the metadata.
        tpo.Prompt.of(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: name a prime\nA:"}],
            id="a2",
            metadata={"instruction": "Name a prime.", "dataset": "koala"},
        ),
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
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ]
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
        tpo.Prompt.of(
            "Explain quicksort md", id="row-2", metadata={"question_id": "q-b", "category": "arena-hard-v0.1"}
        ),
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


#: A count that does not depend on whether tiktoken (and its encoding file) is on this machine.
ESTIMATE = TokenCounter("estimate", estimate_token_len, "not asked for in this test")


def style_features(metadata: dict[str, Any]) -> list[int]:
    """Arena-Hard's show_result, restated: token_len first, then each count (an int, or a dict it sums)."""
    return [v if isinstance(v, int) else sum(v.values()) for v in metadata.values()]


def test_arena_hard_writes_the_current_schema_for_v01_too(arena_results: list[TPOResult], tmp_path: Path) -> None:
    # arena-hard-auto reads v0.1 answers as uid/messages/model/metadata since April 2025; the old
    # layout made its load_model_answers fail with KeyError: 'uid'.
    answer_dir = tmp_path / "data" / "arena-hard-v0.1" / "model_answer"
    report = export_results(arena_results, "arena-hard", answer_dir, model_name="tpo-llama", count_tokens=ESTIMATE)

    assert (report.arena_hard_schema, report.arena_hard_benchmark) == ("current", "v0.1")
    assert report.path == answer_dir / "tpo-llama.jsonl" and report.token_len == "estimate"
    assert [pid for pid, _ in report.skipped] == ["row-3"]
    answers = load_answers(answer_dir, "uid")
    assert list(answers) == ["tpo-llama"]
    assert list(answers["tpo-llama"]) == [
        "q-a",
        "q-b",
    ]  # the v0.1 question ids, sorted as reorg_answer_file leaves them
    finals = {r.metadata["question_id"]: r for r in arena_results}
    for uid, rec in answers["tpo-llama"].items():
        assert list(rec) == ["uid", "ans_id", "model", "messages", "tstamp", "metadata"]
        assert rec["messages"][-1] == {"role": "assistant", "content": {"answer": finals[uid].answer}}
        assert rec["ans_id"] == finals[uid].best_id and isinstance(rec["tstamp"], float)
        assert rec["metadata"]["token_len"] == estimate_token_len(finals[uid].answer or "")
    style = answers["tpo-llama"]["q-b"]["metadata"]
    assert style_features(style) == [estimate_token_len(FINAL.strip()), 1, 3, 1]
    # The token count is an estimate here (ESTIMATE): the export says so.
    assert any("token_len is an estimate" in w and "not asked for in this test" in w for w in report.warnings)


def test_arena_hard_legacy_schema_is_the_pre_2025_v01_layout(arena_results: list[TPOResult], tmp_path: Path) -> None:
    answer_dir = tmp_path / "data" / "arena-hard-v0.1" / "model_answer"
    report = export_results(
        arena_results,
        "arena-hard",
        answer_dir,
        model_name="tpo-llama",
        arena_hard_schema="legacy",
        count_tokens=ESTIMATE,
    )

    assert (report.arena_hard_schema, report.arena_hard_benchmark) == ("legacy", "v0.1")
    answers = load_answers(answer_dir, "question_id")
    assert list(answers["tpo-llama"]) == ["q-a", "q-b"]
    finals = {r.metadata["question_id"]: r for r in arena_results}
    for qid, rec in answers["tpo-llama"].items():
        assert set(rec) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"}
        assert rec["model_id"] == "tpo-llama"
        assert rec["answer_id"] == finals[qid].best_id
        turn = rec["choices"][0]["turns"][0]
        assert rec["choices"][0]["index"] == 0 and turn["content"] == finals[qid].answer
        assert turn["token_len"] == rec["conv_metadata"]["token_len"] == estimate_token_len(turn["content"])
    style = answers["tpo-llama"]["q-b"]["conv_metadata"]
    assert (sum(style["header_count"].values()), style["list_count"], sum(style["bold_count"].values())) == (
        1,
        {"ordered": 2, "unordered": 1},
        1,
    )


def test_arena_hard_v2_answer_file(tmp_path: Path) -> None:
    prompts = [
        tpo.Prompt.of("Write a plan md", id="r1", metadata={"uid": "9f1c", "category": "hard_prompt"}),
        tpo.Prompt.of("Write a poem", id="r2", metadata={"uid": "0a2b", "category": "creative_writing"}),
    ]
    results, _ = read_results(run_file(tmp_path / "v2.jsonl", prompts))
    answer_file = tmp_path / "arena-hard-v2.0" / "model_answer" / "tpo-qwen.jsonl"
    report = export_results(results, "arena-hard", answer_file, count_tokens=ESTIMATE)

    assert (report.arena_hard_schema, report.arena_hard_benchmark) == ("current", "v2.0")
    assert (report.model_name, report.path) == ("tpo-qwen", answer_file)
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
    # pandas, as Arena-Hard's show_result reads the files (get_model_style_metadata): one model, metadata by uid.
    df = pd.read_json(answer_file, lines=True)
    assert df["model"].unique().tolist() == ["tpo-qwen"] and sorted(df["uid"]) == ["0a2b", "9f1c"]
    by_uid = df.set_index("uid")["metadata"].to_dict()
    assert style_features(by_uid["9f1c"])[1:] == [1, 3, 1]


def test_arena_hard_benchmark_is_checked_against_the_folder_and_the_schema(tmp_path: Path) -> None:
    v2 = tmp_path / "data" / "arena-hard-v2.0" / "model_answer" / "m.jsonl"
    assert resolve_arena_hard_benchmark(v2) == "v2.0"
    assert resolve_arena_hard_benchmark(tmp_path / "answers") is None  # no folder names one: any version
    assert resolve_arena_hard_benchmark(tmp_path / "answers", "v0.1", schema="legacy") == "v0.1"
    assert resolve_arena_hard_benchmark(tmp_path / "answers", schema="legacy") is None
    with pytest.raises(
        ConfigError, match=r"v0\.1 \(--arena-hard-benchmark\) does not match the folder arena-hard-v2\.0"
    ):
        resolve_arena_hard_benchmark(v2, "v0.1")
    with pytest.raises(ConfigError, match=r"legacy answer schema exists for arena-hard-v0\.1 only"):
        resolve_arena_hard_benchmark(v2, schema="legacy")
    with pytest.raises(ConfigError, match="legacy answer schema"):
        resolve_arena_hard_benchmark(tmp_path, "v2.0", schema="legacy")
    with pytest.raises(ConfigError, match=r"benchmark must be one of auto, v0\.1, v2\.0, not 'v2'"):
        resolve_arena_hard_benchmark(tmp_path, "v2")
    with pytest.raises(ConfigError, match="schema must be one of current, legacy"):
        resolve_arena_hard_benchmark(tmp_path, schema="v2")


def test_arena_hard_question_ids_and_their_duplicates(tmp_path: Path) -> None:
    plain, _ = read_results(run_file(tmp_path / "plain.jsonl", [tpo.Prompt.of("Hi", id="p-7")]))
    # Without a benchmark id the prompt id is the question id, and the export warns about it.
    assert arena_hard_records(plain, model_name="m", count_tokens=len)[0]["uid"] == "p-7"
    assert arena_hard_records(plain, model_name="m", schema="legacy", count_tokens=len)[0]["question_id"] == "p-7"
    report = export_results(plain, "arena-hard", tmp_path / "out", count_tokens=ESTIMATE)
    assert any("keyed by tpo's prompt ids" in w for w in report.warnings)
    with pytest.raises(ConfigError, match=r"schema must be one of current, legacy, not 'v0\.1'"):
        arena_hard_records(plain, model_name="m", schema="v0.1")

    twins = [tpo.Prompt.of("Hi", id="a", metadata={"uid": "u1"}), tpo.Prompt.of("Hey", id="b", metadata={"uid": "u1"})]
    results, _ = read_results(run_file(tmp_path / "twins.jsonl", twins))
    with pytest.raises(InputError, match="prompts 'a' and 'b' have the same question id 'u1'"):
        export_results(results, "arena-hard", tmp_path / "twins", count_tokens=ESTIMATE)
    assert not (tmp_path / "twins").exists()


# --------------------------------------------------------------------------- token_len


class FakeEncoding:
    """Stands in for a tiktoken encoding: one token per word, and records how it was called."""

    name = "o200k_base"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def encode(self, text: str, *, disallowed_special: Any = "all") -> list[int]:
        self.calls.append((text, disallowed_special))
        return list(range(len(text.split())))


def fake_tiktoken(monkeypatch: pytest.MonkeyPatch, load: Any) -> list[str]:
    """Install a stand-in ``tiktoken`` module whose ``encoding_for_model`` is ``load``; returns the models asked for."""
    import types

    asked: list[str] = []

    def encoding_for_model(model: str) -> Any:
        asked.append(model)
        return load()

    monkeypatch.setitem(
        __import__("sys").modules, "tiktoken", types.SimpleNamespace(encoding_for_model=encoding_for_model)
    )
    return asked


def test_token_len_is_counted_with_tiktoken_as_arena_hard_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    encoding = FakeEncoding()
    asked = fake_tiktoken(monkeypatch, lambda: encoding)
    counter = arena_hard_token_counter()
    assert (counter.method, counter.why_estimate) == ("tiktoken o200k_base", None)
    assert counter.count("three little words <|endoftext|>") == 4
    # gen_answer.py: encoding_for_model("gpt-4o"), encode(answer, disallowed_special=()).
    assert asked == ["gpt-4o"] and encoding.calls == [("three little words <|endoftext|>", ())]
    arena_hard_token_counter("legacy")
    assert asked[-1] == "gpt-3.5-turbo"  # what the pre-2025 code counted v0.1 answers with

    results, _ = read_results(run_file(tmp_path / "r.jsonl", [tpo.Prompt.of("Hi", id="x", metadata={"uid": "u"})]))
    report = export_results(results, "arena-hard", tmp_path / "out")
    assert report.token_len == "tiktoken o200k_base" and not any("estimate" in w for w in report.warnings)
    record = json.loads(report.path.read_text(encoding="utf-8"))
    assert record["metadata"]["token_len"] == len((results[0].answer or "").split())


def test_token_len_is_an_estimate_without_tiktoken_or_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tiktoken", None)  # import fails: not installed
    counter = arena_hard_token_counter()
    assert counter.method == "estimate" and counter.count is estimate_token_len
    assert "tiktoken is not installed" in (counter.why_estimate or "") and "tpo[arena]" in (counter.why_estimate or "")

    def offline() -> Any:
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore detail")

    fake_tiktoken(monkeypatch, offline)
    counter = arena_hard_token_counter()
    assert counter.method == "estimate"
    assert "could not load the gpt-4o encoding (ConnectionError: Failed to resolve" in (counter.why_estimate or "")
    assert "more detail" not in (counter.why_estimate or "") and "TIKTOKEN_CACHE_DIR" in (counter.why_estimate or "")

    results, _ = read_results(run_file(tmp_path / "r.jsonl", [tpo.Prompt.of("Hi", id="x", metadata={"uid": "u"})]))
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "r.jsonl"), "-f", "arena-hard", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (
        "token_len: estimate" in res.output and "token_len is an estimate (about four characters a token)" in res.output
    )
    record = json.loads(next((tmp_path / "o").glob("*.jsonl")).read_text(encoding="utf-8"))
    assert record["metadata"]["token_len"] == estimate_token_len(results[0].answer or "")


def test_token_len_with_the_real_tiktoken_where_its_encoding_loads() -> None:
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is not installed (the arena extra)")
    try:
        tiktoken.encoding_for_model("gpt-4o")
    except Exception as e:  # no network and no cached encoding file
        pytest.skip(f"tiktoken's o200k_base file cannot be loaded here: {type(e).__name__}")
    counter = arena_hard_token_counter()
    assert counter.method == "tiktoken o200k_base"
    assert counter.count("hello world") == 2 and counter.count("<|endoftext|>") > 1


# --------------------------------------------------------------------------- markdown counts


@pytest.mark.parametrize(
    ("text", "headers", "lists", "bold"),
    [
        # Code is left out: "# not a header" and "- not a list" inside the fence do not count.
        (FINAL, 1, {"ordered": 2, "unordered": 1}, 1),
        # Arena-Hard's pattern skips a block whose code holds a backtick, and pairs its closing fence with
        # the next block's opening one: the prose between them (a header, a list item) is not counted.
        ("```js\nconst s = `x`;\n```\n\n# Title\n\n- item\n\n```sh\nls\n```\n", 0, {"ordered": 0, "unordered": 0}, 0),
        # The same without the backtick: both blocks are removed and the prose between them counts.
        ("```js\nconst s = 'x';\n```\n\n# Title\n\n- item\n\n```sh\nls\n```\n", 1, {"ordered": 0, "unordered": 1}, 0),
        # A removed block's text is removed wherever it occurs: the bold line before the code goes too.
        ("Intro\n**Note**\n```\n**Note**\n```\n", 0, {"ordered": 0, "unordered": 0}, 0),
        # Inline code (single backticks) is prose to it; an unclosed fence removes nothing.
        ("Use `**x**` here\n", 0, {"ordered": 0, "unordered": 0}, 1),
        ("```py\n# comment\n1. one\n", 1, {"ordered": 1, "unordered": 0}, 0),
        # A four-backtick fence around a fenced example: the inner fences pair up, the outer ones do not.
        ("````md\n```py\nx\n```\n# h\n````\n- a\n", 0, {"ordered": 0, "unordered": 1}, 0),
        # An empty block, "__" bold and deep headers.
        ("``````\n###### six\n__b__ and **c**\n", 1, {"ordered": 0, "unordered": 0}, 2),
    ],
)
def test_markdown_counts_match_arena_hard(text: str, headers: int, lists: dict[str, int], bold: int) -> None:
    counts = markdown_counts(text)
    assert list(counts) == ["header_count", "list_count", "bold_count"]
    assert list(counts["header_count"]) == ["h1", "h2", "h3", "h4", "h5", "h6"]
    assert (sum(counts["header_count"].values()), counts["list_count"], sum(counts["bold_count"].values())) == (
        headers,
        lists,
        bold,
    )


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
    assert rows["a2"]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: name a prime\nA:"},
    ]
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

    res = CliRunner().invoke(
        cli, ["export", str(alpaca_run), "-f", "jsonl", "-o", str(tmp_path / "s.jsonl"), "--strict"]
    )
    assert res.exit_code == 2
    assert "did not finish" in res.output and not (tmp_path / "s.jsonl").exists()


def test_export_command_arena_hard_schema_benchmark_and_token_len(alpaca_run: Path, tmp_path: Path) -> None:
    answers = tmp_path / "data" / "arena-hard-v0.1" / "model_answer"
    res = CliRunner().invoke(
        cli, ["export", str(alpaca_run), "-f", "arena-hard", "-o", str(answers), "--model-name", "tpo-x"]
    )
    assert res.exit_code == 0, res.output
    assert "in arena-hard format (current answer schema, benchmark v0.1; token_len: " in res.output
    assert "uid" in json.loads((answers / "tpo-x.jsonl").read_text(encoding="utf-8").splitlines()[0])
    if "token_len: estimate" in res.output:  # no tiktoken, or no encoding file: the command says so
        assert "token_len is an estimate" in res.output

    res = CliRunner().invoke(
        cli,
        [
            "export",
            str(alpaca_run),
            "-f",
            "arena-hard",
            "-o",
            str(tmp_path / "old"),
            "--arena-hard-schema",
            "legacy",
            "--model-name",
            "tpo-x",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "(legacy answer schema, any benchmark version;" in res.output
    assert "question_id" in json.loads((tmp_path / "old" / "tpo-x.jsonl").read_text(encoding="utf-8").splitlines()[0])

    res = CliRunner().invoke(
        cli, ["export", str(alpaca_run), "-f", "arena-hard", "-o", str(answers), "--arena-hard-benchmark", "v2.0"]
    )
    assert res.exit_code == 2 and "does not match the folder arena-hard-v0.1" in res.output
    # The old option, which mixed the two, names its replacements instead of writing the wrong layout.
    res = CliRunner().invoke(
        cli, ["export", str(alpaca_run), "-f", "arena-hard", "-o", str(tmp_path / "x"), "--arena-hard-version", "v0.1"]
    )
    assert res.exit_code == 2 and "--arena-hard-schema" in res.output and "--arena-hard-benchmark" in res.output
    assert not (tmp_path / "x").exists()


def test_text_that_utf8_cannot_hold_is_escaped_not_lost(tmp_path: Path) -> None:
    odd = "half an emoji \ud83d, a NUL \x00 and </script>"

    def odd_reply(request: GenerationRequest) -> list[str]:
        return [odd] * request.n

    path = tmp_path / "odd.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in tpo.optimize_many(
            [tpo.Prompt.of("Q", id="o")],
            policy=ScriptedPolicy(odd_reply),
            reward=FunctionReward(lambda m, a: 1.0),
            mode="bon",
            width=2,
        ):
            f.write(r.to_json() + "\n")
    results, _ = read_results(path)
    for fmt, out in (("jsonl", tmp_path / "o.jsonl"), ("alpaca-eval", tmp_path / "o.json")):
        export_results(results, fmt, out)
        text = out.read_text(encoding="utf-8")
        assert "\\ud83d" in text
    assert json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8"))["answer"] == odd
    assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))[0]["output"] == odd
