"""Hands requests from many concurrent prompt chains to one backend, batched when it wants batches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..errors import BackendError, RunError, TPOError

Req = TypeVar("Req")
Res = TypeVar("Res")

#: Loop iterations without a new request before a batch goes out. Chains released together
#: take slightly different paths to their next request (one answer to score or several, or
#: none); waiting a few empty rounds lets the stragglers join without waiting on real work.
QUIET_ROUNDS = 3
_JOIN = object()  # a place in a batch that asks for nothing: see ``submit_many([])``


class Dispatcher(Generic[Req, Res]):
    """Submit one request, await its result.

    With ``batching`` the dispatcher waits until every runnable prompt chain has had its turn
    (the event loop goes quiet), then sends everything pending in one call, one call at a
    time; requests that arrive meanwhile form the next batch. ``max_batch`` caps the size of
    one call: the rest waits for the next. Without ``batching``, each request is its own
    call, made at once, so a slow request never holds up another.
    """

    def __init__(
        self,
        call: Callable[[Sequence[Req]], Awaitable[Sequence[Res]]],
        *,
        batching: bool,
        label: str,
        error: type[RunError] = BackendError,
        max_batch: int | None = None,
    ) -> None:
        self._call = call
        self._batching = batching
        self._label = label
        self._error = error
        self._max_batch = max_batch
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Number of calls made to the backend, and the size of the largest batch.
        self.calls = 0
        self.largest_batch = 0

    async def submit(self, item: Req) -> Res:
        """Send one request and return its result.

        On a batching dispatcher the request joins the batch being gathered; otherwise it is
        a call of its own, made at once. A failure of the call raises: a ``TPOError`` as it
        is, anything else wrapped in the dispatcher's ``RunError`` subclass.
        """
        if not self._batching:
            return (await self._checked_call([item]))[0]
        return await self._enqueue(item)

    async def submit_many(self, items: Sequence[Req]) -> list[Res | RunError]:
        """Submit several requests of one prompt chain so that they can share a batch.

        Failures are per item: a request whose call failed with a ``RunError`` (or with a
        third-party error, which is wrapped in one) gets that error in its place in the
        returned list, and the other requests keep their results. On a batching dispatcher
        the requests of one failed batch call all get its error. Any other ``TPOError`` (a
        ``UserError``) and cancellation propagate.

        On a batching dispatcher, a chain with nothing to submit still takes its place in the
        batch being gathered and resumes when that batch is done, in step with the chains
        that did submit: so they all reach their next request together.
        """
        if not self._batching:
            if not items:
                return []
            outcomes = await asyncio.gather(*(self._checked_call([i]) for i in items), return_exceptions=True)
            return _per_item([o if isinstance(o, BaseException) else o[0] for o in outcomes])
        if not items:
            await self._enqueue(_JOIN)
            return []
        return _per_item(await asyncio.gather(*(self._enqueue(i) for i in items), return_exceptions=True))

    def _enqueue(self, item: object) -> asyncio.Future[Res]:
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))  # type: ignore[arg-type]  # _JOIN rides along as a non-request
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        while self._pending:
            # Let every chain that is ready to run reach its next request first.
            quiet, seen = 0, len(self._pending)
            while quiet < QUIET_ROUNDS:
                await asyncio.sleep(0)
                quiet = quiet + 1 if len(self._pending) == seen else 0
                seen = len(self._pending)
            cut = len(self._pending) if self._max_batch is None else self._max_batch
            batch, self._pending = self._pending[:cut], self._pending[cut:]
            joins = [fut for item, fut in batch if item is _JOIN]
            live = [(item, fut) for item, fut in batch if item is not _JOIN and not fut.cancelled()]
            try:
                if live:
                    await self._deliver(live)
            finally:
                # Chains that only joined resume with the rest of the batch, not before.
                for fut in joins:
                    if not fut.done():
                        fut.set_result(None)  # type: ignore[arg-type]

    async def _deliver(self, live: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            results = await self._checked_call([item for item, _ in live])
        except asyncio.CancelledError:
            for _, fut in live:
                fut.cancel()
            raise
        except Exception as e:  # delivered to every waiter of the batch
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), res in zip(live, results, strict=True):
            if not fut.done():
                fut.set_result(res)

    async def _checked_call(self, items: Sequence[Req]) -> Sequence[Res]:
        """Call the backend once; check the number of results and wrap third-party errors."""
        self.calls += 1
        self.largest_batch = max(self.largest_batch, len(items))
        try:
            results = await self._call(items)
        except TPOError:
            raise
        except Exception as e:  # a backend that let a third-party error escape
            raise self._error(f"{self._label} failed: {type(e).__name__}: {e}") from e
        if len(results) != len(items):
            raise self._error(f"{self._label} returned {len(results)} results for {len(items)} requests")
        return results


def _per_item(outcomes: Sequence[Res | BaseException]) -> list[Res | RunError]:
    """Keep run errors in their item's place; raise anything else (cancellation, a user error, a bug)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, RunError):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]  # only results and RunErrors are left
