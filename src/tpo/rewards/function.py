"""A reward from the user's own Python function, loaded from an importable module or a ``.py`` file.

The function takes the conversation and the answer and returns a number::

    def my_reward(messages, answer):          # messages: [{"role": ..., "content": ...}, ...]
        return -abs(len(answer) - 500) / 500

and is named on the command line as ``python:MODULE:FUNCTION`` (``python:mypkg.rm:my_reward``)
or ``python:FILE.py:FUNCTION`` (``python:./rm.py:my_reward``, ``python:C:\\rm\\rm.py:score``).

A function that scores many answers at once says so with the ``batched`` decorator (or by
setting ``fn.batched = True``, or with the option ``batched=true``); it is then called as
``fn(list_of_messages, list_of_answers)`` and returns a list of numbers, one per answer::

    from tpo.rewards.function import batched

    @batched
    def my_reward(messages_list, answers):
        return [float(len(a)) for a in answers]

A function with a parameter named ``metadata`` (or ``**kwargs``) also receives the prompt's
metadata (a list of them in the batched form): a reference answer, say. Async functions are
awaited. A score is an int or a float (``True``/``False`` count as 1.0/0.0, numpy and torch
scalars are read with ``.item()``), or a ``tpo.Score`` to attach details. An exception in the
function, or a value that is not a finite number, fails the score of that answer (the whole
batch when the function raises in the batched form) with the error, and the run goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigError
from ..options import PluginOptions, flag, integer, option
from ..types import Score, ScoreRequest

__all__ = ["PythonReward", "PythonRewardOptions", "batched", "load_function"]

F = TypeVar("F", bound=Callable[..., Any])


def batched(fn: F) -> F:
    """Mark a reward function as batched: ``fn(list_of_messages, list_of_answers) -> list[float]``."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class PythonRewardOptions(PluginOptions):
    """The options of ``PythonReward`` (``--reward-option NAME=VALUE``); see the class for what each does."""

    owner: ClassVar[str] = "the python reward"

    batched: bool | None = option(None, flag(), "call fn(list_of_messages, list_of_answers) (default: @batched)")
    concurrency: int | None = option(
        None, integer(min=1), "calls at once (default: 1, unlimited for async functions)", affects_results=False
    )


