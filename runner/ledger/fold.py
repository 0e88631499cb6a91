"""Reading the ledger: events from parts + journal, folded into the latest state per job.

The fold is vectorised (pyarrow + numpy, no Python loop over rows): group the
events by job_key in seq order, then for every column take, at each job's last
event, the last non-null value since the start of the job (job-level columns
such as row_id or request) or since the job's latest ``submitting`` event
(attempt-level columns such as request_id, outputs or the error). Re-folding a
duplicated event is harmless: equal seq, equal values.

Reading folds about FOLD_GROUP_EVENTS events at a time and then folds the
folded rows, so memory holds one group of events plus one row per job.
Uses numpy (pyarrow does not depend on it since version 16).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerError
from runner.ledger.journal import list_segments, read_segment
from runner.ledger.parts import PartFile, read_part, scan_parts
from runner.ledger.schema import (
    ATTEMPT_FIELDS,
    LEDGER_SCHEMA,
    OUTCOME_FIELDS,
    JobRecord,
    JobState,
    record_from_row,
    rows_to_table,
)

LEDGER_DIR = "ledger"
JOURNAL_DIR = "journal"
_READ_ATTEMPTS = 20
FOLD_GROUP_EVENTS = 1_000_000
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class EventsRead:
    """All events of a run directory in seq order, and what reading skipped."""

    table: pa.Table
    parts: int
    journal_events: int
    torn_bytes: int


@dataclass(frozen=True, slots=True)
class FoldedRead:
    """The folded ledger (one row per job) and how many events it came from."""

    jobs: pa.Table
    events: int
    parts: int
    torn_bytes: int


@dataclass(frozen=True, slots=True)
class _Snapshot:
    parts: list[PartFile]
    journal_rows: list[dict[str, Any]]
    torn_bytes: int

    def tables(self) -> Iterator[pa.Table]:
        """Event tables in seq order: each part, then the journal's newer events."""
        for part in self.parts:
            yield read_part(part.path)
        if self.journal_rows:
            yield rows_to_table(self.journal_rows)


def _retrying(run_dir: Path, read: Callable[[_Snapshot], _T]) -> _T:
    """Run ``read`` over a snapshot of the run directory. Takes no lock.

    A writer may checkpoint or compact while we read: the journal is read
    before the parts are listed, so an event can only show up twice (and
    journal events a part holds are dropped by seq), and a file that vanishes
    mid-read makes us start again.
    """
    for attempt in range(_READ_ATTEMPTS):
        try:
            return read(_snapshot(run_dir))
        except FileNotFoundError:
            time.sleep(0.01 * attempt)
    raise LedgerError(f"ledger in {run_dir} kept changing while being read; try again")


def _snapshot(run_dir: Path) -> _Snapshot:
    rows: list[dict[str, Any]] = []
    torn = 0
    for segment in list_segments(run_dir / JOURNAL_DIR):
        try:
            read = read_segment(segment)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LedgerError(f"journal {segment} cannot be read: {exc}") from exc
        torn += read.torn_bytes
        rows.extend(read.rows)
    parts, _covered = scan_parts(run_dir / LEDGER_DIR)
    max_part_seq = parts[-1].last_seq if parts else 0
    # Events up to max_part_seq were checkpointed into a part already.
    newer = [r for r in rows if r["seq"] > max_part_seq]
    return _Snapshot(parts, newer, torn)


def read_events(run_dir: Path) -> EventsRead:
    """Every event in parts and journal, each once, in seq order (the full history)."""

    def read(snap: _Snapshot) -> EventsRead:
        tables = list(snap.tables())
        table = pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()
        return EventsRead(table, len(snap.parts), len(snap.journal_rows), snap.torn_bytes)

    return _retrying(run_dir, read)


def read_folded(run_dir: Path) -> FoldedRead:
    """The latest state per job, folding part by part (never all events at once)."""

    def read(snap: _Snapshot) -> FoldedRead:
        jobs, events = fold_tables(snap.tables())
        return FoldedRead(jobs, events, len(snap.parts), snap.torn_bytes)

    return _retrying(run_dir, read)


def fold_tables(tables: Iterable[pa.Table]) -> tuple[pa.Table, int]:
    """Fold event tables given in seq order; returns (jobs, events seen).

    Tables are folded in groups of about FOLD_GROUP_EVENTS events, so memory
    holds one group of events plus the folded rows, never every event. Each
    group folds to one row per job plus a flag saying whether a new attempt
    started in it; folding those rows again, with the flags as attempt
    boundaries, gives the same result as folding all events at once.
    """
    partials: list[pa.Table] = []
    resets: list[np.ndarray] = []
    events = 0
    group: list[pa.Table] = []
    grouped = 0

    def fold_group() -> None:
        folded, reset = _fold(pa.concat_tables(group), None)
        partials.append(folded)
        resets.append(reset)
        group.clear()

    for table in tables:
        events += table.num_rows
        group.append(table)
        grouped += table.num_rows
        if grouped >= FOLD_GROUP_EVENTS:
            fold_group()
            grouped = 0
    if group:
        fold_group()
    if not partials:
        return LEDGER_SCHEMA.empty_table(), 0
    if len(partials) == 1:
        return partials[0], events
    jobs, _reset = _fold(pa.concat_tables(partials), np.concatenate(resets))
    return jobs, events


