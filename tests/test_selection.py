"""The candidate store: content ids, lineage, and deterministic selection of chosen, rejected and final."""

from __future__ import annotations

import hashlib

import pytest

import tpo
from conftest import number_in
from tpo import Candidate, CandidateStore, answer_id
from tpo.testing import FunctionReward, ScriptedPolicy


def _c(text: str, score: float | None, step: int = 0, **kw: object) -> Candidate:
    return Candidate(id=answer_id(text), text=text, score=score, step=step, **kw)  # type: ignore[arg-type]


def test_answer_id_is_a_content_hash() -> None:
    assert answer_id("hello") == hashlib.sha256(b"hello").hexdigest()[:16] == "2cf24dba5fb0a30e"
    assert answer_id("hello") == answer_id("hello")
    assert answer_id("hello") != answer_id("hello ")


@pytest.mark.parametrize(
    "texts",
    [
        ["a<SEP>b", "a", "b", "a<SEP>", "<SEP>b"],
        ["x|||y", "x", "y", "x||", "|y"],
        ["nul\x00", "nul", "nul\x00\x00"],
        ["\ud800", "\udfff", "\ud800\udc00", "𐀀"],
        ["e\u0301", "é"],  # combining and precomposed: different text, different answers
    ],
)
def test_delimiter_like_and_unicode_texts_get_distinct_ids(texts: list[str]) -> None:
    store = CandidateStore(_c(t, float(i)) for i, t in enumerate(texts))
    assert len(store) == len(texts)
    assert [c.text for c in store] == texts
    for t in texts:
        got = store.get(answer_id(t))
        assert got is not None and got.text == t


def test_adding_the_same_answer_again_keeps_the_first() -> None:
    store = CandidateStore()
    assert store.add(_c("same", 1.0, step=0)) is True
    assert store.add(_c("same", 9.0, step=2)) is False
    only = store.get(answer_id("same"))
    assert only is not None and (only.score, only.step) == (1.0, 0)
    assert len(store) == 1 and answer_id("same") in store and "other" not in store


def test_best_and_worst_break_ties_towards_the_first_seen() -> None:
    store = CandidateStore([_c("a", 1.0), _c("b", 3.0), _c("c", 0.0), _c("d", 3.0), _c("e", 0.0)])
    assert store.best().text == "b"  # type: ignore[union-attr]
    assert store.worst().text == "c"  # type: ignore[union-attr]
    tied = CandidateStore([_c("p", 2.0), _c("q", 2.0), _c("r", 2.0)])
    assert tied.best() == tied.worst() == tied.get(answer_id("p"))


def test_unscored_candidates_never_take_part_in_selection() -> None:
    store = CandidateStore([_c("x", None, score_error="boom"), _c("y", -5.0), _c("z", None, score_error="boom")])
    assert store.best().text == "y" and store.worst().text == "y"  # type: ignore[union-attr]
    assert [c.text for c in store.scored()] == ["y"]
    assert CandidateStore([_c("x", None)]).best() is None
    assert CandidateStore().best() is None and CandidateStore().worst() is None


def test_selection_within_one_step() -> None:
    store = CandidateStore([_c("s0", 5.0, 0), _c("s1", 1.0, 0), _c("r0", 3.0, 1), _c("r1", 4.0, 1)])
    assert store.best(step=1).text == "r1" and store.worst(step=1).text == "r0"  # type: ignore[union-attr]
    assert store.best().text == "s0" and store.worst().text == "s1"  # type: ignore[union-attr]
    assert store.best(step=7) is None


def test_candidate_dict_round_trip() -> None:
    c = _c("text 😀", 1.5, 2, parent_id="abc", origin="unclosed", finish_reason="length")
    assert Candidate.from_dict(c.to_dict()) == c
    assert c.scored and not _c("t", None).scored


# --------------------------------------------------------------------------- in the engine


def test_the_final_answer_is_the_first_of_equally_good_answers() -> None:
    # Samples 0..3 score 0, 2, 2, 1; every rewrite scores 2 as well: sample 1 stays the answer.
    scores = {0: 0.0, 1: 2.0, 2: 2.0, 3: 1.0}
    reward = FunctionReward(lambda m, a: scores[number_in(a)] if a.startswith("Answer") else 2.0)
    result = tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=4, depth=2)
    assert result.answer == "Answer 1 to prompt 0."
    assert [result.candidate(s.chosen_id).text for s in result.steps[1:]] == ["Answer 1 to prompt 0."] * 2
    assert [result.candidate(s.rejected_id).text for s in result.steps[1:]] == ["Answer 0 to prompt 0."] * 2


def test_rejected_from_latest_falls_back_to_revision_when_the_latest_step_has_only_the_chosen() -> None:
    # Width 1: step 1 yields one rewrite, the new best; the worst of that step is the chosen one itself.
    reward = FunctionReward(lambda m, a: float(number_in(a)))
    result = tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=1, depth=2, rejected_from="latest")
    assert [s.kind for s in result.steps] == ["sample", "revision", "revision"]
    assert all(s.fallback_to_revision and s.rejected_id is None for s in result.steps[1:])


def test_final_from_last_step_ignores_unscored_rewrites() -> None:
    # Samples 0, 1 score 10, 11; rewrites 4, 5 of step 1 score 4 and (would score) 5, but 5 fails.
    def score(m: object, a: str) -> float:
        n = number_in(a)
        if n == 5:
            raise ValueError("no")
        return 10.0 + n if a.startswith("Answer") else float(n)

    def run(final_from: str) -> tpo.TPOResult:
        return tpo.optimize(
            "q", policy=ScriptedPolicy(), reward=FunctionReward(score), width=2, depth=1, final_from=final_from
        )

    last = run("last_step")
    assert last.candidate(answer_id("Improved answer 5 (step 1) to prompt 0.")).score is None
    assert last.answer == "Improved answer 4 (step 1) to prompt 0." and last.score == 4.0
    assert run("all").answer == "Answer 1 to prompt 0."


def test_a_candidate_writes_every_field_and_reads_back_older_rows() -> None:
    from dataclasses import fields

    c = _c(
        "text",
        1.5,
        step=2,
        parent_id=answer_id("p"),
        origin="tagged",
        finish_reason="length",
        score_details={"rating": 8, "why": ("clear", "short")},
    )
    data = c.to_dict()
    assert list(data) == [f.name for f in fields(Candidate)]  # the JSON form cannot drift from the class
    assert data["score_details"] == {"rating": 8, "why": ["clear", "short"]}
    data["score_details"]["rating"] = 1  # the dict is a copy
    assert c.score_details == {"rating": 8, "why": ["clear", "short"]}
    assert Candidate.from_dict(c.to_dict()) == c
    # A row written before a field existed reads back with that field's default.
    old = {k: v for k, v in c.to_dict().items() if k not in ("score_details", "finish_reason")}
    assert Candidate.from_dict(old) == _c("text", 1.5, step=2, parent_id=answer_id("p"), origin="tagged")
    with pytest.raises(KeyError):
        Candidate.from_dict({"id": c.id, "step": 0})  # no text
    # Still hashable, details or not: a mapping takes no part in the hash.
    assert (
        len(
            {
                c,
                _c(
                    "text",
                    1.5,
                    step=2,
                    parent_id=answer_id("p"),
                    origin="tagged",
                    finish_reason="length",
                    score_details={"rating": 8, "why": ["clear", "short"]},
                ),
            }
        )
        == 1
    )
