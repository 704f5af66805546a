"""The vllm reward against a stand-in ``vllm`` module that records what it is handed (no GPU here)."""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any

import pytest

import tpo
from stubs import load_stub
from tpo import ConfigError, Message, MissingDependencyError, RewardError, Score, ScoreRequest
from tpo.registry import reward_from_spec
from tpo.rewards.vllm_pooling import VLLMReward
from tpo.testing import ScriptedPolicy

stub = load_stub("tpo_tests_vllm_reward_stub", "vllm_reward_stub.py")

CONVERSATION = (Message("system", "You are helpful."), Message("user", "Name a prime number."))


def req(text: str, prompt_id: str = "p") -> ScoreRequest:
    return ScoreRequest(CONVERSATION, text, {}, prompt_id)


def run(reward: VLLMReward, *requests: ScoreRequest) -> list[Score]:
    return asyncio.run(reward.score(list(requests)))


def expected_ids(fake: Any, messages: tuple[Message, ...], answer: str) -> list[int]:
    """The token ids vLLM should get: the template's text, encoded without adding anything."""
    tok = stub.FakeTokenizer(**fake.tokenizer_kwargs)
    text = tok.apply_chat_template(
        [*(m.as_dict() for m in messages), {"role": "assistant", "content": answer}], tokenize=False
    )
    return list(tok.encode(text, add_special_tokens=False))


def bonus(answer: str) -> float:
    return {"7": 3.0, "eight": -2.0}.get(answer, 0.0)


# ---------------------------------------------------------------------------- current vLLM


def test_classify_gets_token_ids_and_raw_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, bonus=bonus)
    reward = reward_from_spec(
        "vllm:Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        tensor_parallel_size=2,
        max_model_len=2048,
        engine_args={"enforce_eager": True},
    )
    assert isinstance(reward, VLLMReward) and reward.batching is True
    assert reward.name == "vllm:Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    [llm] = fake.engines
    assert llm.model == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    assert llm.engine_args == {
        "runner": "pooling",
        "tensor_parallel_size": 2,
        "max_model_len": 2048,
        "enforce_eager": True,
    }

    out = run(reward, req("7"), req("eight"), req("11"))
    [call] = fake.calls
    assert call.method == "classify"
    assert call.kwargs["use_tqdm"] is False
    assert call.kwargs["pooling_params"] == fake.module.PoolingParams(use_activation=False)
    ids = [expected_ids(fake, CONVERSATION, a) for a in ("7", "eight", "11")]
    assert call.prompts == [{"prompt_token_ids": i} for i in ids]
    assert all(i[0] == 1 and i.count(1) == 1 for i in ids)  # the template's BOS, once
    assert [s.value for s in out] == pytest.approx([len(ids[0]) / 10 + 3, len(ids[1]) / 10 - 2, len(ids[2]) / 10])
    # The template saw the answer as the assistant's turn, with no generation prompt after it.
    last = llm.get_tokenizer().template_calls[-1]
    assert last["conversation"][-1] == {"role": "assistant", "content": "11"}
    assert last["add_generation_prompt"] is False and last["tokenize"] is False


def test_raw_false_keeps_vllms_sigmoid(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, bonus=bonus)
    reward = VLLMReward.from_spec("rm", raw=False)
    [s] = run(reward, req("7"))
    assert fake.calls[0].kwargs["pooling_params"] is None
    logit = len(expected_ids(fake, CONVERSATION, "7")) / 10 + 3
    assert s.value == pytest.approx(1 / (1 + math.exp(-logit)))


def test_a_head_with_several_outputs_and_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, num_labels=3)
    base = len(expected_ids(fake, CONVERSATION, "x")) / 10
    assert run(VLLMReward.from_spec("rm", index=2), req("x"))[0].value == pytest.approx(base + 2)
    probs = run(VLLMReward.from_spec("rm", index=2, raw=False), req("x"))[0].value
    assert probs == pytest.approx(math.exp(2) / (1 + math.exp(1) + math.exp(2)))
    [bad] = run(VLLMReward.from_spec("rm", index=5), req("x"))
    assert bad.value is None and bad.error == "the model has 3 output(s); index 5 is out of range"


def test_reward_method_reads_the_last_tokens_row(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, num_labels=2, bonus=bonus)
    reward = VLLMReward.from_spec("internlm/internlm2-1_8b-reward", method="reward", index=1, trust_remote_code=True)
    [s] = run(reward, req("7"))
    [call] = fake.calls
    assert call.method == "reward"
    assert call.kwargs["pooling_params"] == fake.module.PoolingParams(use_activation=False)
    assert fake.engines[0].engine_args == {"runner": "pooling", "trust_remote_code": True}
    assert s.value == pytest.approx(len(expected_ids(fake, CONVERSATION, "7")) / 10 + 3 + 1)


# ---------------------------------------------------------------------------- older vLLM releases


