"""The Transformers policy backend on a tiny random-weight Llama and a tokenizer built here, offline."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tpo  # noqa: E402
from tpo.backends.transformers_local import TransformersPolicy  # noqa: E402
from tpo.errors import BackendError, ConfigError, MissingDependencyError  # noqa: E402
from tpo.testing import FunctionReward  # noqa: E402
from tpo.types import Generation, GenerationRequest, Message, SamplingParams  # noqa: E402

# These tests load tiny models that they build themselves: real loads, on purpose.
pytestmark = pytest.mark.usefixtures("allow_real_requests")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The end-of-sequence token gets id 0 on purpose: a model whose logits are all equal picks it greedily.
SPECIALS = ["<|eos|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Answer the question clearly, briefly and honestly.",
    "Write a short poem about the sea and the wind.",
    "Compare the chosen answer with the rejected one and explain which is better.",
    "Rewrite the answer so that it follows the feedback.",
]


def _build_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 4, trainer)
    # No pad token on purpose: the backend must pad with the end-of-sequence token.
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIALS[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def _build_model(path: Path, tokenizer: Any, *, flat: bool = False) -> None:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        if flat:  # every logit 0: greedy decoding picks token 0, the end-of-sequence token
            model.lm_head.weight.zero_()
        else:  # the end token's logit is always 0 while the best other logit is positive: greedy never stops
            model.lm_head.weight[tokenizer.eos_token_id].zero_()
            model.lm_head.weight.mul_(20.0)  # peakier distributions, so that seeds visibly matter
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _build_model(path, _build_tokenizer(path))
    return path


@pytest.fixture(scope="module")
def policy(model_dir: Path) -> TransformersPolicy:
    return TransformersPolicy.from_spec(str(model_dir))


@pytest.fixture
def generate_calls(policy: TransformersPolicy, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record the keyword arguments of every ``model.generate`` call."""
    calls: list[dict[str, Any]] = []
    model = policy._model
    real = model.generate

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    yield calls


def _req(
    text: str,
    *,
    n: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 6,
    seed: int | None = None,
    logprobs: int | None = None,
    stop: tuple[str, ...] = (),
    system: str | None = None,
) -> GenerationRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    sampling = SamplingParams(temperature=temperature, top_p=0.95, max_tokens=max_tokens, seed=seed, stop=stop)
    return GenerationRequest(messages, n=n, sampling=sampling, logprobs=logprobs, purpose="sample")


def _gen(policy: TransformersPolicy, *requests: GenerationRequest) -> list[Generation]:
    return asyncio.run(policy.generate(list(requests)))


# ---------------------------------------------------------------------------- loading


def test_loads_through_from_spec_like_a_real_checkpoint(policy: TransformersPolicy, model_dir: Path) -> None:
    assert policy.name == f"hf:{model_dir}"
    assert (policy.batching, policy.supports_n, policy.supports_logprobs) == (True, True, True)
    assert (policy.counts_tokens, policy.knows_context_window) == (True, True)
    assert asyncio.run(policy.context_window()) == 4096  # max_position_embeddings; the tokenizer does not know
    assert policy._model.dtype == torch.float32  # dtype=auto on the CPU
    assert policy._pad_id == policy._tokenizer.eos_token_id == 0  # no pad token: the end token pads


