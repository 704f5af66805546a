"""The bounded task pool under optimize_many, on its own: bound, order, errors, leaving early, laziness."""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import aclosing
from typing import Any, TypeVar

import pytest

from tpo.engine._scheduler import bounded_map

T = TypeVar("T")

# A scheduler that leaks a task or reads without end hangs instead of failing: cut it short.
pytestmark = pytest.mark.timeout(60)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def others() -> set[asyncio.Task[Any]]:
    """The tasks of the running loop other than the test's own."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


class Recorder:
    """A job that waits on its item's gate, counting how many jobs are in flight and which were cancelled."""

    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Event] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.started: list[int] = []
        self.cancelled: list[int] = []

    def gate(self, item: int) -> asyncio.Event:
        return self.gates.setdefault(item, asyncio.Event())

    async def __call__(self, item: int) -> int:
        self.started.append(item)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate(item).wait()
            return item * 10
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        finally:
            self.in_flight -= 1


def counted(source: Iterator[int], pulled: list[int]) -> Iterator[int]:
    for item in source:
        pulled.append(item)
        yield item


# --------------------------------------------------------------------------- bound and results


@pytest.mark.parametrize("limit", [1, 3, 50])
def test_every_item_runs_and_never_more_than_limit_at_once(limit: int) -> None:
    in_flight = most = 0

    async def job(item: int) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (item % 4))  # uneven, so slots free up out of order
        in_flight -= 1
        return item * item

    async def main() -> list[int]:
        return [r async for r in bounded_map(job, range(20), limit=limit)]

    results = run(main)
    assert sorted(results) == [i * i for i in range(20)]
    assert most == min(limit, 20)


def test_results_come_out_in_the_order_the_jobs_finish() -> None:
    rec = Recorder()
    release = iter([0, 1])  # after item 2 finishes, item 0, then item 1

    async def main() -> list[int]:
        rec.gate(2).set()
        out = []
        async for r in bounded_map(rec, range(3), limit=3):
            out.append(r)
            nxt = next(release, None)
            if nxt is not None:
                rec.gate(nxt).set()
        return out

    assert run(main) == [20, 0, 10]


def test_jobs_that_finish_together_come_out_in_input_order() -> None:
    rec = Recorder()

    async def release_all_at_once() -> None:
        while len(rec.started) < 50:
            await asyncio.sleep(0)
        for i in reversed(range(50)):  # all finish in the same round of the loop, the last item first
            rec.gate(i).set()

    async def main() -> list[int]:
        async def consume() -> list[int]:
            return [r async for r in bounded_map(rec, range(50), limit=50)]

        out, _ = await asyncio.gather(consume(), release_all_at_once())
        return out

    assert run(main) == [i * 10 for i in range(50)]


def test_a_freed_slot_is_refilled_only_after_the_finished_results_are_handed_over() -> None:
    rec = Recorder()
    pulled: list[int] = []

    async def main() -> list[tuple[int, list[int]]]:
        rec.gate(1).set()
        seen = []
        async for r in bounded_map(rec, counted(iter(range(4)), pulled), limit=2):
            seen.append((r, list(pulled)))
            for i in range(4):
                rec.gate(i).set()
        return seen

    seen = run(main)
    assert seen[0] == (10, [0, 1])  # item 2 was not read before result 10 was taken
    assert sorted(r for r, _ in seen) == [0, 10, 20, 30]


def test_empty_input_yields_nothing_and_calls_nothing() -> None:
    calls: list[int] = []

    async def job(item: int) -> int:
        calls.append(item)
        return item

    async def empty() -> AsyncIterator[int]:
        return
        yield  # an async generator with no items

    async def main() -> tuple[list[int], list[int], set[asyncio.Task[Any]]]:
        sync = [r async for r in bounded_map(job, [], limit=3)]
        aio = [r async for r in bounded_map(job, empty(), limit=3)]
        return sync, aio, others()

    assert run(main) == ([], [], set())
    assert calls == []


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, None])
def test_the_limit_must_be_a_positive_integer(limit: Any) -> None:
    async def job(item: int) -> int:
        return item

    with pytest.raises(ValueError, match=r"limit must be a positive integer, not "):
        bounded_map(job, [1], limit=limit)


# --------------------------------------------------------------------------- laziness


def test_an_endless_iterable_is_read_only_as_far_as_needed() -> None:
    pulled: list[int] = []

    async def job(item: int) -> int:
        await asyncio.sleep(0)
        return item

    async def main() -> list[int]:
        stream = bounded_map(job, counted(itertools.count(), pulled), limit=3)
        out = [await stream.__anext__() for _ in range(10)]
        await stream.aclose()
        return out

    assert sorted(run(main)) == list(range(10))
    assert len(pulled) <= 10 + 3


