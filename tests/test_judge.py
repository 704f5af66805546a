"""The LLM-judge reward with scripted policies: prompts, parsing, expected ratings, retries, batching, fitting."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

import tpo
from conftest import TAG
from tpo import ConfigError, Generation, GenerationRequest, Message, PromptTemplateError, ScoreRequest, TokenLogprob
from tpo.registry import reward_from_spec
from tpo.rewards.judge import (
    DEFAULT_RUBRIC,
    JUDGE_EXAMPLES,
    JudgeReward,
    expected_rating,
    parse_rating,
)
from tpo.testing import ScriptedPolicy, default_reply

QUESTION = (Message("user", "Why is the sky blue?"),)


def ask(reward: JudgeReward, answers: Sequence[str], *, prompt_id: str = "p") -> list[tpo.Score]:
    return asyncio.run(reward.score([ScoreRequest(QUESTION, a, prompt_id=prompt_id) for a in answers]))


def lp(token: str, p: float, top: dict[str, float] | None = None) -> TokenLogprob:
    """A generated token with probability ``p`` and alternatives given as probabilities."""
    alternatives = {token: p, **(top or {})}
    return TokenLogprob(token, math.log(p), tuple((t, math.log(q)) for t, q in alternatives.items()))


class LogprobPolicy(ScriptedPolicy):
    """A scripted policy that also returns log-probabilities, built from each reply's text."""

    def __init__(
        self, replies: object, logprobs_for: Callable[[str], tuple[TokenLogprob, ...]], **kwargs: object
    ) -> None:
        super().__init__(replies, supports_logprobs=True, **kwargs)  # type: ignore[arg-type]
        self._logprobs_for = logprobs_for

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        gens = await super().generate(requests)
        return [
            replace(g, logprobs=tuple(self._logprobs_for(t) for t in g.texts)) if r.logprobs else g
            for g, r in zip(gens, requests, strict=True)
        ]


# ---------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Rating: 7", 7),
        ("rating: 10", 10),
        ("Rating:3\nThe reply is vague.", 3),
        ("Rating: **9**", 9),
        ("I would give it 8/10.", 8),
        ("Overall 6 out of 10", 6),
        ("  5. ", 5),
        ("The answer lists 3 reasons. Rating: 4", 4),
    ],
)
def test_parse_rating_accepts_the_usual_forms(reply: str, rating: int) -> None:
    m = parse_rating(reply)
    assert m is not None and int(m.group(1)) == rating


@pytest.mark.parametrize("reply", ["Rating: N", "Rating: 0", "Rating: 11", "The reply has 3 good points.", "", "12/10"])
def test_parse_rating_rejects_replies_without_a_rating(reply: str) -> None:
    assert parse_rating(reply) is None


# ---------------------------------------------------------------------- expected rating


def test_expected_rating_renormalises_over_the_score_tokens() -> None:
    tokens = (lp("Rating", 0.9), lp(":", 0.99), lp(" 7", 0.5, {" 8": 0.3, " 3": 0.1, " the": 0.1}))
    found = expected_rating(tokens)
    assert found is not None
    value, probs = found
    assert value == pytest.approx((7 * 0.5 + 8 * 0.3 + 3 * 0.1) / 0.9, abs=1e-12)
    assert probs == pytest.approx({3: 0.1 / 0.9, 7: 0.5 / 0.9, 8: 0.3 / 0.9})


def test_expected_rating_sums_spellings_of_the_same_number() -> None:
    tokens = (lp("Rating:", 0.9), lp(" 6", 0.4, {"6": 0.2, " 2": 0.4}))
    value, probs = expected_rating(tokens) or (None, {})
    assert probs == pytest.approx({2: 0.4, 6: 0.6})
    assert value == pytest.approx(2 * 0.4 + 6 * 0.6)


def test_ten_written_as_one_then_zero_uses_the_next_position() -> None:
    # "1" has 0.6 at the rating position; after it, "0" has 0.75 and a newline 0.25.
    tokens = (lp("Rating", 0.9), lp(":", 0.9), lp(" 1", 0.6, {" 9": 0.4}), lp("0", 0.75, {"\n": 0.25}))
    value, probs = expected_rating(tokens) or (None, {})
    assert probs == pytest.approx({1: 0.15, 9: 0.4, 10: 0.45})
    assert value == pytest.approx(1 * 0.15 + 9 * 0.4 + 10 * 0.45)


def test_a_one_that_ends_the_reply_means_one() -> None:
    tokens = (lp("Rating:", 0.9), lp(" 1", 0.7, {" 2": 0.3}))
    _, probs = expected_rating(tokens) or (None, {})
    assert probs == pytest.approx({1: 0.7, 2: 0.3})


