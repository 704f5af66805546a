"""The Transformers sequence-classification reward (``hf:``) on tiny random-weight models built here."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import tpo
from tiny_models import build_tokenizer, make_pairs, save_reward_model
from tpo import ConfigError, MissingDependencyError, RewardError, Score, ScoreRequest
from tpo.registry import reward_from_spec
from tpo.rewards.sequence_classifier import SequenceClassifierReward, _plan
from tpo.testing import ScriptedPolicy
from tpo.types import to_messages

# These tests load tiny models that they build themselves: real loads, on purpose.
pytestmark = pytest.mark.usefixtures("allow_real_requests")

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """No test here may reach a model hub: offline mode on, and any outbound connection recorded."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network access attempted in a test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: on a shared two-core machine, two threads mostly wait for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny model the tests load, saved once as a user would have it on disk."""
    root = tmp_path_factory.mktemp("rms")
    left = build_tokenizer("llama3")
    left.padding_side = "left"
    return {
        # Llama-3 style: the template writes BOS, the tokenizer adds BOS too, no pad token.
        "llama": save_reward_model(root / "llama", "llama"),
        # Same, but the template leaves BOS to the tokenizer.
        "llama_bos_by_tokenizer": save_reward_model(root / "llama_nb", "llama", template_adds_bos=False),
        # A tokenizer that asks for left padding.
        "llama_left": save_reward_model(root / "llama_left", "llama", tokenizer=left, seed=3),
        # Qwen3 / ChatML: no BOS at all, <|endoftext|> pad.
        "qwen3": save_reward_model(root / "qwen3", "qwen3", seed=1),
        "qwen3_2": save_reward_model(root / "qwen3_2", "qwen3", num_labels=2, seed=2),
        # DeBERTa-v2 with a text-pair tokenizer and no chat template.
        "deberta": save_reward_model(root / "deberta", "deberta", seed=4),
    }


@pytest.fixture(scope="module")
def pairs() -> list[tuple[list[dict[str, str]], str]]:
    return make_pairs(24, seed=7, max_answer_words=120)


class _InputSpy:
    """Records the ``input_ids`` of every forward pass of a model."""

    def __init__(self, model: Any) -> None:
        self.calls: list[Any] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    def rows(self) -> list[list[int]]:
        """The unpadded rows of every call, in order."""
        out = []
        for ids, mask in self.calls:
            for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
                out.append(row[: sum(m)])
        return out


def _values(scores: list[Score]) -> list[float]:
    assert all(s.error is None for s in scores), [s.error for s in scores if s.error]
    return [s.value for s in scores]  # type: ignore[misc]


# ---------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("kind", ["llama", "qwen3", "deberta", "llama_left"])
def test_score_is_the_same_alone_or_in_a_batch_of_mixed_lengths(models: dict[str, Path], pairs: Any, kind: str) -> None:
    reward = SequenceClassifierReward.from_spec(str(models[kind]), max_batch_tokens=1536, max_batch_size=8)
    spy = _InputSpy(reward._model)
    messages, answers = [m for m, _ in pairs], [a for _, a in pairs]

    batched = _values(reward.score_pairs(messages, answers))
    batch_calls = len(spy.calls)
    alone = [_values(reward.score_pairs([m], [a]))[0] for m, a in pairs]

    # The batches really mixed lengths (padding present), and the budget held.
    padded = [mask for _, mask in spy.calls[:batch_calls] if mask.shape[0] > 1 and not bool(mask.all())]
    assert padded, "no batch held inputs of different lengths"
    for ids, _ in spy.calls[:batch_calls]:
        assert ids.shape[0] == 1 or ids.shape[0] * ids.shape[1] <= 1536
        assert ids.shape[0] <= 8
    assert max(abs(b - a) for b, a in zip(batched, alone, strict=True)) < TOLERANCE
    # Scores differ between answers: a constant model would make the comparison empty.
    assert max(batched) - min(batched) > 0.05


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_scores_are_the_same_across_two_loaded_instances_and_any_order(
    models: dict[str, Path], pairs: Any, kind: str
) -> None:
    first = SequenceClassifierReward.from_spec(str(models[kind]))
    second = SequenceClassifierReward.from_spec(str(models[kind]), max_batch_tokens=700, max_batch_size=3)
    requests = [ScoreRequest(to_messages(m), a) for m, a in pairs]

    one = _values(asyncio.run(first.score(requests)))
    two = _values(asyncio.run(second.score(list(reversed(requests)))))[::-1]

    assert max(abs(x - y) for x, y in zip(one, two, strict=True)) < TOLERANCE


