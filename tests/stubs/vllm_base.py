"""What both ``vllm`` stand-ins share: the tokenizer, the engine's config objects, and swapping ``vllm`` in and out of ``sys.modules``.

``vllm_stub.py`` plays vLLM for the policy backend (generation, and the pooling calls in
their shapes); ``vllm_reward_stub.py`` plays three releases of vLLM's pooling runner for the
reward. Both build their ``vllm`` module and hand it to ``install_module``.

A stand-in is a test double, so while one is installed tpo's real-request guard
(``tpo.testing.forbid_real_requests``, on in every test by ``tests/conftest.py``) lets the
vLLM plugins load "models" into it; ``allow_real_requests`` sets the guard for one test.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from tpo.testing import forbid_real_requests, real_requests_allowed

__all__ = ["Engine", "FakeTokenizer", "ModelConfig", "allow_real_requests", "break_import", "hide", "install_module"]


class FakeTokenizer:
    """A whitespace tokenizer with a chat template, enough for counting, encoding and decoding.

    A word's id is stable (a CRC of the word) so tests can predict ids and counts, and
    ``decode`` knows every word it has seen. The template gives each message its role marker,
    its words and an end marker, then ``<|assistant|>`` for the generation prompt; so
    ``len(encode(apply_chat_template(messages), add_special_tokens=False))`` is 2 per message
    plus the words of every message, plus 1 for the generation prompt.

    ``bos_token_id=None`` is a tokenizer without a beginning-of-sequence token (as Qwen's);
    otherwise ``encode`` prepends it when asked for special tokens, and ``bos_in_template``
    makes the template write ``<bos>`` itself (as Llama 3's). Every ``apply_chat_template``
    call is recorded in ``template_calls``.
    """

    eos_token = "<eos>"
    eos_token_id = 2
    pad_token_id = 0
    vocab_size = 50_000

    def __init__(self, *, bos_token_id: int | None = 1, bos_in_template: bool = False) -> None:
        self.bos_token_id = bos_token_id
        self.bos_token = "<bos>" if bos_token_id is not None else None
        self.bos_in_template = bos_in_template and bos_token_id is not None
        self._words: dict[int, str] = {self.pad_token_id: "<pad>", self.eos_token_id: "<eos>"}
        if bos_token_id is not None:
            self._words[bos_token_id] = "<bos>"
        self.template_calls: list[dict[str, Any]] = []

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> Any:
        self.template_calls.append(
            {
                "conversation": [dict(m) for m in conversation],
                "tokenize": tokenize,
                "add_generation_prompt": add_generation_prompt,
                **kwargs,
            }
        )
        parts = ["<bos>"] if self.bos_in_template else []
        for m in conversation:
            if set(m) - {"role", "content"} or not isinstance(m.get("content"), str):
                raise ValueError(f"unexpected message {m!r}")
            parts.append(f"<|{m['role']}|> {m['content']} <|end|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        text = " ".join(parts)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(w) for w in text.split()]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        words = [self._words.get(i, f"<{i}>") for i in ids]
        if skip_special_tokens:
            words = [w for w in words if w not in ("<pad>", "<bos>", "<eos>")]
        return " ".join(words)

    def _id(self, word: str) -> int:
        if word == "<bos>" and self.bos_token_id is not None:
            return self.bos_token_id
        i = 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)
        self._words[i] = word
        return i


class ModelConfig:
    """vLLM's ``ModelConfig``: the fields tpo reads."""

    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len


class Engine:
    """``LLM.llm_engine``: where releases before 0.10 keep the model config."""

    def __init__(self, model_config: ModelConfig, tokenizer: FakeTokenizer) -> None:
        self.model_config = model_config
        self._tokenizer = tokenizer

    def get_tokenizer(self) -> FakeTokenizer:
        return self._tokenizer


def install_module(
    monkeypatch: Any,
    module: types.ModuleType,
    attributes: Mapping[str, Any],
    submodules: Mapping[str, Mapping[str, Any]],
) -> None:
    """Fill ``module`` and put it at ``sys.modules["vllm"]``, with ``vllm.<name>`` for each submodule, for one test.

    Real model requests are allowed for the rest of the test: they reach this double.
    """
    allow_real_requests(monkeypatch)
    for name, value in attributes.items():
        setattr(module, name, value)
    module.__path__ = []  # a package, so ``import vllm.outputs`` and the like find the submodules
    monkeypatch.setitem(sys.modules, "vllm", module)
    for sub, contents in submodules.items():
        m = types.ModuleType(f"vllm.{sub}")
        for name, value in contents.items():
            setattr(m, name, value)
        setattr(module, sub, m)
        monkeypatch.setitem(sys.modules, f"vllm.{sub}", m)


class _Guard:
    """tpo's real-request switch as an attribute, so that ``monkeypatch.setattr`` can set it and undo it."""

    @property
    def allowed(self) -> bool:
        return real_requests_allowed()

    @allowed.setter
    def allowed(self, value: bool) -> None:
        forbid_real_requests(not value)  # called plainly, it sets the switch until set again


_GUARD = _Guard()


def allow_real_requests(monkeypatch: Any, allowed: bool = True) -> None:
    """Allow (or forbid) real model requests for the rest of one test; ``monkeypatch`` restores the setting.

    A test that installs a stand-in changes the guard only through this, not with a ``with``
    block, so that every change is undone in reverse order with the stand-in's own.
    """
    monkeypatch.setattr(_GUARD, "allowed", allowed)


def _forget_vllm(monkeypatch: Any) -> None:
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)


def hide(monkeypatch: Any) -> None:
    """Make ``import vllm`` fail with ``ModuleNotFoundError`` for one test, installed or not."""
    _forget_vllm(monkeypatch)
    monkeypatch.setitem(sys.modules, "vllm", None)


class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``vllm``, whose import then fails with the given error."""

    def __init__(self, error: ImportError) -> None:
        self._error = error

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec("vllm", self) if fullname == "vllm" else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise self._error


def break_import(monkeypatch: Any, error: ImportError) -> None:
    """Make ``import vllm`` find vLLM and then fail with ``error``, as a broken installation does, for one test."""
    _forget_vllm(monkeypatch)
    monkeypatch.setattr(sys, "meta_path", [_Broken(error), *sys.meta_path])
