"""The run report: what happened in a run directory, as data.

:func:`build_report` is pure: it takes the folded ledger (one latest row per job,
as :func:`runner.ledger.fold` returns it) and the run's ``run.json`` and returns a
frozen :class:`Report`. :func:`load_jobs` does the reading. Two parts have their own
modules: :mod:`runner.report.failures` (failure groups) and :mod:`runner.report.outlook`
(the resume outlook). Rendering is separate: :mod:`runner.report.text` (text and JSON),
:mod:`runner.report.html` (the page, whose gallery rows and thumbnails come from
:mod:`runner.report.gallery`).

Definitions:

- wall time: from the earliest ``submitted_at`` to the latest ``completed_at``
  (attempt-level columns, so of each job's latest attempt);
- percentiles: linear interpolation between closest ranks (numpy's default), over
  the completed jobs whose value is known (``queue_s`` is null when the queue
  never told us when the job started);
- failure groups: ``error_type`` plus the message with ids, URLs, paths and numbers
  replaced by placeholders, so the same failure on different rows is one group;
- the resume outlook: :func:`runner.ledger.decide` over every folded record. New
  manifest rows (never seen by the ledger) would be submitted too; the report has
  no manifest, so their number is unknown.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerError
from runner.ledger import LEDGER_SCHEMA, JobState, ResumePolicy, read_folded
from runner.ledger.scan import scan_folded
from runner.ledger.totals import COLUMNS as TOTALS_COLUMNS
from runner.ledger.totals import LENGTHS as TOTALS_LENGTHS
from runner.ledger.totals import EndpointTotals, Totals, merge_totals, totals
from runner.report.failures import COLUMNS as FAILURE_COLUMNS
from runner.report.failures import FailureGroup, failed_rows, failure_groups
from runner.report.outlook import ResumeOutlook, resume_outlook

_ZERO = Decimal(0)
STATE_ORDER = tuple(JobState)
PERCENTILES = (50, 90, 99)


EndpointCost = EndpointTotals
# The folded columns a report reads: totals, failures, timing, the resume outlook.
COLUMNS = tuple(dict.fromkeys([
    *TOTALS_COLUMNS, *FAILURE_COLUMNS, "submitted_at", "completed_at", "queue_s", "inference_s",
    "attempt", "request_id",
]))  # fmt: skip
_NO_FAILURES = pa.schema([LEDGER_SCHEMA.field(n) for n in FAILURE_COLUMNS]).empty_table()


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p90/p99 and max over ``known`` values out of ``of`` completed jobs (None if none)."""

    known: int
    of: int
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class Timing:
    first_submitted_at: datetime | None
    last_completed_at: datetime | None
    wall_s: float | None
    completed: int
    images: int
    jobs_per_hour: float | None
    images_per_hour: float | None
    queue: Percentiles
    inference: Percentiles


@dataclass(frozen=True, slots=True)
class Report:
    run_dir: str | None
    manifest: str | None
    manifest_sha256: str | None
    runner_version: str | None
    jobs: int
    by_state: Mapping[JobState, int]
    endpoints: tuple[EndpointCost, ...]
    estimated_usd: Decimal
    estimated_done_usd: Decimal
    billed_usd: Decimal
    possible_duplicates: int  # resubmitted after an unknown outcome: maybe billed twice
    possible_duplicate_usd: Decimal
    unknown_outcomes: int  # latest submit outcome still unknown
    reconciled: Mapping[str, int]  # how fal's history settled unknown outcomes
    duplicates_found: int  # other billed requests the history showed
    duplicates_found_usd: Decimal
    timing: Timing
    failed_jobs: int
    failure_groups: int  # how many distinct groups, of which ``failures`` lists the top ones
    failures: tuple[FailureGroup, ...]
    resume: ResumeOutlook
    notes: tuple[str, ...] = field(default=())


def load_jobs(run_dir: Path | str) -> pa.Table:
    """The folded ledger of a run directory (no lock taken; works while a run writes).

    Folded part by part (:func:`runner.ledger.read_folded`): memory holds one group of
    events plus one row per job, never the whole history.
    """
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    return read_folded(run_dir).jobs


def load_report(
    run_dir: Path | str,
    run_meta: Mapping[str, Any] | None,
    *,
    policy: ResumePolicy | None = None,
    top_failures: int = 10,
    examples: int = 3,
) -> Report:
    """The report of a run directory, read in bounded memory (no lock taken).

    Folds only the columns the report reads, a range of jobs at a time
    (:func:`runner.ledger.scan.scan_folded`), and builds the report from the slices: the
    same report as :func:`build_report` of the whole folded ledger.
    """
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)

    def reduce(slices: Iterator[pa.Table]) -> Report:
        return build_report(slices, run_meta, run_dir=run_dir, policy=policy,
                            top_failures=top_failures, examples=examples)  # fmt: skip

    report, _read = scan_folded(run_dir, COLUMNS, reduce, lengths=TOTALS_LENGTHS)
    return report


