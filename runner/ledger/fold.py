"""Reading the ledger: events from parts + journal, folded into the latest state per job.

The fold is vectorised (pyarrow + numpy, no Python loop over rows): group the
events by job_key in seq order, then for every column take, at each job's last
event, the last non-null value since the start of the job (job-level columns
such as row_id or request) or since the job's latest ``submitting`` event
(attempt-level columns such as request_id, outputs or the error). Re-folding a
duplicated event is harmless: equal seq, equal values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerError
from runner.ledger.journal import list_segments, read_segment
from runner.ledger.parts import read_part, scan_parts
from runner.ledger.schema import (
    ATTEMPT_FIELDS,
    LEDGER_SCHEMA,
    JobRecord,
    JobState,
    record_from_row,
    rows_to_table,
)

LEDGER_DIR = "ledger"
JOURNAL_DIR = "journal"
_READ_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class EventsRead:
    """All events of a run directory in seq order, and what reading skipped."""

    table: pa.Table
    parts: int
    journal_events: int
    torn_bytes: int


def read_events(run_dir: Path) -> EventsRead:
    """Every event in parts and journal, each once. Takes no lock.

    A writer may checkpoint or compact while we read; the journal is listed
    before the parts so that no event can slip between the two listings, and
    a file that vanishes mid-read makes us read again.
    """
    for attempt in range(_READ_ATTEMPTS):
        try:
            return _read_events_once(run_dir)
        except FileNotFoundError:
            time.sleep(0.01 * attempt)
    raise LedgerError(f"ledger in {run_dir} kept changing while being read; try again")


def _read_events_once(run_dir: Path) -> EventsRead:
    segments = list_segments(run_dir / JOURNAL_DIR)
    parts, _covered = scan_parts(run_dir / LEDGER_DIR)
    tables = [read_part(p.path) for p in parts]
    max_part_seq = parts[-1].last_seq if parts else 0
    rows: list[dict[str, Any]] = []
    torn = 0
    for segment in segments:
        try:
            read = read_segment(segment)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise LedgerError(f"journal {segment} cannot be read: {exc}") from exc
        torn += read.torn_bytes
        # Events up to max_part_seq were checkpointed into a part already.
        rows.extend(r for r in read.rows if r["seq"] > max_part_seq)
    if rows:
        tables.append(rows_to_table(rows))
    table = pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()
    return EventsRead(table, len(parts), len(rows), torn)


def fold(events: pa.Table) -> pa.Table:
    """One row per job (sorted by seq) in LEDGER_SCHEMA: its latest state."""
    n = events.num_rows
    if n == 0:
        return LEDGER_SCHEMA.empty_table()
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
    submitting = _to_bool(pc.equal(events["state"], JobState.SUBMITTING.value))[order]
    attempt_start = np.maximum.accumulate(np.where(starts | submitting, index, 0))[last]
    latest = order[last]
    columns = []
    for field in LEDGER_SCHEMA:
        column = events[field.name]
        if column.null_count == 0:
            columns.append(column.take(pa.array(latest)))
            continue
        if column.null_count == n:
            columns.append(pa.nulls(len(last), field.type))
            continue
        valid = _to_bool(pc.is_valid(column))[order]
        last_valid = np.maximum.accumulate(np.where(valid, index, -1))[last]
        since = attempt_start if field.name in ATTEMPT_FIELDS else job_start
        keep = last_valid >= since
        source = order[np.where(keep, last_valid, 0)]
        columns.append(column.take(pa.array(source, mask=~keep)))
    return pa.Table.from_arrays(columns, schema=LEDGER_SCHEMA)


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
        self._index = {key: i for i, key in enumerate(keys)}
        self._brief: tuple[list[str], list[int | None], list[str | None], list[bool | None]]
        self._brief_ready = False

    @classmethod
    def load(cls, run_dir: Path | str) -> LedgerState:
        return cls(fold(read_events(Path(run_dir)).table))

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
