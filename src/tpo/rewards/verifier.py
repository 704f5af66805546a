"""A verifier reward: 1.0 when the answer's final result equals the prompt's reference answer, else 0.0.

The comparison is ``math-verify``'s: both sides are parsed (LaTeX, ``\\boxed{}``, plain
expressions) into SymPy and compared symbolically and numerically, so ``\\boxed{\\frac{1}{2}}``
matches a reference of ``0.5``.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError, MissingDependencyError
from ..options import PluginOptions, integer, number, option, string
from ..types import Score, ScoreRequest

__all__ = ["DEFAULT_FIELDS", "MathReward", "MathRewardOptions"]

#: Metadata fields tried, in order, for the reference answer when no ``field`` is given.
DEFAULT_FIELDS = ("answer", "reference", "solution")

_GOLD_CACHE_SIZE = 1024
_MATH_CHARS = frozenset("\\^_{}=+-*/()[]<>|!")


@dataclass(frozen=True)
class MathRewardOptions(PluginOptions):
    """The options of ``MathReward`` (``--reward-option NAME=VALUE``); see the class for what each does."""

    owner: ClassVar[str] = "the math reward"

    field: str | None = option(None, string(), "metadata key of the reference (default: answer, reference, solution)")
    timeout_s: float = option(5.0, number(0, min_open=True), "seconds math-verify may spend on one answer")
    float_rounding: int = option(6, integer(min=0), "decimal places numbers are rounded to before comparing")


class MathReward:
    """Checks an answer's final result against the reference answer in the prompt's metadata.

    The reference is read from ``metadata[field]``; with no ``field`` the first of
    ``answer``, ``reference``, ``solution`` that the metadata holds is used (a full worked
    solution works: its ``\\boxed{}`` result is taken). A GSM8K-style reference ending in
    ``#### 72`` is reduced to what follows the last ``####``. A reference without math
    delimiters that looks like math (digits, operators, backslashes) is read as LaTeX first
    (``\\frac{1}{2}``, ``x^2+1``), then as plain text; one made of words only is not math,
    and fails the score rather than scoring every answer 0.

    The answer scores 1.0 when a result extracted from it (a ``\\boxed{}`` expression first,
    then phrases like "the answer is", then the last expression) verifies against the
    reference, else 0.0; an answer with no recognisable result scores 0.0. A prompt without
    a reference, or with one that cannot be parsed, fails the score with a message naming the
    field and the prompt.

    math-verify bounds each parse and comparison with ``timeout_s`` through ``SIGALRM``, which
    only works on the main thread. So verification runs on the event loop's thread when that
    is the main thread (it takes milliseconds, and a runaway expression is really stopped);
    otherwise in a worker thread without math-verify's alarms, where an answer that takes
    longer than ``timeout_s`` overall is failed, though the thread cannot be stopped early.
    (math-verify's alarm cancels any ``SIGALRM`` timer the program had set, such as
    pytest-timeout's in its default ``signal`` method.)
    """

    name = "math"
    batching = False
    supports_n = False
    supports_logprobs = False
    description = (
        "1.0 when the answer's final result matches the reference answer in the prompt's metadata (math-verify)."
    )
    options_class = MathRewardOptions

    def __init__(self, *, options: MathRewardOptions | None = None, **kwargs: Any) -> None:
        """The options as keywords (``field="solution"``) or in ``options``."""
        opts = self.options = MathRewardOptions.from_options(kwargs, base=options)
        field, timeout_s = opts.field, opts.timeout_s
        try:
            import math_verify
        except ImportError as e:
            raise MissingDependencyError("math-verify", "math", "The math reward") from e
        self._mv = math_verify
        # One extraction for answers and references alike (a boxed result takes priority).
        self._extraction = (
            math_verify.LatexExtractionConfig(boxed_match_priority=0),
            math_verify.ExprExtractionConfig(),
        )
        self._fields = (field,) if field is not None else DEFAULT_FIELDS
        self._timeout_s = timeout_s
        # math-verify's alarm takes whole seconds.
        self._alarm_s = max(1, math.ceil(timeout_s))
        self._float_rounding = opts.float_rounding
        self._gold: OrderedDict[tuple[str, bool], list[Any]] = OrderedDict()
        self._gold_lock = threading.Lock()
        if field is not None:
            self.name = f"math:{field}"

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> MathReward:
        """``math`` or ``math:FIELD`` (the metadata key of the reference); options ``field``, ``timeout_s``."""
        opts = MathRewardOptions.from_options(options)
        if target.strip():
            if opts.field is not None and opts.field != target.strip():
                raise ConfigError(f"the math reward got two reference fields: math:{target} and field={opts.field}")
            opts = opts.replace(field=target.strip())
        return cls(options=opts)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """1.0 or 0.0 per answer; ``Score.failed`` when the prompt has no usable reference."""
        if threading.current_thread() is threading.main_thread():
            return [self._check(r, alarms=True) for r in requests]
        out = []
        for r in requests:
            try:
                out.append(await asyncio.wait_for(asyncio.to_thread(self._check, r, False), self._timeout_s))
            except asyncio.TimeoutError:
                out.append(
                    Score.failed(
                        f"checking the answer to prompt {r.prompt_id!r} took longer than {self._timeout_s:g} s"
                    )
                )
        return out

    def _check(self, request: ScoreRequest, alarms: bool) -> Score:
        found = self._reference(request.metadata)
        if found is None:
            names = " or ".join(repr(f) for f in self._fields)
            hint = "" if len(self._fields) == 1 else " (choose another with --reward-option field=NAME)"
            return Score.failed(
                f"prompt {request.prompt_id!r} has no reference answer: its metadata has no {names}{hint}"
            )
        key, reference = found
        gold = self._parse_gold(reference, alarms)
        if not gold:
            return Score.failed(
                f"the reference answer of prompt {request.prompt_id!r} ({key}={_short(reference)}) could not be parsed"
            )
        mv = self._mv
        predicted = mv.parse(
            request.answer,
            extraction_config=self._extraction,
            parsing_timeout=self._alarm_s if alarms else None,
        )
        correct = bool(predicted) and bool(
            mv.verify(
                gold, predicted, float_rounding=self._float_rounding, timeout_seconds=self._alarm_s if alarms else None
            )
        )
        return Score(
            1.0 if correct else 0.0,
            details={"field": key, "reference": _shown(gold), "extracted": _shown(predicted) if predicted else None},
        )

    def _reference(self, metadata: Mapping[str, Any]) -> tuple[str, str] | None:
        for key in self._fields:
            value = metadata.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str) and value.strip():
                return key, value
        return None

    def _parse_gold(self, reference: str, alarms: bool) -> list[Any]:
        cache_key = (reference, alarms)
        with self._gold_lock:
            if cache_key in self._gold:
                self._gold.move_to_end(cache_key)
                return self._gold[cache_key]
        text = reference.rsplit("####", 1)[1].strip() if "####" in reference else reference.strip()
        timeout = self._alarm_s if alarms else None
        has_delimiters = any(d in text for d in ("$", "\\(", "\\[", "\\boxed"))
        # A bare reference like "\frac{\sqrt{3}}{2}" is only found as LaTeX inside delimiters; but
        # words inside them would read as a product of symbols, so only math-looking text gets them.
        looks_like_math = len(text) <= 3 or any(ch in _MATH_CHARS or ch.isdigit() for ch in text)
        attempts = [text] if has_delimiters or not looks_like_math else [f"${text}$", text]
        gold: list[Any] = []
        for attempt in attempts:
            gold = self._mv.parse(attempt, extraction_config=self._extraction, parsing_timeout=timeout)
            if gold:
                break
        with self._gold_lock:
            self._gold[cache_key] = gold
            while len(self._gold) > _GOLD_CACHE_SIZE:
                self._gold.popitem(last=False)
        return gold


def _shown(parsed: list[Any]) -> str:
    # math-verify returns [sympy expression, matched text]; the text is what a reader wants.
    return str(parsed[-1]) if parsed else ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= 60 else text[:57] + "...")
