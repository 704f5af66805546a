"""Makes every request fit the backend's context window, shortening long fields visibly."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from ..errors import ConfigError
from ..protocols import PolicyBackend
from ..types import Message

#: Assumed when neither the backend nor the configuration gives a context window.
DEFAULT_CONTEXT_WINDOW = 8192
_SAFETY_TOKENS = 16


def estimate_tokens(text: str) -> int:
    """A conservative token count for text when the backend has no tokenizer to ask.

    Real tokenizers give about four ASCII characters a token; this assumes 2.5, and a token
    for every byte of non-ASCII text (the worst case of a byte-level vocabulary).
    """
    ascii_chars = sum(1 for ch in text if ord(ch) < 128) if not text.isascii() else len(text)
    non_ascii_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    return math.ceil(ascii_chars / 2.5) + non_ascii_bytes


def estimate_messages(messages: Sequence[Message]) -> int:
    """``estimate_tokens`` over a conversation, with a chat-template allowance per message."""
    return 8 + sum(8 + estimate_tokens(m.content) for m in messages)


def shorten_middle(text: str, keep_chars: int) -> str:
    """Keep the start and the end of ``text`` and say visibly how much was cut from the middle."""
    if keep_chars >= len(text):
        return text
    keep_chars = max(keep_chars, 0)
    head = (keep_chars * 3) // 5
    tail = keep_chars - head
    omitted = len(text) - keep_chars
    marker = f"\n[... {omitted:,} characters omitted to fit the context window ...]\n"
    return text[:head] + marker + (text[len(text) - tail :] if tail else "")


class ContextBudget:
    """Counts tokens for one backend and fits requests into its window."""

    def __init__(self, backend: PolicyBackend, window: int) -> None:
        self.window = window
        self._backend = backend
        self._limit = window - _SAFETY_TOKENS - window // 100
        self._empty_message_tokens: int | None = None  # the chat template's cost of one empty turn

    def count(self, messages: Sequence[Message]) -> int:
        """Prompt tokens of ``messages``: the backend's count when it can tell, else the estimate."""
        n = self._backend_count(messages)
        return estimate_messages(messages) if n is None else n

    def _backend_count(self, messages: Sequence[Message]) -> int | None:
        counter: Callable[[Sequence[Message]], int | None] | None = getattr(self._backend, "count_tokens", None)
        if counter is None:
            return None
        try:
            return counter(messages)
        except Exception:  # a tokenizer choking on odd text (a lone surrogate, say): the estimate still works
            return None

    def fit(
        self,
        build: Callable[[Mapping[str, str]], tuple[Message, ...]],
        values: Mapping[str, str],
        shrinkable: Sequence[str],
        max_tokens: int,
    ) -> tuple[tuple[Message, ...], int, tuple[str, ...]]:
        """Build the request from ``values``; shorten the largest ``shrinkable`` values until it fits.

        Returns the messages, the completion token limit that still fits, and the names of
        the values that were shortened.
        """
        reserve, prompt_budget = self._split(max_tokens)
        current = dict(values)
        # Characters kept of each original value; every attempt shortens the original afresh,
        # so a marker never ends up inside another marker.
        kept = {k: len(values[k]) for k in shrinkable}
        truncated: set[str] = set()
        for attempt in range(1, 13):
            messages = build(current)
            used = self.count(messages)
            if used <= prompt_budget:
                return messages, max(1, min(max_tokens, self._limit - used)), tuple(sorted(truncated))
            sizes = {k: self._text_tokens(current[k]) for k in shrinkable if current[k]}
            if not sizes:
                break
            # Cut the excess plus room for the markers and a slack that grows with every
            # attempt (token counts of cut text are not additive), from the largest values.
            slack = 24 * len(sizes) + attempt * max(8, prompt_budget // 50)
            target_total = max(0, sum(sizes.values()) - (used - prompt_budget) - slack)
            for name, cap in _water_fill(sizes, target_total).items():
                if cap < sizes[name]:
                    kept[name] = int(kept[name] * cap / sizes[name])
                    current[name] = shorten_middle(values[name], kept[name])
                    truncated.add(name)
        raise ConfigError(
            f"a request does not fit the context window of {self.window} tokens even with its long parts "
            f"shortened; with those parts empty it still takes about {self.count(build({k: '' for k in values}))} "
            f"tokens, and {reserve} are kept for the reply. "
            "Use a model with a larger window, a lower max_tokens, or shorter templates."
        )

    def check_fits(
        self,
        build: Callable[[Mapping[str, str]], tuple[Message, ...]],
        empty_values: Mapping[str, str],
        max_tokens: int,
        *,
        what: str,
        owner: str,
    ) -> None:
        """Raise ``ConfigError`` when a request built from ``empty_values`` leaves no room in the window.

        The test ``fit`` applies, so a template that passes here can always be fitted by
        shortening its values. ``what`` names the template and ``owner`` the backend, for the message.
        """
        reserve, prompt_budget = self._split(max_tokens)
        used = self.count(build(empty_values))
        if used > prompt_budget:
            raise ConfigError(
                f"{what} does not fit the context window of {self.window} tokens of {owner}: with every value "
                f"empty it takes about {used} tokens, and {reserve} are kept for the reply "
                f"(about {prompt_budget} are available). Use a model with a larger window, "
                "a lower max_tokens or critic_max_tokens, or a shorter template."
            )

    def _split(self, max_tokens: int) -> tuple[int, int]:
        """Tokens kept for the reply, and what is left for the prompt."""
        reserve = min(max_tokens, self._limit // 2)
        return reserve, self._limit - reserve

    def _text_tokens(self, text: str) -> int:
        n = self._backend_count((Message("user", text),))
        if n is not None and self._empty_message_tokens is None:
            self._empty_message_tokens = self._backend_count((Message("user", ""),))
        if n is not None and self._empty_message_tokens is not None:
            return max(1, n - self._empty_message_tokens)
        return max(1, estimate_tokens(text))


def _water_fill(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Caps per value so that their sum is at most ``total``, cutting the largest values first."""
    names = sorted(sizes, key=lambda k: sizes[k])
    caps: dict[str, int] = {}
    remaining, left = total, len(names)
    for name in names:
        share = remaining // left if left else 0
        caps[name] = min(sizes[name], share)
        remaining -= caps[name]
        left -= 1
    return caps
