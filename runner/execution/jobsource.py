"""Where admission's jobs come from: the manifest read by this run, or a shared feed.

    job_stream(config)    the manifest's jobs (and bad rows); only shard K's under --shard K
    JobSource             what admission reads: batches of jobs, and their count for the bar
    ManifestSource        a run reading the manifest itself (twice: a count, and admission)

Shards run in one process read the manifest once for all of them instead
(:class:`runner.scale.feed.ManifestFeed` hands each shard a :class:`JobSource`): sixteen
shards each reading the whole manifest twice to keep a sixteenth of it was half the client
CPU of a sharded run (docs/SCALE.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from itertools import islice, takewhile
from typing import Protocol

import anyio.to_thread

from runner.config import RunConfig
from runner.endpoints.cost import PriceTable
from runner.errors import ManifestError, RowError
from runner.manifest.batches import iter_job_batches, iter_manifest_jobs
from runner.manifest.identity import shard_of
from runner.manifest.jobs import ExpandOptions, Job, row_identity
from runner.manifest.plan import build_plan_batches, job_estimate
from runner.media.inputs import InputSizer

# Jobs read per trip to a worker thread.
BATCH = 256

# A job's estimated dollars (None: unknown), for the bar's total.
Estimator = Callable[[Job], Decimal | None]


@dataclass(frozen=True)
class Pricer:
    """A job's estimated dollars (an :data:`Estimator`); and the prices and input sizes
    behind it, so a count can price rows alike once instead of making every job."""

    prices: PriceTable
    sizer: InputSizer

    def __call__(self, job: Job) -> Decimal | None:
        return job_estimate(job, self.prices, self.sizer, self.sizer.lora_bytes).usd


def expand_options(config: RunConfig) -> ExpandOptions:
    return ExpandOptions(
        manifest_dir=config.manifest.resolve().parent,
        default_endpoint=config.default_endpoint,
        allowed_endpoints=frozenset(config.allowed_endpoints),
        defaults=dict(config.defaults),
        prompt_template=config.prompt_template,
        id_column=config.id_column,
    )


def job_stream(config: RunConfig, *, check_unique_ids: bool = True) -> Iterator[Job | RowError]:
    options = replace(expand_options(config), check_unique_ids=check_unique_ids)
    items = iter_manifest_jobs(config.manifest, config.fmt, options)
    if config.shards is None or config.shard is None:
        return items
    return _in_shard(items, config.shard, config.shards)


def strict_check(config: RunConfig) -> None:
    """``--strict``: refuse the whole manifest if any row is bad, before sending anything."""
    bad: list[str] = []
    count = 0
    for item in job_stream(config):
        if isinstance(item, RowError):
            count += 1
            if len(bad) < 5:
                bad.extend(str(p) for p in item.problems[:1])
    if count:
        more = f" (and {count - len(bad)} more)" if count > len(bad) else ""
        raise ManifestError(
            f"--strict: {count} bad row{'s' * (count != 1)}, nothing was submitted: "
            + "; ".join(bad)
            + more
        )


def item_shard(item: Job | RowError, shards: int) -> int:
    """The shard of a job (or a bad row): by a hash of the row's identity."""
    identity = item.row_id if isinstance(item, Job) else row_identity(item.problems[0])
    return shard_of(identity, shards)


def _in_shard(items: Iterator[Job | RowError], shard: int, shards: int) -> Iterator[Job | RowError]:
    """The jobs (and bad rows) of one shard."""
    return (item for item in items if item_shard(item, shards) == shard)


def count_jobs(
    items: Iterator[Job | RowError], estimate: Estimator, stop: threading.Event | None = None
) -> tuple[int, Decimal]:
    """How many jobs (bad rows included) and their estimated dollars (so far, if ``stop``)."""
    jobs, usd = 0, Decimal(0)
    for item in items:
        if stop is not None and stop.is_set():
            break
        jobs += 1
        if isinstance(item, Job):
            usd += estimate(item) or Decimal(0)
    return jobs, usd


def count_plain(config: RunConfig, pricer: Pricer, stop: threading.Event) -> tuple[int, Decimal]:
    """The manifest's jobs and dollars as ``runner plan`` counts them: rows alike are priced
    once and plain rows are counted, not made (2M rows: 2.7 CPU s; making them, ~70)."""
    # With the id check, as plan and admission read it: a repeated id is a bad row ($0).
    # Its table is this pass's while it lasts (16-19 bytes an id), and admission's own is
    # small then: the run holds both at its start, as it holds one at its end.
    batches = iter_job_batches(
        config.manifest, config.fmt, expand_options(config), materialize=False
    )
    plan = build_plan_batches(
        takewhile(lambda _batch: not stop.is_set(), batches), pricer.prices,
        input_sizes=pricer.sizer, lora_bytes=pricer.sizer.lora_bytes,
    )  # fmt: skip
    return plan.total.jobs + plan.bad_rows, plan.total.usd


class JobSource(Protocol):
    """What admission reads its jobs from."""

    async def next_batch(self) -> list[Job | RowError]:
        """The next jobs in manifest order; [] at the end."""
        ...

    def close(self) -> None:
        """Admission wants no more (it may stop before the end)."""
        ...

    async def count(self, pricer: Pricer) -> tuple[int, Decimal]:
        """This run's job count and estimated dollars (a pass of its own)."""
        ...


class ManifestSource:
    """A run's own reading of the manifest (in worker threads, a batch at a time)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._stream: Iterator[Job | RowError] | None = None

    async def next_batch(self) -> list[Job | RowError]:
        if self._stream is None:
            self._stream = job_stream(self.config)
        stream = self._stream
        return await anyio.to_thread.run_sync(lambda: list(islice(stream, BATCH)))

    def close(self) -> None:
        self._stream = None

    async def count(self, pricer: Pricer) -> tuple[int, Decimal]:
        # Only counting: admission reports duplicate ids, this pass need not hold them.
        ended = threading.Event()  # the run ended first: stop counting, let the process exit

        def tally_all() -> tuple[int, Decimal]:
            if self.config.shard is not None:  # --shard K: the shard's jobs, by their identity
                return count_jobs(job_stream(self.config, check_unique_ids=False), pricer, ended)
            return count_plain(self.config, pricer, ended)

        try:
            return await anyio.to_thread.run_sync(tally_all, abandon_on_cancel=True)
        finally:
            ended.set()