def test_a_single_ten_token_makes_one_mean_one() -> None:
    tokens = (lp("Rating:", 0.9), lp(" 10", 0.5, {" 1": 0.2, " 9": 0.3}))
    value, probs = expected_rating(tokens) or (None, {})
    assert probs == pytest.approx({1: 0.2, 9: 0.3, 10: 0.5})
    assert value == pytest.approx(0.2 + 2.7 + 5.0)


def test_an_unobserved_one_is_split_evenly_between_one_and_ten() -> None:
    tokens = (lp("Rating:", 0.9), lp(" 8", 0.6, {" 1": 0.4}))
    value, probs = expected_rating(tokens) or (None, {})
    assert probs == pytest.approx({1: 0.2, 8: 0.6, 10: 0.2})
    assert value == pytest.approx(0.2 + 4.8 + 2.0)


def test_expected_rating_needs_the_number_to_start_a_token() -> None:
    assert expected_rating((lp("Rating:7", 0.9),)) is None
    assert expected_rating((lp("No", 0.9), lp(" idea", 0.9))) is None


# ---------------------------------------------------------------------- the reward


def test_parsed_rating_without_logprobs_and_the_request_it_sends() -> None:
    policy = ScriptedPolicy(["Rating: 7"])
    reward = JudgeReward(policy)
    [score] = ask(reward, ["Rayleigh scattering."])
    assert score.value == 7.0 and score.error is None
    assert score.details is not None and score.details["method"] == "parsed" and score.details["attempts"] == 1
    [request] = policy.requests
    assert request.purpose == "judge" and request.n == 1 and request.logprobs is None
    assert request.sampling.temperature <= 0.3 and request.sampling.max_tokens <= 32
    text = "\n".join(m.content for m in request.messages)
    assert DEFAULT_RUBRIC in text
    assert "Rayleigh scattering." in request.messages[-1].content
    assert "Why is the sky blue?" in request.messages[-1].content
    assert "Rating:" in text


def test_the_examples_come_first_as_earlier_turns() -> None:
    policy = ScriptedPolicy(["Rating: 5", "Rating: 5"])
    ask(JudgeReward(policy), ["an answer"])
    ask(JudgeReward(policy, examples=False), ["an answer"])
    with_examples, without = policy.requests
    assert [m.role for m in with_examples.messages] == ["user", "assistant"] * len(JUDGE_EXAMPLES) + ["user"]
    assert [m.content for m in with_examples.messages[1::2]] == [f"Rating: {r}" for _, _, r in JUDGE_EXAMPLES]
    assert len(without.messages) == 1
    assert DEFAULT_RUBRIC in without.messages[0].content and "an answer" in without.messages[0].content


def test_every_answer_of_a_prompt_shares_the_same_prompt_prefix() -> None:
    policy = ScriptedPolicy(["Rating: 5", "Rating: 6"])
    ask(JudgeReward(policy), ["first answer", "second answer"])
    a, b = policy.requests
    assert a.messages[:-1] == b.messages[:-1]


def test_expected_rating_with_logprobs() -> None:
    def logprobs_for(text: str) -> tuple[TokenLogprob, ...]:
        return (lp("Rating", 0.9), lp(":", 0.9), lp(" 8", 0.5, {" 6": 0.5}))

    policy = LogprobPolicy(["Rating: 8"], logprobs_for)
    [score] = ask(JudgeReward(policy, top_logprobs=5), ["answer"])
    assert score.value == pytest.approx(7.0)
    assert score.details is not None and score.details["method"] == "logprobs"
    assert score.details["probabilities"] == {"6": 0.5, "8": 0.5}
    assert policy.requests[0].logprobs == 5


def test_logprobs_that_do_not_line_up_fall_back_to_the_parsed_number() -> None:
    policy = LogprobPolicy(["Rating: 8"], lambda text: (lp("garbage", 0.5),))
    [score] = ask(JudgeReward(policy), ["answer"])
    assert score.value == 8.0
    assert score.details is not None and score.details["method"] == "parsed" and score.details["logprobs_unusable"]


def test_an_unparseable_reply_is_asked_again_with_another_seed() -> None:
    policy = ScriptedPolicy(["I cannot judge that.", "Rating: 6"])
    reward = JudgeReward(policy)
    [score] = ask(reward, ["answer"])
    assert score.value == 6.0
    assert score.details is not None and score.details["attempts"] == 2
    first, second = policy.requests
    assert first.messages == second.messages
    assert first.sampling.seed != second.sampling.seed
    assert second.sampling.temperature == reward.retry_temperature


def test_two_unparseable_replies_record_a_failure_with_the_replies() -> None:
    policy = ScriptedPolicy(["I cannot judge that.", "Still no."])
    [score] = ask(JudgeReward(policy), ["answer"])
    assert score.value is None and score.error is not None and "no rating" in score.error
    assert score.details == {"reply": "Still no.", "replies": ["I cannot judge that.", "Still no."], "attempts": 2}


