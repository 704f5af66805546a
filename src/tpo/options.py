"""Plugin options declared once: typed fields with defaults and constraints, checked with one message style.

A plugin declares its options as one frozen dataclass of ``option(...)`` fields; the same
declaration checks what ``from_spec`` receives from the command line (already JSON-parsed,
``--policy-option n_ctx=4096``), checks the keyword options of the plugin's constructor, and
describes the options in ``tpo backends --verbose``::

    from dataclasses import dataclass
    from typing import ClassVar

    from tpo.options import PluginOptions, integer, number, option

    @dataclass(frozen=True)
    class MyOptions(PluginOptions):
        owner: ClassVar[str] = "mine"
        n_ctx: int | None = option(None, integer(min=256), "context window in tokens (default: the model's)")
        min_p: float = option(0.05, number(0, 1), "llama.cpp's min-p sampling setting")

    MyOptions.from_options({"n_ctx": "abc"})
    # ConfigError: mine: n_ctx must be an integer >= 256, got 'abc'
    MyOptions.from_options({"n_cxt": 512})
    # ConfigError: mine: unknown option 'n_cxt'; it takes: n_ctx, min_p

An option whose value is ``None`` counts as not given: it keeps its default. An option whose
default is ``None`` may stay unset; its constraint applies only to a value that is given.
Numbers are stored as ``float``, mappings as ``dict``; nothing else is converted, so the
text ``"7"`` is not an integer.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

__all__ = [
    "Check",
    "OptionInfo",
    "PluginOptions",
    "check_fields",
    "check_value",
    "custom",
    "describe_options",
    "flag",
    "integer",
    "mapping",
    "number",
    "one_of",
    "option",
    "string",
    "unknown_options_error",
]

_CHECK = "tpo.check"
_HELP = "tpo.help"
_AFFECTS_RESULTS = "tpo.affects_results"
_MAX_SHOWN = 80

OptionsT = TypeVar("OptionsT", bound="PluginOptions")


class Check:
    """A constraint on one option's value: what it accepts, how it is shown, and how a value is stored.

    Subclass it for a constraint of your own: set ``kind`` (``"integer"``) and ``constraint``
    (``">= 256"``, or empty) and implement ``coerce``.
    """

    #: The kind of value, as ``tpo backends --verbose`` lists it.
    kind: str = "value"
    #: The limits within the kind, as ``tpo backends --verbose`` lists them (may be empty).
    constraint: str = ""

    def describe(self) -> str:
        """What the option must be, for messages: ``an integer >= 256``."""
        return " ".join(p for p in (self._noun(), self.constraint) if p)

    def coerce(self, value: Any) -> Any:
        """The value as stored; ``ValueError`` when it does not meet the constraint."""
        return value

    def _noun(self) -> str:
        return f"a {self.kind}"


class _Integer(Check):
    kind = "integer"

    def __init__(self, low: int | None, high: int | None) -> None:
        self.low, self.high = low, high
        self.constraint = _bounds(low, high, low_open=False, high_open=False)

    def _noun(self) -> str:
        return "an integer"

    def coerce(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError
        n = int(value)
        if (self.low is not None and n < self.low) or (self.high is not None and n > self.high):
            raise ValueError
        return n


class _Number(Check):
    kind = "number"

    def __init__(self, low: float | None, high: float | None, *, low_open: bool, high_open: bool, finite: bool) -> None:
        self.low, self.high, self.low_open, self.high_open, self.finite = low, high, low_open, high_open, finite
        self.constraint = _bounds(low, high, low_open=low_open, high_open=high_open)
        if finite and low is None and high is None:
            self.constraint = "finite"

    def describe(self) -> str:
        return "a finite number" if self.constraint == "finite" else super().describe()

    def coerce(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError
        x = float(value)
        if math.isnan(x) or (self.finite and math.isinf(x)):
            raise ValueError
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            raise ValueError
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            raise ValueError
        return x


class _Flag(Check):
    kind = "flag"

    def describe(self) -> str:
        return "true or false"

    def coerce(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value


class _OneOf(Check):
    kind = "choice"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices
        self.constraint = ", ".join(choices)

    def describe(self) -> str:
        return f"one of {self.constraint}"

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise ValueError
        return value


class _String(Check):
    kind = "string"
    constraint = "non-empty"

    def describe(self) -> str:
        return "a non-empty string"

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError
        return value


class _Mapping(Check):
    kind = "mapping"

    def __init__(self, values: type | None) -> None:
        self.values = values
        self.constraint = f"of {_plural(values)}" if values is not None else ""

    def coerce(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ValueError
        if self.values is not None and not all(isinstance(v, self.values) for v in value.values()):
            raise ValueError
        return dict(value)


class _Custom(Check):
    def __init__(self, convert: Callable[[Any], Any], kind: str, description: str, constraint: str) -> None:
        self._convert, self.kind, self._description, self.constraint = convert, kind, description, constraint

    def describe(self) -> str:
        return self._description

    def coerce(self, value: Any) -> Any:
        try:
            return self._convert(value)
        except (ConfigError, TypeError) as e:
            raise ValueError(str(e)) from e


def integer(*, min: int | None = None, max: int | None = None) -> Check:
    """A whole number (never a bool or a float) from ``min`` to ``max`` inclusive."""
    return _Integer(min, max)


def number(
    min: float | None = None,
    max: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
    finite: bool = True,
) -> Check:
    """A real number (an int or a float, never a bool or NaN), stored as ``float``.

    ``min`` and ``max`` are inclusive unless ``min_open``/``max_open``; ``finite=False``
    admits the infinities.
    """
    return _Number(min, max, low_open=min_open, high_open=max_open, finite=finite)


def flag() -> Check:
    """``True`` or ``False`` (``true``/``false`` on the command line); nothing else."""
    return _Flag()


def one_of(*choices: str) -> Check:
    """One of the given strings, exactly."""
    if not choices:
        raise ValueError("one_of() needs at least one choice")
    return _OneOf(tuple(choices))


def string() -> Check:
    """A string that is not empty or only whitespace (stored as given)."""
    return _String()


def mapping(values: type | None = None) -> Check:
    """A mapping with string keys (a JSON object), stored as a ``dict``; every value of type ``values`` if given."""
    return _Mapping(values)


def custom(convert: Callable[[Any], Any], *, kind: str, description: str, constraint: str = "") -> Check:
    """A constraint of your own: ``convert(value)`` returns the value to store or raises ``ValueError``.

    ``description`` completes "NAME must be ..." in messages; ``kind`` and ``constraint`` are
    what ``tpo backends --verbose`` shows. A ``ConfigError`` or ``TypeError`` from ``convert``
    counts as ``ValueError``: the message is always the standard one.
    """
    return _Custom(convert, kind, description, constraint)


def option(default: Any, check: Check, help: str = "", *, affects_results: bool = True) -> Any:
    """A dataclass field for one option: its default, its ``Check`` and a line of help for listings.

    Use it for immutable defaults only (``None``, numbers, strings, flags); a mapping option
    defaults to ``None``. ``affects_results=False`` declares a connection setting (a timeout,
    retries, concurrency, where the server is): it cannot change any result, so a batch run
    leaves it out of its fingerprint and a resumed run may change it.
    """
    if not isinstance(check, Check):
        raise TypeError(f"option() needs a Check such as integer() or flag(), not {type(check).__name__}")
    return dataclasses.field(default=default, metadata={_CHECK: check, _HELP: help, _AFFECTS_RESULTS: affects_results})


def check_value(name: str, value: Any, check: Check, *, owner: str = "") -> Any:
    """``value`` as ``check`` stores it, or ``ConfigError``: ``llamacpp: n_ctx must be an integer >= 16, got 'abc'``."""
    try:
        return check.coerce(value)
    except ValueError:
        raise ConfigError(f"{_prefix(owner)}{name} must be {check.describe()}, got {_shown(value)}") from None


def check_fields(obj: Any, *, none_means_default: bool = True) -> None:
    """Check and store every ``option`` field of the dataclass instance ``obj`` (frozen ones too), in order.

    ``None`` is always allowed in a field whose default is ``None``. In another field it counts
    as not given (the default is stored), or, with ``none_means_default=False``, is checked
    like any value (and so rejected). The owner named in messages is the class attribute
    ``owner`` (none if absent). ``PluginOptions`` does this on construction; other dataclasses
    call it in their ``__post_init__``.
    """
    owner = getattr(type(obj), "owner", "")
    for f in dataclasses.fields(obj):
        check = f.metadata.get(_CHECK)
        if check is None:
            continue
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        if value is None and none_means_default and f.default is not dataclasses.MISSING:
            object.__setattr__(obj, f.name, f.default)
            continue
        object.__setattr__(obj, f.name, check_value(f.name, value, check, owner=owner))


def unknown_options_error(unknown: Sequence[str], known: Sequence[str], *, owner: str = "") -> ConfigError:
    """The error for options nobody declared: ``"llamacpp: unknown option 'n_cxt'; it takes: n_ctx, ..."``."""
    names = ", ".join(repr(n) for n in unknown)
    noun = "option" if len(unknown) == 1 else "options"
    return ConfigError(f"{_prefix(owner)}unknown {noun} {names}; it takes: {', '.join(known) or 'none'}")


@dataclass(frozen=True)
class OptionInfo:
    """One declared option, as ``tpo backends --verbose`` lists it."""

    name: str
    kind: str
    constraint: str
    default: Any
    help: str
    #: False for a connection setting, which no result depends on (see ``option``).
    affects_results: bool = True

    @property
    def description(self) -> str:
        """``integer >= 256``: the kind and the constraint together."""
        return " ".join(p for p in (self.kind, self.constraint) if p)


def describe_options(cls: type) -> tuple[OptionInfo, ...]:
    """The ``option`` fields of a dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        check = f.metadata.get(_CHECK)
        if check is not None:
            out.append(
                OptionInfo(
                    f.name,
                    check.kind,
                    check.constraint,
                    f.default,
                    f.metadata.get(_HELP, ""),
                    f.metadata.get(_AFFECTS_RESULTS, True),
                )
            )
    return tuple(out)


