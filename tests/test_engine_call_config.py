"""``Engine.optimize(..., config=...)``: prompts with their own configuration on one engine, sharing its batches."""

from __future__ import annotations

import asyncio

import pytest

import tpo
from conftest import hash_score, pure_reply
from tpo import Engine, TPOConfig
from tpo.testing import FunctionReward, ScriptedPolicy


def test_concurrent_calls_with_different_configs_share_batches_and_match_their_own_runs() -> None:
    policy = ScriptedPolicy(pure_reply, batching=True)
    reward = FunctionReward(hash_score)
    engine = Engine(policy, reward, config=TPOConfig(width=3, depth=1))
    configs = {"a": TPOConfig(width=2, depth=2, seed=5), "b": TPOConfig(width=4, depth=1, mode="revision"), "c": None}

    async def run_all() -> list[tpo.TPOResult]:
        calls = [engine.optimize(f"Question {k}?", id=k, config=c) for k, c in configs.items()]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(run_all())
    assert len(policy.calls[0]) == 3  # the three samples went out together
    for result, (key, config) in zip(results, configs.items(), strict=True):
        alone = tpo.optimize(
            tpo.Prompt(key, (tpo.Message("user", f"Question {key}?"),)),
            policy=ScriptedPolicy(pure_reply),
            reward=FunctionReward(hash_score),
            config=config or TPOConfig(width=3, depth=1),
        )
        assert result.answer == alone.answer and result.config == alone.config
        assert [c.id for c in result.candidates] == [c.id for c in alone.candidates]
    assert [r.config["width"] for r in results] == [2, 4, 3] and results[1].steps[1].kind == "revision"


def test_a_per_call_config_that_cannot_run_is_refused_before_any_model_work() -> None:
    # Best-of-N sends no template, so the engine's own configuration fits a tiny window; TPO's does not.
    policy = ScriptedPolicy(pure_reply, window=300)
    engine = Engine(policy, FunctionReward(hash_score), config=TPOConfig(width=2, mode="bon", max_tokens=64))
    with pytest.raises(tpo.ConfigError, match="cannot change context_window"):
        asyncio.run(engine.optimize("Hi", config=TPOConfig(context_window=4096)))
    with pytest.raises(tpo.ConfigError, match=r"template .*does not fit the context window of 300 tokens"):
        asyncio.run(engine.optimize("Hi", config=TPOConfig(width=2, depth=1, max_tokens=64)))
    with pytest.raises(tpo.ConfigError, match=r"must be a tpo\.TPOConfig"):
        asyncio.run(engine.optimize("Hi", config={"width": 2}))  # type: ignore[arg-type]
    assert policy.calls == []
    assert asyncio.run(engine.optimize("Hi")).status == "complete"  # the engine's own configuration still runs


def test_per_call_configs_alike_in_their_templates_are_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # tpo serve makes a configuration per request: tokenizing the templates each time would be waste.
    engine = Engine(ScriptedPolicy(pure_reply), FunctionReward(hash_score), config=TPOConfig(width=2, depth=1))
    checked: list[TPOConfig] = []
    check = engine._check_templates
    monkeypatch.setattr(engine, "_check_templates", lambda budget, cfg: (checked.append(cfg), check(budget, cfg)))

    async def run_all() -> None:
        for seed in range(3):  # the seed does not change what the templates need
            await engine.optimize("Hi", config=TPOConfig(width=2, depth=1, seed=seed))
        await engine.optimize("Hi", config=TPOConfig(width=2, depth=1, max_tokens=100))  # this does

    asyncio.run(run_all())
    assert [c.seed for c in checked] == [0, 0, 0]  # the engine's own at preparation, then the first and the last call
    assert checked[-1].max_tokens == 100
