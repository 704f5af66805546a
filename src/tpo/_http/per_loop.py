"""One resource per asyncio event loop (an HTTP client), closed on its own loop.

A pool of connections belongs to the event loop that opened it, and every synchronous tpo
call (``tpo.optimize``) runs a loop of its own, so an HTTP backend keeps one client per
loop. Each client must be closed while its loop still runs: once a loop is closed, its
socket transports can no longer be closed (closing one schedules a callback on the dead
loop, which refuses it), and the garbage collector reclaims them with a
``ResourceWarning: unclosed transport``.

So a resource is closed either by ``PerLoop.aclose()`` (on the running loop) or, failing
that, when its loop shuts down: each resource is guarded by an async generator, and
``loop.shutdown_asyncgens()`` (which ``asyncio.run``, ``asyncio.Runner`` and tpo's own
drivers call before closing a loop) finalises every async generator still open on the
loop, running the close while the loop can still do it. Only a loop closed without that
step leaves its resource behind; it is forgotten at the next use, and the collector
closes its sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    guard: AsyncGenerator[None, None]


class PerLoop(Generic[T]):
    """Makes one ``T`` for each event loop that asks (``make``) and closes it on that loop (``close``)."""

    def __init__(self, make: Callable[[], T], close: Callable[[T], Awaitable[None]]) -> None:
        self._make = make
        self._close = close
        self._entries: dict[asyncio.AbstractEventLoop, _Entry[T]] = {}

    def __len__(self) -> int:
        """How many resources are open (for tests and diagnostics)."""
        return len(self._entries)

    async def get(self) -> T:
        """The running loop's resource, made on first use (or first use since ``aclose``)."""
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is not None:
            return entry.value
        self._forget_closed_loops()
        value = self._make()
        guard = self._guard(loop, value)
        # Stored before the first await, so that concurrent callers on this loop share it.
        self._entries[loop] = _Entry(value, guard)
        # The first step registers the generator with the running loop, whose shutdown finalises it.
        await guard.__anext__()
        return value

    async def aclose(self) -> None:
        """Close the running loop's resource; the next ``get`` makes a new one.

        Resources of other loops that still run are closed by those loops (their ``aclose``
        or their shutdown); those of loops already closed are forgotten.
        """
        entry = self._entries.pop(asyncio.get_running_loop(), None)
        self._forget_closed_loops()
        if entry is not None:
            await entry.guard.aclose()

    async def _guard(self, loop: asyncio.AbstractEventLoop, value: T) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            current = self._entries.get(loop)
            if current is not None and current.value is value:
                del self._entries[loop]
            try:
                await self._close(value)
            except Exception:  # noqa: S110 - a pool that fails to close has nothing left to give; the run must go on
                pass

    def _forget_closed_loops(self) -> None:
        for loop in list(self._entries):
            if loop.is_closed():
                # Its transports cannot be closed any more: dropping them lets the collector close the sockets.
                self._entries.pop(loop, None)