def test_an_endless_async_stream_is_read_only_as_far_as_needed() -> None:
    pulled: list[int] = []

    async def source() -> AsyncIterator[int]:
        for i in itertools.count():
            pulled.append(i)
            await asyncio.sleep(0)
            yield i

    async def job(item: int) -> int:
        return item

    async def main() -> list[int]:
        stream = bounded_map(job, source(), limit=4)
        out = [await stream.__anext__() for _ in range(10)]
        await stream.aclose()
        return out

    assert run(main) == list(range(10))  # instant jobs finish together, so in input order
    assert len(pulled) <= 10 + 4


def test_nothing_is_read_or_started_before_the_first_result_is_asked_for() -> None:
    pulled: list[int] = []
    rec = Recorder()

    async def main() -> None:
        stream = bounded_map(rec, counted(iter(range(5)), pulled), limit=2)
        await asyncio.sleep(0.01)
        assert pulled == [] and rec.started == []
        await stream.aclose()

    run(main)


# --------------------------------------------------------------------------- errors and leaving early


def test_an_exception_from_a_job_reaches_the_consumer_and_cancels_the_others() -> None:
    rec = Recorder()

    async def job(item: int) -> int:
        if item == 3:
            await asyncio.sleep(0.01)
            raise KeyError("job 3 failed")
        return await rec(item)

    async def main() -> set[asyncio.Task[Any]]:
        with pytest.raises(KeyError, match="job 3 failed"):
            async for _ in bounded_map(job, range(100), limit=5):
                pass
        return others()

    assert run(main) == set()
    assert sorted(rec.cancelled) == [0, 1, 2, 4]
    assert rec.started == [0, 1, 2, 4]  # no new item was started after the failure


def test_an_exception_from_the_source_reaches_the_consumer_and_cancels_the_jobs() -> None:
    rec = Recorder()
    got: list[int] = []

    def source() -> Iterator[int]:
        yield 0
        yield 1
        raise LookupError("bad row 2")

    async def main() -> set[asyncio.Task[Any]]:
        rec.gate(0).set()
        with pytest.raises(LookupError, match="bad row 2"):
            async for r in bounded_map(rec, source(), limit=2):
                got.append(r)
        return others()

    assert run(main) == set()
    assert got == [0]  # the row after it is read once 0 is handed over, and is bad
    assert rec.cancelled == [1]


@pytest.mark.parametrize("how", ["aclose", "break out of aclosing"])
def test_leaving_mid_iteration_cancels_and_awaits_every_job(how: str) -> None:
    rec = Recorder()

    async def main() -> set[asyncio.Task[Any]]:
        rec.gate(0).set()
        if how == "aclose":
            stream = bounded_map(rec, itertools.count(), limit=4)
            assert await stream.__anext__() == 0
            await stream.aclose()
        else:
            async with aclosing(bounded_map(rec, itertools.count(), limit=4)) as stream:
                async for _ in stream:
                    break
        return others()

    assert run(main) == set()  # checked inside the loop, before asyncio.run could tidy up
    assert sorted(rec.cancelled) == [1, 2, 3]
    assert rec.in_flight == 0


def test_cancelling_the_consumer_cancels_and_awaits_every_job() -> None:
    rec = Recorder()

    async def main() -> set[asyncio.Task[Any]]:
        async def consume() -> list[int]:
            return [r async for r in bounded_map(rec, range(10), limit=3)]

        consumer = asyncio.create_task(consume())
        while len(rec.started) < 3:
            await asyncio.sleep(0)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        return others()

    assert run(main) == set()
    assert sorted(rec.cancelled) == [0, 1, 2]
    assert rec.started == [0, 1, 2]


def test_a_failure_left_behind_on_leaving_early_is_not_reported_as_never_retrieved() -> None:
    reported: list[dict[str, Any]] = []

    async def job(item: int) -> int:
        if item == 1:
            raise RuntimeError("nobody asked for this one")
        return item

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        stream = bounded_map(job, range(3), limit=3)
        assert await stream.__anext__() == 0  # 1 and 2 finished in the same round and wait their turn
        await stream.aclose()
        gc.collect()  # a task whose exception nobody retrieved reports it when it is collected

    run(main)
    gc.collect()
    assert reported == []


def test_a_slow_source_does_not_hold_back_results_that_are_ready() -> None:
    """A producer that sends its next item only after it has seen a result must not wait forever."""

    async def go() -> list[int]:
        got_one = asyncio.Event()

        async def producer() -> AsyncIterator[int]:
            yield 1
            await got_one.wait()  # the next item depends on the first result
            yield 2

        async def double(x: int) -> int:
            return 2 * x

        out = []
        async for result in bounded_map(double, producer(), limit=4):
            out.append(result)
            got_one.set()
        return out

    assert asyncio.run(asyncio.wait_for(go(), timeout=5)) == [2, 4]
