"""The run report read from a run directory in bounded memory: what
:func:`runner.report.data.build_report` makes of one fold of the whole ledger and every
event, a bucket of jobs at a time.

Three reads, none holding every job: the superseded versions
(:func:`runner.ledger.identity.superseded_keys`); the folded jobs, with only the columns the
report reads (:func:`runner.ledger.scan.scan_folded`), each slice reduced to its totals,
timing values, resume counts, safety figures and failed rows; and the events, every event of
a bucket of jobs at a time (:func:`runner.ledger.scan.scan_events`), reduced to per-minute
counts for the timeline and per-invocation counts. What is kept grows only with the failed
jobs (their rows, for the failure groups), the completed jobs' queue and inference times
(16 bytes a job, for exact percentiles) and the ``--html`` gallery's ``limit`` jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerError
from runner.ledger import JobState, ResumePolicy
from runner.ledger.identity import COLUMNS as IDENTITY_COLUMNS
from runner.ledger.identity import HashedIdentities, exact_superseded, superseded_keys
from runner.ledger.scan import scan_events, scan_folded
from runner.ledger.totals import COLUMNS as TOTALS_COLUMNS
from runner.ledger.totals import merge_totals, totals
from runner.report import failures
from runner.report.data import (
    Report,
    _safety,
    assemble_report,
    merge_safety,
    timing_of,
    timing_part,
)
from runner.report.gallery import Gallery, gallery
from runner.report.invocations import invocations_of, merge_run_counts, run_counts
from runner.report.outlook import outlook_counts, outlook_of
from runner.report.timeline import EVENT_COLUMNS, JobOrder, minute_counts, timeline_of

# The folded columns the report reads.
_MORE = ("submitted_at", "completed_at", "queue_s", "inference_s", "attempt", "request_id",
         "retryable", "flagged", "nsfw", "rerolls", "cached_from")  # fmt: skip
JOB_COLUMNS = tuple(dict.fromkeys([*TOTALS_COLUMNS, *failures.COLUMNS, *IDENTITY_COLUMNS, *_MORE]))
_LENGTHS = ("outputs", "duplicate_request_ids")
_NO_KEYS = pa.array([], pa.string())
_GALLERY_ORDER = [("source", "ascending"), ("line", "ascending"), ("variant", "ascending"),
                  ("seq", "ascending")]  # fmt: skip


def _require_run_dir(run_dir: Path) -> None:
    if not ((run_dir / "ledger").is_dir() or (run_dir / "run.json").is_file()):
        raise LedgerError(f"{run_dir} is not a run directory (no ledger/ and no run.json)")


def _split(jobs: pa.Table, old_keys: pa.Array, all_versions: bool) -> tuple[pa.Table, pa.Table]:
    """(the jobs shown, the superseded ones) of a slice."""
    if len(old_keys) == 0:
        return jobs, jobs.slice(0, 0)
    gone = pc.is_in(jobs["job_key"], value_set=old_keys)
    return (jobs if all_versions else jobs.filter(pc.invert(gone))), jobs.filter(gone)


def read_report(
    run_dir: Path | str,
    run_meta: Mapping[str, Any] | None,
    *,
    policy: ResumePolicy | None = None,
    top_failures: int = 10,
    examples: int = 3,
    all_versions: bool = False,
) -> Report:
    """The report of a run directory, equal to ``build_report`` over every version of the
    folded ledger and :func:`runner.report.data.load_events` (no lock taken)."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    # Read as if no job were superseded, keeping each job's identity (20 bytes); read again
    # only when some are.
    parts, candidates = _job_parts(run_dir, _NO_KEYS, all_versions, identities=True)
    old_keys = exact_superseded(run_dir, candidates)
    if len(old_keys):
        parts, _ = _job_parts(run_dir, old_keys, all_versions, identities=False)
    counted, old = merge_totals(parts["counted"]), merge_totals(parts["old"])
    failed = pa.concat_tables(parts["failed"]) if parts["failed"] else None
    if failed is not None:
        # One fold lists jobs by their last event: the same order among equal lines.
        failed = failed.sort_by([("source", "ascending"), ("line", "ascending"),
                                 ("seq", "ascending")])  # fmt: skip
    groups, failed_jobs = failures.failure_groups(failed, examples) if failed else ([], 0)

    def events(buckets: Iterator[pa.Table]) -> tuple[list[Any], list[Any]]:
        minutes, runs = [], []
        for bucket in buckets:
            order = JobOrder.of(bucket)
            minutes.append(minute_counts(bucket, order))
            runs.append(run_counts(bucket, order))
        return minutes, runs

    (minutes, runs), _info = scan_events(run_dir, EVENT_COLUMNS, events)
    return assemble_report(
        counted=counted,
        superseded=old,
        groups=groups,
        failed=failed_jobs,
        timing=timing_of(parts["timing"]),
        resume=outlook_of(parts["outlook"], policy or ResumePolicy()),
        safety=merge_safety(parts["safety"]),
        run_meta=run_meta,
        run_dir=run_dir,
        top_failures=top_failures,
        all_versions=all_versions,
        invocations=invocations_of(merge_run_counts(runs), run_meta or {}),
        timeline=timeline_of(minutes, estimate_usd=counted.estimated_usd),
    )


