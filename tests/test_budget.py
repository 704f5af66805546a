"""Every request the engine builds fits the backend's context window, with long parts visibly shortened."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

import tpo
from conftest import TAG, hash_score, pure_reply
from tpo import GenerationRequest, Message
from tpo.engine._budget import ContextBudget, estimate_messages, estimate_tokens, shorten_middle
from tpo.testing import FunctionReward, ScriptedPolicy

MARKER = "characters omitted to fit the context window"
WINDOW = 4096


class TokenCounter:
    """A stand-in tokenizer: one token per three characters, plus a per-message overhead; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages: Sequence[Message]) -> int:
        self.calls += 1
        return 3 + sum(5 + len(m.content.encode("utf-8", "surrogatepass")) // 3 for m in messages)


def _assert_every_request_fits(policy: ScriptedPolicy, count: Callable[[Sequence[Message]], int], window: int) -> None:
    assert policy.violations == []  # the double saw no request beyond its window, nor any other breach
    assert policy.requests
    for r in policy.requests:
        used = count(r.messages)
        assert used + r.sampling.max_tokens <= window, (r.purpose, r.step, used, r.sampling.max_tokens)
        assert r.sampling.max_tokens >= 256  # room left to answer, not a token or two


def _long_prompt(chars: int) -> str:
    body = "".join(f"line {i:06d} of a very long document.\n" for i in range(chars // 36 + 1))
    return "HEAD-OF-PROMPT " + body[: chars - 30] + " TAIL-OF-PROMPT"


@pytest.mark.parametrize("with_counter", [True, False], ids=["token-counter", "estimate"])
def test_a_200k_character_prompt_fits_every_request(with_counter: bool) -> None:
    counter = TokenCounter() if with_counter else None
    policy = ScriptedPolicy(pure_reply, window=WINDOW, tokens=counter)
    prompt = _long_prompt(200_000)
    assert len(prompt) == 200_000
    result = tpo.optimize(prompt, policy=policy, reward=FunctionReward(hash_score), width=3, depth=2)

    assert result.status == "complete", result.error
    assert len(policy.requests) == 7
    _assert_every_request_fits(policy, counter or estimate_messages, WINDOW)
    if counter is not None:
        assert counter.calls > 0  # the backend's own count was used, not the estimate

    sample = policy.requests[0].messages[0].content
    assert sample.startswith("HEAD-OF-PROMPT") and sample.endswith("TAIL-OF-PROMPT")
    assert MARKER in sample and len(sample) < 20_000
    # Budgets are not wasted: the shortened prompt still fills a good part of the room it had.
    assert (counter or estimate_messages)(policy.requests[0].messages) > WINDOW // 4
    for r in policy.requests[1:]:
        assert MARKER in r.messages[0].content
    assert result.steps[0].truncated == ("conversation",)
    assert all("conversation" in s.truncated for s in result.steps[1:])
    # The original prompt is kept whole in the result.
    assert result.messages[0]["content"] == prompt


def test_the_reward_model_sees_the_whole_prompt() -> None:
    reward = FunctionReward(hash_score)
    policy = ScriptedPolicy(pure_reply, window=WINDOW, tokens=TokenCounter())
    prompt = _long_prompt(50_000)
    tpo.optimize(prompt, policy=policy, reward=reward, width=2, depth=1)
    assert policy.violations == []
    assert all(r.messages[0].content == prompt for r in reward.requests)


@pytest.mark.parametrize("with_counter", [True, False], ids=["token-counter", "estimate"])
def test_a_long_multi_turn_conversation_fits(with_counter: bool) -> None:
    counter = TokenCounter() if with_counter else None
    conversation = [{"role": "system", "content": "Answer briefly."}]
    for i in range(20):
        conversation.append({"role": "user", "content": f"question {i} " + "q" * 8_000})
        conversation.append({"role": "assistant", "content": f"answer {i} " + "a" * 8_000})
    conversation.append({"role": "user", "content": "FINAL QUESTION: what now?"})

    policy = ScriptedPolicy(pure_reply, window=WINDOW, tokens=counter)
    result = tpo.optimize(conversation, policy=policy, reward=FunctionReward(hash_score), width=2, depth=1)

    assert result.status == "complete", result.error
    _assert_every_request_fits(policy, counter or estimate_messages, WINDOW)
    sample = policy.requests[0].messages
    # The turns stay turns; the short ones (system, the last question) are kept whole.
    assert [m.role for m in sample] == [m["role"] for m in conversation]
    assert sample[0].content == "Answer briefly." and sample[-1].content == "FINAL QUESTION: what now?"
    assert sum(MARKER in m.content for m in sample) >= 10
    assert result.steps[0].truncated == ("conversation",)
    assert "FINAL QUESTION: what now?" in policy.requests_for("loss")[0].messages[0].content


@pytest.mark.parametrize("with_counter", [True, False], ids=["token-counter", "estimate"])
def test_long_chosen_rejected_critique_and_feedback_are_shortened_visibly(with_counter: bool) -> None:
    counter = TokenCounter() if with_counter else None
    long = {p: f"{p.upper()}-START " + p[0] * 60_000 + f" {p.upper()}-END" for p in ("sample", "loss", "gradient")}

    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "update":
            return [f"<{TAG}>short rewrite {i}</{TAG}>" for i in range(request.n)]
        return [f"{i}{long[request.purpose]}" for i in range(request.n)]

    policy = ScriptedPolicy(reply, window=WINDOW, tokens=counter)
    result = tpo.optimize("short question", policy=policy, reward=FunctionReward(hash_score), width=3, depth=1)

    assert result.status == "complete", result.error
    _assert_every_request_fits(policy, counter or estimate_messages, WINDOW)
    step = result.steps[1]
    assert set(step.truncated) == {"chosen", "rejected", "critique", "feedback"}
    # The stored answers and the recorded critique are whole; only what the model is shown is cut.
    assert all(len(c.text) > 60_000 for c in result.candidates if c.step == 0)
    assert step.critique is not None and len(step.critique) > 60_000
    loss = policy.requests_for("loss")[0].messages[0].content
    assert "short question" in loss  # the short conversation is not what gets cut
    assert loss.count(MARKER) == 2 and "SAMPLE-START" in loss and "SAMPLE-END" in loss
    grad = policy.requests_for("gradient")[0].messages
    assert MARKER in grad[1].content and grad[1].content.startswith("0LOSS-START")
    update = policy.requests_for("update")[0].messages[0].content
    assert update.count(MARKER) == 3 and "GRADIENT-START" in update
    assert f"<{TAG}>" in update  # the instructions after the long parts survive


def test_a_critic_with_a_smaller_window_gets_requests_that_fit_its_own_window() -> None:
    counter = TokenCounter()
    policy = ScriptedPolicy(pure_reply, window=32_768, tokens=counter)
    critic = ScriptedPolicy(pure_reply, window=2048, tokens=counter)
    prompt = _long_prompt(60_000)
    result = tpo.optimize(
        prompt, policy=policy, critic=critic, reward=FunctionReward(hash_score), width=2, depth=1, max_tokens=512
    )
    assert result.status == "complete", result.error
    _assert_every_request_fits(policy, counter, 32_768)
    _assert_every_request_fits(critic, counter, 2048)
    assert MARKER not in policy.requests[0].messages[0].content  # 60k characters fit 32k tokens
    assert result.steps[0].truncated == ()


def test_the_configured_window_overrides_the_backends_and_max_tokens_shrinks_to_fit() -> None:
    counter = TokenCounter()
    policy = ScriptedPolicy(pure_reply, window=100_000, tokens=counter)
    result = tpo.optimize(
        _long_prompt(30_000),
        policy=policy,
        reward=FunctionReward(hash_score),
        width=2,
        depth=1,
        context_window=4096,
        max_tokens=8000,
    )
    assert result.status == "complete", result.error
    _assert_every_request_fits(policy, counter, 4096)
    assert all(r.sampling.max_tokens < 4096 for r in policy.requests)


def test_short_requests_are_left_alone() -> None:
    policy = ScriptedPolicy(pure_reply, window=WINDOW)
    result = tpo.optimize(
        "a short question", policy=policy, reward=FunctionReward(hash_score), width=2, depth=1, max_tokens=1000
    )
    assert policy.violations == []
    assert all(s.truncated == () for s in result.steps)
    assert all(r.sampling.max_tokens == 1000 for r in policy.requests)
    assert all(MARKER not in m.content for r in policy.requests for m in r.messages)


def test_no_window_known_assumes_a_conservative_default() -> None:
    policy = ScriptedPolicy(pure_reply)  # neither a window nor a token counter
    result = tpo.optimize(_long_prompt(200_000), policy=policy, reward=FunctionReward(hash_score), width=2, depth=1)
    assert result.status == "complete"
    _assert_every_request_fits(policy, estimate_messages, 8192)
    assert result.steps[0].truncated == ("conversation",)


def test_a_window_too_small_for_the_templates_is_a_clear_config_error_before_any_model_work() -> None:
    policy, reward = ScriptedPolicy(pure_reply, window=300), FunctionReward(hash_score)
    with pytest.raises(
        tpo.ConfigError,
        match="the loss_tpo prompt template does not fit the context window of 300 tokens of the critic scripted",
    ):
        tpo.optimize("q", policy=policy, reward=reward, width=2, depth=1, max_tokens=100)
    with pytest.raises(tpo.ConfigError, match="does not fit the context window of 300 tokens"):
        list(tpo.optimize_many(["a", "b"], policy=policy, reward=reward, width=2, depth=1, max_tokens=100))
    assert policy.calls == [] and reward.calls == []  # found before sampling, not half-way through every prompt


def test_a_critic_too_small_for_the_templates_fails_up_front_whatever_the_policy() -> None:
    policy, critic = ScriptedPolicy(pure_reply, window=32_768), ScriptedPolicy(pure_reply, window=300, name="small")
    with pytest.raises(tpo.ConfigError, match="of the critic small"):
        tpo.optimize(
            "q", policy=policy, critic=critic, reward=FunctionReward(hash_score), width=2, depth=1, max_tokens=100
        )
    assert policy.calls == [] and critic.calls == []


def test_a_long_user_template_is_named_in_the_error() -> None:
    long_update = tpo.DEFAULT_PROMPTS.update + "\n\nStyle guide:\n" + "Be precise and kind. " * 400
    prompts = tpo.PromptSet(update=long_update)
    policy = ScriptedPolicy(pure_reply, window=2048)
    with pytest.raises(tpo.ConfigError, match="the update prompt template does not fit"):
        tpo.optimize("q", policy=policy, reward=FunctionReward(hash_score), width=2, depth=1, prompts=prompts)
    assert policy.calls == []


@pytest.mark.parametrize("options", [{"mode": "bon"}, {"depth": 0}], ids=["bon", "depth-0"])
def test_best_of_n_sends_no_template_so_a_small_window_is_fine(options: dict) -> None:
    policy = ScriptedPolicy(pure_reply, window=300)
    result = tpo.optimize("q", policy=policy, reward=FunctionReward(hash_score), width=2, max_tokens=100, **options)
    assert result.status == "complete", result.error
    assert policy.violations == []


def test_revision_mode_only_checks_the_templates_it_uses() -> None:
    # A huge comparison template that revision never sends.
    prompts = tpo.PromptSet(loss_tpo=tpo.DEFAULT_PROMPTS.loss_tpo + " Be thorough." * 2000)
    policy = ScriptedPolicy(pure_reply, window=WINDOW)
    result = tpo.optimize(
        "q", policy=policy, reward=FunctionReward(hash_score), width=2, depth=1, mode="revision", prompts=prompts
    )
    assert result.status == "complete", result.error
    with pytest.raises(tpo.ConfigError, match="the loss_tpo prompt template"):
        tpo.optimize(
            "q", policy=policy, reward=FunctionReward(hash_score), width=2, depth=1, mode="tpo", prompts=prompts
        )


# --------------------------------------------------------------------------- the pieces


def test_shorten_middle_keeps_both_ends_and_says_how_much_went() -> None:
    text = "A" * 500 + "B" * 500
    short = shorten_middle(text, 100)
    assert short.startswith("A" * 60) and short.endswith("B" * 40)
    assert "[... 900 characters omitted to fit the context window ...]" in short
    assert shorten_middle("short", 100) == "short"
    assert "5 characters omitted" in shorten_middle("short", 0)


def test_estimate_is_conservative_for_ascii_and_non_ascii() -> None:
    assert estimate_tokens("a" * 1000) == 400  # real tokenizers: about 250
    assert estimate_tokens("中" * 10) == 30  # three UTF-8 bytes each, a token per byte at worst
    assert estimate_tokens("\ud800") == 3  # a lone surrogate does not crash the estimate
    assert estimate_messages([Message("user", "")]) == 16


def test_budget_fit_shortens_the_largest_values_first() -> None:
    class Backend:
        def count_tokens(self, messages: Sequence[Message]) -> int:
            return sum(len(m.content) for m in messages)  # one token per character

    budget = ContextBudget(Backend(), 2000)  # type: ignore[arg-type]
    values = {"big": "x" * 5000, "mid": "y" * 600, "small": "z" * 50}

    def build(v: dict[str, str]) -> tuple[Message, ...]:
        return (Message("user", "|".join(v[k] for k in ("big", "mid", "small"))),)

    messages, max_tokens, cut = budget.fit(build, values, list(values), 500)
    text = messages[0].content
    assert cut == ("big",)
    assert "y" * 600 in text and "z" * 50 in text
    assert len(text) + max_tokens <= 2000
    assert max_tokens == 500
    assert len(text) > 1000  # most of the room is used


def test_a_backend_failing_to_tell_its_window_is_a_backend_error() -> None:
    class Broken(ScriptedPolicy):
        async def context_window(self) -> int | None:
            raise RuntimeError("connection refused")

    with pytest.raises(tpo.BackendError, match="failed to tell its context window: RuntimeError: connection refused"):
        tpo.optimize("q", policy=Broken(pure_reply), reward=FunctionReward(hash_score), width=1, depth=0)


def test_a_nonsense_window_counts_as_unknown() -> None:
    class Odd(ScriptedPolicy):
        async def context_window(self) -> int | None:
            return -5

    policy = Odd(pure_reply)
    result = tpo.optimize(_long_prompt(100_000), policy=policy, reward=FunctionReward(hash_score), width=1, depth=0)
    assert result.status == "complete"
    _assert_every_request_fits(policy, estimate_messages, 8192)


def test_a_token_counter_that_chokes_falls_back_to_the_estimate() -> None:
    class Strict(ScriptedPolicy):
        """A backend whose tokenizer raises on a lone surrogate, as real ones do."""

        def count_tokens(self, messages: Sequence[Message]) -> int | None:
            for m in messages:
                m.content.encode("utf-8")
            return 3 + sum(5 + len(m.content) // 3 for m in messages)

    def count_or_estimate(messages: Sequence[Message]) -> int:
        try:
            return Strict().count_tokens(messages) or 0
        except UnicodeEncodeError:
            return estimate_messages(messages)

    def reply(request: GenerationRequest) -> list[str]:
        if request.purpose == "sample":
            return [f"odd \ud800 answer {i} " + "z" * 30_000 for i in range(request.n)]
        return pure_reply(request)

    policy = Strict(reply)  # no window of its own: the test checks the requests itself
    result = tpo.optimize(
        _long_prompt(40_000), policy=policy, reward=FunctionReward(hash_score), width=2, depth=1, context_window=WINDOW
    )
    assert result.status == "complete", result.error
    _assert_every_request_fits(policy, count_or_estimate, WINDOW)
    assert "chosen" in result.steps[1].truncated


def test_the_scripted_policy_refuses_requests_beyond_its_window() -> None:
    import asyncio

    policy = ScriptedPolicy(window=1000, tokens=TokenCounter())
    fits = GenerationRequest((Message("user", "x" * 300),), sampling=tpo.SamplingParams(max_tokens=500))
    too_big = GenerationRequest((Message("user", "x" * 1500),), sampling=tpo.SamplingParams(max_tokens=500))
    asyncio.run(policy.generate([fits]))
    assert policy.violations == []
    with pytest.raises(AssertionError, match="exceeds the window of 1000"):
        asyncio.run(policy.generate([too_big]))
    assert len(policy.violations) == 1 and "exceeds the window of 1000" in policy.violations[0]


def test_a_breach_of_the_window_shows_in_violations_not_only_as_a_failed_prompt() -> None:
    # The engine is told a larger window than the backend has: the breach reaches the double, which
    # records it; the engine can only report the raised AssertionError as a failed prompt.
    policy = ScriptedPolicy(pure_reply, window=1024)
    result = tpo.optimize(
        _long_prompt(20_000), policy=policy, reward=FunctionReward(hash_score), width=2, depth=0, context_window=8192
    )
    assert result.status == "failed" and "AssertionError" in (result.error or "")
    assert len(policy.violations) == 1 and "exceeds the window of 1024" in policy.violations[0]


def test_a_script_that_runs_out_is_a_violation() -> None:
    policy = ScriptedPolicy(["only one answer"])
    result = tpo.optimize("q", policy=policy, reward=FunctionReward(hash_score), width=2, depth=0)
    assert result.status == "failed"
    assert policy.violations == ["ScriptedPolicy ran out of scripted replies at a 'sample' request"]