def test_score_is_the_raw_logit_of_the_model(models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = models["qwen3"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    conversation = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Nile."}]
    ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = model(input_ids=ids).logits[0, 0].item()

    reward = SequenceClassifierReward.from_spec(str(path))
    got = _values(reward.score_pairs(["Name a river."], ["The Nile."]))[0]

    assert got == pytest.approx(expected, abs=1e-5)  # no softmax or sigmoid on top
    assert reward.score_pairs([], []) == []


# ---------------------------------------------------------------------- BOS handling


def test_no_doubled_bos_when_the_template_writes_it(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["llama"]))
    tokenizer = reward._tokenizer
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # this tokenizer adds BOS on encode
    spy = _InputSpy(reward._model)

    reward.score_pairs(["Why is the sky blue?"], ["Rayleigh scattering."])

    (row,) = spy.rows()
    assert row[0] == bos and row.count(bos) == 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Rayleigh scattering."}],
        tokenize=False,
    )
    assert text.startswith(tokenizer.bos_token)
    assert tokenizer.decode(row) == text


def test_bos_added_once_when_the_template_leaves_it_to_the_tokenizer(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["llama_bos_by_tokenizer"]))
    tokenizer = reward._tokenizer
    spy = _InputSpy(reward._model)

    reward.score_pairs(["Hello?"], ["Hi."])

    (row,) = spy.rows()
    assert row[0] == tokenizer.bos_token_id and row.count(tokenizer.bos_token_id) == 1


def test_tokenizer_without_bos_gets_none(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["qwen3"]))
    tokenizer = reward._tokenizer
    assert tokenizer.bos_token_id is None
    spy = _InputSpy(reward._model)

    reward.score_pairs(["Hello?"], ["Hi."])

    (row,) = spy.rows()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}], tokenize=False
    )
    assert row == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert row[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_a_model_without_pad_token_pads_with_eos(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["llama"]))
    assert reward._tokenizer.pad_token_id is None
    assert reward.pad_token_id == reward._tokenizer.eos_token_id
    assert reward._model.config.pad_token_id == reward.pad_token_id


# ---------------------------------------------------------------------- truncation


def _long(word: str, n: int) -> str:
    return " ".join(f"{word}{i % 10}" for i in range(n))


def test_truncation_drops_the_oldest_turns_first_and_records_it(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["qwen3"]), max_length=200)
    tokenizer = reward._tokenizer
    spy = _InputSpy(reward._model)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "OLDEST " + _long("alpha", 40)},
        {"role": "assistant", "content": "OLDREPLY " + _long("beta", 40)},
        {"role": "user", "content": "MIDDLE " + _long("gamma", 10)},
        {"role": "assistant", "content": "MIDREPLY " + _long("delta", 10)},
        {"role": "user", "content": "LATEST question about rivers?"},
    ]
    answer = "ANSWER the river flows to the sea."

    (score,) = reward.score_pairs([conversation], [answer])

    assert score.error is None and score.value is not None
    assert score.details is not None
    assert score.details["truncated"] is True
    assert score.details["dropped_turns"] == 2  # the oldest exchange only: the middle one fits
    assert score.details["answer_tokens_removed"] == 0
    (row,) = spy.rows()
    assert len(row) <= 200 and score.details["input_tokens"] == len(row)
    text = tokenizer.decode(row)
    assert "OLDEST" not in text and "OLDREPLY" not in text
    assert "Be brief." in text and "MIDDLE" in text and "MIDREPLY" in text
    assert "LATEST question about rivers?" in text and answer in text


def test_a_long_last_question_is_shortened_in_the_middle(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["llama"]), max_length=96)
    spy = _InputSpy(reward._model)
    question = "START " + _long("word", 150) + " END?"

    (score,) = reward.score_pairs([question], ["A short answer."])

    assert score.details is not None and score.details["truncated"] is True
    assert score.details["prompt_tokens_removed"] > 0 and score.details["answer_tokens_removed"] == 0
    (row,) = spy.rows()
    assert len(row) <= 96
    text = reward._tokenizer.decode(row)
    assert "START" in text and "END?" in text and "A short answer." in text