@dataclass(frozen=True)
class PluginOptions:
    """Base class of a plugin's options: a frozen dataclass of ``option`` fields, checked on construction.

    Set the class attribute ``owner`` to the name messages should begin with (``"llamacpp"``).
    ``from_options`` is what ``from_spec`` calls on the options it receives; a constructor that
    takes keyword options calls ``from_options(kwargs, base=options)``.
    """

    owner: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def describe(cls) -> tuple[OptionInfo, ...]:
        """Every option with its kind, constraint, default and help."""
        return describe_options(cls)

    @classmethod
    def not_affecting_results(cls) -> frozenset[str]:
        """The options declared ``affects_results=False``: connection settings no result depends on."""
        return frozenset(info.name for info in describe_options(cls) if not info.affects_results)

    @classmethod
    def from_options(cls: type[OptionsT], options: Mapping[str, Any], *, base: OptionsT | None = None) -> OptionsT:
        """``base`` (default: every default) with ``options`` applied, checked.

        Options whose value is ``None`` count as not given; a name the class does not
        declare raises ``ConfigError`` listing the ones it does.
        """
        if base is None:
            base = cls()
        elif not isinstance(base, cls):
            raise ConfigError(f"{_prefix(cls.owner)}options must be a {cls.__name__}, got {type(base).__name__}")
        given = {k: v for k, v in options.items() if v is not None}
        names = cls.names()
        unknown = [k for k in given if k not in names]
        if unknown:
            raise unknown_options_error(unknown, names, owner=cls.owner)
        return dataclasses.replace(base, **given) if given else base

    def replace(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with some options changed, checked like ``from_options``."""
        return type(self).from_options(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        """Every option and its value."""
        return {name: getattr(self, name) for name in self.names()}


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _fmt(x: float) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return repr(x)


def _bounds(low: float | None, high: float | None, *, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_fmt(high)}"
    return ""


def _plural(values: type) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "flags"}.get(values, values.__name__)
