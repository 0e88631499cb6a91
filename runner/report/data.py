"""The run report: what happened in a run directory, as data.

:func:`build_report` is pure: it takes the folded ledger (one latest row per job,
as :func:`runner.ledger.fold` returns it) and the run's ``run.json`` and returns a
frozen :class:`Report`. :func:`load_jobs` does the reading; :mod:`runner.report.reader`
makes the same report a bucket of jobs at a time (``runner report``), from the parts
:func:`assemble_report` puts together. Two parts have their own
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
- flagged: completed jobs whose outputs fal's safety checker flagged (``flagged``, from
  ``has_nsfw_concepts``), and how many such images they hold; re-rolls: flagged outputs
  discarded for a new seed (``--flagged reroll``) and what they cost, on top of ``billed``
  (which is each job's latest attempt); cached: jobs completed from the cross-run cache;
- the resume outlook: :func:`runner.ledger.decide` over every folded record. New
  manifest rows (never seen by the ledger) would be submitted too; the report has
  no manifest, so their number is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints.money import trim_usd
from runner.errors import LedgerError
from runner.ledger import JobState, ResumePolicy, read_folded
from runner.ledger.records import read_event_columns
from runner.ledger.totals import EndpointTotals, Totals, totals
from runner.ledger.versions import split_versions
from runner.report.failures import FailureGroup, failure_groups
from runner.report.invocations import Invocation, invocation_lines
from runner.report.outlook import ResumeOutlook, resume_outlook
from runner.report.timeline import EVENT_COLUMNS, Timeline, timeline

_ZERO = Decimal(0)
STATE_ORDER = tuple(JobState)
PERCENTILES = (50, 90, 99)


EndpointCost = EndpointTotals


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
class Safety:
    """fal's safety checker and the cross-run cache, over the current jobs."""

    flagged_jobs: int = 0  # completed with a flagged output kept
    flagged_images: int = 0  # black images among those outputs
    rerolls: int = 0  # flagged outputs discarded for a new seed
    reroll_usd: Decimal = _ZERO  # what those discarded attempts were billed
    cached_jobs: int = 0  # completed from the cross-run cache, at $0


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
    safety: Safety = field(default_factory=Safety)

    # Older versions of rows recorded again (runner.ledger.versions): left out of every
    # count and sum above unless ``all_versions``; what they were billed is still spent.
    superseded: int = 0
    superseded_billed_usd: Decimal = _ZERO
    superseded_estimated_usd: Decimal = _ZERO
    all_versions: bool = False
    superseded_reroll_usd: Decimal = _ZERO  # re-rolls paid for superseded jobs
    # One line per `runner run` on the directory, and the run over time (from every
    # event, superseded versions included: they happened). Empty without the events.
    invocations: tuple[Invocation, ...] = ()
    timeline: Timeline = field(default_factory=Timeline)
    manifest_dir: str | None = None  # absolute, where its relative input paths start

    @property
    def spent_usd(self) -> Decimal:
        """Everything paid, re-rolls and superseded versions included, whatever the counts
        show."""
        paid = self.billed_usd + self.safety.reroll_usd
        if self.all_versions:
            return trim_usd(paid)
        return trim_usd(paid + self.superseded_billed_usd + self.superseded_reroll_usd)


def _safety(jobs: pa.Table) -> Safety:
    names = set(jobs.column_names)
    if not {"flagged", "rerolls", "reroll_usd", "cached_from"} <= names:
        return Safety()
    done = jobs.filter(pc.equal(jobs["state"], JobState.COMPLETED.value))
    flagged = done.filter(pc.fill_null(done["flagged"], False))
    images = pc.sum(pc.cast(pc.list_flatten(flagged["nsfw"]), pa.int64())).as_py()
    usd = pc.sum(jobs["reroll_usd"]).as_py()
    return Safety(
        flagged_jobs=flagged.num_rows,
        flagged_images=int(images or 0),
        rerolls=int(pc.sum(jobs["rerolls"]).as_py() or 0),
        reroll_usd=trim_usd(Decimal(usd or 0)),
        cached_jobs=int(pc.sum(pc.is_valid(done["cached_from"])).as_py() or 0),
    )


def merge_safety(parts: list[Safety]) -> Safety:
    """The safety figures of disjoint sets of jobs, added up."""
    return Safety(
        flagged_jobs=sum(p.flagged_jobs for p in parts),
        flagged_images=sum(p.flagged_images for p in parts),
        rerolls=sum(p.rerolls for p in parts),
        reroll_usd=trim_usd(sum((p.reroll_usd for p in parts), _ZERO)),
        cached_jobs=sum(p.cached_jobs for p in parts),
    )


def load_jobs(run_dir: Path | str) -> pa.Table:
    """The folded ledger of a run directory (no lock taken; works while a run writes).

    Folded part by part (:func:`runner.ledger.read_folded`): memory holds one group of
    events plus one row per job, never the whole history.
    """
    run_dir = Path(run_dir)
    if not ((run_dir / "ledger").is_dir() or (run_dir / "run.json").is_file()):
        raise LedgerError(f"{run_dir} is not a run directory (no ledger/ and no run.json)")
    return read_folded(run_dir).jobs


