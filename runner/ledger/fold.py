"""Reading the ledger: events from parts + journal, folded into the latest state per job
(the fold itself: :mod:`runner.ledger.folding`).

The fold is vectorised (pyarrow + numpy, no Python loop over rows): group the
events by job_key in seq order, then for every column take, at each job's last
event, the last non-null value since the start of the job (job-level columns
such as row_id or request) or since the job's latest ``submitting`` event
(attempt-level columns such as request_id, outputs or the error). Re-folding a
duplicated event is harmless: equal seq, equal values.

Reading folds about FOLD_GROUP_EVENTS events at a time and then folds the
folded rows, so memory holds one group of events plus one row per job.
:func:`read_admission` reads only the columns a resumed run needs (a few
percent of the bytes), and :class:`LedgerState` holds them without a Python
object per job, so a million-job ledger folds in a few hundred MB.
Uses numpy (pyarrow does not depend on it since version 16).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerError
from runner.ledger.folding import UNFETCHED, _to_bool, fold_tables
from runner.ledger.journal import list_segments, read_segment
from runner.ledger.parts import PartFile, read_part, scan_parts
from runner.ledger.schema import (
    LEDGER_SCHEMA,
    JobState,
    rows_to_table,
)

LEDGER_DIR = "ledger"
JOURNAL_DIR = "journal"
SHARDS_DIR = "shards"  # a sharded run directory: shards/<K>/ each a run directory
_READ_ATTEMPTS = 20
# What admission and resume read of each job: decide() (state, attempt, request_id,
# retryable), the spend so far (billed_usd, reroll_usd), cancelling in-flight jobs (endpoint).
ADMISSION_COLUMNS = (
    "seq",
    "job_key",
    "state",
    "endpoint",
    "attempt",
    "request_id",
    "retryable",
    "billed_usd",
    "reroll_usd",  # paid re-rolls of flagged outputs: earlier spend, like billed_usd
)
# Past one job in this many with downloads pending, read every column of every job.
_WHOLE_FRACTION = 8
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
    # A sharded run directory: one snapshot per shard (each with its own seq), read as one.
    shards: tuple[_Snapshot, ...] = ()

    def tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Event tables in seq order (all columns, or those named): parts, then the journal.

        For a sharded run directory, shard after shard: a job's events are all in its one
        shard, in that shard's seq order, which is all the fold needs.
        """
        if self.shards:
            for shard in self.shards:
                yield from shard.tables(columns)
            return
        for part in self.parts:
            yield read_part(part.path, columns)
        if self.journal_rows:
            table = rows_to_table(self.journal_rows)
            yield table if columns is None else table.select(list(columns))


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


def shard_dirs(run_dir: Path) -> list[Path]:
    """The shards' run directories of a sharded run directory (``shards/K``), by K."""
    root = run_dir / SHARDS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def _snapshot(run_dir: Path) -> _Snapshot:
    """The run directory's parts and journal; a sharded one's are those of its shards."""
    shards = tuple(_snapshot_one(d) for d in shard_dirs(run_dir))
    if not shards:
        return _snapshot_one(run_dir)
    return _Snapshot(
        parts=[p for s in shards for p in s.parts],
        journal_rows=[r for s in shards for r in s.journal_rows],
        torn_bytes=sum(s.torn_bytes for s in shards),
        shards=shards,
    )


def _snapshot_one(run_dir: Path) -> _Snapshot:
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


