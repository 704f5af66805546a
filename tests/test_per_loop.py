"""Per-event-loop resources: one per loop, closed on their own loop by aclose() or by the loop's shutdown."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from tpo._http.per_loop import PerLoop


@dataclass
class Thing:
    number: int
    closed_on: asyncio.AbstractEventLoop | None = None


@dataclass
class Maker:
    """Makes numbered things and records which loop closed each."""

    made: list[Thing] = field(default_factory=list)
    fail_close: bool = False

    def make(self) -> Thing:
        thing = Thing(len(self.made))
        self.made.append(thing)
        return thing

    async def close(self, thing: Thing) -> None:
        await asyncio.sleep(0)  # a real close awaits; it must be able to
        thing.closed_on = asyncio.get_running_loop()
        if self.fail_close:
            raise OSError("the pool would not close")


@pytest.fixture
def maker() -> Maker:
    return Maker()


def test_one_per_loop_shared_by_concurrent_callers(maker: Maker) -> None:
    per_loop = PerLoop(maker.make, maker.close)

    async def go() -> list[Thing]:
        together = await asyncio.gather(*(per_loop.get() for _ in range(5)))
        return [*together, await per_loop.get()]

    things = asyncio.run(go())
    assert len(maker.made) == 1 and all(t is maker.made[0] for t in things)


def test_closed_by_the_loops_shutdown_on_that_loop(maker: Maker) -> None:
    per_loop = PerLoop(maker.make, maker.close)
    loops: list[asyncio.AbstractEventLoop] = []

    async def use() -> None:
        loops.append(asyncio.get_running_loop())
        await per_loop.get()

    for _ in range(3):
        asyncio.run(use())  # and no aclose(): asyncio.run's shutdown closes it
    assert [t.closed_on for t in maker.made] == loops
    assert len(per_loop) == 0


def test_aclose_closes_now_and_the_next_use_reopens(maker: Maker) -> None:
    per_loop = PerLoop(maker.make, maker.close)

    async def go() -> None:
        first = await per_loop.get()
        await per_loop.aclose()
        assert first.closed_on is asyncio.get_running_loop() and len(per_loop) == 0
        second = await per_loop.get()
        assert second is not first and second.closed_on is None
        await per_loop.aclose()
        await per_loop.aclose()  # twice is harmless

    asyncio.run(go())
    assert len(maker.made) == 2 and all(t.closed_on is not None for t in maker.made)


def test_a_failing_close_is_swallowed(maker: Maker) -> None:
    maker.fail_close = True
    per_loop = PerLoop(maker.make, maker.close)

    async def go() -> None:
        await per_loop.get()
        await per_loop.aclose()

    asyncio.run(go())
    assert maker.made[0].closed_on is not None


def test_a_loop_closed_without_shutdown_is_forgotten(maker: Maker) -> None:
    per_loop = PerLoop(maker.make, maker.close)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(per_loop.get())
    loop.close()  # no shutdown_asyncgens(): nothing could close the thing on its loop
    assert len(per_loop) == 1

    async def go() -> Thing:
        return await per_loop.get()

    fresh = asyncio.run(go())
    assert fresh is maker.made[1] and maker.made[0].closed_on is None
    assert len(per_loop) == 0


def test_loops_in_two_threads_keep_their_own(maker: Maker) -> None:
    per_loop = PerLoop(maker.make, maker.close)
    both_have_one = threading.Barrier(2, timeout=30)
    got: dict[str, Thing] = {}
    again: dict[str, Thing] = {}

    def run(name: str) -> None:
        async def go() -> None:
            got[name] = await per_loop.get()
            await asyncio.to_thread(both_have_one.wait)
            again[name] = await per_loop.get()

        asyncio.run(go())

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got["a"] is not got["b"] and len(maker.made) == 2
    assert again == got and again["a"] is got["a"] and again["b"] is got["b"]
    assert all(t.closed_on is not None for t in maker.made)