def test_vllm_0_10_switches_the_activation_off_with_the_older_names(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, version="0.10")
    n = len(expected_ids(fake, CONVERSATION, "x"))
    assert run(VLLMReward.from_spec("rm"), req("x"))[0].value == pytest.approx(n / 10)
    assert fake.calls[-1].kwargs["pooling_params"] == fake.module.PoolingParams(activation=False)
    assert run(VLLMReward.from_spec("rm", method="reward"), req("x"))[0].value == pytest.approx(n / 10)
    assert fake.calls[-1].kwargs["pooling_params"] == fake.module.PoolingParams(softmax=False)
    assert all(e.engine_args == {"runner": "pooling"} for e in fake.engines)


def test_vllm_0_8_uses_task_and_an_engine_pooler_config(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, version="0.8")
    n = len(expected_ids(fake, CONVERSATION, "x"))
    classify = VLLMReward.from_spec("rm")
    assert run(classify, req("x"))[0].value == pytest.approx(n / 10)
    PoolerConfig = sys.modules["vllm.config"].PoolerConfig
    assert fake.engines[0].engine_args == {"task": "classify", "override_pooler_config": PoolerConfig(softmax=False)}
    assert fake.calls[-1].kwargs["pooling_params"] is None
    reward = VLLMReward.from_spec("rm", method="reward")
    assert run(reward, req("x"))[0].value == pytest.approx(n / 10)
    assert fake.engines[1].engine_args == {"task": "reward"}
    # An explicit pooler config from the user is left alone.
    VLLMReward.from_spec("rm", engine_args={"override_pooler_config": PoolerConfig(pooling_type="LAST")})
    assert fake.engines[2].engine_args["override_pooler_config"] == PoolerConfig(pooling_type="LAST")


# ---------------------------------------------------------------------------- tokens


def test_tokenizer_without_bos_gets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, bos_token_id=None)
    run(VLLMReward.from_spec("qwen-rm"), req("x"))
    ids = fake.calls[0].prompts[0]["prompt_token_ids"]
    assert 1 not in ids and ids == expected_ids(fake, CONVERSATION, "x")


def test_bos_added_once_when_the_template_does_not_write_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch, bos_in_template=False)
    run(VLLMReward.from_spec("rm"), req("x"))
    ids = fake.calls[0].prompts[0]["prompt_token_ids"]
    assert ids == [1, *expected_ids(fake, CONVERSATION, "x")]


def test_long_conversations_lose_their_oldest_turns_and_a_hopeless_answer_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_chat = (
        Message("system", "sys"),
        Message("user", "old " * 30),
        Message("assistant", "older reply " * 10),
        Message("user", "What now?"),
    )
    fake = stub.install(monkeypatch)
    full = len(expected_ids(fake, long_chat, "fine"))
    short = len(expected_ids(fake, (long_chat[0], long_chat[3]), "fine"))
    limit = (full + short) // 2
    stub_llm_len = stub.install(monkeypatch, max_model_len=limit)
    reward = VLLMReward.from_spec("rm")
    out = run(
        reward,
        ScoreRequest(long_chat, "fine", {}, "a"),
        ScoreRequest(long_chat, "word " * limit, {}, "b"),
        ScoreRequest(CONVERSATION, "ok", {}, "c"),
    )
    assert out[0].value == pytest.approx(short / 10)
    assert out[0].details == {"dropped_turns": 2}  # messages, as the hf reward counts them: one user-assistant exchange
    assert out[1].value is None and out[1].error is not None
    assert f"more than the model's {limit} (max_model_len)" in out[1].error
    assert out[2].value is not None and out[2].details is None
    [call] = stub_llm_len.calls
    assert len(call.prompts) == 2
    kept = stub_llm_len.engines[0].get_tokenizer().decode(call.prompts[0]["prompt_token_ids"])
    assert "old" not in kept.split() and "What" in kept


# ---------------------------------------------------------------------------- failures and configuration


def test_a_failing_batch_raises_reward_error_and_the_engine_records_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch)
    reward = VLLMReward.from_spec("rm")
    fake.fail_next.append(RuntimeError("CUDA error: out of memory"))
    with pytest.raises(
        RewardError, match="vLLM failed on a batch of 2 answers: RuntimeError: CUDA error: out of memory"
    ):
        run(reward, req("a"), req("b"))
    fake.fail_next.append(RuntimeError("CUDA error: out of memory"))
    result = tpo.optimize("Hi", policy=ScriptedPolicy(), reward=reward, mode="bon", width=2)
    assert result.status == "failed"
    assert result.usage.reward_failures == 2
    assert all("out of memory" in (c.score_error or "") for c in result.candidates)


def test_one_call_for_every_prompts_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch)
    reward = VLLMReward.from_spec("rm")
    results = list(
        tpo.optimize_many(
            ["First?", "Second?", "Third?"], policy=ScriptedPolicy(batching=True), reward=reward, mode="bon", width=4
        )
    )
    assert all(r.status == "complete" for r in results)
    assert [len(c.prompts) for c in fake.calls] == [12]


