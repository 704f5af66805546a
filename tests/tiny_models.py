"""Builds tiny random-weight reward models and offline tokenizers with real chat templates, for tests and benchmarks.

Nothing here touches a model hub: tokenizers are trained in-process on a small built-in
corpus and models are initialised from a small config with a fixed seed. Typical use::

    path = save_reward_model(tmp_path / "rm", "llama")          # Llama-3-style, num_labels=1
    reward = SequenceClassifierReward.from_spec(str(path))

    # a benchmark-sized model
    path = save_reward_model(tmp_path / "rm", "qwen3", hidden_size=256, num_layers=4)
    pairs = make_pairs(1000, seed=0)                            # mixed-length (messages, answer)

Kinds: ``"llama"`` (Llama-3 chat template that writes the BOS token itself, tokenizer that
also adds BOS on encode, no pad token), ``"qwen3"`` (ChatML template, no BOS token at all,
``<|endoftext|>`` as pad) and ``"deberta"`` (DeBERTa-v2 with a BERT-style text-pair
tokenizer and no chat template, like OpenAssistant's reward model).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

Kind = Literal["llama", "qwen3", "deberta"]

# Llama-3's template in shape: the template itself emits the BOS token, and the assistant
# turn ends with <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# The same turns without the leading BOS, for tokenizers that add it on encode instead.
LLAMA3_CHAT_TEMPLATE_NO_BOS = LLAMA3_CHAT_TEMPLATE.replace("{{- bos_token }}", "")

# ChatML as Qwen uses it: no BOS token anywhere, every turn closed by <|im_end|> and a newline.
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_PAIR_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]

_WORDS = (
    "the a an of to and in is it that for on with as was by be this are or from at which have not but "
    "answer question model reward score prompt explain why how what when where who write list give short long "
    "python function code error data value number result example test step first second third last because "
    "water energy light planet river city history science music language world people time year day night "
    "good bad better best clear helpful honest safe wrong correct simple complex small large quick slow "
    "please thanks sure here there then than also only very more most some many each every any all none "
    "résumé café naïve 東京 数学 😀 ±×÷ ∑ λ"
).split()


def corpus(n_sentences: int = 400, *, seed: int = 0) -> list[str]:
    """Sentences drawn from a small vocabulary (with some non-ASCII), enough to train a BPE tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        out.append(sentence)
    return out


def build_tokenizer(
    style: Literal["llama3", "chatml", "pair"],
    *,
    vocab_size: int = 600,
    template_adds_bos: bool = True,
    with_pad: bool | None = None,
    seed: int = 0,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained offline, with that family's special tokens.

    ``llama3``: ``<|begin_of_text|>`` is BOS and is added on encode (as Llama-3's tokenizer
    does); the chat template writes it too unless ``template_adds_bos=False``; no pad token
    unless ``with_pad``. ``chatml``: no BOS, ``<|im_end|>`` is EOS, ``<|endoftext|>`` the pad
    (unless ``with_pad=False``). ``pair``: ``[CLS] A [SEP] B [SEP]`` with no chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"llama3": _LLAMA_SPECIALS, "chatml": _CHATML_SPECIALS, "pair": _PAIR_SPECIALS}[style]
    tok = Tokenizer(models.BPE(unk_token="[UNK]" if style == "pair" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    kwargs: dict[str, Any] = {}
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        kwargs = {
            "bos_token": bos,
            "eos_token": "<|eot_id|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE if template_adds_bos else LLAMA3_CHAT_TEMPLATE_NO_BOS,
        }
        if with_pad:
            kwargs["pad_token"] = "<|end_of_text|>"
    elif style == "chatml":
        kwargs = {"eos_token": "<|im_end|>", "chat_template": CHATML_CHAT_TEMPLATE}
        if with_pad is not False:
            kwargs["pad_token"] = "<|endoftext|>"
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        kwargs = {
            "bos_token": "[CLS]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "eos_token": "[SEP]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        }
        if with_pad is not False:
            kwargs["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **kwargs)


def build_model(
    kind: Kind,
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    num_labels: int = 1,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.2,
    seed: int = 0,
) -> Any:
    """A random-weight sequence-classification model sized for ``tokenizer``, in eval mode.

    The pad id in the config is the tokenizer's, or left unset when it has none (as in
    Llama-3 reward models, where the loader has to choose one). ``initializer_range`` is
    larger than usual so that scores of different answers differ clearly.
    """
    import torch
    from transformers import (
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        Qwen3Config,
        Qwen3ForSequenceClassification,
    )

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "max_position_embeddings": max_position_embeddings,
        "num_labels": num_labels,
        "initializer_range": initializer_range,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config: Any
    cls: Any
    if kind == "llama":
        config = LlamaConfig(num_key_value_heads=num_kv_heads, tie_word_embeddings=False, **common)
        cls = LlamaForSequenceClassification
    elif kind == "qwen3":
        config = Qwen3Config(
            num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads, tie_word_embeddings=False, **common
        )
        cls = Qwen3ForSequenceClassification
    elif kind == "deberta":
        config = DebertaV2Config(
            type_vocab_size=0,
            relative_attention=True,
            position_biased_input=False,
            pos_att_type=["p2c", "c2p"],
            max_relative_positions=-1,
            position_buckets=64,
            **common,
        )
        cls = DebertaV2ForSequenceClassification
    else:
        raise ValueError(f"unknown kind {kind!r}")
    with torch.random.fork_rng(devices=[]):  # a fixed seed without touching the caller's RNG
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def save_reward_model(
    path: str | Path,
    kind: Kind,
    *,
    tokenizer: Any = None,
    template_adds_bos: bool = True,
    with_pad: bool | None = None,
    **model_options: Any,
) -> Path:
    """Build a tokenizer and a model of ``kind`` and ``save_pretrained`` both into ``path``; return it.

    Load the result as a user would: ``SequenceClassifierReward.from_spec(str(path))`` or
    ``AutoModelForSequenceClassification.from_pretrained(path)``. ``model_options`` go to
    ``build_model`` (``hidden_size``, ``num_layers``, ``num_labels``, ``seed``, ...).
    """
    path = Path(path)
    if tokenizer is None:
        style = {"llama": "llama3", "qwen3": "chatml", "deberta": "pair"}[kind]
        tokenizer = build_tokenizer(style, template_adds_bos=template_adds_bos, with_pad=with_pad)  # type: ignore[arg-type]
    model = build_model(kind, tokenizer, **model_options)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    out, line = [], []
    for w in words:
        line.append(w)
        if rng.random() < 0.08:
            out.append(" ".join(line).capitalize() + ".")
            line = []
    if line:
        out.append(" ".join(line).capitalize() + ".")
    return " ".join(out)


def make_pairs(n: int, *, seed: int = 0, max_answer_words: int = 300) -> list[tuple[list[dict[str, str]], str]]:
    """``n`` (conversation, answer) pairs of mixed, realistic lengths, reproducible from ``seed``.

    Conversations have an optional system turn and one to three user turns (with assistant
    replies between them); answers run from a few words to ``max_answer_words``, skewed short
    as real answers are.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": _text(rng, rng.randint(5, 30))})
        for turn in range(rng.choice([1, 1, 1, 2, 3])):
            if turn:
                messages.append({"role": "assistant", "content": _text(rng, rng.randint(5, 80))})
            messages.append({"role": "user", "content": _text(rng, rng.randint(3, 60)) + "?"})
        n_words = min(max_answer_words, max(2, int(rng.expovariate(1 / 80))))
        out.append((messages, _text(rng, n_words)))
    return out