def test_prefer_replaces_the_rubric() -> None:
    policy = ScriptedPolicy(["Rating: 4"])
    reward = JudgeReward(policy, prefer="Answers in one short sentence, with no jargon.")
    ask(reward, ["answer"])
    text = policy.requests[0].messages[0].content
    assert "Answers in one short sentence, with no jargon." in text
    assert DEFAULT_RUBRIC not in text


def test_custom_instructions_and_case_templates() -> None:
    policy = ScriptedPolicy(["Rating: 4"])
    reward = JudgeReward(
        policy, instructions="Criteria: {{rubric}}", case="Q={{conversation}} A={{answer}}", examples=False
    )
    ask(reward, ["42"])
    assert policy.requests[0].messages[0].content == f"Criteria: {DEFAULT_RUBRIC}\n\nQ=Why is the sky blue? A=42"
    with pytest.raises(PromptTemplateError, match="rubric"):
        JudgeReward(policy, instructions="no placeholder")
    with pytest.raises(PromptTemplateError, match="unknown: chosen"):
        JudgeReward(policy, case="{{conversation}} {{answer}} {{chosen}}")


def test_answers_that_contain_placeholders_stay_text() -> None:
    policy = ScriptedPolicy(["Rating: 4"])
    ask(JudgeReward(policy), ["Use {{rubric}} and {{answer}} literally."])
    assert "Use {{rubric}} and {{answer}} literally." in policy.requests[0].messages[-1].content


def test_a_batching_backend_gets_every_judge_prompt_in_one_call() -> None:
    replies = ["Rating: 3", "nothing", "Rating: 9", "Rating: 5", "nope", "Rating: 2", "Rating: 7"]
    policy = ScriptedPolicy(replies, batching=True)
    reward = JudgeReward(policy)
    assert reward.batching is True
    scores = ask(reward, [f"answer {i}" for i in range(5)])
    assert [s.value for s in scores] == [3.0, 2.0, 9.0, 5.0, 7.0]
    assert [len(call) for call in policy.calls] == [5, 2]  # all five, then the two retries together
    assert all(r.purpose == "judge" for r in policy.requests)


def test_a_batch_cap_of_the_backend_is_kept_and_passed_on() -> None:
    policy = ScriptedPolicy(lambda r: "Rating: 5", batching=True, max_batch_size=2)
    reward = JudgeReward(policy)
    assert reward.max_batch_size == 2
    ask(reward, ["a", "b", "c", "d", "e"])
    assert [len(call) for call in policy.calls] == [2, 2, 1]


def test_a_concurrent_backend_gets_one_request_per_call() -> None:
    policy = ScriptedPolicy(lambda r: "Rating: 5", batching=False)
    reward = JudgeReward(policy)
    assert reward.batching is False
    ask(reward, ["a", "b", "c"])
    assert [len(call) for call in policy.calls] == [1, 1, 1]


def test_seeds_depend_on_the_answer_and_repeat_across_runs() -> None:
    policy = ScriptedPolicy(lambda r: "Rating: 5")
    reward = JudgeReward(policy)
    ask(reward, ["a", "b"])
    ask(reward, ["a"])
    a1, b1, a2 = (r.sampling.seed for r in policy.requests)
    assert a1 == a2 and a1 != b1
    ask(JudgeReward(policy, seed=1), ["a"])
    assert policy.requests[-1].sampling.seed != a1


def test_a_long_answer_is_shortened_visibly_to_fit_the_window() -> None:
    policy = ScriptedPolicy(lambda r: "Rating: 6", window=2048)  # the double fails any request that does not fit
    long_answer = "The sky scatters blue light. " * 7000  # 200,000 characters
    [score] = ask(JudgeReward(policy), [long_answer])
    assert policy.violations == []
    assert score.value == 6.0
    assert score.details is not None and score.details["truncated"] == ["answer"]
    content = policy.requests[0].messages[-1].content
    assert re.search(r"\[\.\.\. [\d,]+ characters omitted to fit the context window \.\.\.\]", content)
    assert len(content) < 20_000


def test_a_window_too_small_for_the_instructions_fails_the_score_not_the_run() -> None:
    policy = ScriptedPolicy(lambda r: "Rating: 6", window=256)
    reward = JudgeReward(policy, prefer="Be thorough. " * 400)
    [score] = ask(reward, ["answer"])
    assert score.value is None and score.error is not None and "context window" in score.error
    assert policy.requests == []


def test_a_failing_backend_fails_the_scores_without_raising() -> None:
    def broken(request: GenerationRequest) -> str:
        raise tpo.BackendError("server down")

    for batching in (True, False):
        scores = ask(JudgeReward(ScriptedPolicy(broken, batching=batching)), ["a", "b"])
        assert all(s.value is None and s.error is not None and "server down" in s.error for s in scores)


