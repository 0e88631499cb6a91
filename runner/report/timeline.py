"""A run over time, from its ledger events: completions, failures by reason and spend, per
time bucket. Pure: an events table in (the columns of :data:`EVENT_COLUMNS`), a frozen
:class:`Timeline` out; :mod:`runner.report.charts` draws it.

Buckets are a minute wide unless that makes more than :data:`MAX_BUCKETS` of them, then
the next width of :data:`BUCKET_WIDTHS_S` that fits. Counted per event, at its time:

Only *transitions* count: an event whose state differs from the job's previous event. A
completed job's outputs, once downloaded, are recorded again as ``completed`` (with the
same bill): that is not a second completion, nor a second payment.

- a completion: a ``completed`` transition (cache hits included);
- a failure: a ``failed``, ``cancelled`` or ``invalid`` transition, by its ``error_type`` (else
  its state), so an attempt that failed and was retried counts once per failure, and a
  re-rolled flagged output counts as ``flagged``;
- spend: ``billed_usd`` of every transition that carries it (each attempt's end), cumulative,
  so it reaches everything billed, re-rolls and superseded versions included.

A compacted ledger keeps only each job's latest event: its timeline shows those only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints.money import trim_usd
from runner.ledger import JobState

EVENT_COLUMNS = ("seq", "at", "job_key", "state", "run_id", "billed_usd", "error_type")
MAX_BUCKETS = 120
BUCKET_WIDTHS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400)
TOP_REASONS = 5  # failure reasons drawn apart; the rest are "other"
_FAILED = [s.value for s in (JobState.FAILED, JobState.CANCELLED, JobState.INVALID)]
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Timeline:
    """Per-bucket counts from ``start``; every tuple has one value per bucket."""

    start: datetime | None = None
    bucket_s: int = 60
    completions: tuple[int, ...] = ()
    failures: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (reason, per bucket), most first
    spend_usd: tuple[Decimal, ...] = ()  # cumulative billed at each bucket's end
    estimate_usd: Decimal = _ZERO  # the estimate of the current jobs, to spend against
    events: int = 0

    @property
    def buckets(self) -> int:
        return len(self.completions)

    def bucket_start(self, i: int) -> datetime:
        assert self.start is not None
        return self.start + timedelta(seconds=i * self.bucket_s)


def bucket_width_s(span_s: float, max_buckets: int = MAX_BUCKETS) -> int:
    """The narrowest width of BUCKET_WIDTHS_S that covers ``span_s`` in ``max_buckets``."""
    for width in BUCKET_WIDTHS_S:
        if span_s < width * max_buckets:
            return width
    days = int(span_s // (86400 * max_buckets)) + 1
    return 86400 * days


def timeline(events: pa.Table, *, estimate_usd: Decimal = _ZERO) -> Timeline:
    """The timeline of ``events`` (any order; only the EVENT_COLUMNS it uses are read)."""
    return timeline_of([minute_counts(events)], estimate_usd=estimate_usd)


@dataclass(frozen=True, slots=True)
class MinuteCounts:
    """What a timeline counts of some jobs' events (every event of each), per minute of
    the clock: completions, failures by reason and spend. Bucket widths are whole minutes
    and buckets start on a minute, so the counts of several sets of jobs add up to those of
    all their events (:func:`timeline_of`)."""

    events: int = 0
    first_us: int | None = None
    last_us: int | None = None
    completions: pa.Table | None = None  # minute, count
    failures: pa.Table | None = None  # minute, reason, count
    spend: pa.Table | None = None  # minute, usd (sum)


def minute_counts(events: pa.Table, jobs: JobOrder | None = None) -> MinuteCounts:
    """The per-minute counts of ``events``: every event of the jobs they hold (``jobs``:
    their :class:`JobOrder`, if already made)."""
    if events.num_rows == 0:
        return MinuteCounts()
    micros = pc.cast(events["at"], pa.int64()).to_numpy()
    minute = pa.array(micros // 60_000_000)
    moved = transitions(events, jobs or JobOrder.of(events))
    done = _mask(pc.equal(events["state"], JobState.COMPLETED.value)) & moved
    completions = (
        pa.table({"minute": minute.filter(pa.array(done))})
        .group_by("minute", use_threads=False)
        .aggregate([("minute", "count")])
    )
    failed = _mask(pc.is_in(events["state"], pa.array(_FAILED))) & moved
    picked = events.select(["error_type", "state"]).filter(pa.array(failed))
    named = pc.fill_null(pc.not_equal(picked["error_type"], ""), False)
    reason = pc.if_else(named, picked["error_type"], picked["state"])
    failures = (
        pa.table({"minute": minute.filter(pa.array(failed)), "reason": reason})
        .group_by(["minute", "reason"], use_threads=False)
        .aggregate([("minute", "count")])
    )
    billed = events["billed_usd"]
    valid = pa.array(_mask(pc.is_valid(billed)) & moved)
    spend = (
        pa.table({"minute": minute.filter(valid), "usd": billed.filter(valid)})
        .group_by("minute", use_threads=False)
        .aggregate([("usd", "sum")])
    )
    return MinuteCounts(
        events.num_rows, int(micros.min()), int(micros.max()), completions, failures, spend
    )


def timeline_of(parts: Iterable[MinuteCounts], *, estimate_usd: Decimal = _ZERO) -> Timeline:
    """The timeline of every event counted in ``parts`` (of disjoint sets of jobs)."""
    found = [p for p in parts if p.events]
    if not found:
        return Timeline(estimate_usd=estimate_usd)
    first = min(p.first_us for p in found if p.first_us is not None)
    last = max(p.last_us for p in found if p.last_us is not None)
    start_s = first // 1_000_000 // 60 * 60  # whole minutes, so the labels read well
    span_s = last / 1_000_000 - start_s
    width = bucket_width_s(span_s)
    count = (last // 1_000_000 - start_s) // width + 1

    def merged(name: str, keys: list[str], value: str, how: str) -> pa.Table:
        tables = [getattr(p, name) for p in found if getattr(p, name) is not None]
        table = pa.concat_tables(tables).rename_columns([*keys, "value"])
        bucket = pc.divide(
            pc.subtract(pc.multiply(table["minute"], 60), start_s), pa.scalar(width, pa.int64())
        )
        table = table.drop_columns(["minute"]).append_column("bucket", bucket)
        grouped = table.group_by(["bucket", *keys[1:]], use_threads=False)
        return grouped.aggregate([("value", how)]).rename_columns(["bucket", *keys[1:], value])

    completions = merged("completions", ["minute"], "n", "sum")
    per = np.zeros(count, dtype=np.int64)
    np.add.at(per, completions["bucket"].to_numpy(), completions["n"].to_numpy())
    return Timeline(
        start=datetime.fromtimestamp(start_s, UTC),
        bucket_s=width,
        completions=tuple(int(n) for n in per),
        failures=_failures(merged("failures", ["minute", "reason"], "n", "sum"), count),
        spend_usd=_spend(merged("spend", ["minute"], "usd", "sum"), count),
        estimate_usd=estimate_usd,
        events=sum(p.events for p in found),
    )


@dataclass(frozen=True, slots=True)
class JobOrder:
    """Events sorted by (job, seq): ``order`` holds their rows, ``same_job[i]`` says whether
    sorted row ``i`` belongs to the job of sorted row ``i - 1``."""

    order: np.ndarray
    same_job: np.ndarray

    @classmethod
    def of(cls, events: pa.Table) -> JobOrder:
        if events.num_rows == 0:
            return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        codes = np.asarray(pc.dictionary_encode(events["job_key"].combine_chunks()).indices)
        order = np.lexsort((events["seq"].to_numpy(), codes))
        ranked = codes[order]
        return cls(order, np.concatenate(([False], ranked[1:] == ranked[:-1])))


def transitions(events: pa.Table, jobs: JobOrder | None = None) -> np.ndarray:
    """For each event (in the table's order): does its state differ from the previous
    event of the same job (by seq)? A job's first event always does."""
    n = events.num_rows
    if n == 0:
        return np.zeros(0, dtype=bool)
    jobs = jobs or JobOrder.of(events)
    states = np.asarray(pc.dictionary_encode(events["state"].combine_chunks()).indices)
    ranked = states[jobs.order]
    repeat = jobs.same_job & np.concatenate(([False], ranked[1:] == ranked[:-1]))
    out = np.empty(n, dtype=bool)
    out[jobs.order] = ~repeat
    return out


def _mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _failures(table: pa.Table, count: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(reason, failures per bucket), most first, from (bucket, reason, n) rows."""
    if table.num_rows == 0:
        return ()
    totals: Counter[str] = Counter()
    buckets, reasons, counts = (table[c].to_pylist() for c in ("bucket", "reason", "n"))
    for reason, n in zip(reasons, counts, strict=True):
        totals[str(reason)] += int(n)
    ranked = [r for r, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]
    # One "other" stands for two reasons or more, never for one that could be named.
    shown = ranked if len(ranked) <= TOP_REASONS + 1 else ranked[:TOP_REASONS]
    named = {reason: n for n, reason in enumerate(shown)}
    other = len(shown)
    per = np.zeros((other + 1, count), dtype=np.int64)
    for bucket, reason, n in zip(buckets, reasons, counts, strict=True):
        per[named.get(str(reason), other), int(bucket)] += int(n)
    out = [(reason, tuple(int(x) for x in per[n])) for n, reason in enumerate(shown)]
    if len(ranked) > len(shown):
        label = f"{len(ranked) - len(shown)} other reasons"
        out.append((label, tuple(int(x) for x in per[other])))
    return tuple(out)


def _spend(table: pa.Table, count: int) -> tuple[Decimal, ...]:
    """Cumulative spend at each bucket's end, from (bucket, usd) rows."""
    if table.num_rows == 0:
        return (_ZERO,) * count
    per = dict.fromkeys(range(count), _ZERO)
    for bucket, usd in zip(table["bucket"].to_pylist(), table["usd"].to_pylist(), strict=True):
        per[int(bucket)] = usd or _ZERO
    running = _ZERO
    out = []
    for i in range(count):
        running += per[i]
        out.append(trim_usd(running))
    return tuple(out)
