"""Reading a :class:`ResumeState` from the ledger in bounded memory (see its module).

:func:`load_resume_state` decodes the parts once, narrowing each batch to what a resume
reads (:data:`RESUME_COLUMNS`, ``request_id`` and the outputs' local copies as flags) and
spilling it to a file per range of job keys (Arrow IPC in a temporary directory of the run
directory), then folds each range's file in turn and keeps a few flat arrays per job. A
range holds about ``PASS_BYTES`` of narrowed events; only one range is folded at a time.
:func:`read_whole` folds the whole records of a few jobs from the parts their events span.
"""

from __future__ import annotations

import bisect
import itertools
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runner.errors import LedgerCorruptError
from runner.ledger.fold import _flag_unfetched, _retrying, _Snapshot
from runner.ledger.folding import _to_bool, fold_tables
from runner.ledger.heap import release_freed
from runner.ledger.parts import _check_part_schema, iter_part, part_size_of
from runner.ledger.resumebuild import UNFETCHED, Builder
from runner.ledger.resumestate import IN_FLIGHT, ResumeState
from runner.ledger.schema import LEDGER_SCHEMA, JobRecord, record_from_row, rows_to_table

RESUME_COLUMNS = (
    "seq", "job_key", "state", "attempt", "request_id", "retryable", "billed_usd", "reroll_usd",
)  # fmt: skip
_LOCAL_PATH = "outputs.list.element.local_path"
_HAS_ID = "request_id"  # folded as a bool: whether the attempt has a request id
# Bytes of narrowed events a range holds; its fold's peak is a few times this.
PASS_BYTES = 4 * 2**20
_BATCH_ROWS = 32_768
# Narrowed events the spill holds at most (its batches keep the part's decoded batch alive).
_SPILL_HELD_ROWS = 8 * _BATCH_ROWS
_COMPARED_BOUNDS = 64  # up to this many range bounds, each batch is compared with each


def load_resume_state(
    run_dir: Path | str, *, downloads: bool = True, pass_bytes: int | None = None
) -> ResumeState:
    """What a run resuming ``run_dir`` reads of its ledger (``downloads``: which completed
    jobs still lack a local copy of an output). Takes no lock; the run holds it."""
    run_dir = Path(run_dir)
    state = _retrying(run_dir, lambda snap: _read(snap, run_dir, downloads, pass_bytes))
    release_freed()
    keys = state.keys_in(IN_FLIGHT)
    if keys:
        state.records = _retrying(run_dir, lambda snap: _whole(snap, keys))
    state.run_dir = run_dir
    return state