def build_report(
    jobs: pa.Table | Iterable[pa.Table],
    run_meta: Mapping[str, Any] | None,
    *,
    run_dir: Path | str | None = None,
    policy: ResumePolicy | None = None,
    top_failures: int = 10,
    examples: int = 3,
) -> Report:
    """The report of a folded ledger: one table, or disjoint slices of its jobs (each job in
    one). Pure: no I/O, no clock. Reads the columns of :data:`COLUMNS` only."""
    meta = run_meta or {}
    found = meta.get("manifest")
    manifest: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    policy = policy or ResumePolicy()
    parts: list[Totals] = []
    failed_parts: list[pa.Table] = []
    timings: list[_TimingPart] = []
    outlooks: list[ResumeOutlook] = []
    for table in [jobs] if isinstance(jobs, pa.Table) else jobs:
        parts.append(totals(table))
        failed_parts.append(failed_rows(table).select(FAILURE_COLUMNS))
        timings.append(_timing_part(table))
        outlooks.append(resume_outlook(table, policy))
    counted = merge_totals(parts)
    endpoints = counted.endpoints
    failed_jobs = pa.concat_tables(failed_parts) if failed_parts else _NO_FAILURES
    groups, failed = failure_groups(failed_jobs, examples)
    notes = []
    if any(ep.billed_jobs < ep.by_state.get(JobState.COMPLETED, 0) for ep in endpoints):
        notes.append("some completed jobs have no output-based cost (unknown endpoint price)")
    return Report(
        run_dir=None if run_dir is None else str(run_dir),
        manifest=_str_or_none(manifest.get("path")),
        manifest_sha256=_str_or_none(manifest.get("sha256")),
        runner_version=_str_or_none(meta.get("runner_version")),
        jobs=counted.jobs,
        by_state=counted.by_state,
        endpoints=endpoints,
        estimated_usd=counted.estimated_usd,
        estimated_done_usd=counted.estimated_done_usd,
        billed_usd=counted.billed_usd,
        possible_duplicates=counted.possible_duplicates,
        possible_duplicate_usd=counted.possible_duplicate_usd,
        unknown_outcomes=counted.unknown_outcomes,
        reconciled=counted.reconciled,
        duplicates_found=counted.duplicates_found,
        duplicates_found_usd=counted.duplicates_found_usd,
        timing=_timing(timings),
        failed_jobs=failed,
        failure_groups=len(groups),
        failures=tuple(groups[:top_failures]),
        resume=merge_outlooks(outlooks, policy),
        notes=tuple(notes),
    )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def percentiles(values: np.ndarray, of: int) -> Percentiles:
    """p50/p90/p99 (linear interpolation) and max of ``values``; ``of`` is the population."""
    if values.size == 0:
        return Percentiles(0, of)
    p50, p90, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
    return Percentiles(int(values.size), of, p50, p90, p99, float(values.max()))


@dataclass(frozen=True, slots=True)
class _TimingPart:
    """What the timing needs of one slice of jobs."""

    first: datetime | None
    last: datetime | None
    completed: int
    images: int
    queue: np.ndarray
    inference: np.ndarray


def _timing_part(jobs: pa.Table) -> _TimingPart:
    done = jobs.filter(pc.equal(jobs["state"], JobState.COMPLETED.value))

    def column(name: str) -> np.ndarray:
        return np.asarray(done[name].drop_null().to_numpy(), dtype=float)

    return _TimingPart(
        first=pc.min(jobs["submitted_at"]).as_py(),
        last=pc.max(done["completed_at"]).as_py() if done.num_rows else None,
        completed=done.num_rows,
        images=int(pc.sum(pc.list_value_length(done["outputs"])).as_py() or 0),
        queue=column("queue_s"),
        inference=column("inference_s"),
    )


def _timing(parts: list[_TimingPart]) -> Timing:
    firsts = [p.first for p in parts if p.first is not None]
    lasts = [p.last for p in parts if p.last is not None]
    first = min(firsts) if firsts else None
    last = max(lasts) if lasts else None
    wall_s = (last - first).total_seconds() if first and last and last > first else None
    completed = sum(p.completed for p in parts)
    images = sum(p.images for p in parts)

    def per_hour(count: int) -> float | None:
        return count * 3600.0 / wall_s if wall_s else None

    def values(name: str) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else np.zeros(0)

    return Timing(
        first_submitted_at=first,
        last_completed_at=last,
        wall_s=wall_s,
        completed=completed,
        images=images,
        jobs_per_hour=per_hour(completed),
        images_per_hour=per_hour(images),
        queue=percentiles(values("queue"), completed),
        inference=percentiles(values("inference"), completed),
    )


def merge_outlooks(parts: list[ResumeOutlook], policy: ResumePolicy) -> ResumeOutlook:
    """The outlook of disjoint slices of jobs: counts added, reasons largest first."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return resume_outlook(LEDGER_SCHEMA.empty_table(), policy)
    counts: dict[str, int] = {}
    reasons: Counter[str] = Counter()
    for part in parts:
        reasons.update(part.reasons)
        for f in fields(part):
            value = getattr(part, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                counts[f.name] = counts.get(f.name, 0) + value
    ordered = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return ResumeOutlook(policy=policy, reasons=ordered, **counts)


def _require_run_dir(run_dir: Path) -> None:
    if not ((run_dir / "ledger").is_dir() or (run_dir / "run.json").is_file()):
        raise LedgerError(f"{run_dir} is not a run directory (no ledger/ and no run.json)")
