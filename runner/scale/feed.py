"""One reading of the manifest for every shard a process runs.

    feed = ManifestFeed(config, shards)
    feed.source(K)        shard K's jobs (a JobSource), handed to its engine
    feed.run()            reads the manifest once, in manifest order, and hands each job to
                          its shard; a shard's buffer full holds the reading (backpressure)
    feed.run_count()      counts every shard's jobs and dollars in one more pass, for the bar

Each shard reading the whole manifest itself and keeping its share cost N readings (and N
count passes) for one manifest: with 16 shards, half the client CPU of the run. Admission
order is the manifest's, as unsharded: the reading goes no further ahead of the slowest
shard than its buffer. A shard that stops admitting closes its source; its jobs are
dropped from then on. An error reading the manifest reaches every shard still reading.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from decimal import Decimal
from itertools import islice

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runner.config import RunConfig
from runner.errors import RowError
from runner.execution.jobsource import BATCH, Estimator, item_shard, job_stream
from runner.manifest.jobs import Job

Batch = list[Job | RowError]

# A shard's buffer, in batches (each about BATCH / shards jobs).
DEPTH = 8


class ManifestFeed:
    """The manifest read once, each job to its shard's source."""

    def __init__(self, config: RunConfig, shards: Sequence[int], *, depth: int = DEPTH) -> None:
        assert config.shards is not None
        self.shards = config.shards
        self._config = config.model_copy(update={"shard": None})  # every shard's jobs
        self._sends: dict[int, MemoryObjectSendStream[Batch]] = {}
        self._receives: dict[int, MemoryObjectReceiveStream[Batch]] = {}
        for k in shards:
            self._sends[k], self._receives[k] = anyio.create_memory_object_stream[Batch](depth)
        self.error: Exception | None = None
        self._estimate: Estimator | None = None
        self._asked = anyio.Event()
        self._counted = anyio.Event()
        self._counts: dict[int, tuple[int, Decimal]] = {}
        self._count_error: Exception | None = None
        self.passes = 0  # readings of the manifest begun (a test counts them)

    def source(self, shard: int) -> ShardSource:
        return ShardSource(self, shard, self._receives[shard])

    async def run(self) -> None:
        """Read the manifest and hand out its jobs; every source ends when it ends."""
        self.passes += 1
        try:
            stream = job_stream(self._config)
            while self._sends:
                batch = await anyio.to_thread.run_sync(lambda: list(islice(stream, BATCH)))
                if not batch:
                    return
                split: dict[int, Batch] = {}
                for item in batch:
                    split.setdefault(item_shard(item, self.shards), []).append(item)
                for k, items in split.items():
                    await self._send(k, items)
        except Exception as exc:  # the shards' own to raise, as a run reading it would
            self.error = exc
        finally:
            for send in self._sends.values():
                send.close()

    def close(self) -> None:
        """Close every shard's stream (those a shard never read included)."""
        for send in self._sends.values():
            send.close()
        for receive in self._receives.values():
            receive.close()

    async def _send(self, shard: int, items: Batch) -> None:
        send = self._sends.get(shard)
        if send is None:
            return  # not a shard of this process, or it stopped admitting
        try:
            await send.send(items)
        except anyio.BrokenResourceError:
            del self._sends[shard]
            send.close()

    async def count(self, shard: int, estimate: Estimator) -> tuple[int, Decimal]:
        """Shard ``shard``'s count, from the one pass (priced by the first shard asking)."""
        if self._estimate is None:
            self._estimate = estimate
            self._asked.set()
        await self._counted.wait()
        if self._count_error is not None:
            raise self._count_error
        return self._counts.get(shard, (0, Decimal(0)))

    async def run_count(self) -> None:
        """Count every shard's jobs in one pass, once a shard asks."""
        await self._asked.wait()
        estimate = self._estimate
        assert estimate is not None
        self.passes += 1

        ended = threading.Event()  # the run ended first: stop counting, let the process exit

        def tally_all() -> dict[int, tuple[int, Decimal]]:
            # Only counting: admission reports duplicate ids, this pass need not hold them.
            items = job_stream(self._config, check_unique_ids=False)
            return count_shards(items, self.shards, estimate, ended)

        try:
            self._counts = await anyio.to_thread.run_sync(tally_all, abandon_on_cancel=True)
        except Exception as exc:
            self._count_error = exc
        finally:
            ended.set()
        self._counted.set()


def count_shards(
    items: Iterator[Job | RowError],
    shards: int,
    estimate: Estimator,
    stop: threading.Event | None = None,
) -> dict[int, tuple[int, Decimal]]:
    """Each shard's job count (bad rows included) and estimated dollars, in one pass."""
    jobs: dict[int, int] = {}
    usd: dict[int, Decimal] = {}
    for item in items:
        if stop is not None and stop.is_set():
            break
        k = item_shard(item, shards)
        jobs[k] = jobs.get(k, 0) + 1
        if isinstance(item, Job):
            usd[k] = usd.get(k, Decimal(0)) + (estimate(item) or Decimal(0))
    return {k: (n, usd.get(k, Decimal(0))) for k, n in jobs.items()}


class ShardSource:
    """One shard's jobs from a :class:`ManifestFeed` (a JobSource)."""

    def __init__(
        self, feed: ManifestFeed, shard: int, receive: MemoryObjectReceiveStream[Batch]
    ) -> None:
        self._feed = feed
        self._shard = shard
        self._receive = receive

    async def next_batch(self) -> list[Job | RowError]:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._receive.close()
            if self._feed.error is not None:
                raise self._feed.error from None
            return []

    def close(self) -> None:
        self._receive.close()

    async def count(self, pricer: Estimator) -> tuple[int, Decimal]:
        return await self._feed.count(self._shard, pricer)