def _read(snap: _Snapshot, run_dir: Path, downloads: bool, pass_bytes: int | None) -> ResumeState:
    """Read the parts once, narrowing each batch and spilling it to the file of its range of
    job keys (Arrow IPC, next to the ledger); then fold each range's file in turn."""
    names = [n for n in RESUME_COLUMNS if n != _HAS_ID]
    events, size = 0, 0
    for part in snap.parts:
        rows, part_size = part_size_of(part.path, names)
        events += rows
        size += part_size + 2 * rows  # the two flags
    events += len(snap.journal_rows)
    size += len(snap.journal_rows) * (size // max(events, 1) or 100)
    bounds = _boundaries(snap, -(-size // (pass_bytes or PASS_BYTES)))
    release_freed()  # the samples' decoded pages
    out = Builder(downloads, _schema(downloads))
    every = _events(snap, list(RESUME_COLUMNS), downloads)
    if not bounds:
        out.add_slice(every)
        return out.finish()
    # One decode of the parts (the costly part), however many ranges: a pass per range
    # over the parts would decode them all again each time.
    with tempfile.TemporaryDirectory(prefix=".resume-", dir=run_dir) as tmp:
        files = [Path(tmp) / f"range-{i}.arrow" for i in range(len(bounds) + 1)]
        _spill(every, bounds, files, _schema(downloads))
        release_freed()  # the parts' decoded batches
        for path in files:
            out.add_slice(_read_spilled(path))
            path.unlink()
            release_freed()
    return out.finish()


def _spill(
    tables: Iterator[pa.Table], bounds: list[str], files: list[Path], schema: pa.Schema
) -> None:
    """Each event into the file of its key range (``bounds`` split them), in seq order."""
    writers = [pa.ipc.new_file(str(path), schema) for path in files]
    held: list[list[pa.Table]] = [[] for _ in files]
    counts = [0] * len(files)

    def flush(i: int) -> None:
        if held[i]:
            writers[i].write_table(pa.concat_tables(held[i]))
            held[i], counts[i] = [], 0

    try:
        for table in tables:
            which = _ranges_of(table["job_key"], bounds)
            order = np.argsort(which, kind="stable")
            ordered = table.take(pa.array(order))
            ends = np.cumsum(np.bincount(which, minlength=len(files)))
            for i, (start, stop) in enumerate(itertools.pairwise([0, *ends.tolist()])):
                if stop > start:
                    held[i].append(ordered.slice(start, stop - start))
                    counts[i] += stop - start
                if counts[i] >= _BATCH_ROWS:
                    flush(i)
            if sum(counts) >= _SPILL_HELD_ROWS:  # many ranges: each holds few rows
                for i in range(len(files)):
                    flush(i)
        for i in range(len(files)):
            flush(i)
    finally:
        for writer in writers:
            writer.close()


def _ranges_of(keys: pa.ChunkedArray, bounds: list[str]) -> np.ndarray:
    """Each key's range: how many of the (sorted) ``bounds`` are <= it. Many bounds: a
    bisection per bound in the sorted keys (a comparison of every key with each of ~300
    bounds took most of a 10M-job spill, ~30 ms a batch of 32,768 events)."""
    if len(bounds) <= _COMPARED_BOUNDS:  # few: a comparison per bound is cheaper than a sort
        which = np.zeros(len(keys), dtype=np.int32)
        for bound in bounds:
            which += _to_bool(pc.greater_equal(keys, bound))
        return which
    by_key = pc.sort_indices(keys).to_numpy()  # nulls last (none in a ledger)
    valid = len(by_key) - keys.null_count
    ordered = keys.take(by_key[:valid]).to_pylist()
    cuts = [0, *(bisect.bisect_left(ordered, bound) for bound in bounds), valid]
    which = np.zeros(len(by_key), dtype=np.int32)  # a null: no bound is <= it
    which[by_key[:valid]] = np.repeat(np.arange(len(cuts) - 1, dtype=np.int32), np.diff(cuts))
    return which


def _read_spilled(path: Path) -> Iterator[pa.Table]:
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


def _schema(downloads: bool) -> pa.Schema:
    fields = [LEDGER_SCHEMA.field(n) for n in RESUME_COLUMNS if n != _HAS_ID]
    fields.insert(4, pa.field(_HAS_ID, pa.bool_()))
    return pa.schema([*fields, pa.field(UNFETCHED, pa.bool_())] if downloads else fields)


def _narrow(table: pa.Table, downloads: bool) -> pa.Table:
    """``request_id`` as whether it is there; ``outputs`` as whether one lacks a local copy."""
    has_id = pc.if_else(pc.is_valid(table[_HAS_ID]), True, pa.scalar(None, pa.bool_()))
    table = table.set_column(table.schema.get_field_index(_HAS_ID), _HAS_ID, has_id)
    return _flag_unfetched(table) if downloads else table


def _events(snap: _Snapshot, names: list[str], downloads: bool) -> Iterator[pa.Table]:
    """Every event, narrowed (:func:`_narrow`), in seq order, a batch at a time."""
    read = [*names, _LOCAL_PATH] if downloads else names
    wanted = [*names, "outputs"] if downloads else names
    for part in snap.parts:
        for table in _iter_columns(part.path, read, wanted):
            yield _narrow(table, downloads)
    if snap.journal_rows:
        yield _narrow(rows_to_table(snap.journal_rows).select(wanted), downloads)


def _iter_columns(path: Path, read: list[str], wanted: list[str]) -> Iterator[pa.Table]:
    """A part's columns ``read`` (nested ones by path) as tables of the columns ``wanted``."""
    try:
        with pq.ParquetFile(path) as handle:
            schema = handle.schema_arrow
            _check_part_schema(schema, path)
            present = [n for n in read if n.split(".")[0] in schema.names]
            for batch in handle.iter_batches(_BATCH_ROWS, columns=present, use_threads=False):
                table = pa.Table.from_batches([batch])
                yield table if len(present) == len(read) else _missing_as_null(table, wanted)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise LedgerCorruptError(f"ledger part {path} cannot be read: {exc}") from exc


def _missing_as_null(table: pa.Table, names: list[str]) -> pa.Table:
    """``table`` with the columns ``names``, those an older part lacks all null."""
    columns = [
        table[n]
        if n in table.column_names
        else pa.nulls(table.num_rows, LEDGER_SCHEMA.field(n).type)
        for n in names
    ]
    return pa.Table.from_arrays(columns, names=names)


def _whole(
    snap: _Snapshot, keys: Sequence[str], low: int = 0, high: int | None = None
) -> dict[str, JobRecord]:
    table = _whole_table(snap, keys, low, high)
    return {row["job_key"]: record_from_row(row) for row in table.to_pylist()}


def _whole_table(snap: _Snapshot, keys: Sequence[str], low: int, high: int | None) -> pa.Table:
    """Every column of the jobs ``keys``, folded from the events with seq in [low, high]
    (all of theirs), reading only the parts that overlap, a batch at a time."""
    value_set = pa.array(list(keys), pa.string())

    def tables() -> Iterator[pa.Table]:
        for part in snap.parts:
            if part.last_seq < low or (high is not None and part.first_seq > high):
                continue
            for table in iter_part(part.path, batch_rows=_BATCH_ROWS):
                yield table.filter(pc.is_in(table["job_key"], value_set=value_set))
        if snap.journal_rows:
            table = rows_to_table(snap.journal_rows)
            yield table.filter(pc.is_in(table["job_key"], value_set=value_set))

    jobs, _events = fold_tables(tables())
    return jobs


def read_whole(run_dir: Path, keys: Sequence[str], low: int, high: int) -> pa.Table:
    """The whole folded records of ``keys``, whose events all lie in seq [low, high]."""
    return _retrying(run_dir, lambda snap: _whole_table(snap, keys, low, high))


_SAMPLE_ROWS = 4_096  # job keys sampled per part to place the range boundaries
_SAMPLE_PARTS = 64  # parts sampled at most, evenly spaced (each costs a decode of a page)


def _boundaries(snap: _Snapshot, ranges: int) -> list[str]:
    """``ranges - 1`` job keys splitting a sample of the ledger's keys into equal ranges."""
    if ranges <= 1:
        return []
    samples = []
    parts = snap.parts
    if len(parts) > _SAMPLE_PARTS:
        parts = [parts[len(parts) * i // _SAMPLE_PARTS] for i in range(_SAMPLE_PARTS)]
    for part in parts:
        first = next(iter_part(part.path, ["job_key"], batch_rows=_SAMPLE_ROWS), None)
        if first is not None:  # a copy: a slice would hold the part's decoded page
            samples.append(pc.unique(first["job_key"]))
    if snap.journal_rows:
        samples.append(pa.chunked_array([[r["job_key"] for r in snap.journal_rows[::64]]]))
    keys = pc.unique(pa.chunked_array(samples, pa.string()).combine_chunks())
    keys = keys.take(pc.sort_indices(keys))
    if len(keys) < 2:
        return []
    step = len(keys) / ranges
    picked = {keys[int(step * i)].as_py() for i in range(1, ranges) if int(step * i) > 0}
    return sorted(k for k in picked if k is not None)