def test_the_registry_builds_it_and_passes_options(model_dir: Path) -> None:
    built = tpo.registry.policy_from_spec(f"hf:{model_dir}", dtype="bfloat16", batch_size=4, device="cpu")
    assert isinstance(built, TransformersPolicy)
    assert built._model.dtype == torch.bfloat16 and built._batch_size == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "tpu"}, "device must be"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_batch_tokens": -1}, "max_batch_tokens"),
        ({"trust_remote_code": "yes"}, "trust_remote_code"),
        ({"temperature": 0.5}, "the hf policy backend: unknown option 'temperature'; it takes: device,"),
    ],
)
def test_bad_options_are_config_errors(model_dir: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransformersPolicy.from_spec(str(model_dir), **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_a_missing_gpu_is_a_config_error(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        TransformersPolicy.from_spec(str(model_dir), device="cuda")


def test_a_missing_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="could not load"):
        TransformersPolicy.from_spec(str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="hf:MODEL_OR_PATH"):
        TransformersPolicy.from_spec("")


def test_a_tokenizer_without_chat_template_is_refused(policy: TransformersPolicy, model_dir: Path) -> None:
    plain = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    plain.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        TransformersPolicy(policy._model, plain)


@pytest.mark.parametrize("hidden", ["transformers", "torch"])
def test_missing_packages_name_the_hf_extra(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(MissingDependencyError) as info:
        TransformersPolicy.from_spec("some/model")
    assert info.value.extra == "hf" and "pip install 'tpo[hf]'" in str(info.value)
    assert repr(hidden) in str(info.value)


# ---------------------------------------------------------------------------- generation


def test_n_return_sequences_in_one_call(policy: TransformersPolicy, generate_calls: list[dict[str, Any]]) -> None:
    [gen] = _gen(policy, _req("Write a poem.", n=3, temperature=1.0, max_tokens=5, seed=7))
    assert len(gen.texts) == 3 and len(gen.finish_reasons) == 3
    assert len(set(gen.texts)) > 1  # three samples, not one copied
    [call] = generate_calls
    assert call["num_return_sequences"] == 3 and call["do_sample"] is True
    assert call["temperature"] == 1.0 and call["top_p"] == 0.95 and call["max_new_tokens"] == 5


def test_greedy_with_n_decodes_once_and_copies(
    policy: TransformersPolicy, generate_calls: list[dict[str, Any]]
) -> None:
    [gen] = _gen(policy, _req("Write a poem.", n=2, temperature=0.0))
    assert gen.texts[0] == gen.texts[1]
    [call] = generate_calls
    assert call["num_return_sequences"] == 1 and call["do_sample"] is False and "temperature" not in call


def test_left_padding_does_not_change_greedy_output(
    policy: TransformersPolicy, generate_calls: list[dict[str, Any]]
) -> None:
    target = _req("Answer the question clearly.", max_tokens=8)
    [alone] = _gen(policy, target)
    longer = _req(
        "Compare the chosen answer with the rejected one and explain which is better, in detail.",
        system="You are careful.",
        max_tokens=8,
    )
    shorter = _req("Hi", max_tokens=8)
    batch = _gen(policy, longer, target, shorter)
    assert batch[1].texts == alone.texts
    assert batch[1].prompt_tokens == alone.prompt_tokens
    assert len(generate_calls) == 2  # the mixed-length batch was one call
    mask = generate_calls[1]["attention_mask"]
    ids = generate_calls[1]["input_ids"]
    lengths = mask.sum(dim=1).tolist()
    assert sorted(lengths, reverse=True) == lengths and len(set(lengths)) == 3  # three different lengths
    for row_mask, row_ids in zip(mask.tolist(), ids.tolist(), strict=True):
        pad = row_mask.index(1)
        assert row_mask == [0] * pad + [1] * (len(row_mask) - pad)  # padding on the left only
        assert set(row_ids[:pad]) <= {policy._pad_id}


def test_max_new_tokens_is_honoured(policy: TransformersPolicy) -> None:
    greedy, sampled = _gen(
        policy, _req("Write a poem.", max_tokens=7), _req("Write a poem.", n=2, temperature=1.0, max_tokens=4, seed=3)
    )
    assert greedy.completion_tokens == 7 and greedy.finish_reasons == ("length",)
    assert sampled.completion_tokens is not None and sampled.completion_tokens <= 2 * 4


def test_end_of_sequence_gives_finish_reason_stop(model_dir: Path, tmp_path: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    _build_model(tmp_path, tokenizer, flat=True)
    flat = TransformersPolicy.from_spec(str(tmp_path))
    [gen] = _gen(flat, _req("Hello", max_tokens=5))
    assert gen.texts == ("",) and gen.finish_reasons == ("stop",) and gen.completion_tokens == 1


def test_stop_strings_cut_the_text(policy: TransformersPolicy) -> None:
    [full] = _gen(policy, _req("Write a poem.", max_tokens=10))
    text = full.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    [cut] = _gen(policy, _req("Write a poem.", max_tokens=10, stop=(stop,)))
    assert cut.texts[0] == text[: text.find(stop)]
    assert cut.finish_reasons == ("stop",)


def test_seeds_are_reproducible_and_leave_the_global_rng_alone(policy: TransformersPolicy) -> None:
    batch = [_req("Write a poem.", n=2, temperature=1.0, max_tokens=6, seed=s) for s in (1, 2)]
    state = torch.get_rng_state()
    first = _gen(policy, *batch)
    assert torch.equal(torch.get_rng_state(), state)
    again = _gen(policy, *batch)
    assert [g.texts for g in again] == [g.texts for g in first]
    other = _gen(policy, *[_req("Write a poem.", n=2, temperature=1.0, max_tokens=6, seed=s) for s in (3, 4)])
    assert [g.texts for g in other] != [g.texts for g in first]


def test_count_tokens_is_the_real_input_length(
    policy: TransformersPolicy, generate_calls: list[dict[str, Any]]
) -> None:
    messages = (Message("system", "Be brief."), Message("user", "Why is the sea salty?"))
    counted = policy.count_tokens(messages)
    # The template rendered by hand, encoded without a second set of special tokens.
    expected_text = "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhy is the sea salty?<|end|>\n<|assistant|>\n"
    assert counted == len(policy._tokenizer.encode(expected_text, add_special_tokens=False))
    [gen] = _gen(policy, GenerationRequest(messages, sampling=SamplingParams(temperature=0.0, max_tokens=2)))
    [call] = generate_calls
    assert counted == gen.prompt_tokens == int(call["attention_mask"].sum()) == call["input_ids"].shape[1]


def test_requests_are_grouped_by_settings_and_split_by_batch_size(
    policy: TransformersPolicy, generate_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    mixed = [_req("a", max_tokens=3), _req("b", max_tokens=4), _req("c", max_tokens=3), _req("d", max_tokens=4)]
    gens = _gen(policy, *mixed)
    assert len(generate_calls) == 2
    assert sorted(c["input_ids"].shape[0] for c in generate_calls) == [2, 2]
    assert [g.completion_tokens for g in gens] == [3, 4, 3, 4]  # answers come back in request order

    generate_calls.clear()
    monkeypatch.setattr(policy, "_batch_size", 4)
    sampled = [_req(t, n=2, temperature=1.0, seed=i) for i, t in enumerate("abc")]
    _gen(policy, *sampled)
    assert [c["input_ids"].shape[0] * c["num_return_sequences"] for c in generate_calls] == [4, 2]


def test_logprobs_of_the_generated_tokens(policy: TransformersPolicy) -> None:
    [gen] = _gen(policy, _req("Rate this answer.", n=2, temperature=1.0, max_tokens=4, seed=5, logprobs=3))
    assert gen.logprobs is not None and len(gen.logprobs) == 2
    for text, tokens in zip(gen.texts, gen.logprobs, strict=True):
        assert tokens is not None and len(tokens) == 4
        joined = "".join(t.token for t in tokens)
        if "\ufffd" not in joined:  # a byte-level token alone may be part of a character
            assert joined == text
        for t in tokens:
            assert t.logprob <= 0 and len(t.top) == 3
            assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
            assert t.logprob <= t.top[0][1] + 1e-6
    [greedy] = _gen(policy, _req("Rate this answer.", max_tokens=3, logprobs=2))
    assert greedy.logprobs is not None and greedy.logprobs[0] is not None
    for t in greedy.logprobs[0]:  # greedy takes the most likely token
        assert t.top[0] == (t.token, pytest.approx(t.logprob))


def test_a_closed_backend_refuses_work(model_dir: Path) -> None:
    closing = TransformersPolicy.from_spec(str(model_dir))
    asyncio.run(closing.aclose())
    with pytest.raises(BackendError, match="closed"):
        _gen(closing, _req("a"))


# ---------------------------------------------------------------------------- through the engine


def test_one_tpo_run(policy: TransformersPolicy) -> None:
    reward = FunctionReward(lambda messages, answer: float(len(set(answer))))
    result = tpo.optimize(
        "Write a short poem about the sea.", policy=policy, reward=reward, width=2, depth=1, max_tokens=8, seed=3
    )
    assert result.status == "complete", result.error
    assert [s.kind for s in result.steps] == ["sample", "tpo"] or result.steps[1].fallback_to_revision
    assert result.usage.policy_calls == 4  # sample, loss, gradient, update
    assert result.usage.prompt_tokens > 0 and 0 < result.usage.completion_tokens <= 8 * 2 + 8 + 8 + 8 * 2
    assert result.answer is not None and result.score == max(c.score for c in result.candidates if c.score is not None)
