"""The JSON form of a result: real results validate against the shipped JSON Schema, which the docs describe."""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import tpo
from conftest import TAG, hash_score, number_in, pure_reply
from tpo import BackendError, GenerationRequest, Score, TPOResult
from tpo.result import dumps_json
from tpo.testing import FunctionReward, ScriptedPolicy, default_reply

DOC = Path(__file__).parent.parent / "docs" / "result-schema.md"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files("tpo").joinpath("result.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(data)
    return data


def _validate(schema: dict[str, Any], document: Any) -> None:
    jsonschema.Draft202012Validator(schema).validate(document)


def _mixed_updates(request: GenerationRequest) -> list[str]:
    if request.purpose == "update":
        return [f"<{TAG}>Rewrite 40</{TAG}>", "Rewrite 41 untagged", f"<{TAG}>Rewrite 42 unclosed", "", "\ud800 7"]
    return default_reply(request)


def _failing_score(messages: object, answer: str) -> float:
    if number_in(answer) in (2, 41):
        raise ValueError("cannot judge")
    return float(number_in(answer))


def _results() -> dict[str, TPOResult]:
    """Real results of every shape: complete, partial, failed, with fallbacks, failures and truncation."""
    out: dict[str, TPOResult] = {}
    partials: list[TPOResult] = []
    out["d2n5"] = tpo.optimize(
        "What is TPO?", policy=ScriptedPolicy(), reward=FunctionReward(hash_score), on_step=partials.append
    )
    out["partial"] = partials[1]
    out["bon"] = tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(hash_score), width=3, mode="bon")
    out["revision"] = tpo.optimize(
        "q",
        policy=ScriptedPolicy(),
        reward=FunctionReward(hash_score),
        mode="revision",
        width=2,
        depth=1,
        metadata={"reference": 4, "tags": ["a", "b"]},
    )
    out["fallbacks_and_failures"] = tpo.optimize(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        policy=ScriptedPolicy(_mixed_updates),
        reward=FunctionReward(_failing_score),
        width=5,
        depth=2,
        rejected_from="latest",
        final_from="last_step",
        early_stop_patience=3,
        critic_max_tokens=50,
    )
    out["tied"] = tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(lambda m, a: 0), width=2, depth=1)
    out["early_stop"] = tpo.optimize(
        "q", policy=ScriptedPolicy(), reward=FunctionReward(lambda m, a: 9.5), early_stop_score=9
    )
    out["truncated"] = tpo.optimize(
        "x" * 60_000,
        policy=ScriptedPolicy(pure_reply, window=2048),
        reward=FunctionReward(hash_score),
        width=2,
        depth=1,
    )

    def down(request: GenerationRequest) -> list[str]:
        if request.purpose == "gradient":
            raise BackendError("server went away")
        return pure_reply(request)

    out["backend_failed"] = tpo.optimize("q", policy=ScriptedPolicy(down), reward=FunctionReward(hash_score))

    def judged(messages: object, answer: str) -> Score:
        n = number_in(answer)
        if n == 1:
            return Score.failed("no rating in the reply", {"reply": "Hard to say.", "attempts": 2})
        return Score(float(n), details={"rating": n, "components": [{"name": "len", "score": 0.5}], "odd": object()})

    out["score_details"] = tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(judged), width=3, depth=1)
    out["nothing_scored"] = tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(lambda m, a: {}))
    return out


RESULTS = _results()


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_real_results_validate_against_the_schema(name: str, schema: dict[str, Any]) -> None:
    result = RESULTS[name]
    document = json.loads(result.to_json())
    _validate(schema, document)
    assert TPOResult.from_dict(document) == result


def test_the_results_cover_every_shape() -> None:
    statuses = {r.status for r in RESULTS.values()}
    assert statuses == {"complete", "partial", "failed"}
    shaped = RESULTS["fallbacks_and_failures"]
    assert shaped.score_failures > 0 and shaped.to_dict()["extraction_fallbacks"] > 0
    assert any(s.failures for s in shaped.steps)
    assert RESULTS["truncated"].steps[1].truncated
    assert RESULTS["tied"].steps[1].fallback_to_revision
    assert RESULTS["early_stop"].stopped_early
    assert RESULTS["nothing_scored"].answer is None and RESULTS["nothing_scored"].status == "failed"
    assert RESULTS["backend_failed"].answer is not None and RESULTS["backend_failed"].status == "failed"
    details = [c.score_details for c in RESULTS["score_details"].candidates]
    assert (
        details[0] is not None and details[0]["rating"] == 0 and details[1] == {"reply": "Hard to say.", "attempts": 2}
    )


#: Fields added within schema version 1: always written now, optional in the schema so older results still validate.
ADDED_IN_VERSION_1 = {
    "step": {"cumulative"},
    "usage": {"prompt_flops", "completion_flops"},
    "config": {"policy_params", "critic_params"},
}


