"""Reading batch inputs: every format, field selection, stable ids, carried fields, limit and shuffle, and bad rows named by file and line."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tpo import ConfigError, InputError, Message
from tpo.batch.datasets import MAX_LISTED_PROBLEMS, read_prompts

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4", "category": "math"},
    {"prompt": "Name a colour.", "answer": "blue", "category": "general"},
    {"prompt": "Capital of France?", "answer": "Paris", "category": "geo"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary(dataset: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(p.messages[-1].content, dict(p.metadata)) for p in dataset]


EXPECTED = [(r["prompt"], {"answer": r["answer"], "category": r["category"]}) for r in ROWS]


# ---------------------------------------------------------------------------- formats


def test_jsonl(tmp_path: Path) -> None:
    ds = read_prompts(write_jsonl(tmp_path / "in.jsonl", ROWS))
    assert summary(ds) == EXPECTED
    assert ds.format == "jsonl" and len(ds) == 3 and ds.rows_read == 3


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert summary(read_prompts(path)) == EXPECTED


def test_json_file_holding_one_object_per_line_is_read_as_jsonl(tmp_path: Path) -> None:
    ds = read_prompts(write_jsonl(tmp_path / "in.json", ROWS))
    assert summary(ds) == EXPECTED and ds.format == "jsonl"


def test_csv_and_tsv(tmp_path: Path) -> None:
    assert summary(read_prompts(write_csv(tmp_path / "in.csv", ROWS))) == EXPECTED
    assert summary(read_prompts(write_csv(tmp_path / "in.tsv", ROWS, "\t"))) == EXPECTED


def test_csv_cell_holding_a_conversation_as_json(tmp_path: Path) -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, multi\nline"}]
    path = write_csv(tmp_path / "in.csv", [{"prompt": json.dumps(conversation), "k": "v"}])
    (prompt,) = read_prompts(path)
    assert prompt.messages == (Message("system", "Be brief."), Message("user", "Hi, multi\nline"))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert summary(read_prompts(path)) == EXPECTED


def test_csv_rows_are_read_again_from_the_file_not_kept_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    # A byte-order mark, Windows line ends, a quoted cell spanning lines, and a blank line.
    path.write_bytes(
        b'\xef\xbb\xbfprompt,answer\r\n"Line one\r\nline two",1\r\n\r\nPlain question?,2\r\nLast one,3\r\n'
    )
    ds = read_prompts(path, shuffle=True, seed=3)
    expected = {
        "Line one\r\nline two": {"answer": "1"},
        "Plain question?": {"answer": "2"},
        "Last one": {"answer": "3"},
    }
    assert dict(summary(ds)) == expected and ds.rows_read == 3
    # Rows are found again by their offset in the file: an edit after the check is noticed, not hidden by a copy.
    path.write_bytes(path.read_bytes().replace(b"Last one", b"Lost one"))
    with pytest.raises(InputError, match=r"in.csv line 6: the row changed since the input was checked"):
        list(ds)


def test_parquet_is_read_one_row_group_at_a_time(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": f"Question {i}?", "n": i} for i in range(10)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    ds = read_prompts(path, shuffle=True, seed=1, limit=6)
    held = []
    got = []
    for prompt in ds:
        got.append((prompt.messages[-1].content, prompt.metadata["n"]))
        held.append(len(ds._reader._cached[1]))  # type: ignore[attr-defined]
    assert len(got) == 6 and all(text == f"Question {n}?" for text, n in got)
    assert [n for _, n in got] != sorted(n for _, n in got)  # shuffled across row groups
    assert max(held) <= 3  # one row group in memory, never the table
    with pytest.raises(InputError, match=r"in.parquet row 4: the prompt field 'prompt' is empty"):
        pq.write_table(pa.Table.from_pylist([*rows[:3], {"prompt": "", "n": 3}]), path, row_group_size=2)
        read_prompts(path)


def test_huggingface_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert summary(read_prompts(tmp_path / "single")) == EXPECTED
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS)})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert summary(read_prompts(tmp_path / "dict", split="test")) == EXPECTED
    with pytest.raises(InputError, match=r"splits train, test; choose one with --split"):
        read_prompts(tmp_path / "dict")
    with pytest.raises(InputError, match=r"no split 'validation'"):
        read_prompts(tmp_path / "dict", split="validation")


def test_huggingface_data_folder_via_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    ds = read_prompts(folder)
    assert summary(ds) == EXPECTED and ds.format == "hf"


def test_rows_from_python() -> None:
    ds = read_prompts(ROWS)
    assert summary(ds) == EXPECTED and ds.format == "rows" and ds.source == "<rows>"


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"in.txt: cannot tell the format.*--input-format"):
        read_prompts(tmp_path / "in.txt")
    write_jsonl(tmp_path / "rows.txt", ROWS)
    assert len(read_prompts(tmp_path / "rows.txt", input_format="jsonl")) == 3
    with pytest.raises(InputError, match=r"nope.jsonl: no such file"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"--split applies to Hugging Face datasets"):
        read_prompts(tmp_path / "rows.txt", input_format="jsonl", split="train")


# ---------------------------------------------------------------------------- fields and ids


def test_prompt_field_as_a_list_of_messages(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "ref": 1}]
    (prompt,) = read_prompts(write_jsonl(tmp_path / "in.jsonl", rows), prompt_field="messages")
    assert prompt.messages == (Message("system", "S"), Message("user", "U"))
    assert dict(prompt.metadata) == {"ref": 1}


def test_missing_prompt_field_lists_the_fields_and_suggests_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Do it", "output": "x"}])
    with pytest.raises(InputError) as e:
        read_prompts(path)
    assert "in.jsonl line 1: has no field 'prompt' (its fields: 'instruction', 'output')" in str(e.value)
    assert "--prompt-field instruction" in str(e.value)
    (prompt,) = read_prompts(path, prompt_field="instruction")
    assert prompt.messages[-1].content == "Do it" and dict(prompt.metadata) == {"output": "x"}


def test_id_field_sets_the_ids_and_is_not_carried(tmp_path: Path) -> None:
    rows = [{"id": 7, **ROWS[0]}, {"id": "b", **ROWS[1]}]
    ds = read_prompts(write_jsonl(tmp_path / "in.jsonl", rows), id_field="id")
    assert ds.ids == ["7", "b"]
    assert all("id" not in p.metadata for p in ds)


def test_derived_ids_are_stable_and_depend_on_the_whole_row(tmp_path: Path) -> None:
    a = read_prompts(write_jsonl(tmp_path / "a.jsonl", ROWS)).ids
    # The same rows, keys in another order, in another format: the same ids.
    b = read_prompts([dict(reversed(list(r.items()))) for r in ROWS]).ids
    assert a == b and len(set(a)) == 3 and all(len(i) == 16 and int(i, 16) >= 0 for i in a)
    # Pinned, so a change of the derivation (which would orphan every resumable run) is noticed.
    assert (
        read_prompts([{"prompt": "hi"}]).ids
        == [hashlib.sha256(b'{"prompt":"hi"}').hexdigest()[:16]]
        == ["14479f4e87d340fe"]
    )
    changed = read_prompts([{**ROWS[0], "answer": "5"}]).ids
    assert changed[0] != a[0]


def test_carried_fields_are_made_json_ready(tmp_path: Path) -> None:
    import datetime as dt
    import decimal

    row = {
        "prompt": "p",
        "when": dt.date(2025, 1, 2),
        "price": decimal.Decimal("1.5"),
        "nan": float("nan"),
        "raw": b"text",
        "nested": {"a": [1, 2.5, None]},
    }
    (prompt,) = read_prompts([row])
    assert dict(prompt.metadata) == {
        "when": "2025-01-02",
        "price": 1.5,
        "nan": None,
        "raw": "text",
        "nested": {"a": [1, 2.5, None]},
    }
    with pytest.raises(InputError, match=r"row 1: field 'blob' holds binary data"):
        read_prompts([{"prompt": "p", "blob": b"\xff\x00"}])
    with pytest.raises(InputError, match=r"row 1: field 'obj' holds a object"):
        read_prompts([{"prompt": "p", "obj": object()}])


# ---------------------------------------------------------------------------- limit and shuffle


def test_limit_and_shuffle_are_deterministic() -> None:
    rows = [{"prompt": f"q{i}"} for i in range(50)]
    plain = read_prompts(rows, limit=5)
    assert [p.messages[0].content for p in plain] == [f"q{i}" for i in range(5)]
    one = read_prompts(rows, shuffle=True, seed=3, limit=10)
    two = read_prompts(rows, shuffle=True, seed=3, limit=10)
    other = read_prompts(rows, shuffle=True, seed=4, limit=10)
    assert one.ids == two.ids != other.ids
    assert [p.messages[0].content for p in one] != [f"q{i}" for i in range(10)]
    # A limit takes the first prompts of the shuffled order.
    assert read_prompts(rows, shuffle=True, seed=3).ids[:10] == one.ids
    assert one.rows_sha256 == two.rows_sha256 != other.rows_sha256
    assert one.describe()["limit"] == 10 and one.describe()["shuffle_seed"] == 3
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        read_prompts(rows, limit=0)


def test_prompts_can_skip_ids_and_read_lazily(tmp_path: Path) -> None:
    ds = read_prompts(write_jsonl(tmp_path / "in.jsonl", ROWS))
    first = ds.ids[0]
    assert [p.id for p in ds.prompts(skip={first})] == ds.ids[1:]


# ---------------------------------------------------------------------------- bad input


BAD_LINES = [
    ('{"prompt": "ok"}', None),
    ('{"prompt": "ok", ', "line 2: not valid JSON"),
    ('{"prompt": ""}', "line 3: the prompt field 'prompt' is empty"),
    ('{"question": "q"}', "line 4: has no field 'prompt'"),
    ('{"prompt": 12}', "line 5: the prompt field 'prompt' holds a number"),
    ("[1, 2]", "line 6: expected a JSON object, got a list"),
    ('{"prompt": [{"role": "user"}]}', "line 7: field 'prompt': message 0 has no text content"),
    ('{"prompt": "ok"}', "line 8: is identical to line 1"),
    ('{"prompt": null}', "line 9: the prompt field 'prompt' is empty"),
]


def _bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    body = "\n".join(line for line, _ in BAD_LINES).encode() + b'\n\xff\xfe{"prompt": "x"}\n'
    path.write_bytes(body)
    return path


def test_strict_mode_lists_every_problem_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        read_prompts(_bad_file(tmp_path))
    message = str(e.value)
    for _, expected in BAD_LINES:
        if expected:
            assert f"in.jsonl {expected}" in message
    assert "in.jsonl line 10: not valid UTF-8 text (byte 0xff at column 1)" in message
    assert "9 of 10 rows are invalid; nothing was run" in message
    assert "--skip-invalid" in message


def test_lenient_mode_skips_and_reports(tmp_path: Path) -> None:
    ds = read_prompts(_bad_file(tmp_path), skip_invalid=True)
    assert [p.messages[0].content for p in ds] == ["ok"]
    assert ds.problem_count == 9 and len(ds.problems) == 9
    assert [p.where.rsplit("/", 1)[-1] for p in ds.problems] == [
        f"in.jsonl line {n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10)
    ]


def test_duplicate_ids_from_the_id_field(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "y"},
        {"id": "a", "prompt": "z"},
        {"id": True, "prompt": "w"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(InputError) as e:
        read_prompts(path, id_field="id")
    assert "in.jsonl line 3: repeats the id 'a' of line 1" in str(e.value)
    assert "in.jsonl line 4: the id field 'id' must be a non-empty string or an integer" in str(e.value)
    assert read_prompts(path, id_field="id", skip_invalid=True).ids == ["a", "b"]


def test_problem_list_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join("oops\n" for _ in range(50)) + '{"prompt": "fine"}\n')
    with pytest.raises(InputError) as e:
        read_prompts(path)
    message = str(e.value)
    assert message.count("not valid JSON") == MAX_LISTED_PROBLEMS
    assert f"… and {50 - MAX_LISTED_PROBLEMS} more" in message
    ds = read_prompts(path, skip_invalid=True)
    assert len(ds) == 1 and ds.problem_count == 50 and len(ds.problems) == MAX_LISTED_PROBLEMS


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("in.jsonl", b"", "in.jsonl: the input has no rows"),
        ("in.jsonl", b"\n\n  \n", "in.jsonl: the input has no rows"),
        ("in.json", b"[]", "in.json: the input has no rows"),
        ("in.csv", b"prompt,answer\n", "in.csv: the input has no rows"),
        ("in.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "in.jsonl: looks like a binary file"),
        ("in.csv", b"a,b\x00c\n1,2\n", "in.csv: looks like a binary file"),
        ("in.json", b'[{"prompt": "a"},\n {"prompt": }]', "in.json line 2 (item 2): not valid JSON"),
        ("in.json", b'{"prompt": "a"}', "in.json: expected a JSON list of objects"),
        ("in.parquet", b"not parquet at all", "in.parquet: not a readable Parquet file"),
    ],
)
def test_unreadable_inputs_fail_even_when_lenient(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for lenient in (False, True):
        with pytest.raises(InputError) as e:
            read_prompts(path, skip_invalid=lenient)
        assert expected in str(e.value)


def test_every_row_invalid_when_lenient(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"x": 1}, {"x": 2}])
    with pytest.raises(InputError, match=r"none of the 2 rows is valid"):
        read_prompts(path, skip_invalid=True)


def test_csv_problems_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'prompt,answer\n"multi\nline prompt",1\n,2\nonly-one-column\nok \xff,3\nfine,4\n')
    with pytest.raises(InputError) as e:
        read_prompts(path)
    message = str(e.value)
    assert "in.csv line 4: the prompt field 'prompt' is empty" in message
    assert "in.csv line 5: has 1 columns; the header has 2" in message
    assert "in.csv line 6: not valid UTF-8 text" in message
    ds = read_prompts(path, skip_invalid=True)
    assert [p.messages[0].content for p in ds] == ["multi\nline prompt", "fine"]


def test_json_list_problems_name_line_and_item(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text('[\n  {"prompt": "a"},\n  "text",\n  {"prompt": "  "}\n]\n')
    with pytest.raises(InputError) as e:
        read_prompts(path)
    assert "in.json line 3 (item 2): expected a JSON object, got a string" in str(e.value)
    assert "in.json line 4 (item 3): the prompt field 'prompt' is empty" in str(e.value)


def test_a_lone_surrogate_is_refused_at_the_check_with_file_and_line(tmp_path: Path) -> None:
    # Valid JSON (json.loads accepts it), but no UTF-8 text can hold it: no model could ever be sent it.
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"prompt": "fine"}\n'
        '{"prompt": "bad \\ud800 text"}\n'
        '{"prompt": "ok", "note": ["x", {"deep": "\\udfff"}]}\n'
        '{"prompt": "ok too", "\\ud83d": 1}\n'
        '{"prompt": "a pair is fine: \\ud83d\\ude00"}\n',
        encoding="utf-8",
    )
    with pytest.raises(InputError) as e:
        read_prompts(path)
    message = str(e.value)
    assert "in.jsonl line 2: field 'prompt' holds a lone UTF-16 surrogate (U+D800 at character 5)" in message
    assert "in.jsonl line 3: field 'note[1].deep' holds a lone UTF-16 surrogate (U+DFFF" in message
    assert "in.jsonl line 4: a field name holds a lone UTF-16 surrogate (U+D83D" in message
    assert "3 of 5 rows are invalid" in message
    ds = read_prompts(path, skip_invalid=True)
    assert [p.messages[0].content for p in ds] == ["fine", "a pair is fine: \U0001f600"]
    # A conversation in a CSV cell is JSON text too.
    csv_path = tmp_path / "in.csv"
    csv_path.write_text('prompt\n"[{""role"": ""user"", ""content"": ""x \\udc00""}]"\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"in.csv line 2: field 'prompt\[0\].content' holds a lone UTF-16 surrogate"):
        read_prompts(csv_path)
    with pytest.raises(InputError, match=r"row 1: field 'prompt' holds a lone UTF-16 surrogate"):
        read_prompts([{"prompt": "\ud800"}])


# ---------------------------------------------------------------------------- the id field, found automatically


def test_the_id_field_is_found_when_every_row_has_exactly_one(tmp_path: Path) -> None:
    rows = [{"question_id": 10 + i, **r} for i, r in enumerate(ROWS)]
    ds = read_prompts(write_jsonl(tmp_path / "in.jsonl", rows))
    assert ds.ids == ["10", "11", "12"] and ds.id_field == "question_id" and ds.describe()["id_field"] == "question_id"
    assert ds.id_note is not None and "prompt ids are the field 'question_id', which every row has" in ds.id_note
    assert "--id-field none" in ds.id_note
    assert all("question_id" not in p.metadata for p in ds)
    # None asks for row hashes, whatever the rows hold.
    hashed = read_prompts(write_jsonl(tmp_path / "in.jsonl", rows), id_field=None)
    assert hashed.id_field is None and hashed.id_note is None and all(len(i) == 16 for i in hashed.ids)
    # No such field: row hashes, and nothing to say.
    plain = read_prompts(ROWS)
    assert plain.id_field is None and plain.id_note is None


@pytest.mark.parametrize(
    "rows, why",
    [
        ([{"id": "a", "prompt": "x"}, {"prompt": "y"}], "1 of 2 rows have no field 'id'"),
        (
            [{"id": "a", "prompt": "x"}, {"uid": "b", "prompt": "y"}],
            "the rows differ in which of the fields 'id' or 'uid' they have",
        ),
        (
            [{"id": "a", "uid": "u", "prompt": "x"}, {"id": "b", "prompt": "y"}],
            "1 of 2 rows have more than one of the fields 'id' or 'uid'",
        ),
    ],
)
def test_no_id_field_is_guessed_when_rows_disagree(rows: list[dict[str, Any]], why: str) -> None:
    ds = read_prompts(rows)
    assert ds.id_field is None and all(len(i) == 16 for i in ds.ids)
    assert ds.id_note == f"prompt ids are derived from each row, because {why}; name the id field with --id-field"


def test_an_id_field_found_automatically_is_checked_like_a_named_one(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "y"},
        {"id": "a", "prompt": "z"},
        {"id": None, "prompt": "w"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(InputError) as e:
        read_prompts(path)
    message = str(e.value)
    # A repeated id is what finding the field is for: without it the three rows would pass as distinct.
    assert "in.jsonl line 3: repeats the id 'a' of line 1 (ids from the field 'id', found in every row;" in message
    assert "in.jsonl line 4: the id field 'id' must be a non-empty string or an integer, not None" in message
    assert "--id-field none derives ids from the rows" in message
    assert read_prompts(path, skip_invalid=True).ids == ["a", "b"]
    assert len(read_prompts(path, id_field=None).ids) == 4
    with pytest.raises(ConfigError, match=r"the id field must be a field name, 'auto' or None"):
        read_prompts(path, id_field="")


def test_an_input_that_goes_away_during_the_run_is_an_input_error_naming_it(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    ds = read_prompts(path)
    path.unlink()
    with pytest.raises(InputError, match=r"cannot read .*in.jsonl: No such file or directory"):
        list(ds)