def test_missing_vllm_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    stub.hide(monkeypatch)
    with pytest.raises(MissingDependencyError, match="'vllm'"):
        VLLMReward.from_spec("rm")


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("", {}, "needs a model"),
        ("rm", {"method": "embed"}, "the vllm reward: method must be one of classify, reward, got 'embed'"),
        ("rm", {"raw": "yes"}, "raw must be true or false, got 'yes'"),
        ("rm", {"batch_size": 8}, "the vllm reward: unknown option 'batch_size'; it takes: "),
        ("rm", {"engine_args": {"not_an_engine_arg": 1}}, "vLLM rejected the engine arguments"),
        (
            "rm",
            {"max_model_len": 1024, "engine_args": {"max_model_len": 512}},
            "given both as an option and in engine_args",
        ),
        ("rm", {"engine_args": {"model": "x"}}, "not in engine_args"),
        ("rm", {"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be a number in \(0, 1\], got 1.5"),
        # The same checks of the engine options as the vllm policy backend's (they share them).
        ("rm", {"tensor_parallel_size": "two"}, "tensor_parallel_size must be an integer"),
        ("rm", {"seed": "7"}, "seed must be an integer"),
        ("rm", {"dtype": 16}, "dtype must be a non-empty string, got 16"),
        ("rm", {"trust_remote_code": "yes"}, "trust_remote_code must be true or false"),
        ("rm", {"engine_args": "enforce_eager=true"}, "engine_args must be a mapping"),
        ("rm", {"enable_prefix_caching": False}, "unknown option 'enable_prefix_caching'"),
    ],
)
def test_bad_configuration(monkeypatch: pytest.MonkeyPatch, target: str, options: dict[str, Any], message: str) -> None:
    stub.install(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        reward_from_spec(f"vllm:{target}" if target else "vllm", **options)


def test_a_model_that_cannot_load_is_a_reward_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch)
    fake.fail_next.append(OSError("no such model"))
    with pytest.raises(RewardError, match="vLLM could not load 'rm': OSError: no such model"):
        VLLMReward.from_spec("rm")


@pytest.mark.parametrize(
    "error",
    [
        ModuleNotFoundError("No module named 'torch'", name="torch"),
        ImportError("libcudart.so.12: cannot open shared object"),
    ],
)
def test_a_broken_vllm_install_is_a_reward_error(monkeypatch: pytest.MonkeyPatch, error: ImportError) -> None:
    stub.break_import(monkeypatch, error)
    with pytest.raises(RewardError, match="vLLM is installed but could not be imported") as info:
        VLLMReward.from_spec("rm")
    assert info.value.__cause__ is error


def test_forbidden_real_requests_stop_the_load_before_vllm_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    stub.allow_real_requests(monkeypatch, False)
    fake = stub.install(monkeypatch)  # the stand-in is a double: installing it allows loads again
    VLLMReward.from_spec("rm")
    assert len(fake.engines) == 1
    stub.allow_real_requests(monkeypatch, False)
    with pytest.raises(ConfigError, match=r"vllm:other-rm: real model requests are forbidden"):
        VLLMReward.from_spec("other-rm")
    assert len(fake.engines) == 1


def test_an_engine_without_a_tokenizer_is_a_reward_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch)
    reward = VLLMReward.from_spec("rm")

    def no_tokenizer() -> Any:
        raise ValueError("the tokenizer was not initialised (skip_tokenizer_init=True)")

    fake.engines[0].get_tokenizer = no_tokenizer
    with pytest.raises(RewardError, match="the vLLM engine has no tokenizer"):
        run(reward, req("a"))
    assert fake.calls == []


def test_closed_reward_refuses_to_score(monkeypatch: pytest.MonkeyPatch) -> None:
    stub.install(monkeypatch)
    reward = VLLMReward.from_spec("rm")
    asyncio.run(reward.aclose())
    with pytest.raises(RewardError, match="was closed"):
        run(reward, req("a"))


def test_a_ready_llm_can_be_passed_in(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch)
    llm = fake.module.LLM("my-rm", runner="pooling")
    reward = VLLMReward(llm, pooling_params=fake.module.PoolingParams(use_activation=False), name="mine")
    assert reward.name == "mine"
    assert run(reward, req("x"))[0].value == pytest.approx(len(expected_ids(fake, CONVERSATION, "x")) / 10)


def test_a_vllm_without_the_method_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = stub.install(monkeypatch)
    llm = fake.module.LLM("rm", runner="pooling")
    monkeypatch.setattr(type(llm), "reward", None)
    with pytest.raises(ConfigError, match=r"this vLLM has no LLM\.reward\(\)"):
        VLLMReward(llm, method="reward")