def fold(events: pa.Table) -> pa.Table:
    """One row per job (sorted by seq) in LEDGER_SCHEMA: its latest state."""
    return _fold(events, None)[0]


def _fold(events: pa.Table, resets: np.ndarray | None) -> tuple[pa.Table, np.ndarray]:
    """(folded rows, whether each job started an attempt within ``events``).

    ``resets`` marks extra rows (already folded ones) that start an attempt.
    """
    n = events.num_rows
    if n == 0:
        return LEDGER_SCHEMA.empty_table(), np.zeros(0, dtype=bool)
    codes = pc.dictionary_encode(events["job_key"].combine_chunks()).indices.to_numpy()
    seq = events["seq"].to_numpy()
    if n < 2 or bool(np.all(seq[1:] >= seq[:-1])):
        order = np.argsort(codes, kind="stable")
    else:
        order = np.lexsort((seq, codes))
    sorted_codes = codes[order]
    change = sorted_codes[1:] != sorted_codes[:-1]
    starts = np.concatenate(([True], change))
    ends = np.concatenate((change, [True]))
    last = np.flatnonzero(ends)
    last = last[np.argsort(seq[order[last]], kind="stable")]
    index = np.arange(n)
    job_start = np.maximum.accumulate(np.where(starts, index, 0))[last]
    submitting = _to_bool(pc.equal(events["state"], JobState.SUBMITTING.value))
    if resets is not None:
        submitting = submitting | resets
    submitting = submitting[order]
    attempt_row = np.maximum.accumulate(np.where(starts | submitting, index, 0))[last]
    latest = order[last]
    columns = [
        _fold_column(events[f.name], f, order, index, last, latest, job_start, attempt_row)
        for f in LEDGER_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=LEDGER_SCHEMA), submitting[attempt_row]


def _fold_column(
    column: pa.ChunkedArray,
    field: pa.Field,
    order: np.ndarray,
    index: np.ndarray,
    last: np.ndarray,
    latest: np.ndarray,
    job_start: np.ndarray,
    attempt_start: np.ndarray,
) -> pa.Array | pa.ChunkedArray:
    """A column's value for each job: the last non-null one since the job or attempt start."""
    n = len(column)
    if column.null_count == 0 or field.name in OUTCOME_FIELDS:
        return column.take(pa.array(latest))
    if column.null_count == n:
        return pa.nulls(len(last), field.type)
    valid = _to_bool(pc.is_valid(column))[order]
    last_valid = np.maximum.accumulate(np.where(valid, index, -1))[last]
    since = attempt_start if field.name in ATTEMPT_FIELDS else job_start
    keep = last_valid >= since
    source = order[np.where(keep, last_valid, 0)]
    return column.take(pa.array(source, mask=~keep))


def _to_bool(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


@dataclass(frozen=True, slots=True)
class JobBrief:
    """The few fields a resume decision needs, cheap to look up for millions of jobs."""

    job_key: str
    state: JobState
    attempt: int | None
    request_id: str | None
    retryable: bool | None


class LedgerState:
    """The folded ledger: one latest record per job, looked up by job_key."""

    def __init__(self, jobs: pa.Table) -> None:
        self.jobs = jobs
        keys: list[str] = jobs["job_key"].to_pylist()
        self._index = dict(zip(keys, range(len(keys)), strict=True))
        self._brief: tuple[list[str], list[int | None], list[str | None], list[bool | None]]
        self._brief_ready = False

    @classmethod
    def load(cls, run_dir: Path | str) -> LedgerState:
        return cls(read_folded(Path(run_dir)).jobs)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, job_key: object) -> bool:
        return job_key in self._index

    def keys(self) -> Iterator[str]:
        return iter(self._index)

    def get(self, job_key: str) -> JobRecord | None:
        """The full folded record of one job, or None when the ledger never saw it."""
        i = self._index.get(job_key)
        if i is None:
            return None
        return record_from_row(self.jobs.slice(i, 1).to_pylist()[0])

    def brief(self, job_key: str) -> JobBrief | None:
        i = self._index.get(job_key)
        if i is None:
            return None
        if not self._brief_ready:
            self._brief = (
                self.jobs["state"].to_pylist(),
                self.jobs["attempt"].to_pylist(),
                self.jobs["request_id"].to_pylist(),
                self.jobs["retryable"].to_pylist(),
            )
            self._brief_ready = True
        states, attempts, request_ids, retryable = self._brief
        return JobBrief(job_key, JobState(states[i]), attempts[i], request_ids[i], retryable[i])