def test_an_answer_too_long_alone_keeps_its_beginning(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["qwen3"]), max_length=64)
    spy = _InputSpy(reward._model)
    answer = "BEGINNING " + _long("tail", 200) + " FINALWORD"

    (score,) = reward.score_pairs(["Tell me everything?"], [answer])

    assert score.error is None and score.details is not None
    assert score.details["answer_tokens_removed"] > 0
    (row,) = spy.rows()
    assert len(row) <= 64
    text = reward._tokenizer.decode(row)
    assert "BEGINNING" in text and "FINALWORD" not in text and "Tell me everything?" in text


def test_untruncated_scores_carry_no_details_and_truncated_ones_are_batch_invariant(
    models: dict[str, Path], pairs: Any
) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["llama"]), max_length=128, max_batch_tokens=2048)
    messages, answers = [m for m, _ in pairs], [a for _, a in pairs]

    batched = reward.score_pairs(messages, answers)
    alone = [reward.score_pairs([m], [a])[0] for m, a in pairs]

    assert any(s.details for s in batched) and any(s.details is None for s in batched)
    assert [s.details for s in batched] == [s.details for s in alone]
    assert max(abs(b - a) for b, a in zip(_values(batched), _values(alone), strict=True)) < TOLERANCE


# ---------------------------------------------------------------------- text pairs and output index


def test_text_pair_mode_feeds_question_and_answer_as_a_pair(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["deberta"]))
    assert reward.input_format == "pair"  # "auto" with no chat template
    spy = _InputSpy(reward._model)

    reward.score_pairs(
        [
            "What is water?",
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye?"},
            ],
        ],
        ["H2O.", "Goodbye."],
    )

    tokenizer = reward._tokenizer
    rows = spy.rows()
    expected = [
        tokenizer("What is water?", "H2O.")["input_ids"],
        tokenizer("User: Hi\n\nAssistant: Hello\n\nUser: Bye?", "Goodbye.")["input_ids"],
    ]
    assert sorted(rows) == sorted(expected)
    with pytest.raises(ConfigError, match="no chat template"):
        SequenceClassifierReward.from_spec(str(models["deberta"]), input_format="chat")


def test_pair_mode_can_be_forced_on_a_chat_model(models: dict[str, Path]) -> None:
    chat = SequenceClassifierReward.from_spec(str(models["llama"]))
    pair = SequenceClassifierReward.from_spec(str(models["llama"]), input_format="pair")
    spy = _InputSpy(pair._model)

    a = _values(chat.score_pairs(["Hello?"], ["Hi."]))[0]
    b = _values(pair.score_pairs(["Hello?"], ["Hi."]))[0]

    assert spy.rows() == [pair._tokenizer("Hello?", "Hi.")["input_ids"]]
    assert a != b


def test_output_index_picks_a_head_of_a_multi_output_model(models: dict[str, Path], pairs: Any) -> None:
    messages, answers = [m for m, _ in pairs[:6]], [a for _, a in pairs[:6]]
    head0 = SequenceClassifierReward.from_spec(str(models["qwen3_2"]))
    head1 = SequenceClassifierReward.from_spec(str(models["qwen3_2"]), output_index=1)
    spy = _InputSpy(head1._model)

    zero = _values(head0.score_pairs(messages, answers))
    one = _values(head1.score_pairs(messages, answers))

    import torch

    ids, mask = spy.calls[0]
    with torch.inference_mode():
        logits = head1._model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape[1] == 2
    assert sorted(one) == pytest.approx(sorted(logits[:, 1].tolist()), abs=1e-5)
    assert all(abs(x - y) > 1e-3 for x, y in zip(zero, one, strict=True))
    with pytest.raises(ConfigError, match="out of range"):
        SequenceClassifierReward.from_spec(str(models["qwen3_2"]), output_index=2)
    with pytest.raises(ConfigError, match="out of range"):
        SequenceClassifierReward.from_spec(str(models["qwen3"]), output_index=1)