def read_admission(run_dir: Path, *, downloads: bool = True) -> pa.Table:
    """The folded ADMISSION_COLUMNS per job, plus ``outputs``: what a resumed run reads.

    ``outputs`` is null except, when ``downloads``, for completed jobs with an
    output not yet downloaded: those rows carry every column of LEDGER_SCHEMA
    (a second pass over their events only), as a download records a whole
    completed event. When that is most of the jobs (a run without downloads,
    resumed with them), every column of every job is read instead.
    ``state`` and ``endpoint`` come dictionary-encoded.
    """
    columns = [*ADMISSION_COLUMNS, "outputs"] if downloads else list(ADMISSION_COLUMNS)

    def read(snap: _Snapshot) -> pa.Table:
        tables = snap.tables(columns)
        if downloads:
            tables = (_flag_unfetched(t) for t in tables)
        jobs, _events = fold_tables(tables, empty=_admission_schema(downloads))
        if downloads:
            flag = jobs[UNFETCHED].fill_null(False)
            jobs = jobs.drop_columns([UNFETCHED])
            done = pc.equal(jobs["state"], JobState.COMPLETED.value)
            unfetched = np.flatnonzero(_to_bool(pc.and_(done, flag)))
        else:
            unfetched = np.zeros(0, dtype=np.int64)
        if len(unfetched) * _WHOLE_FRACTION > jobs.num_rows:
            del jobs
            jobs, _events = fold_tables(snap.tables())
        elif len(unfetched):
            keys = jobs["job_key"].take(pa.array(unfetched))
            wanted = (t.filter(pc.is_in(t["job_key"], value_set=keys)) for t in snap.tables())
            full, _events = fold_tables(wanted)
            jobs = _widen(jobs, full, unfetched)
        else:
            outputs = pa.nulls(jobs.num_rows, LEDGER_SCHEMA.field("outputs").type)
            jobs = jobs.append_column(LEDGER_SCHEMA.field("outputs"), outputs)
        for name in ("state", "endpoint"):
            encoded = pc.dictionary_encode(jobs[name])
            jobs = jobs.set_column(jobs.schema.get_field_index(name), name, encoded)
        return jobs

    return _retrying(run_dir, read)


def _admission_schema(downloads: bool) -> pa.Schema:
    schema = pa.schema([LEDGER_SCHEMA.field(name) for name in ADMISSION_COLUMNS])
    return schema.append(pa.field(UNFETCHED, pa.bool_())) if downloads else schema


def _flag_unfetched(events: pa.Table) -> pa.Table:
    """``outputs`` replaced by whether any output lacks local_path (null: no outputs)."""
    outputs = events["outputs"].combine_chunks()
    flat = pc.list_flatten(outputs)
    missing = _to_bool(pc.is_null(pc.struct_field(flat, "local_path")))
    parents = pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False)
    any_missing = np.bincount(parents[missing], minlength=len(outputs)) > 0
    flag = pa.array(any_missing, mask=~_to_bool(pc.is_valid(outputs)))
    return events.drop_columns(["outputs"]).append_column(UNFETCHED, flag)


def _widen(jobs: pa.Table, full: pa.Table, rows: np.ndarray) -> pa.Table:
    """Every column of LEDGER_SCHEMA: ``full``'s folded rows at ``rows``, nulls elsewhere.

    Both folds list jobs by the seq of their last event, which is unique, so
    ``full`` (a subset of the jobs) lines up with ``rows`` by seq. The added
    flat columns are dictionary-encoded: a few whole records among a million
    jobs cost an index byte or two per job and column, not a null slot of 4-16.
    """
    seqs = jobs["seq"].to_numpy()[rows]
    at = np.searchsorted(full["seq"].to_numpy(), seqs)
    if len(at) != full.num_rows or not np.array_equal(full["seq"].to_numpy()[at], seqs):
        raise LedgerError("ledger changed between two passes of one read")
    source = np.zeros(jobs.num_rows, dtype=np.int64)
    source[rows] = at
    missing = np.ones(jobs.num_rows, dtype=bool)
    missing[rows] = False
    index_type = next(t for t in (np.int8, np.int16, np.int32) if len(at) <= np.iinfo(t).max)
    fields, columns = [], []
    for field in LEDGER_SCHEMA:
        if field.name in jobs.column_names:
            column = jobs[field.name]
        elif pa.types.is_nested(field.type):
            column = full[field.name].take(pa.array(source, mask=missing))
        else:
            values = full[field.name].combine_chunks()
            absent = missing | ~_to_bool(values.is_valid())[source]
            indices = pa.array(source.astype(index_type), mask=absent)
            column = pa.DictionaryArray.from_arrays(indices, values)
        fields.append(pa.field(field.name, column.type, nullable=field.nullable))
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, LEDGER_SCHEMA.metadata))
