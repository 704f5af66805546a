"""The math reward: math-verify against the reference answer in the prompt's metadata."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import tpo
from tpo import ConfigError, Message, Score, ScoreRequest
from tpo.registry import reward_from_spec
from tpo.rewards.verifier import MathReward
from tpo.testing import ScriptedPolicy

pytest.importorskip("math_verify")

QUESTION = (Message("user", "Compute the value."),)


def req(text: str, prompt_id: str = "q1", **metadata: Any) -> ScoreRequest:
    return ScoreRequest(QUESTION, text, metadata, prompt_id)


def values(reward: MathReward, *requests: ScoreRequest) -> list[float | None]:
    return [s.value for s in asyncio.run(reward.score(list(requests)))]


@pytest.fixture(scope="module")
def reward() -> MathReward:
    return MathReward()


@pytest.mark.parametrize(
    ("reference", "answer", "expected"),
    [
        ("0.5", "Adding the halves we get $\\boxed{\\frac{1}{2}}$.", 1.0),
        ("\\frac{1}{2}", "So the result is 0.5", 1.0),
        ("42", "The answer is 42", 1.0),
        ("42", "The answer is 41.", 0.0),
        ("\\frac{\\sqrt{3}}{2}", "Therefore $\\boxed{\\frac{\\sqrt3}{2}}$", 1.0),
        ("\\frac{\\sqrt{3}}{2}", "Therefore $\\boxed{\\frac{\\sqrt2}{2}}$", 0.0),
        ("x^2+2x+1", "Factoring gives $\\boxed{(x+1)^2}$", 1.0),
        ("$(1,2)$", "The interval is $\\boxed{(1, 2)}$", 1.0),
        ("3", "I do not know.", 0.0),
        # The boxed result wins over numbers met on the way.
        ("7", "First 3 + 3 = 6, then add one: $\\boxed{7}$", 1.0),
        ("7", "Adding one gives 7, but wait: $\\boxed{8}$", 0.0),
    ],
)
def test_math_style_answers(reward: MathReward, reference: str, answer: str, expected: float) -> None:
    assert values(reward, req(answer, answer=reference)) == [expected]


def test_reference_from_a_full_solution_and_gsm8k_style_references(reward: MathReward) -> None:
    solution = "Half of 48 is 24, and $48 + 24 = 72$. So she sold $\\boxed{72}$ clips."
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert values(
        reward,
        req("She sold 72 clips.", solution=solution),
        req("The total is 72", answer=gsm8k),
        req("The total is 24", answer=gsm8k),
    ) == [1.0, 1.0, 0.0]


def test_numeric_references_and_fields_tried_in_order(reward: MathReward) -> None:
    out = asyncio.run(
        reward.score([req("$\\boxed{12}$", answer=12), req("12", reference="12", solution="$\\boxed{13}$")])
    )
    assert [s.value for s in out] == [1.0, 1.0]
    assert out[0].details == {"field": "answer", "reference": "12", "extracted": "12"}
    assert out[1].details is not None and out[1].details["field"] == "reference"


def test_missing_reference_fails_with_the_field_and_prompt_named(reward: MathReward) -> None:
    [score] = asyncio.run(reward.score([req("42", prompt_id="row-17", question="q")]))
    assert score.value is None
    assert score.error is not None
    assert "prompt 'row-17' has no reference answer" in score.error
    assert "'answer' or 'reference' or 'solution'" in score.error
    custom = MathReward.from_spec("", field="gold")
    [score] = asyncio.run(custom.score([req("42", prompt_id="r2", answer="42")]))
    assert score.error == "prompt 'r2' has no reference answer: its metadata has no 'gold'"
    assert custom.name == "math:gold"


def test_field_from_the_spec_or_the_option() -> None:
    by_target = reward_from_spec("math:gold")
    assert values(by_target, req("\\boxed{5}", gold="5", answer="6")) == [1.0]  # type: ignore[arg-type]
    by_option = reward_from_spec("math", field="gold")
    assert by_option.name == "math:gold"
    with pytest.raises(ConfigError, match="two reference fields"):
        reward_from_spec("math:gold", field="other")
    with pytest.raises(ConfigError, match="unknown option 'tolerance'; it takes: field, timeout_s, float_rounding"):
        reward_from_spec("math", tolerance=0.1)
    with pytest.raises(ConfigError, match="timeout_s"):
        MathReward(timeout_s=0)


def test_an_unparseable_reference_fails(reward: MathReward) -> None:
    [score] = asyncio.run(reward.score([req("42", prompt_id="p9", answer="see the figure")]))
    assert score.value is None and score.error is not None
    assert "reference answer of prompt 'p9'" in score.error and "could not be parsed" in score.error


def test_works_from_an_event_loop_off_the_main_thread(reward: MathReward) -> None:
    # math-verify's alarms only work on the main thread; off it the reward must still verify.
    result: list[Score] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            result.extend(
                asyncio.run(reward.score([req("$\\boxed{\\frac{1}{2}}$", answer="0.5"), req("0.3", answer="0.5")]))
            )
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert not errors
    assert [s.value for s in result] == [1.0, 0.0]


def test_optimize_with_a_reference_in_the_metadata() -> None:
    replies = iter(["I think it is 5.", "It is $\\boxed{4}$.", "Maybe 3?"])
    policy = ScriptedPolicy(lambda r: [next(replies) for _ in range(r.n)])
    result = tpo.optimize(
        "What is 2 + 2?", policy=policy, reward=MathReward(), mode="bon", width=3, metadata={"answer": "4"}
    )
    assert result.answer == "It is $\\boxed{4}$."
    assert result.score == 1.0
    assert sorted(c.score for c in result.candidates if c.score is not None) == [0.0, 0.0, 1.0]