def _job_parts(
    run_dir: Path, old_keys: pa.Array, all_versions: bool, *, identities: bool
) -> tuple[dict[str, list[Any]], np.ndarray]:
    """Each slice's share of the report, and (``identities``) the candidate rows of
    :class:`runner.ledger.identity.HashedIdentities`."""

    def reduce(slices: Iterator[pa.Table]) -> tuple[dict[str, list[Any]], np.ndarray]:
        parts: dict[str, list[Any]] = {k: [] for k in ("counted", "old", "failed", "timing",
                                                       "outlook", "safety")}  # fmt: skip
        seen = HashedIdentities()
        for jobs in slices:
            if identities:
                seen.add(jobs)
            shown, old = _split(jobs, old_keys, all_versions)
            parts["counted"].append(totals(shown))
            parts["old"].append(totals(old))
            parts["failed"].append(failures.failed_rows(shown).select([*failures.COLUMNS, "seq"]))
            parts["timing"].append(timing_part(shown))
            parts["outlook"].append(outlook_counts(shown))
            parts["safety"].append(_safety(shown))
        return parts, seen.candidates()

    found, _info = scan_folded(run_dir, JOB_COLUMNS, reduce, lengths=_LENGTHS)
    return found


def read_gallery(
    run_dir: Path | str,
    *,
    limit: int | None = 500,
    states: Collection[JobState] = (),
    all_versions: bool = False,
) -> Gallery:
    """:func:`runner.report.gallery.gallery` of the current jobs (every version with
    ``all_versions``), keeping only the first ``limit`` jobs of each slice in manifest order."""
    if limit is not None and limit < 0:
        raise ValueError(f"gallery limit must be >= 0, not {limit}")
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    old_keys = superseded_keys(run_dir)
    wanted = pa.array([JobState(s).value for s in states], pa.string())

    def reduce(slices: Iterator[pa.Table]) -> tuple[pa.Table | None, int]:
        best: pa.Table | None = None
        total = 0
        for jobs in slices:
            shown, _old = _split(jobs, old_keys, all_versions)
            if len(wanted):
                shown = shown.filter(pc.is_in(shown["state"], value_set=wanted))
            total += shown.num_rows
            merged = shown if best is None else pa.concat_tables([best, shown])
            best = merged.sort_by(_GALLERY_ORDER)
            if limit is not None:
                best = best.slice(0, limit)
        return best, total

    (best, total), _info = scan_folded(run_dir, None, reduce)
    if best is None:
        return Gallery((), 0, tuple(JobState(s) for s in states))
    made = gallery(best, limit=limit, states=states)
    return dataclasses.replace(made, total=total)