def load_events(run_dir: Path | str) -> pa.Table:
    """The columns of every event the invocations and the timeline read (no lock taken)."""
    return read_event_columns(Path(run_dir), EVENT_COLUMNS)


def build_report(
    jobs: pa.Table,
    run_meta: Mapping[str, Any] | None,
    *,
    run_dir: Path | str | None = None,
    policy: ResumePolicy | None = None,
    top_failures: int = 10,
    examples: int = 3,
    all_versions: bool = False,
    events: pa.Table | None = None,
) -> Report:
    """The report of a folded ledger (every version). Pure: no I/O, no clock.

    Superseded jobs (:mod:`runner.ledger.versions`) are left out of every count, sum,
    timing and failure unless ``all_versions``; their spend is reported on its own.
    ``events`` (:func:`load_events`) give the invocations and the timeline; without them
    the invocations come from run.json alone and the timeline is empty.
    """
    versions = split_versions(jobs, all_versions=all_versions)
    jobs = versions.shown
    groups, failed = failure_groups(jobs, examples)
    counted = totals(jobs)
    return assemble_report(
        counted=counted,
        superseded=totals(versions.superseded),
        groups=groups,
        failed=failed,
        timing=_timing(jobs),
        resume=resume_outlook(jobs, policy or ResumePolicy()),
        safety=_safety(jobs),
        run_meta=run_meta,
        run_dir=run_dir,
        top_failures=top_failures,
        all_versions=all_versions,
        invocations=invocation_lines(events, run_meta or {}),
        timeline=Timeline(estimate_usd=counted.estimated_usd)
        if events is None
        else timeline(events, estimate_usd=counted.estimated_usd),
    )


def assemble_report(
    *,
    counted: Totals,
    superseded: Totals,
    groups: list[FailureGroup],
    failed: int,
    timing: Timing,
    resume: ResumeOutlook,
    safety: Safety,
    run_meta: Mapping[str, Any] | None,
    run_dir: Path | str | None,
    top_failures: int,
    all_versions: bool,
    invocations: tuple[Invocation, ...],
    timeline: Timeline,
) -> Report:
    """The report of its parts, computed over the current jobs (``superseded``: the others)."""
    meta = run_meta or {}
    found = meta.get("manifest")
    manifest: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    endpoints = counted.endpoints
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
        timing=timing,
        failed_jobs=failed,
        failure_groups=len(groups),
        failures=tuple(groups[:top_failures]),
        resume=resume,
        notes=tuple(notes),
        safety=safety,
        superseded=superseded.jobs,
        superseded_billed_usd=superseded.billed_usd,
        superseded_estimated_usd=superseded.estimated_usd,
        all_versions=all_versions,
        manifest_dir=_str_or_none(manifest.get("dir")),
        invocations=invocations,
        timeline=timeline,
        superseded_reroll_usd=superseded.reroll_usd,
    )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def percentiles(values: np.ndarray, of: int) -> Percentiles:
    """p50/p90/p99 (linear interpolation) and max of ``values``; ``of`` is the population."""
    if values.size == 0:
        return Percentiles(0, of)
    p50, p90, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
    return Percentiles(int(values.size), of, p50, p90, p99, float(values.max()))


def _timing(jobs: pa.Table) -> Timing:
    return timing_of([timing_part(jobs)])


@dataclass(frozen=True, slots=True)
class TimingPart:
    """What the timing reads of some jobs: :func:`timing_of` adds parts of disjoint jobs up."""

    first_submitted_at: datetime | None
    last_completed_at: datetime | None
    completed: int
    images: int
    queue: np.ndarray
    inference: np.ndarray


def timing_part(jobs: pa.Table) -> TimingPart:
    done = jobs.filter(pc.equal(jobs["state"], JobState.COMPLETED.value))

    def column(name: str) -> np.ndarray:
        return np.asarray(done[name].drop_null().to_numpy(), dtype=float)

    return TimingPart(
        first_submitted_at=pc.min(jobs["submitted_at"]).as_py(),
        last_completed_at=pc.max(done["completed_at"]).as_py() if done.num_rows else None,
        completed=done.num_rows,
        images=int(pc.sum(pc.list_value_length(done["outputs"])).as_py() or 0),
        queue=column("queue_s"),
        inference=column("inference_s"),
    )


def timing_of(parts: list[TimingPart]) -> Timing:
    firsts = [p.first_submitted_at for p in parts if p.first_submitted_at is not None]
    lasts = [p.last_completed_at for p in parts if p.last_completed_at is not None]
    first = min(firsts) if firsts else None
    last = max(lasts) if lasts else None
    wall_s = (last - first).total_seconds() if first and last and last > first else None
    completed = sum(p.completed for p in parts)
    images = sum(p.images for p in parts)

    def per_hour(count: int) -> float | None:
        return count * 3600.0 / wall_s if wall_s else None

    def values(name: str) -> np.ndarray:
        found = [getattr(p, name) for p in parts]
        return np.concatenate(found) if found else np.zeros(0, dtype=float)

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