class PythonReward:
    """Scores answers with a Python function ``fn(messages, answer) -> float`` (or its batched form).

    ``messages`` is the conversation as a list of OpenAI-style dicts, without the answer.
    Plain (non-async) functions run in a worker thread so that a slow one does not stall the
    other prompts; at most ``concurrency`` calls run at once (default 1 for plain functions,
    since user code is rarely thread-safe, and unlimited for async functions).
    """

    name = "python"
    batching = False
    supports_n = False
    supports_logprobs = False
    description = "Your own Python function fn(messages, answer) -> float, from a module or a .py file."
    options_class = PythonRewardOptions

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        options: PythonRewardOptions | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Score with ``fn``; ``batched`` and ``concurrency`` as keywords or in ``options``."""
        opts = self.options = PythonRewardOptions.from_options(kwargs, base=options)
        batched, concurrency = opts.batched, opts.concurrency
        if not callable(fn):
            raise ConfigError(f"PythonReward needs a callable, got {type(fn).__name__}")
        self._fn = fn
        self._batched = bool(getattr(fn, "batched", False)) if batched is None else bool(batched)
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)
        self._limit = concurrency if concurrency is not None else (None if self._is_async else 1)
        self._wants_metadata = _accepts_metadata(fn)
        self.batching = self._batched
        self.name = name or f"python:{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', type(fn).__name__)}"
        self._semaphores: dict[int, asyncio.Semaphore] = {}

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> PythonReward:
        """``MODULE:FUNCTION`` or ``PATH.py:FUNCTION``; options ``batched`` and ``concurrency``."""
        opts = PythonRewardOptions.from_options(options)
        return cls(load_function(target), options=opts, name=f"python:{target.strip()}")

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """One score per request; a failure of the function is recorded on the answers it concerned."""
        if not requests:
            return []
        if self._batched:
            return await self._score_batch(list(requests))
        return list(await asyncio.gather(*(self._score_one(r) for r in requests)))

    async def preflight(self) -> None:
        """Check, before a run, that the function takes the arguments tpo passes it (without calling it).

        A function with the wrong parameters would otherwise fail every score, and only after
        every prompt had sampled. Raises ``ConfigError`` naming the expected form.
        """
        try:
            signature = inspect.signature(self._fn)
        except (TypeError, ValueError):  # a builtin that does not say: its first call will tell
            return
        messages = [{"role": "user", "content": "Say hello."}]
        args: tuple[Any, ...] = ([messages], ["Hello!"]) if self._batched else (messages, "Hello!")
        kwargs: dict[str, Any] = {"metadata": [{}] if self._batched else {}} if self._wants_metadata else {}
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            form = "fn(list_of_messages, list_of_answers)" if self._batched else "fn(messages, answer)"
            raise ConfigError(
                f"the reward {self.name} cannot be called as tpo calls it, {form} (with metadata=... when it has a "
                f"parameter named metadata): {e}; its signature is {signature}"
            ) from e

    async def _score_one(self, request: ScoreRequest) -> Score:
        kwargs: dict[str, Any] = {"metadata": dict(request.metadata)} if self._wants_metadata else {}
        try:
            value = await self._call(_as_dicts(request), request.answer, **kwargs)
        except Exception as e:  # the user's function: its failure is data about this answer
            return Score.failed(f"{self.name} raised {type(e).__name__}: {e}")
        return _to_score(value, self.name)

    async def _score_batch(self, requests: list[ScoreRequest]) -> list[Score]:
        kwargs: dict[str, Any] = {"metadata": [dict(r.metadata) for r in requests]} if self._wants_metadata else {}
        try:
            values = await self._call([_as_dicts(r) for r in requests], [r.answer for r in requests], **kwargs)
        except Exception as e:
            return [Score.failed(f"{self.name} raised {type(e).__name__}: {e}")] * len(requests)
        if isinstance(values, (str, bytes, Mapping)) or (
            not isinstance(values, Sequence) and not hasattr(values, "tolist")
        ):
            return [
                Score.failed(
                    f"{self.name} is batched but returned {type(values).__name__}, not a list of {len(requests)} numbers"
                )
            ] * len(requests)
        items = list(values.tolist() if hasattr(values, "tolist") else values)
        if len(items) != len(requests):
            return [Score.failed(f"{self.name} returned {len(items)} scores for {len(requests)} answers")] * len(
                requests
            )
        return [_to_score(v, self.name) for v in items]

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        semaphore = self._semaphore()
        if semaphore is None:
            return await self._invoke(*args, **kwargs)
        async with semaphore:
            return await self._invoke(*args, **kwargs)

    async def _invoke(self, *args: Any, **kwargs: Any) -> Any:
        if self._is_async:
            return await self._fn(*args, **kwargs)
        out = await asyncio.to_thread(self._fn, *args, **kwargs)
        # A plain function may still hand back an awaitable (a lambda returning a coroutine).
        return await out if inspect.isawaitable(out) else out

    def _semaphore(self) -> asyncio.Semaphore | None:
        if self._limit is None:
            return None
        # A semaphore belongs to one event loop; each synchronous tpo call runs a new one.
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(id(loop))
        if sem is None:
            self._semaphores = {id(loop): asyncio.Semaphore(self._limit)}
            sem = self._semaphores[id(loop)]
        return sem


def load_function(target: str) -> Callable[..., Any]:
    """The function named by ``MODULE:FUNCTION`` or ``PATH.py:FUNCTION``.

    The last colon separates the function, so a Windows path with a drive letter
    (``C:\\rm\\rm.py:score``) works. A file is loaded under a module name derived from its
    absolute path, so two files with the same name do not replace each other.
    """
    spec = target.strip()
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise ConfigError(
            f"python reward {target!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION, e.g. python:./rm.py:score"
        )
    if _looks_like_path(source):
        module = _load_file(source, target)
    else:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as e:
            if e.name and (source == e.name or source.startswith(e.name + ".")):
                raise ConfigError(
                    f"python reward {target!r}: no module named {source!r} (is it installed, or on PYTHONPATH? "
                    f"for a file, write its path ending in .py)"
                ) from e
            raise ConfigError(f"python reward {target!r}: importing {source!r} failed: {e}") from e
        except Exception as e:  # the user's module failed while importing
            raise ConfigError(f"python reward {target!r}: importing {source!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"python reward {target!r}: {source!r} has no function {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"python reward {target!r}: {attr!r} in {source!r} is a {type(obj).__name__}, not a function")
    fn: Callable[..., Any] = obj
    return fn


def _looks_like_path(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


def _load_file(source: str, target: str) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"python reward {target!r}: the file {source!r} does not exist")
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    module_name = f"_tpo_user_reward_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"python reward {target!r}: {source!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as `import` does, so dataclasses and pickling inside it work.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[module_name]
        if not isinstance(e, Exception):
            raise
        raise ConfigError(f"python reward {target!r}: running {source!r} failed: {type(e).__name__}: {e}") from e
    return module


def _accepts_metadata(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "metadata" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _as_dicts(request: ScoreRequest) -> list[dict[str, str]]:
    # Fresh dicts per call: a function that edits its argument cannot affect other answers.
    return [m.as_dict() for m in request.messages]


def _to_score(value: Any, owner: str) -> Score:
    if isinstance(value, Score):
        return value
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:  # numpy and torch scalars
            value = value.item()
        except (TypeError, ValueError):
            pass
    if not isinstance(value, numbers.Real):
        return Score.failed(f"{owner} returned {type(value).__name__} {_short(value)}, not a number")
    number = float(value)
    if not math.isfinite(number):
        return Score.failed(f"{owner} returned {number}, not a finite number")
    return Score(number)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
