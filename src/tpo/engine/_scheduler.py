"""Runs one coroutine function over a stream of items, a bounded number at a time, yielding results as they finish."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["bounded_map"]

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    fn: Callable[[T], Coroutine[Any, Any, R]], items: Iterable[T] | AsyncIterable[T], *, limit: int
) -> AsyncGenerator[R, None]:
    """Run ``fn(item)`` as a task for each item, at most ``limit`` at once, and yield each result as it finishes.

    Items are read lazily: more only once finished tasks have had their results handed over,
    so ``items`` may be an endless stream. Tasks that finish together come out in
    the order their items came in. An exception from ``fn`` (or from reading ``items``) is
    raised to the consumer and cancels every task still running; so does leaving early
    (``aclose()``, ``break``, the consumer being cancelled). In every case the tasks are awaited
    before the generator ends: none is left pending. ``items`` itself is not closed: it belongs
    to the caller.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    source = items.__aiter__() if isinstance(items, AsyncIterable) else iter(items)
    return _run(fn, source, limit)


async def _run(
    fn: Callable[[T], Coroutine[Any, Any, R]], source: Iterator[T] | AsyncIterator[T], limit: int
) -> AsyncGenerator[R, None]:
    running: dict[asyncio.Task[R], int] = {}  # each task's start number, for a stable order among ties
    numbers = itertools.count()
    ready: list[asyncio.Task[R]] = []
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < limit:
                try:
                    item = await source.__anext__() if isinstance(source, AsyncIterator) else next(source)
                except (StopIteration, StopAsyncIteration):
                    exhausted = True
                    break
                running[asyncio.create_task(fn(item))] = next(numbers)
            if not running:
                return
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            ready = sorted(done, key=running.__getitem__)
            for task in ready:
                del running[task]
            while ready:
                yield ready.pop(0).result()
    finally:
        for task in ready:  # finished, but left behind by an error or the consumer stopping
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it as never retrieved
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
