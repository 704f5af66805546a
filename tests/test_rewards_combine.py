"""Combining rewards with weights (and per-prompt normalisation), and caching scores."""

from __future__ import annotations

import asyncio
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import tpo
from tpo import ConfigError, Message, RewardError, Score, ScoreRequest
from tpo.rewards.combine import CachedReward, WeightedReward
from tpo.testing import FunctionReward, ScriptedPolicy

QUESTION = (Message("user", "Tell me something."),)


def req(text: str, prompt_id: str = "p", **metadata: Any) -> ScoreRequest:
    return ScoreRequest(QUESTION, text, metadata, prompt_id)


def run(reward: Any, *requests: ScoreRequest) -> list[Score]:
    return asyncio.run(reward.score(list(requests)))


def length(name: str = "len", **kwargs: Any) -> FunctionReward:
    return FunctionReward(lambda m, a: float(len(a)), name=name, **kwargs)


def first_number(answer: str) -> float:
    m = re.search(r"-?\d+", answer)
    return float(m.group()) if m else 0.0


def number(name: str = "num", **kwargs: Any) -> FunctionReward:
    return FunctionReward(lambda m, a: first_number(a), name=name, **kwargs)


class Failing:
    """A reward that raises for every call."""

    name = "broken"
    batching = True

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closed = False

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        raise self.error

    async def aclose(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------- weights


def test_equal_weights_by_default_and_the_name() -> None:
    combined = WeightedReward([length(), number()])
    assert combined.weights == [0.5, 0.5]
    assert combined.name == "0.5*len + 0.5*num"
    [s] = run(combined, req("7 apples"))
    assert s.value == pytest.approx(0.5 * 8 + 0.5 * 7)
    assert s.details == {
        "components": [
            {"name": "len", "weight": 0.5, "value": 8.0},
            {"name": "num", "weight": 0.5, "value": 7.0},
        ]
    }


def test_given_weights_including_a_penalty() -> None:
    combined = WeightedReward([number(), length()], weights=[0.7, -0.3])
    assert combined.name == "0.7*num + -0.3*len"
    assert [s.value for s in run(combined, req("10"), req("3 cats"))] == pytest.approx(
        [0.7 * 10 - 0.3 * 2, 0.7 * 3 - 0.3 * 6]
    )


def test_any_failed_component_fails_the_answer_with_every_error() -> None:
    def picky(messages: Any, answer: str) -> float:
        if "x" in answer:
            raise ValueError("no x allowed")
        return 1.0

    def pickier(messages: Any, answer: str) -> float:
        if "y" in answer:
            raise ValueError("no y allowed")
        return 2.0

    combined = WeightedReward([FunctionReward(picky, name="a"), FunctionReward(pickier, name="b")])
    out = run(combined, req("x"), req("xy"), req("ok"))
    assert out[0].value is None and out[0].error == "a: ValueError: no x allowed"
    assert out[1].error == "a: ValueError: no x allowed; b: ValueError: no y allowed"
    assert out[2].value == pytest.approx(1.5)
    parts = out[0].details["components"]  # type: ignore[index]
    assert parts[0]["error"] == "ValueError: no x allowed" and parts[1]["value"] == 2.0


def test_a_component_that_raises_fails_only_through_its_own_error() -> None:
    combined = WeightedReward([length(), Failing(RewardError("server down"))], weights=[1, 1])
    out = run(combined, req("a"), req("b"))
    assert all(s.error == "broken: RewardError: server down" for s in out)
    assert all(s.details["components"][0]["value"] == 1.0 for s in out)  # type: ignore[index]
    third_party = WeightedReward([length(), Failing(KeyError("weights"))], weights=[1, 1])
    [s] = run(third_party, req("a"))
    assert s.error == "broken: broken failed: KeyError: 'weights'"


def test_components_run_concurrently_each_the_way_it_likes() -> None:
    gate = asyncio.Event()

    async def waits(messages: Any, answer: str) -> float:
        # Finishes only if the other component runs meanwhile.
        await asyncio.wait_for(gate.wait(), 5)
        return 1.0

    async def opens(messages_list: Any, answers: list[str]) -> list[float]:
        gate.set()
        return [2.0] * len(answers)

    one_by_one = FunctionReward(waits, name="w")
    batched = FunctionReward(opens, batched=True, name="o")
    combined = WeightedReward([one_by_one, batched])
    assert combined.batching is True
    out = run(combined, req("a"), req("b"), req("c"))
    assert [s.value for s in out] == [1.5, 1.5, 1.5]
    assert [len(c) for c in one_by_one.calls] == [1, 1, 1]
    assert [len(c) for c in batched.calls] == [3]
    assert WeightedReward([length(), number()]).batching is False


def test_invalid_combinations() -> None:
    with pytest.raises(ConfigError, match="2 reward weight"):
        WeightedReward([length(), number(), length("l2")], weights=[1, 2])
    with pytest.raises(ConfigError, match="finite numbers"):
        WeightedReward([length(), number()], weights=[1, math.inf])
    with pytest.raises(ConfigError, match="non-zero"):
        WeightedReward([length(), number()], weights=[0, 0])
    with pytest.raises(ConfigError, match="normalize must be one of none, zscore, minmax"):
        WeightedReward([length()], normalize="rank")
    with pytest.raises(ConfigError, match="at least one reward"):
        WeightedReward([])
    with pytest.raises(ConfigError, match="no score"):
        WeightedReward([object()])  # type: ignore[list-item]


def test_aclose_closes_every_component() -> None:
    a, b = Failing(RewardError("x")), Failing(RewardError("y"))
    asyncio.run(WeightedReward([a, b]).aclose())
    assert a.closed and b.closed


# ---------------------------------------------------------------------------- normalisation


def test_zscore_reference_comes_from_the_first_batch_and_stays_fixed() -> None:
    combined = WeightedReward([number(), length()], weights=[1, 1], normalize="zscore")
    assert combined.batching is True
    first = ["1", "2", "3 x"]
    out = run(combined, *[req(a) for a in first])
    nums, lens = [1.0, 2.0, 3.0], [1.0, 1.0, 3.0]
    mn, sn = statistics.fmean(nums), statistics.pstdev(nums)
    ml, sl = statistics.fmean(lens), statistics.pstdev(lens)
    expected = [(n - mn) / sn + (l_ - ml) / sl for n, l_ in zip(nums, lens, strict=True)]
    assert [s.value for s in out] == pytest.approx(expected)
    # A later batch of the same prompt goes through the same map, even if it alone has other statistics.
    [later] = run(combined, req("10 more"))
    assert later.value == pytest.approx((10 - mn) / sn + (7 - ml) / sl)
    assert later.details["components"][0]["normalized"] == pytest.approx((10 - mn) / sn)  # type: ignore[index]
    assert later.details["components"][0]["value"] == 10.0  # type: ignore[index]


def test_minmax_groups_by_prompt_and_handles_no_spread() -> None:
    combined = WeightedReward([number()], normalize="minmax")
    out = run(combined, req("2", "a"), req("4", "a"), req("6", "a"), req("5", "b"), req("5 5", "b"))
    assert [s.value for s in out] == pytest.approx([0.0, 0.5, 1.0, 0.0, 0.0])
    # Prompt a's reference is (2, 4): a later 8 maps beyond 1, prompt b's spread was 0 so its scale is 1.
    out = run(combined, req("8", "a"), req("9", "b"))
    assert [s.value for s in out] == pytest.approx([1.5, 4.0])


def test_failed_answers_do_not_enter_the_reference() -> None:
    def maybe(messages: Any, answer: str) -> float:
        if answer == "bad":
            raise ValueError("nope")
        return first_number(answer)

    combined = WeightedReward([FunctionReward(maybe, name="m")], normalize="minmax")
    out = run(combined, req("bad"), req("0"), req("10"))
    assert out[0].value is None
    assert [s.value for s in out[1:]] == pytest.approx([0.0, 1.0])


def test_references_are_bounded() -> None:
    combined = WeightedReward([number()], normalize="minmax", max_prompts=2)
    for pid in ("a", "b", "c"):
        run(combined, req("0", pid), req("10", pid))
    # "a" was forgotten: its next batch sets a new reference; "c" kept (0, 10).
    assert [s.value for s in run(combined, req("5", "a"), req("20", "a"), req("5", "c"))] == pytest.approx(
        [0.0, 1.0, 0.5]
    )


def test_normalising_declares_per_prompt_state_so_resuming_can_start_such_prompts_over() -> None:
    assert WeightedReward([number(), length()]).per_prompt_state is False
    for mode in ("zscore", "minmax"):
        combined = WeightedReward([number(), length()], normalize=mode)
        assert combined.per_prompt_state is True
        # Why it matters: a fresh object (a new process) scores the same answer on another prompt-local scale.
        run(combined, req("0", "p"), req("10", "p"))
        later = run(combined, req("5", "p"))[0].value
        fresh = WeightedReward([number(), length()], normalize=mode)
        run(fresh, req("50", "p"), req("80", "p"))
        assert run(fresh, req("5", "p"))[0].value != pytest.approx(later)


def test_normalised_scores_through_the_engine_rank_by_one_fixed_map() -> None:
    # Sample answers "Answer k ..." number 0..3; rewrites continue the count. Component scores:
    # the number, and the negated length. Every candidate's combined score must be the step-0 map.
    policy = ScriptedPolicy()
    num = FunctionReward(lambda ms, answers: [first_number(a) for a in answers], batched=True, name="num")
    neg_len = FunctionReward(lambda m, a: -float(len(a)), name="short")
    combined = WeightedReward([num, neg_len], weights=[0.6, 0.4], normalize="zscore")
    result = tpo.optimize("Hi", policy=policy, reward=combined, width=4, depth=2)
    assert result.status == "complete"
    assert len(num.calls[0]) == 4  # the initial samples arrive together and set the reference
    samples = [c for c in result.candidates if c.step == 0]
    nums = [first_number(c.text) for c in samples]
    lens = [-float(len(c.text)) for c in samples]

    def mapped(text: str) -> float:
        z1 = (first_number(text) - statistics.fmean(nums)) / (statistics.pstdev(nums) or 1.0)
        z2 = (-len(text) - statistics.fmean(lens)) / (statistics.pstdev(lens) or 1.0)
        return 0.6 * z1 + 0.4 * z2

    assert len(result.candidates) > 4
    for c in result.candidates:
        assert c.score == pytest.approx(mapped(c.text))
    assert result.answer == max(result.candidates, key=lambda c: mapped(c.text)).text


def test_the_cli_builds_a_weighted_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpo.cli import _common

    rm = tmp_path / "two_rms.py"
    rm.write_text(
        "def a(messages, answer):\n    return 1.0\n\ndef b(messages, answer):\n    return 3.0\n", encoding="utf-8"
    )
    monkeypatch.setattr(tpo.models, "build_policy", lambda spec, options, server: ScriptedPolicy())
    models = _common.build_models(
        {"policy_spec": "scripted", "reward_specs": [f"python:{rm}:a", f"python:{rm}:b"], "reward_weights": "0.7,0.3"}
    )
    assert isinstance(models.reward, WeightedReward)
    assert models.reward.weights == [0.7, 0.3]
    assert models.reward.name == f"0.7*python:{rm}:a + 0.3*python:{rm}:b"
    assert [s.value for s in run(models.reward, req("x"))] == pytest.approx([0.7 + 0.9])


# ---------------------------------------------------------------------------- caching


def test_cache_scores_each_pair_once() -> None:
    inner = FunctionReward(lambda ms, answers: [float(len(a)) for a in answers], batched=True, name="len")
    cached = CachedReward(inner)
    assert cached.batching is True and cached.name == "len"
    out = run(cached, req("ab"), req("abc"), req("ab"))
    assert [s.value for s in out] == [2.0, 3.0, 2.0]
    assert [[r.answer for r in c] for c in inner.calls] == [["ab", "abc"]]
    out = run(cached, req("abc"), req("abcd"))
    assert [s.value for s in out] == [3.0, 4.0]
    assert [[r.answer for r in c] for c in inner.calls] == [["ab", "abc"], ["abcd"]]
    assert (cached.hits, cached.misses) == (2, 3)
    assert run(cached, req("ab")) == [Score(2.0)] and len(inner.calls) == 2


def test_cache_key_covers_conversation_answer_and_metadata() -> None:
    inner = length()
    cached = CachedReward(inner)
    other_question = ScoreRequest((Message("user", "Something else."),), "ab", {}, "p")
    run(cached, req("ab"), other_question, req("ab", answer="1"), req("ab", answer="2"), req("ab", answer="1"))
    assert len(inner.requests) == 4


def test_failures_are_not_cached_and_errors_propagate() -> None:
    attempts = 0

    def flaky(messages: Any, answer: str) -> float:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ValueError("first time unlucky")
        return 1.0

    cached = CachedReward(FunctionReward(flaky))
    assert run(cached, req("a"))[0].value is None
    assert run(cached, req("a"))[0].value == 1.0
    assert run(cached, req("a"))[0].value == 1.0
    assert attempts == 2
    broken = CachedReward(Failing(RewardError("down")))
    with pytest.raises(RewardError, match="down"):
        run(broken, req("a"), req("a"))
    assert broken._inflight == {}


def test_concurrent_calls_share_one_scoring() -> None:
    started = 0

    async def slow(messages: Any, answer: str) -> float:
        nonlocal started
        started += 1
        await asyncio.sleep(0.01)
        return 5.0

    cached = CachedReward(FunctionReward(slow))

    async def go() -> list[list[Score]]:
        return list(await asyncio.gather(cached.score([req("x")]), cached.score([req("x")]), cached.score([req("x")])))

    out = asyncio.run(go())
    assert [o[0].value for o in out] == [5.0, 5.0, 5.0]
    assert started == 1


def test_cache_is_bounded_least_recently_used_first() -> None:
    inner = length()
    cached = CachedReward(inner, max_entries=2)
    run(cached, req("a"))
    run(cached, req("bb"))
    run(cached, req("a"))  # "a" is now the most recent
    run(cached, req("ccc"))  # evicts "bb"
    run(cached, req("a"))
    run(cached, req("bb"))
    assert [r.answer for r in inner.requests] == ["a", "bb", "ccc", "bb"]
    with pytest.raises(ConfigError, match="max_entries"):
        CachedReward(inner, max_entries=0)


def test_cached_components_inside_a_weighted_reward() -> None:
    expensive = number()
    combined = WeightedReward([CachedReward(expensive), length()], weights=[1, 1])
    run(combined, req("1 a"), req("2 b"))
    run(combined, req("1 a"), req("3 c"))
    assert [r.answer for r in expensive.requests] == ["1 a", "2 b", "3 c"]
