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
    # An async source is read in a task of its own, so that a slow source never holds back results
    # that are ready (a producer that waits for a result before sending more would wait forever).
    reading: asyncio.Future[T] | None = None
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < limit:
                if isinstance(source, AsyncIterator):
                    if reading is None:
                        reading = asyncio.ensure_future(source.__anext__())
                    if not reading.done():
                        break
                    done_read, reading = reading, None
                    try:
                        item = done_read.result()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                else:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                running[asyncio.create_task(fn(item))] = next(numbers)
            if not running and reading is None:
                return
            waiting: set[asyncio.Future[Any]] = set(running)
            if reading is not None:
                waiting.add(reading)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            ready = sorted((task for task in running if task in done), key=running.__getitem__)
            for task in ready:
                del running[task]
            while ready:
                yield ready.pop(0).result()
    finally:
        for task in ready:  # finished, but left behind by an error or the consumer stopping
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it as never retrieved
        pending: list[asyncio.Future[Any]] = [*running]
        if reading is not None:
            pending.append(reading)
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
