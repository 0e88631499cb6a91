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
    if events.num_rows == 0:
        return Timeline(estimate_usd=estimate_usd)
    micros = pc.cast(events["at"], pa.int64()).to_numpy()
    first = int(micros.min())
    start_s = first // 1_000_000 // 60 * 60  # whole minutes, so the labels read well
    span_s = int(micros.max()) / 1_000_000 - start_s
    width = bucket_width_s(span_s)
    index = (micros // 1_000_000 - start_s) // width
    count = int(index.max()) + 1
    moved = transitions(events, JobOrder.of(events))
    done = _mask(pc.equal(events["state"], JobState.COMPLETED.value)) & moved
    return Timeline(
        start=datetime.fromtimestamp(start_s, UTC),
        bucket_s=width,
        completions=_per_bucket(index, done, count),
        failures=_failures(events, index, count, moved),
        spend_usd=_spend(events, index, count, moved),
        estimate_usd=estimate_usd,
        events=events.num_rows,
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


def _per_bucket(index: np.ndarray, mask: np.ndarray, count: int) -> tuple[int, ...]:
    return tuple(int(n) for n in np.bincount(index[mask], minlength=count))


def _failures(
    events: pa.Table, index: np.ndarray, count: int, moved: np.ndarray
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    failed = _mask(pc.is_in(events["state"], pa.array(_FAILED))) & moved
    if not failed.any():
        return ()
    rows = np.flatnonzero(failed)
    picked = events.select(["error_type", "state"]).filter(pa.array(failed))
    types, states = picked["error_type"].to_pylist(), picked["state"].to_pylist()
    reasons = [str(t or s) for t, s in zip(types, states, strict=True)]
    ranked = [r for r, _ in sorted(Counter(reasons).items(), key=lambda kv: (-kv[1], kv[0]))]
    # One "other" stands for two reasons or more, never for one that could be named.
    shown = ranked if len(ranked) <= TOP_REASONS + 1 else ranked[:TOP_REASONS]
    named = {reason: n for n, reason in enumerate(shown)}
    other = len(shown)
    codes = np.array([named.get(r, other) for r in reasons])
    out = []
    for n, reason in enumerate(shown):
        out.append((reason, _per_bucket(index[rows], codes == n, count)))
    if len(ranked) > len(shown):
        label = f"{len(ranked) - len(shown)} other reasons"
        out.append((label, _per_bucket(index[rows], codes == other, count)))
    return tuple(out)


def _spend(
    events: pa.Table, index: np.ndarray, count: int, moved: np.ndarray
) -> tuple[Decimal, ...]:
    billed = events["billed_usd"]
    valid = _mask(pc.is_valid(billed)) & moved
    if not valid.any():
        return (_ZERO,) * count
    table = pa.table({"bucket": pa.array(index[valid]), "usd": billed.filter(pa.array(valid))})
    sums = table.group_by("bucket").aggregate([("usd", "sum")])
    per = dict.fromkeys(range(count), _ZERO)
    for bucket, usd in zip(sums["bucket"].to_pylist(), sums["usd_sum"].to_pylist(), strict=True):
        per[int(bucket)] = usd or _ZERO
    running = _ZERO
    out = []
    for i in range(count):
        running += per[i]
        out.append(trim_usd(running))
    return tuple(out)
