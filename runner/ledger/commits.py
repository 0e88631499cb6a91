"""Group commit across ledgers: the shards run in one process fsync together.

A ledger makes its appended events durable with one write and fsync shared by every task
waiting meanwhile (:meth:`runner.ledger.store.Ledger.commit`). Shards run in one process
each have their own ledger with a job or two in flight, so each commit was a trip to a
worker thread and an fsync for one event. A :class:`CommitGroup` shared by those ledgers
makes one trip per round: the first waiter leads the round, which writes every waiting
ledger's events and fsyncs their segments side by side; waiters that arrive meanwhile wait
for the next round. The contract does not change: commit returns once its own ledger's
events are fsynced, and a ledger's write error reaches its own waiter only.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.to_thread

Flush = Callable[[], None]  # one ledger's write + fsync of what it has appended


class _Round:
    __slots__ = ("done", "errors", "flushes")

    def __init__(self) -> None:
        self.flushes: list[Flush] = []
        self.errors: dict[int, BaseException] = {}
        self.done = False


class CommitGroup:
    """One commit round at a time for several ledgers (see the module's text)."""

    def __init__(self, *, parallel: int = 16) -> None:
        self._next = _Round()
        self._lock: anyio.Lock | None = None
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="commit")
        self.rounds = 0  # rounds run (a test compares them with the commits)
        self.flushes = 0

    async def flush(self, flush: Flush) -> None:
        """Run ``flush`` in the next round; return once it is done (raise what it raised)."""
        mine = self._next
        mine.flushes.append(flush)
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if not mine.done:
                self._next = _Round()
                await anyio.to_thread.run_sync(self._run, mine)
        error = mine.errors.get(id(flush))
        if error is not None:
            raise error

    def _run(self, round_: _Round) -> None:
        self.rounds += 1
        self.flushes += len(round_.flushes)
        try:
            if len(round_.flushes) == 1:
                _call(round_.flushes[0], round_.errors)
                return
            futures = [self._pool.submit(_call, f, round_.errors) for f in round_.flushes]
            for future in futures:
                future.result()
        finally:
            round_.done = True

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _call(flush: Flush, errors: dict[int, BaseException]) -> None:
    try:
        flush()
    except BaseException as exc:  # this ledger's waiter raises it, not its neighbours'
        errors[id(flush)] = exc