def test_no_requests_means_no_calls() -> None:
    policy = ScriptedPolicy()
    assert ask(JudgeReward(policy), []) == []
    assert policy.calls == []


# ---------------------------------------------------------------------- construction


def test_from_spec_uses_the_given_policy() -> None:
    policy = ScriptedPolicy(name="mine")
    reward = reward_from_spec("judge", policy=policy, prefer="Short answers.", max_tokens=8)
    assert isinstance(reward, JudgeReward)
    assert reward.policy is policy and reward.rubric == "Short answers." and reward.max_tokens == 8
    assert reward.name == "judge:mine"


def test_only_a_judge_that_owns_its_backend_closes_it() -> None:
    class Closable(ScriptedPolicy):
        closes_per_loop = True
        closed = 0

        async def aclose(self) -> None:
            self.closed += 1

    shared, owned = Closable(), Closable()
    borrowed, own = JudgeReward(shared), JudgeReward(owned, owns_policy=True)
    assert borrowed.closes_per_loop is False and own.closes_per_loop is True
    asyncio.run(borrowed.aclose())
    asyncio.run(own.aclose())
    assert (shared.closed, owned.closed) == (0, 1)


def test_from_spec_errors_are_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="needs a model"):
        JudgeReward.from_spec("")
    with pytest.raises(ConfigError, match="judge: unknown option 'temprature'; it takes: prefer, instructions,"):
        JudgeReward.from_spec("", policy=ScriptedPolicy(), temprature=0.1)
    with pytest.raises(ConfigError, match="judge: max_tokens must be an integer >= 1, got 0"):
        JudgeReward.from_spec("", policy=ScriptedPolicy(), max_tokens=0)
    with pytest.raises(ConfigError, match="empty"):
        JudgeReward(ScriptedPolicy(), prefer="  ")
    with pytest.raises(ConfigError, match="backend_options needs a judge backend"):
        JudgeReward.from_spec("", policy=ScriptedPolicy(), backend_options={"n_ctx": 512})


def test_from_spec_with_a_target_builds_another_backend(tmp_path: object) -> None:
    # The judge's own backend is built from its spec: a missing GGUF file is reported as such.
    with pytest.raises(ConfigError, match="does not exist"):
        JudgeReward.from_spec("llamacpp:/nonexistent/judge.gguf", policy=ScriptedPolicy())
    with pytest.raises(ConfigError, match="unknown policy backend"):
        JudgeReward.from_spec("nosuchbackend:model", policy=ScriptedPolicy())


# ---------------------------------------------------------------------- inside the engine


def judged_policy(request: GenerationRequest) -> list[str]:
    """Default replies, and judge ratings equal to the number in the judged answer (capped at 10)."""
    if request.purpose == "judge":
        answer = request.messages[-1].content.rsplit("Reply:", 1)[-1]
        numbers = [int(n) for n in re.findall(r"\d+", answer)]
        return [f"Rating: {min(10, max(1, numbers[0] if numbers else 1))}"]
    return default_reply(request)


def test_the_judge_inside_optimize_end_to_end() -> None:
    policy = ScriptedPolicy(judged_policy, batching=True)
    reward = JudgeReward(policy)
    result = tpo.optimize("Count to ten.", policy=policy, reward=reward, width=3, depth=2, seed=3)
    assert result.status == "complete"
    scored = [c for c in result.candidates if c.score is not None]
    assert len(scored) == len(result.candidates) >= 3
    assert result.score == max(c.score for c in scored)
    judge_requests = policy.requests_for("judge")
    assert len(judge_requests) == len(result.candidates)
    # Each step's answers went to the judge together.
    assert sorted(len(call) for call in policy.calls if call[0].purpose == "judge") == [3, 3, 3]
    for c in result.candidates:
        numbers = [int(n) for n in re.findall(r"\d+", c.text)]
        assert c.score == float(min(10, max(1, numbers[0])))


def test_a_judge_that_never_rates_fails_the_prompt_with_a_clear_error() -> None:
    def never(request: GenerationRequest) -> list[str]:
        return ["I won't."] if request.purpose == "judge" else default_reply(request)

    policy = ScriptedPolicy(never)
    result = tpo.optimize("Hi", policy=policy, reward=JudgeReward(policy), width=2, depth=1)
    assert result.status == "failed"
    assert result.error is not None and "no rating" in result.error


def test_tag_text_in_an_answer_reaches_the_judge_unchanged() -> None:
    answer = f"<{TAG}>x</{TAG}> <SEP> ünïcödé ✓"
    policy = ScriptedPolicy(["Rating: 5"])
    ask(JudgeReward(policy), [answer])
    assert answer in policy.requests[0].messages[-1].content
