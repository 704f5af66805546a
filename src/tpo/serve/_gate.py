"""Admission: at most N prompts optimised at once, a bounded first-come first-served queue behind them."""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class QueueFull(Exception):
    """Every slot is taken and the queue is full."""


class Gate:
    """``slots`` prompts run at once; up to ``queue`` more wait in arrival order; more are refused."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.queue = queue
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def enter(self) -> Slot:
        """A place in line, taken now; raise ``QueueFull`` when there is none. Await it with ``async with``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.running < self.slots and not self._waiting:
            self.running += 1
            fut.set_result(None)
        elif len(self._waiting) >= self.queue:
            raise QueueFull
        else:
            self._waiting.append(fut)
        return Slot(self, fut)

    def _release(self) -> None:
        self.running -= 1
        while self._waiting and self.running < self.slots:
            fut = self._waiting.popleft()
            self.running += 1
            fut.set_result(None)

    def _leave(self, fut: asyncio.Future[None]) -> None:
        """A place given up (the client left, or timed out): out of the line, or its slot passed on."""
        if fut in self._waiting:
            self._waiting.remove(fut)
            fut.cancel()
        elif fut.done() and not fut.cancelled():
            self._release()


class Slot:
    """A place in the gate's line: ``async with slot:`` waits for a slot and holds it for the block."""

    def __init__(self, gate: Gate, fut: asyncio.Future[None]) -> None:
        self._gate = gate
        self._fut = fut
        self._left = False

    @property
    def ready(self) -> bool:
        """True once the slot is this request's (it need not wait)."""
        return self._fut.done() and not self._fut.cancelled()

    async def __aenter__(self) -> Slot:
        try:
            await asyncio.shield(self._fut)
        except BaseException:
            self.leave()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.leave()

    def leave(self) -> None:
        """Give the place up (idempotent): safe whether or not the slot was reached."""
        if not self._left:
            self._left = True
            self._gate._leave(self._fut)
