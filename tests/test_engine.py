"""The TPO engine end to end with scripted doubles: calls, selection, failures, concurrency, seeds, resume."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence

import pytest

import tpo
from conftest import TAG, hash_score, make_reward, number_in, pure_reply, strip_timings
from tpo import BackendError, GenerationRequest, Message, Prompt, RewardError, Score, ScoreRequest, TPOConfig, TPOResult
from tpo.testing import FunctionReward, ScriptedPolicy

# --------------------------------------------------------------------------- the paper's D2-N5


def test_d2_n5_makes_exactly_the_calls_of_the_method(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize("What is TPO?", policy=policy, reward=reward, width=5, depth=2)

    assert result.status == "complete", result.error
    # One request per generate call (a non-batching backend), in the order of the method.
    assert [len(call) for call in policy.calls] == [1] * 7
    reqs = policy.requests
    assert [(r.purpose, r.step, r.n) for r in reqs] == [
        ("sample", 0, 5),
        ("loss", 1, 1),
        ("gradient", 1, 1),
        ("update", 1, 5),
        ("loss", 2, 1),
        ("gradient", 2, 1),
        ("update", 2, 5),
    ]
    assert all(r.prompt_id == "0" for r in reqs)
    assert reqs[0].messages == (Message("user", "What is TPO?"),)

    # The gradient request continues the loss conversation: loss prompt, critique, then the ask.
    for step, (loss, grad) in enumerate([(reqs[1], reqs[2]), (reqs[4], reqs[5])], start=1):
        record = result.steps[step]
        assert len(loss.messages) == 1 and loss.messages[0].role == "user"
        assert grad.messages[0] == loss.messages[0]
        assert grad.messages[1] == Message("assistant", record.critique)
        assert grad.messages[2].role == "user"
        assert grad.messages[2].content == tpo.DEFAULT_PROMPTS.gradient
        # The update sees the conversation, the chosen answer, the critique and the feedback.
        update = reqs[3 * step]
        text = update.messages[-1].content
        chosen = result.candidate(record.chosen_id)
        for part in ("What is TPO?", chosen.text, record.critique, record.feedback, f"<{TAG}>"):
            assert part in text

    # 15 scored answers, all different, scored once each.
    assert len(result.candidates) == 15
    assert all(c.score is not None for c in result.candidates)
    assert len(reward.requests) == 15
    assert len({r.answer for r in reward.requests}) == 15
    assert [c.step for c in result.candidates] == [0] * 5 + [1] * 5 + [2] * 5

    # The final answer is the best of the 15.
    best = max(result.candidates, key=lambda c: c.score or -math.inf)
    assert (result.answer, result.score, result.best_id) == (best.text, best.score, best.id)
    assert result.answer == "Improved answer 18 (step 2) to prompt 0."

    # Usage: 7 policy calls, 5 + 1 + 1 + 5 + 1 + 1 + 5 sequences, 15 answers scored.
    assert result.usage.policy_calls == 7
    assert result.usage.sequences == 19
    assert result.usage.reward_calls == 15
    assert result.usage.reward_failures == 0
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert sum(s.usage.policy_calls for s in result.steps) == 7
    assert [s.usage.policy_calls for s in result.steps] == [1, 3, 3]
    assert [s.usage.reward_calls for s in result.steps] == [5, 5, 5]


def test_steps_record_selection_lineage_critique_and_feedback(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize("q", policy=policy, reward=reward, width=5, depth=2)
    by_text = {c.text: c for c in result.candidates}
    s0, s1, s2 = result.steps

    assert s0.kind == "sample" and s0.chosen_id is None and s0.critique is None
    assert s0.candidate_ids == tuple(c.id for c in result.candidates[:5])
    assert s0.best_score == 4.0

    assert s1.kind == "tpo" and not s1.fallback_to_revision
    assert s1.chosen_id == by_text["Answer 4 to prompt 0."].id
    assert s1.rejected_id == by_text["Answer 0 to prompt 0."].id
    assert s1.critique == "Critique 5: the chosen answer is clearer but could be more specific."
    assert s1.feedback == "Feedback 6: add a concrete example and remove filler."
    assert s1.extraction == {"tagged": 5} and s1.fallbacks == 0 and s1.failures == ()
    assert s1.best_score == 11.0

    # Step 2 improves the best rewrite of step 1, against the worst answer of the whole store.
    assert s2.chosen_id == by_text["Improved answer 11 (step 1) to prompt 0."].id
    assert s2.rejected_id == by_text["Answer 0 to prompt 0."].id
    for c in result.candidates:
        expected_parent = {0: None, 1: s1.chosen_id, 2: s2.chosen_id}[c.step]
        assert c.parent_id == expected_parent
        assert c.origin == ("sample" if c.step == 0 else "tagged")
        assert c.id == tpo.answer_id(c.text)

    # The loss request of a TPO step shows both answers.
    loss = policy.requests_for("loss")[0].messages[0].content
    assert "Answer 4 to prompt 0." in loss and "Answer 0 to prompt 0." in loss


def test_width_one_works(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize("q", policy=policy, reward=reward, width=1, depth=2)
    assert result.status == "complete"
    assert [(r.purpose, r.n) for r in policy.requests] == [
        ("sample", 1),
        ("loss", 1),
        ("gradient", 1),
        ("update", 1),
        ("loss", 1),
        ("gradient", 1),
        ("update", 1),
    ]
    assert [c.text for c in result.candidates] == [
        "Answer 0 to prompt 0.",
        "Improved answer 3 (step 1) to prompt 0.",
        "Improved answer 6 (step 2) to prompt 0.",
    ]
    # One candidate: chosen is rejected, so step 1 is a revision; step 2 has two to compare.
    assert result.steps[1].fallback_to_revision and result.steps[1].kind == "revision"
    assert result.steps[2].kind == "tpo" and not result.steps[2].fallback_to_revision
    assert result.answer == "Improved answer 6 (step 2) to prompt 0."


@pytest.mark.parametrize("mode", ["tpo", "revision", "bon"])
def test_depth_zero_is_best_of_n(mode: str, policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize("q", policy=policy, reward=reward, width=4, depth=0, mode=mode)
    assert [r.purpose for r in policy.requests] == ["sample"]
    assert policy.requests[0].n == 4
    assert len(result.steps) == 1 and result.steps[0].kind == "sample"
    assert result.answer == "Answer 3 to prompt 0."
    assert result.usage.policy_calls == 1 and result.usage.reward_calls == 4


def test_bon_mode_resolves_depth_to_zero(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize("q", policy=policy, reward=reward, width=6, depth=3, mode="bon")
    assert TPOConfig(mode="bon", depth=3).depth == 0
    assert result.config["depth"] == 0 and result.config["mode"] == "bon"
    assert [r.purpose for r in policy.requests] == ["sample"]
    assert len(result.candidates) == 6


# --------------------------------------------------------------------------- revision against tpo


def _distinct_replies(request: GenerationRequest) -> list[str]:
    """Answers with unmistakable markers, so a test can see which ones a request shows."""
    if request.purpose == "sample":
        return [f"SAMPLE-{i}-MARK" for i in range(request.n)]
    if request.purpose == "update":
        return [f"<{TAG}>REWRITE-{request.step}-{i}-MARK</{TAG}>" for i in range(request.n)]
    return [f"{request.purpose} text at {request.step}"]


def test_revision_never_shows_a_rejected_answer() -> None:
    policy = ScriptedPolicy(_distinct_replies)
    # The worst answer is SAMPLE-0, the best the last rewrite of the last step.
    score = {"SAMPLE-0-MARK": 0.0, "SAMPLE-1-MARK": 5.0, "SAMPLE-2-MARK": 3.0}
    reward = make_reward(lambda a: score.get(a, 10.0 + len(a) / 100 + number_in(a[-6:])))
    result = tpo.optimize("q", policy=policy, reward=reward, width=3, depth=2, mode="revision")

    assert result.status == "complete"
    assert [s.kind for s in result.steps] == ["sample", "revision", "revision"]
    assert all(s.rejected_id is None and not s.fallback_to_revision for s in result.steps[1:])
    for r in policy.requests[1:]:
        text = "\n".join(m.content for m in r.messages)
        assert "SAMPLE-0-MARK" not in text  # the worst answer, TPO's rejected one
        assert "<reply_B>" not in text
    assert "SAMPLE-1-MARK" in policy.requests_for("loss")[0].messages[0].content
    assert "<reply>" in policy.requests_for("loss")[0].messages[0].content


def test_tpo_shows_the_rejected_answer_to_loss_and_gradient() -> None:
    policy = ScriptedPolicy(_distinct_replies)
    score = {"SAMPLE-0-MARK": 0.0, "SAMPLE-1-MARK": 5.0, "SAMPLE-2-MARK": 3.0}
    reward = make_reward(lambda a: score.get(a, 1.0))
    result = tpo.optimize("q", policy=policy, reward=reward, width=3, depth=1, mode="tpo")

    step = result.steps[1]
    assert step.kind == "tpo"
    assert result.candidate(step.chosen_id).text == "SAMPLE-1-MARK"
    assert result.candidate(step.rejected_id).text == "SAMPLE-0-MARK"
    loss = policy.requests_for("loss")[0].messages[0].content
    grad = policy.requests_for("gradient")[0]
    assert "<reply_A>\nSAMPLE-1-MARK\n</reply_A>" in loss
    assert "<reply_B>\nSAMPLE-0-MARK\n</reply_B>" in loss
    assert "SAMPLE-0-MARK" in grad.messages[0].content
    # The update is about improving the chosen answer; the rejected one is not pasted again.
    update = policy.requests_for("update")[0].messages[0].content
    assert "SAMPLE-1-MARK" in update and "SAMPLE-0-MARK" not in update


# --------------------------------------------------------------------------- ties


def test_all_scores_tied_falls_back_to_revision(policy: ScriptedPolicy) -> None:
    reward = make_reward(lambda a: 1.0)
    result = tpo.optimize("q", policy=policy, reward=reward, width=3, depth=2)

    assert result.status == "complete"
    for step in result.steps[1:]:
        assert step.fallback_to_revision is True
        assert step.kind == "revision"
        assert step.rejected_id is None
    # Ties break towards the answer seen first: the first sample is chosen, and is final.
    first = result.candidates[0]
    assert [s.chosen_id for s in result.steps[1:]] == [first.id, first.id]
    assert result.best_id == first.id and result.answer == "Answer 0 to prompt 0."
    for r in policy.requests_for("loss"):
        assert "<reply_B>" not in r.messages[0].content  # the revision template was used
    data = result.to_dict()
    assert [s["fallback_to_revision"] for s in data["steps"]] == [False, True, True]


def test_partial_ties_break_deterministically(policy: ScriptedPolicy) -> None:
    # Samples 0..4 score 1, 3, 0, 3, 0: best is the first 3 (sample 1), worst the first 0 (sample 2).
    scores = {0: 1.0, 1: 3.0, 2: 0.0, 3: 3.0, 4: 0.0}
    reward = make_reward(lambda a: scores.get(number_in(a), 0.0))
    runs = [tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=5, depth=1) for _ in range(3)]
    step = runs[0].steps[1]
    assert runs[0].candidate(step.chosen_id).text == "Answer 1 to prompt 0."
    assert runs[0].candidate(step.rejected_id).text == "Answer 2 to prompt 0."
    assert runs[0].answer == "Answer 1 to prompt 0."
    assert len({json.dumps(strip_timings(r.to_dict())) for r in runs}) == 1


# --------------------------------------------------------------------------- extraction of rewrites


def _with_updates(update: Sequence[str]) -> ScriptedPolicy:
    """The default replies, except that every update call answers ``update``."""
    from tpo.testing import default_reply

    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "update":
            return list(update)
        return default_reply(request)

    return ScriptedPolicy(reply)


def test_every_rewrite_missing_its_tags_is_counted_and_still_used(reward: FunctionReward) -> None:
    untagged = [f"Plain rewrite {10 + i}" for i in range(4)]
    result = tpo.optimize("q", policy=_with_updates(untagged), reward=reward, width=4, depth=1)
    step = result.steps[1]
    assert step.extraction == {"untagged": 4}
    assert step.fallbacks == 4
    assert step.failures == ()
    rewrites = [c for c in result.candidates if c.step == 1]
    assert [c.text for c in rewrites] == untagged
    assert all(c.origin == "untagged" and c.score is not None for c in rewrites)
    assert result.answer == "Plain rewrite 13"
    assert result.to_dict()["extraction_fallbacks"] == 4
    assert result.to_dict()["steps"][1]["fallbacks"] == 4


def test_unclosed_unopened_and_tagged_rewrites(reward: FunctionReward) -> None:
    replies = [
        f"Sure! <{TAG}>Rewrite 21 closed</{TAG}> Hope it helps.",
        f"Here you go: <{TAG}>Rewrite 22 never closed",
        f"Rewrite 23 with only a closing tag</{TAG}>",
        "Rewrite 24 without any tags",
    ]
    result = tpo.optimize("q", policy=_with_updates(replies), reward=reward, width=4, depth=1)
    step = result.steps[1]
    assert step.extraction == {"tagged": 1, "unclosed": 1, "unopened": 1, "untagged": 1}
    assert step.fallbacks == 3
    got = {c.text: c.origin for c in result.candidates if c.step == 1}
    assert got == {
        "Rewrite 21 closed": "tagged",
        "Rewrite 22 never closed": "unclosed",
        "Rewrite 23 with only a closing tag": "unopened",
        "Rewrite 24 without any tags": "untagged",
    }


def test_empty_rewrites_are_failures_and_not_scored(reward: FunctionReward) -> None:
    replies = ["", f"<{TAG}>   </{TAG}>", f"<{TAG}>Rewrite 30</{TAG}>", "  \n "]
    result = tpo.optimize("q", policy=_with_updates(replies), reward=reward, width=4, depth=1)
    step = result.steps[1]
    assert result.status == "complete"
    assert [c.text for c in result.candidates if c.step == 1] == ["Rewrite 30"]
    assert len(reward.requests) == 4 + 1  # the samples and the one real rewrite
    assert all(r.answer.strip() for r in reward.requests)
    assert len(step.failures) == 3
    assert step.failures[0].startswith("rewrite 0 was empty")
    assert step.failures[1].startswith("rewrite 1 was empty (tagged)")
    assert step.failures[2].startswith("rewrite 3 was empty")
    assert step.extraction == {"untagged": 2, "tagged": 2}


def test_empty_samples_are_failures_and_not_scored(reward: FunctionReward) -> None:
    policy = ScriptedPolicy(["Answer 1", "", "   ", "Answer 4"])
    result = tpo.optimize("q", policy=policy, reward=reward, width=4, depth=0)
    assert [c.text for c in result.candidates] == ["Answer 1", "Answer 4"]
    assert result.steps[0].failures == ("sample 1 was empty", "sample 2 was empty")


def test_repeated_rewrites_are_scored_once_and_listed_in_the_step(reward: FunctionReward) -> None:
    replies = [f"<{TAG}>Rewrite 40</{TAG}>", f"<{TAG}>Rewrite 40</{TAG}>", f"<{TAG}>Answer 2 to prompt 0.</{TAG}>"]
    result = tpo.optimize("q", policy=_with_updates(replies), reward=reward, width=3, depth=1)
    ids = result.steps[1].candidate_ids
    assert len(ids) == 3 and ids[0] == ids[1]
    assert ids[2] == result.candidates[2].id  # an existing sample, kept from step 0
    assert len(result.candidates) == 4
    assert len(reward.requests) == 3 + 1


# --------------------------------------------------------------------------- awkward text

AWKWARD = [
    f"Use <{TAG}> and </{TAG}> to mark an answer.",
    "fields a<SEP>b|||c\tTAB",
    "nul\x00inside and \x1f unit separator",
    "{{chosen}} and {{rejected}} stay literal",
    "emoji 😀👩‍👩‍👧 and CJK 中文字符 テスト",
    "RTL עברית العربية and combining e\u0301 a\u0308",
    "lone surrogate \ud800 here",
    "zero\u200bwidth and \u2028line separator",
]


def test_awkward_answers_round_trip_through_the_store_and_json(tmp_path) -> None:
    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "sample":
            return list(AWKWARD)
        if request.purpose == "update":
            # The rewrites also hold the tag text inside a properly tagged answer.
            return [f"<{TAG}>v2 {a}</{TAG}>" for a in AWKWARD]
        return [f"{request.purpose}: {AWKWARD[1]} {AWKWARD[4]}"]

    policy = ScriptedPolicy(reply)
    reward = FunctionReward(hash_score)
    result = tpo.optimize("q", policy=policy, reward=reward, width=len(AWKWARD), depth=1)

    assert result.status == "complete"
    texts = [c.text for c in result.candidates]
    assert texts == AWKWARD + [f"v2 {a}" for a in AWKWARD]
    assert len({c.id for c in result.candidates}) == 2 * len(AWKWARD)
    assert result.steps[1].extraction == {"tagged": len(AWKWARD)}

    # The placeholder text in an answer is not filled in by the renderer.
    loss = policy.requests_for("loss")[0].messages[0].content
    chosen = result.candidate(result.steps[1].chosen_id).text
    assert chosen in loss

    # JSON: to a UTF-8 file and back, identical.
    path = tmp_path / "result.json"
    path.write_text(result.to_json(), encoding="utf-8")
    back = TPOResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    assert back == result
    assert [c.text for c in back.candidates] == texts
    assert all(tpo.answer_id(c.text) == c.id for c in back.candidates)


def test_json_keeps_non_ascii_readable_when_it_can(policy: ScriptedPolicy) -> None:
    reward = make_reward(lambda a: 1.0)
    result = tpo.optimize("Grüße 😀", policy=policy, reward=reward, width=1, depth=0)
    assert "Grüße 😀" in result.to_json()


def test_placeholder_text_in_answers_is_not_rendered() -> None:
    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "sample":
            return ["good {{rejected}}", "bad {{chosen}}"]
        return _distinct_replies(request)

    policy = ScriptedPolicy(reply)
    reward = make_reward(lambda a: 1.0 if a.startswith("good") else 0.0)
    tpo.optimize("q", policy=policy, reward=reward, width=2, depth=1)
    loss = policy.requests_for("loss")[0].messages[0].content
    assert "<reply_A>\ngood {{rejected}}\n</reply_A>" in loss
    assert "<reply_B>\nbad {{chosen}}\n</reply_B>" in loss


# --------------------------------------------------------------------------- options


def _peak_reward(answer: str) -> float:
    """Scores peak at answer number 9: step 1 (7..11) beats step 2 (14..18)."""
    return -float((number_in(answer) - 9) ** 2)


def test_rejected_from_latest_takes_the_worst_of_the_last_step(policy: ScriptedPolicy) -> None:
    reward = make_reward(_peak_reward)
    latest = tpo.optimize("q", policy=policy, reward=reward, width=5, depth=2, rejected_from="latest")
    everything = tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=5, depth=2)

    for result in (latest, everything):
        assert result.candidate(result.steps[1].rejected_id).text == "Answer 0 to prompt 0."
    # Step 1's rewrites 7..11 score -4, -1, 0, -1, -4: the worst of them is rewrite 7 (first of the ties).
    assert latest.candidate(latest.steps[2].rejected_id).text == "Improved answer 7 (step 1) to prompt 0."
    assert everything.candidate(everything.steps[2].rejected_id).text == "Answer 0 to prompt 0."
    assert latest.config["rejected_from"] == "latest"


def test_final_from_last_step(policy: ScriptedPolicy) -> None:
    reward = make_reward(_peak_reward)
    last = tpo.optimize("q", policy=policy, reward=reward, width=5, depth=2, final_from="last_step")
    best = tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=5, depth=2)
    assert best.answer == "Improved answer 9 (step 1) to prompt 0." and best.score == 0.0
    assert last.answer == "Improved answer 14 (step 2) to prompt 0." and last.score == -25.0
    assert last.best_id == last.candidate(last.best_id).id


def test_early_stop_by_score(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    # Samples score 0..4, step 1's rewrites 7..11: the threshold 10 is passed after step 1.
    result = tpo.optimize("q", policy=policy, reward=reward, width=5, depth=4, early_stop_score=10)
    assert len(result.steps) == 2
    assert result.stopped_early == "best score 11 reached the threshold 10"
    assert result.status == "complete"
    assert [r.purpose for r in policy.requests] == ["sample", "loss", "gradient", "update"]

    # Reached by the initial samples already: no improvement step at all.
    policy2 = ScriptedPolicy()
    result = tpo.optimize("q", policy=policy2, reward=reward, width=5, depth=4, early_stop_score=4)
    assert len(result.steps) == 1 and result.stopped_early is not None
    assert len(policy2.requests) == 1


def test_early_stop_by_patience(policy: ScriptedPolicy) -> None:
    # Only the samples are any good: the best score never improves after step 0.
    reward = make_reward(lambda a: 100.0 - number_in(a) if a.startswith("Answer") else 0.0)
    result = tpo.optimize("q", policy=policy, reward=reward, width=3, depth=5, early_stop_patience=2)
    assert len(result.steps) == 3  # step 0, then two steps without improvement
    assert result.stopped_early == "best score did not improve for 2 step(s)"
    assert result.answer == "Answer 0 to prompt 0."


def test_a_run_that_uses_all_its_steps_did_not_stop_early(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize(
        "q", policy=policy, reward=reward, width=5, depth=2, early_stop_score=18, early_stop_patience=1
    )
    assert len(result.steps) == 3
    assert result.score == 18.0
    assert result.stopped_early is None


def test_critic_writes_critiques_feedback_and_rewrites(reward: FunctionReward) -> None:
    policy, critic = ScriptedPolicy(name="policy"), ScriptedPolicy(name="critic")
    result = tpo.optimize(
        "q",
        policy=policy,
        critic=critic,
        reward=reward,
        width=2,
        depth=1,
        critic_temperature=0.1,
        critic_max_tokens=77,
        temperature=0.9,
    )
    assert [r.purpose for r in policy.requests] == ["sample"]
    assert [r.purpose for r in critic.requests] == ["loss", "gradient", "update"]
    assert [r.sampling.temperature for r in critic.requests] == [0.1, 0.1, 0.9]
    assert [r.sampling.max_tokens for r in critic.requests][:2] == [77, 77]
    assert policy.requests[0].sampling.temperature == 0.9
    assert (result.policy, result.critic, result.reward) == ("policy", "critic", "number")


def test_multi_turn_conversation_is_sampled_as_given_and_shown_to_the_critic(policy, reward) -> None:
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
    ]
    result = tpo.optimize(conversation, policy=policy, reward=reward, width=2, depth=1)
    assert policy.requests[0].messages_as_dicts() == conversation
    assert [dict(m) for m in result.messages] == conversation
    loss = policy.requests_for("loss")[0].messages[0].content
    assert "[System instructions]\nBe terse." in loss and "[User]\nAnother?" in loss
    assert all(r.messages == tuple(tpo.Message(**m) for m in conversation) for r in reward.requests)


def test_prompt_metadata_reaches_the_reward_and_the_result(policy: ScriptedPolicy) -> None:
    reward = FunctionReward(lambda m, a: 1.0)
    prompt = Prompt.of("2+2?", id="sum-1", metadata={"reference": "4"})
    result = tpo.optimize(prompt, policy=policy, reward=reward, width=2, depth=0)
    assert result.prompt_id == "sum-1" and result.metadata == {"reference": "4"}
    assert all(r.metadata == {"reference": "4"} and r.prompt_id == "sum-1" for r in reward.requests)


# --------------------------------------------------------------------------- reward failures


def test_answers_that_cannot_be_scored_are_recorded_and_never_selected(policy: ScriptedPolicy) -> None:
    def score(answer: str) -> float:
        if number_in(answer) in (1, 4, 9):
            raise ValueError(f"cannot judge answer {number_in(answer)}")
        return float(number_in(answer))

    result = tpo.optimize("q", policy=policy, reward=make_reward(score), width=5, depth=2)
    assert result.status == "complete"
    failed = [c for c in result.candidates if c.score is None]
    assert [number_in(c.text) for c in failed] == [1, 4, 9]
    assert failed[0].score_error == "ValueError: cannot judge answer 1"
    assert result.score_failures == 3 and result.usage.reward_failures == 3
    assert result.to_dict()["score_failures"] == 3
    failed_ids = {c.id for c in failed}
    for step in result.steps[1:]:
        assert step.chosen_id not in failed_ids and step.rejected_id not in failed_ids
    assert result.candidate(result.steps[1].chosen_id).text == "Answer 3 to prompt 0."
    assert result.best_id not in failed_ids
    assert any("could not be scored: ValueError: cannot judge answer 4" in f for f in result.steps[0].failures)


def test_every_answer_failing_to_score_fails_the_prompt_clearly(policy: ScriptedPolicy) -> None:
    def score(answer: str) -> float:
        raise RuntimeError("reward server is down")

    result = tpo.optimize("q", policy=policy, reward=make_reward(score), width=3, depth=2)
    assert result.status == "failed"
    assert result.error == "no answer could be scored: RuntimeError: reward server is down"
    assert result.answer is None and result.score is None and result.best_id is None
    assert len(result.candidates) == 3 and all(c.score is None for c in result.candidates)
    assert [r.purpose for r in policy.requests] == ["sample"]  # no critique of unscored answers


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_rejected(bad: float, policy: ScriptedPolicy) -> None:
    result = tpo.optimize("q", policy=policy, reward=make_reward(lambda a: bad if "1" in a else 1.0), width=3, depth=0)
    broken = result.candidates[1]
    assert broken.score is None
    assert "non-finite" in (broken.score_error or "")
    assert result.best_id == result.candidates[0].id
    json.loads(result.to_json())  # strict JSON: no NaN or Infinity anywhere
    assert "NaN" not in result.to_json() and "Infinity" not in result.to_json()


class _RaisingReward:
    """A reward model whose whole batch call fails on answers of one step."""

    name = "raising"
    batching = False

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        if any("step 1" in r.answer for r in requests):
            raise self.exc
        return [Score(float(number_in(r.answer))) for r in requests]


@pytest.mark.parametrize("exc", [RewardError("rate limited"), KeyError("boom")])
def test_a_reward_model_raising_fails_those_answers_not_the_run(exc: Exception, policy: ScriptedPolicy) -> None:
    result = tpo.optimize("q", policy=policy, reward=_RaisingReward(exc), width=2, depth=2)
    assert result.status == "complete"
    step1 = [c for c in result.candidates if c.step == 1]
    assert len(step1) == 2 and all(c.score is None and c.score_error for c in step1)
    assert "rate limited" in (step1[0].score_error or "") or "KeyError" in (step1[0].score_error or "")
    assert result.usage.reward_failures == 2


def test_a_score_without_value_or_error_is_a_failure_with_a_reason(policy: ScriptedPolicy) -> None:
    reward = make_reward(lambda a: Score(None) if "1" in a else 2.0)
    result = tpo.optimize("q", policy=policy, reward=reward, width=2, depth=0)
    assert result.candidates[1].score is None
    assert result.candidates[1].score_error


# --------------------------------------------------------------------------- backend failures


def _failing_for(prompt_id: str, purpose: str, exc: Exception) -> ScriptedPolicy:
    def reply(request: GenerationRequest) -> list[str]:
        if request.prompt_id == prompt_id and request.purpose == purpose:
            raise exc
        return pure_reply(request)

    return ScriptedPolicy(reply)


@pytest.mark.parametrize(
    "exc", [BackendError("server went away", backend="scripted", status=503), ConnectionError("reset")]
)
def test_backend_failure_fails_that_prompt_only(exc: Exception) -> None:
    policy = _failing_for("1", "update", exc)
    reward = FunctionReward(hash_score)
    results = {
        r.prompt_id: r for r in tpo.optimize_many(["a", "b", "c"], policy=policy, reward=reward, width=3, depth=2)
    }

    assert {k: r.status for k, r in results.items()} == {"0": "complete", "1": "failed", "2": "complete"}
    failed = results["1"]
    assert failed.error is not None and failed.error.startswith("BackendError: ")
    assert ("server went away" in failed.error) or ("ConnectionError: reset" in failed.error)
    # What was computed before the failure is kept: the samples, scored, and the best of them.
    assert len(failed.candidates) == 3 and [s.step for s in failed.steps] == [0]
    assert failed.answer is not None and failed.best_id == max(failed.candidates, key=lambda c: c.score or 0).id
    assert failed.usage.policy_calls == 3  # sample, loss, gradient; the update call failed
    for ok in ("0", "2"):
        assert len(results[ok].candidates) == 9 and len(results[ok].steps) == 3
    json.loads(failed.to_json())


def test_backend_failure_at_the_first_call_gives_a_failed_result_with_no_answer() -> None:
    policy = _failing_for("0", "sample", BackendError("no such model"))
    result = tpo.optimize("q", policy=policy, reward=FunctionReward(hash_score), width=2, depth=1)
    assert result.status == "failed"
    assert result.error == "BackendError: no such model"
    assert result.candidates == () and result.steps == () and result.answer is None


def test_a_backend_returning_the_wrong_number_of_generations_is_a_backend_error() -> None:
    class Short:
        name, batching, supports_n, supports_logprobs = "short", False, True, False

        async def generate(self, requests: Sequence[GenerationRequest]) -> list[tpo.Generation]:
            return []

    result = tpo.optimize("q", policy=Short(), reward=FunctionReward(hash_score), width=2, depth=1)
    assert result.status == "failed"
    assert "returned 0 results for 1 requests" in (result.error or "")


def test_fewer_samples_than_asked_are_recorded(reward: FunctionReward) -> None:
    def reply(request: GenerationRequest) -> list[str]:
        return ["Answer 1"] if request.purpose == "sample" else pure_reply(request)

    result = tpo.optimize("q", policy=ScriptedPolicy(reply), reward=reward, width=3, depth=0)
    assert result.steps[0].failures == ("the backend returned 1 of 3 samples",)


# --------------------------------------------------------------------------- many prompts at once


def test_a_slow_prompt_does_not_hold_up_the_others() -> None:
    # Two groups of prompts whose calls differ tenfold: 0.015 s for even ids, 0.15 s for odd ones.
    # A chain is 7 calls (D=2), so a fast chain takes about 0.1 s and a slow one about 1 s: a gap
    # that no scheduling hiccup on a busy machine closes.
    fast_s, slow_s, calls_per_chain, prompts = 0.015, 0.15, 7, 60

    def latency(request: GenerationRequest) -> float:
        return fast_s if int(request.prompt_id) % 2 == 0 else slow_s

    policy = ScriptedPolicy(pure_reply, latency_s=latency)
    started = time.perf_counter()
    order = [
        r.prompt_id
        for r in tpo.optimize_many(
            [f"q{i}" for i in range(prompts)], policy=policy, reward=FunctionReward(hash_score), width=5, depth=2
        )
    ]
    wall_s = time.perf_counter() - started

    assert sorted(order, key=int) == [str(i) for i in range(prompts)]
    assert len(policy.calls) == prompts * calls_per_chain
    # Results stream in the order chains finish: every fast prompt before any slow one, so none
    # of them waited for a slow chain.
    fast = {str(i) for i in range(0, prompts, 2)}
    assert set(order[: len(fast)]) == fast
    # The chains ran side by side: the run takes about one slow chain (it cannot take less),
    # nowhere near the chains one after another.
    slowest_chain_s = calls_per_chain * slow_s
    sum_of_chains_s = prompts // 2 * calls_per_chain * (fast_s + slow_s)
    assert slowest_chain_s <= wall_s < sum_of_chains_s / 5, (wall_s, slowest_chain_s, sum_of_chains_s)


@pytest.mark.parametrize("batched_reward", [False, True])
def test_a_batching_backend_gets_every_prompts_requests_of_a_step_in_one_call(batched_reward: bool) -> None:
    depth, prompts = 2, 100
    policy = ScriptedPolicy(pure_reply, batching=True)
    if batched_reward:
        reward = FunctionReward(lambda ms, answers: [hash_score((), a) for a in answers], batched=True)
    else:
        reward = FunctionReward(hash_score)
    results = list(
        tpo.optimize_many([f"q{i}" for i in range(prompts)], policy=policy, reward=reward, width=5, depth=depth)
    )

    assert all(r.status == "complete" for r in results)
    assert len(policy.calls) == 1 + 3 * depth
    assert [len(call) for call in policy.calls] == [prompts] * (1 + 3 * depth)
    for call in policy.calls:
        assert len({r.purpose for r in call}) == 1 and len({r.prompt_id for r in call}) == prompts
    if batched_reward:
        assert len(reward.calls) == 1 + depth
        assert [len(c) for c in reward.calls] == [5 * prompts] * (1 + depth)


@pytest.mark.parametrize("batched_reward", [False, True])
def test_batches_stay_whole_when_prompts_have_different_amounts_to_score(batched_reward: bool) -> None:
    # Some prompts' rewrites repeat an earlier answer (nothing new to score), some come back
    # empty or all the same (one answer to score), the rest are all new: the chains take
    # different paths through scoring, yet each step's requests still go out in one call.
    def reply(request: GenerationRequest) -> list[str]:
        kind = int(request.prompt_id) % 4
        if request.purpose != "update":
            return pure_reply(request)
        if kind == 0:
            return [f"<{TAG}>Same for {request.prompt_id}</{TAG}>"] * request.n
        if kind == 1:
            return [f"<{TAG}>One {request.step}</{TAG}>"] + [""] * (request.n - 1)
        if kind == 2:
            return [""] * request.n
        return [f"<{TAG}>Rewrite {i} at {request.step}</{TAG}>" for i in range(request.n)]

    depth, prompts = 3, 40
    policy = ScriptedPolicy(reply, batching=True)
    if batched_reward:
        reward = FunctionReward(lambda ms, answers: [hash_score((), a) for a in answers], batched=True)
    else:
        reward = FunctionReward(hash_score)
    results = list(
        tpo.optimize_many([f"q{i}" for i in range(prompts)], policy=policy, reward=reward, width=3, depth=depth)
    )
    assert all(r.status == "complete" and len(r.steps) == depth + 1 for r in results)
    assert [len(call) for call in policy.calls] == [prompts] * (1 + 3 * depth)


def test_max_concurrent_prompts_bounds_the_work_in_flight() -> None:
    policy = ScriptedPolicy(pure_reply, batching=True)
    results = list(
        tpo.optimize_many(
            [f"q{i}" for i in range(10)],
            policy=policy,
            reward=FunctionReward(hash_score),
            width=2,
            depth=1,
            max_concurrent_prompts=3,
        )
    )
    assert len(results) == 10
    assert max(len(call) for call in policy.calls) <= 3


# --------------------------------------------------------------------------- seeds


def test_every_call_gets_its_derived_seed() -> None:
    policy = ScriptedPolicy(pure_reply)
    results = list(
        tpo.optimize_many(["a", "b"], policy=policy, reward=FunctionReward(hash_score), width=2, depth=2, seed=1234)
    )
    for r in policy.requests:
        assert r.sampling.seed == tpo.derive_seed(1234, r.prompt_id, r.step, r.purpose)
    seeds = [r.sampling.seed for r in policy.requests]
    assert len(set(seeds)) == len(seeds)  # per prompt, step and role
    for result in results:
        assert result.seed == 1234 and result.config["seed"] == 1234


def test_derive_seed_is_stable_across_versions() -> None:
    # Pinned: changing the derivation would silently change every published run's samples.
    assert tpo.derive_seed(0, "0", 0, "sample") == 1839525722
    assert tpo.derive_seed(0, "0", 1, "loss") == 1749793080
    assert tpo.derive_seed(7, "prompt-a", 2, "update") == tpo.derive_seed(7, "prompt-a", 2, "update")
    assert tpo.derive_seed(7, "prompt-a", 2, "update") != tpo.derive_seed(8, "prompt-a", 2, "update")
    assert 0 <= tpo.derive_seed(2**62, "x" * 1000, 10**6, "gradient") < 2**31


def test_same_seed_gives_the_same_result_and_another_seed_does_not() -> None:
    def run(seed: int) -> dict:
        result = tpo.optimize(
            "q", policy=ScriptedPolicy(pure_reply), reward=FunctionReward(hash_score), width=4, depth=2, seed=seed
        )
        return strip_timings(result.to_dict())

    a, b, c = run(5), run(5), run(6)
    assert json.dumps(a) == json.dumps(b)
    assert a != c and a["seed"] == 5 and c["seed"] == 6


def test_result_records_the_resolved_configuration(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    result = tpo.optimize("q", policy=policy, reward=reward, width=3, depth=1, temperature=0.3, seed=9)
    config = TPOConfig(width=3, depth=1, temperature=0.3, seed=9)
    assert result.config == config.to_dict()
    assert TPOConfig.from_dict(dict(result.config)) == config
    assert result.config["prompts"]["update"] == tpo.DEFAULT_PROMPTS.update


# --------------------------------------------------------------------------- progress and resume


def test_on_step_gets_a_partial_result_after_every_step(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    seen: list[TPOResult] = []
    final = tpo.optimize("q", policy=policy, reward=reward, width=3, depth=2, on_step=seen.append)
    assert [r.status for r in seen] == ["partial"] * 3
    assert [len(r.steps) for r in seen] == [1, 2, 3]
    assert [len(r.candidates) for r in seen] == [3, 6, 9]
    assert seen[0].answer == "Answer 2 to prompt 0." and seen[-1].answer == final.answer
    assert final.status == "complete"


def test_an_async_on_step_callback_is_awaited(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    seen: list[int] = []

    async def on_step(result: TPOResult) -> None:
        await asyncio.sleep(0)
        seen.append(len(result.steps))

    tpo.optimize("q", policy=policy, reward=reward, width=2, depth=2, on_step=on_step)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("through_json", [False, True])
def test_resume_continues_from_the_next_step_and_matches_an_uninterrupted_run(through_json: bool) -> None:
    reward = FunctionReward(hash_score)
    partials: list[TPOResult] = []
    full = tpo.optimize(
        "q", policy=ScriptedPolicy(pure_reply), reward=reward, width=4, depth=3, seed=3, on_step=partials.append
    )
    checkpoint = partials[1]  # after step 1
    assert checkpoint.status == "partial" and len(checkpoint.steps) == 2
    if through_json:
        checkpoint = TPOResult.from_dict(json.loads(checkpoint.to_json()))

    policy, reward2 = ScriptedPolicy(pure_reply), FunctionReward(hash_score)
    resumed = tpo.optimize("q", policy=policy, reward=reward2, width=4, depth=3, seed=3, resume=checkpoint)

    assert [(r.purpose, r.step) for r in policy.requests] == [
        ("loss", 2),
        ("gradient", 2),
        ("update", 2),
        ("loss", 3),
        ("gradient", 3),
        ("update", 3),
    ]
    assert len(reward2.requests) == 8
    assert resumed.status == "complete"
    assert strip_timings(resumed.to_dict()) == strip_timings(full.to_dict())
    assert resumed.usage.wall_time_s >= checkpoint.usage.wall_time_s


def test_resume_through_optimize_many(reward: FunctionReward) -> None:
    partials: dict[str, TPOResult] = {}

    def keep_first_step(result: TPOResult) -> None:
        if len(result.steps) == 1:
            partials[result.prompt_id] = result

    full = {
        r.prompt_id: r
        for r in tpo.optimize_many(
            ["a", "b"],
            policy=ScriptedPolicy(pure_reply),
            reward=FunctionReward(hash_score),
            width=2,
            depth=2,
            on_step=keep_first_step,
        )
    }
    policy = ScriptedPolicy(pure_reply)
    resumed = {
        r.prompt_id: r
        for r in tpo.optimize_many(
            ["a", "b"], policy=policy, reward=FunctionReward(hash_score), width=2, depth=2, resume={"0": partials["0"]}
        )
    }
    assert [r.purpose for r in policy.requests if r.prompt_id == "0"] == ["loss", "gradient", "update"] * 2
    assert next(r.purpose for r in policy.requests if r.prompt_id == "1") == "sample"
    for pid in ("0", "1"):
        assert strip_timings(resumed[pid].to_dict()) == strip_timings(full[pid].to_dict())


def test_resuming_a_complete_result_does_no_work(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    done = tpo.optimize("q", policy=policy, reward=reward, width=2, depth=1)
    again = ScriptedPolicy()
    assert tpo.optimize("q", policy=again, reward=reward, width=2, depth=1, resume=done) == done
    assert again.calls == []


def test_resuming_a_failed_result_starts_again() -> None:
    failed = tpo.optimize(
        "q", policy=_failing_for("0", "loss", BackendError("down")), reward=FunctionReward(hash_score), width=2, depth=1
    )
    assert failed.status == "failed"
    policy = ScriptedPolicy(pure_reply)
    result = tpo.optimize("q", policy=policy, reward=FunctionReward(hash_score), width=2, depth=1, resume=failed)
    assert result.status == "complete" and policy.requests[0].purpose == "sample"


def test_resuming_with_another_conversation_is_refused(policy: ScriptedPolicy, reward: FunctionReward) -> None:
    partials: list[TPOResult] = []
    tpo.optimize("first question", policy=policy, reward=reward, width=2, depth=1, on_step=partials.append)
    with pytest.raises(tpo.InputError, match="different conversation"):
        tpo.optimize("second question", policy=ScriptedPolicy(), reward=reward, width=2, depth=1, resume=partials[0])


# --------------------------------------------------------------------------- one answer's scoring failure


class _OneAtATimeReward:
    """A non-batching reward model that raises for one answer, as an HTTP reward whose server refuses it."""

    name = "one-at-a-time"
    batching = False

    def __init__(self, refuse: str, exc: type[Exception]) -> None:
        self.refuse, self.exc = refuse, exc
        self.calls: list[list[ScoreRequest]] = []

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        self.calls.append(list(requests))
        (request,) = requests
        if self.refuse in request.answer:
            raise self.exc(f"server refused {request.answer!r}")
        return [Score(float(number_in(request.answer)))]


@pytest.mark.parametrize("exc", [RewardError, ValueError])
def test_a_non_batching_reward_raising_for_one_answer_fails_only_that_answer(exc: type[Exception]) -> None:
    reward = _OneAtATimeReward("Answer 2 ", exc)
    result = tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=5, depth=1)

    assert all(len(call) == 1 for call in reward.calls)  # called one answer at a time, as it asks
    assert result.status == "complete", result.error
    by_number = {number_in(c.text): c for c in result.candidates}
    refused = by_number.pop(2)
    assert refused.score is None and "server refused 'Answer 2 to prompt 0.'" in (refused.score_error or "")
    assert all(c.score == float(n) for n, c in by_number.items())  # the other answers of the call kept their scores
    assert len(result.candidates) == 10 and result.usage.reward_failures == 1
    assert result.answer == "Improved answer 11 (step 1) to prompt 0."


def test_a_batching_reward_raising_fails_the_answers_of_that_call() -> None:
    class Batched(_OneAtATimeReward):
        batching = True

        async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
            self.calls.append(list(requests))
            if any(self.refuse in r.answer for r in requests):
                raise RewardError("the batch was refused")
            return [Score(float(number_in(r.answer))) for r in requests]

    reward = Batched("Answer 2 ", RewardError)
    results = {
        r.prompt_id: r for r in tpo.optimize_many(["a", "b"], policy=ScriptedPolicy(), reward=reward, width=3, depth=0)
    }
    assert [len(call) for call in reward.calls] == [6]  # both prompts' samples in one call
    assert all(
        c.score is None and c.score_error == "the batch was refused" for r in results.values() for c in r.candidates
    )


def test_submit_many_keeps_run_errors_per_item_and_lets_cancellation_and_user_errors_through() -> None:
    from tpo.engine._dispatch import Dispatcher

    async def call(items: Sequence[str]) -> list[str]:
        (item,) = items
        if item == "refused":
            raise RewardError("refused")
        if item == "broken":
            raise KeyError("broken")
        if item == "cancelled":
            raise asyncio.CancelledError
        if item == "misconfigured":
            raise tpo.ConfigError("misconfigured")
        return [item.upper()]

    async def main() -> None:
        d: Dispatcher[str, str] = Dispatcher(call, batching=False, label="reward model test", error=RewardError)
        out = await d.submit_many(["a", "refused", "b", "broken"])
        assert out[0] == "A" and out[2] == "B"
        assert isinstance(out[1], RewardError) and str(out[1]) == "refused"
        assert isinstance(out[3], RewardError) and "KeyError" in str(out[3])
        with pytest.raises(asyncio.CancelledError):
            await d.submit_many(["a", "cancelled"])
        with pytest.raises(tpo.ConfigError, match="misconfigured"):
            await d.submit_many(["misconfigured", "a"])

    asyncio.run(main())


# --------------------------------------------------------------------------- preparing an engine


class _SlowWindow(ScriptedPolicy):
    """A backend whose context window takes a round trip to learn, and may fail the first time."""

    def __init__(self, *, fail_first: bool = False) -> None:
        super().__init__(pure_reply)
        self.fail_first = fail_first
        self.lookups = 0

    async def context_window(self) -> int | None:
        self.lookups += 1
        await asyncio.sleep(0.01)
        if self.fail_first and self.lookups == 1:
            raise BackendError("the server is still starting")
        return 8192


def test_concurrent_calls_on_a_fresh_engine_share_one_preparation() -> None:
    policy = _SlowWindow()
    engine = tpo.Engine(policy, FunctionReward(hash_score), config=TPOConfig(width=2, depth=1))

    async def main() -> list[TPOResult]:
        return list(
            await asyncio.gather(
                engine.optimize("a", id="a"), engine.optimize("b", id="b"), engine.optimize("c", id="c")
            )
        )

    results = asyncio.run(main())
    assert [r.status for r in results] == ["complete"] * 3, [r.error for r in results]
    assert policy.lookups == 1


def test_a_failed_preparation_is_tried_again_by_the_next_call() -> None:
    policy = _SlowWindow(fail_first=True)
    engine = tpo.Engine(policy, FunctionReward(hash_score), config=TPOConfig(width=2, depth=1))

    async def main() -> TPOResult:
        with pytest.raises(BackendError, match="still starting"):
            await engine.optimize("a")
        return await engine.optimize("a")

    result = asyncio.run(main())
    assert result.status == "complete", result.error
    assert policy.lookups == 2
    assert [r.purpose for r in policy.requests] == ["sample", "loss", "gradient", "update"]


# --------------------------------------------------------------------------- one prompt's problems


def test_a_resume_of_another_conversation_fails_only_that_prompt() -> None:
    partials: list[TPOResult] = []
    tpo.optimize(
        "another question",
        policy=ScriptedPolicy(pure_reply),
        reward=FunctionReward(hash_score),
        width=2,
        depth=1,
        on_step=partials.append,
    )
    policy = ScriptedPolicy(pure_reply)
    results = {
        r.prompt_id: r
        for r in tpo.optimize_many(
            ["a", "b", "c"],
            policy=policy,
            reward=FunctionReward(hash_score),
            width=2,
            depth=1,
            resume={"1": partials[0]},
        )
    }
    assert {k: r.status for k, r in results.items()} == {"0": "complete", "1": "failed", "2": "complete"}
    assert results["1"].error == (
        "InputError: prompt '1': the result to resume from belongs to a different conversation (prompt '0')"
    )
    assert results["1"].candidates == () and results["1"].answer is None
    assert all(r.prompt_id != "1" for r in policy.requests)
    json.loads(results["1"].to_json())


def test_a_conversation_that_cannot_be_made_to_fit_fails_only_that_prompt() -> None:
    # 401 turns: the chat-template allowance per message alone exceeds the window.
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(401)]
    policy = ScriptedPolicy(pure_reply, window=2048)
    results = {
        r.prompt_id: r
        for r in tpo.optimize_many(
            ["a", turns, "c"], policy=policy, reward=FunctionReward(hash_score), width=2, depth=1
        )
    }
    assert {k: r.status for k, r in results.items()} == {"0": "complete", "1": "failed", "2": "complete"}
    assert (results["1"].error or "").startswith(
        "InputError: prompt '1': a request does not fit the context window of 2048 tokens"
    )
    assert policy.violations == []
    assert all(r.prompt_id != "1" for r in policy.requests)


def test_a_user_error_from_a_backend_is_not_mistaken_for_one_prompts_failure() -> None:
    def reply(request: GenerationRequest) -> list[str]:
        if request.prompt_id == "1":
            raise tpo.ConfigError("the backend was set up wrongly")
        return pure_reply(request)

    with pytest.raises(tpo.ConfigError, match="set up wrongly"):
        list(
            tpo.optimize_many(
                ["a", "b", "c"], policy=ScriptedPolicy(reply), reward=FunctionReward(hash_score), width=2, depth=1
            )
        )


# --------------------------------------------------------------------------- batch caps


def test_max_batch_size_caps_every_call_of_a_batching_backend_and_reward() -> None:
    policy = ScriptedPolicy(pure_reply, batching=True, max_batch_size=7)
    reward = FunctionReward(lambda ms, answers: [hash_score((), a) for a in answers], batched=True, max_batch_size=11)
    results = list(tpo.optimize_many([f"q{i}" for i in range(20)], policy=policy, reward=reward, width=3, depth=1))

    assert all(r.status == "complete" for r in results)
    assert max(len(call) for call in policy.calls) == 7
    assert sum(len(call) for call in policy.calls) == 20 * 4
    assert [len(call) for call in policy.calls[:3]] == [7, 7, 6]  # the 20 samples: full calls first
    assert max(len(call) for call in reward.calls) == 11
    assert sum(len(call) for call in reward.calls) == 20 * 6


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_a_bad_max_batch_size_is_a_config_error(bad: object) -> None:
    policy = ScriptedPolicy(batching=True)
    policy.max_batch_size = bad  # type: ignore[assignment]
    with pytest.raises(tpo.ConfigError, match="policy scripted: max_batch_size must be a positive integer or None"):
        tpo.Engine(policy, FunctionReward(hash_score))
    reward = FunctionReward(hash_score, name="fn")
    reward.max_batch_size = bad  # type: ignore[assignment]
    with pytest.raises(tpo.ConfigError, match="reward fn: max_batch_size"):
        tpo.Engine(ScriptedPolicy(), reward)


# --------------------------------------------------------------------------- progress costs nothing unasked


def test_partial_results_are_built_only_for_an_on_step_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    # A partial result holds the whole configuration, templates included: not worth building unread.
    built: list[int] = []
    original = TPOConfig.to_dict

    def counting(self: TPOConfig) -> dict:
        built.append(1)
        return original(self)

    monkeypatch.setattr(TPOConfig, "to_dict", counting)
    tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(hash_score), width=2, depth=3)
    assert len(built) == 1  # the final result only
    built.clear()
    seen: list[TPOResult] = []
    tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(hash_score), width=2, depth=3, on_step=seen.append)
    assert len(seen) == 4 and len(built) == 4 + 1


# --------------------------------------------------------------------------- the reward model's details


class _Opaque:
    def __str__(self) -> str:
        return "an opaque object"


def test_the_reward_models_details_are_kept_json_safe_with_each_candidate() -> None:
    def score(messages: object, answer: str) -> Score:
        n = number_in(answer)
        if n == 1:
            return Score.failed("the judge gave no rating", {"reply": "I cannot say."})
        return Score(
            float(n),
            details={
                "rating": n,
                "components": {"length": (1, 2.5)},
                3: _Opaque(),
                "nan": math.nan,
                "ok": True,
                "none": None,
            },
        )

    result = tpo.optimize("q", policy=ScriptedPolicy(), reward=FunctionReward(score), width=2, depth=0)
    scored, failed = result.candidates
    assert scored.score_details == {
        "rating": 0,
        "components": {"length": [1, 2.5]},
        "3": "an opaque object",
        "nan": "nan",
        "ok": True,
        "none": None,
    }
    assert failed.score is None and failed.score_details == {"reply": "I cannot say."}
    text = result.to_json()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["candidates"][0]["score_details"]["components"] == {"length": [1, 2.5]}
    assert TPOResult.from_dict(data) == result


def test_a_non_finite_score_keeps_its_details() -> None:
    reward = FunctionReward(lambda m, a: Score(math.inf, details={"raw": "inf from the server"}))
    result = tpo.optimize("q", policy=ScriptedPolicy(), reward=reward, width=1, depth=0)
    (c,) = result.candidates
    assert c.score is None and "non-finite" in (c.score_error or "")
    assert c.score_details == {"raw": "inf from the server"}