# ---------------------------------------------------------------------- options and errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 8}, "the hf reward: unknown option 'batch_size'; it takes: device,"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda"}, "CUDA"),
        ({"dtype": "int3"}, "dtype"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"max_batch_size": "8"}, "max_batch_size"),
        ({"max_length": 4}, "max_length"),
        ({"max_length": 100_000}, "position embeddings"),
        ({"output_index": -1}, "output_index"),
        ({"output_index": True}, "output_index"),
        ({"input_format": "xml"}, "input_format"),
        ({"trust_remote_code": "yes"}, "trust_remote_code"),
    ],
)
def test_bad_options_are_config_errors(models: dict[str, Path], options: dict[str, Any], message: str) -> None:
    import torch

    if options.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=message):
        SequenceClassifierReward.from_spec(str(models["qwen3"]), **options)


def test_missing_paths_are_clear_errors_without_network(tmp_path: Path, _offline: list[Any]) -> None:
    with pytest.raises(ConfigError, match="no such model directory"):
        SequenceClassifierReward.from_spec(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        SequenceClassifierReward.from_spec(str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        SequenceClassifierReward.from_spec(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="give a model"):
        SequenceClassifierReward.from_spec("")
    with pytest.raises(ConfigError, match="cannot load 'no-such-org/no-such-reward-model'"):
        SequenceClassifierReward.from_spec("no-such-org/no-such-reward-model")
    assert _offline == []


def test_a_language_model_checkpoint_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("llama3")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    with pytest.raises(ConfigError, match="not a sequence-classification reward model"):
        SequenceClassifierReward.from_spec(str(tmp_path))


def test_missing_torch_names_the_hf_extra(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"tpo\[hf\]"):
        SequenceClassifierReward.from_spec(str(models["qwen3"]))


def test_a_template_that_rejects_a_conversation_fails_only_that_pair(models: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["qwen3"])
    tokenizer.chat_template = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns here') }}{%- endif %}"
        + tokenizer.chat_template
    )
    model = AutoModelForSequenceClassification.from_pretrained(models["qwen3"])
    reward = SequenceClassifierReward(model, tokenizer, name="strict")

    ok, bad = reward.score_pairs(
        ["Fine?", [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]], ["Yes.", "No."]
    )

    assert ok.error is None and ok.value is not None
    assert bad.value is None and bad.error is not None and "no system turns here" in bad.error


def test_a_closed_reward_refuses_to_score(models: dict[str, Path]) -> None:
    reward = SequenceClassifierReward.from_spec(str(models["qwen3"]))
    assert asyncio.run(reward.score([])) == []
    asyncio.run(reward.aclose())
    with pytest.raises(RewardError, match="closed"):
        asyncio.run(reward.score([ScoreRequest(to_messages("Hi?"), "Hello.")]))


def test_plan_respects_the_token_budget_and_row_limit() -> None:
    lengths = [5, 300, 40, 41, 40, 1000, 7, 120, 120, 3]
    batches = _plan(lengths, max_batch_tokens=250, max_batch_size=3)

    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        widths = [lengths[i] for i in batch]
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(widths) <= 250
        assert widths == sorted(widths, reverse=True)
    assert [5] in batches and [1] in batches  # longer than the budget alone: a batch of its own


# ---------------------------------------------------------------------- through tpo


def test_registry_and_optimize_end_to_end(models: dict[str, Path]) -> None:
    reward = reward_from_spec(f"hf:{models['llama']}", max_batch_size=4)
    assert isinstance(reward, SequenceClassifierReward)
    assert reward.name == f"hf:{models['llama']}" and reward.batching is True
    policy = ScriptedPolicy()

    result = tpo.optimize("Why do rivers flow to the sea?", policy=policy, reward=reward, width=3, depth=1, seed=0)

    candidates = result.candidates
    assert len(candidates) == 6 and all(c.score is not None for c in candidates)
    expected = reward.score_pairs(["Why do rivers flow to the sea?"] * len(candidates), [c.text for c in candidates])
    for c, s in zip(candidates, expected, strict=True):
        assert c.score == pytest.approx(s.value, abs=TOLERANCE)
    best = max(candidates, key=lambda c: c.score if c.score is not None else float("-inf"))
    assert result.status == "complete"
    assert result.answer == best.text and result.score == best.score
    assert result.reward == reward.name