def test_the_schema_lists_exactly_the_fields_the_code_writes(schema: dict[str, Any]) -> None:
    data = RESULTS["d2n5"].to_dict()
    defs = schema["$defs"]
    assert set(schema["required"]) == set(schema["properties"]) == set(data)
    assert set(defs["candidate"]["required"]) == set(defs["candidate"]["properties"]) == set(data["candidates"][0])
    for name, written in (("step", data["steps"][1]), ("usage", data["usage"]), ("config", data["config"])):
        assert set(defs[name]["properties"]) == set(written)
        assert set(defs[name]["required"]) == set(written) - ADDED_IN_VERSION_1[name]
    prompts = defs["config"]["properties"]["prompts"]
    assert set(prompts["required"]) == set(data["config"]["prompts"])


def test_a_result_written_before_the_added_fields_still_validates_and_reads(schema: dict[str, Any]) -> None:
    document = copy.deepcopy(RESULTS["d2n5"].to_dict())
    for step in document["steps"]:
        del step["cumulative"]
        for key in ADDED_IN_VERSION_1["usage"]:
            del step["usage"][key]
    for key in ADDED_IN_VERSION_1["usage"]:
        del document["usage"][key]
    for key in ADDED_IN_VERSION_1["config"]:
        del document["config"][key]
    _validate(schema, document)
    result = TPOResult.from_dict(document)
    assert result.steps[1].cumulative is None and result.usage.flops is None
    assert result.usage.completion_tokens == RESULTS["d2n5"].usage.completion_tokens


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["status"], "done"),
        (["schema_version"], 2),
        (["candidates", 0, "id"], "not-a-hash"),
        (["candidates", 0, "score"], "high"),
        (["candidates", 0, "score_error"], "failed although it has a score"),
        (["candidates", 0, "score_details"], "a string, not an object"),
        (["steps", 1, "kind"], "dpo"),
        (["steps", 1, "extraction"], {"sloppy": 1}),
        (["usage", "policy_calls"], -1),
        (["config", "width"], 0),
        (["error"], "an error on a complete result"),
        (["answer"], None),
        (["surprise"], 1),
    ],
)
def test_the_schema_rejects_malformed_results(schema: dict[str, Any], path: list[Any], value: Any) -> None:
    document = copy.deepcopy(RESULTS["d2n5"].to_dict())
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validate(schema, document)


def test_reading_a_result_of_another_schema_version_is_an_input_error() -> None:
    data = RESULTS["bon"].to_dict()
    data["schema_version"] = 99
    with pytest.raises(tpo.InputError, match="schema_version 99"):
        TPOResult.from_dict(data)


def test_a_lone_surrogate_is_escaped_so_the_json_can_be_saved(tmp_path: Path) -> None:
    result = RESULTS["fallbacks_and_failures"]
    assert any("\ud800" in c.text for c in result.candidates)
    text = result.to_json()
    (tmp_path / "r.json").write_text(text, encoding="utf-8")
    assert TPOResult.from_dict(json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))) == result


def test_dumps_json_keeps_text_readable_unless_it_cannot_be_saved(tmp_path: Path) -> None:
    assert dumps_json({"a": "Grüße 😀"}) == '{"a": "Grüße 😀"}'
    assert dumps_json({"a": [1, 2]}, indent=2) == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert dumps_json({"a": [1, 2]}, compact=True) == '{"a":[1,2]}'
    odd = {"a": "Grüße \ud800"}
    text = dumps_json(odd)
    assert text.isascii() and json.loads(text) == odd
    (tmp_path / "odd.json").write_text(text, encoding="utf-8")
    assert json.loads((tmp_path / "odd.json").read_text(encoding="utf-8")) == odd
    with pytest.raises(ValueError):
        dumps_json({"x": float("nan")}, allow_nan=False)


# --------------------------------------------------------------------------- the documentation


def _documented_names() -> set[str]:
    return set(re.findall(r"^\|\s*`([a-z_]+)`", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE))


def test_every_field_is_documented() -> None:
    data = RESULTS["d2n5"].to_dict()
    documented = _documented_names()
    fields = (
        set(data)
        | set(data["candidates"][0])
        | set(data["steps"][1])
        | set(data["usage"])
        | set(data["config"])
        | set(data["config"]["prompts"])
    )
    assert fields - documented == set()
    assert documented - fields == set()  # nothing documented that the code does not write


def test_the_documented_example_is_valid(schema: dict[str, Any]) -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert blocks, "docs/result-schema.md has no JSON example"
    example = json.loads(blocks[0])
    _validate(schema, example)
    assert TPOResult.from_dict(example).to_dict() == example
