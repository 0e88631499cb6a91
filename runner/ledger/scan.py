"""Reading the folded ledger in bounded memory: the columns a reader needs, a bucket of jobs
at a time.

:func:`scan_folded` folds only the named columns (plus seq, job_key and state) and hands
the reader the folded rows in *slices*: the jobs are split into buckets by a hash of their
job_key (:func:`runner.ledger.keyhash.buckets`). Every part is read once, a batch at a
time, and each event is written to its bucket's scratch file (Arrow IPC, uncompressed, in a
temporary directory: ``TMPDIR`` chooses where); then each bucket is read back and folded on
its own. Every job is in exactly one slice, folded from all of its events, so a reader that
reduces each slice and combines the results (sums, counts, a file written slice after
slice) sees what one fold of the whole ledger gives. Memory holds one batch while the parts
are read and one bucket's events and folded rows after; the number of buckets follows the
size of the columns read (about ``PASS_BYTES`` each), and the scratch files take that size
on disk for the time of the scan. A ledger that fits one bucket is folded straight from its
parts, with no scratch file.

Within a slice, rows are in the order of each job's last event (as :func:`fold` returns
them); slices come in no particular order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger import keyhash
from runner.ledger.fold import _retrying, _Snapshot
from runner.ledger.folding import _fold, fold_tables
from runner.ledger.parts import iter_part, part_size_of
from runner.ledger.schema import LEDGER_SCHEMA, rows_to_table
from runner.ledger.scratch import scratch_errors, scratch_folder

# Bytes of the named columns (uncompressed, as the parts' footers count them) per bucket:
# a bucket's fold holds its events plus one folded row per job, and its peak is a few
# times its bytes.
PASS_BYTES = 8 * 2**20
MAX_BUCKETS = 1_000  # scratch files open at once while the parts are read
GROUP_EVENTS = 150_000
_KEYS = ("seq", "job_key", "state")
_RESET = "_reset"  # a spilled row's job started an attempt within the events folded into it
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ScanInfo:
    """What a scan read: its events, parts and the journal bytes it skipped as torn."""

    events: int
    parts: int
    torn_bytes: int
    passes: int


def scan_folded(
    run_dir: Path,
    columns: Sequence[str] | None,
    reduce: Callable[[Iterator[pa.Table]], _T],
    *,
    lengths: Sequence[str] = (),
    pass_bytes: int | None = None,
) -> tuple[_T, ScanInfo]:
    """``reduce`` over the folded slices of the ledger (the named columns, or every one).

    ``lengths`` names list columns read for their number of items only (images, duplicate
    ids): each becomes a list of nulls of the same length, which costs 4 bytes a row.

    ``reduce`` takes the slices' iterator and returns the result; it must keep nothing
    else, for when a writer checkpoints or compacts while the parts are read the scan starts
    over and calls it again (a ledger of more than one bucket is read whole, into the
    scratch files, before the first slice is handed out). Takes no lock.
    """
    names = LEDGER_SCHEMA.names if columns is None else _with_keys(columns)

    def read(snap: _Snapshot) -> tuple[_T, ScanInfo]:
        events, size = 0, 0
        for part in snap.parts:
            rows, part_size = part_size_of(part.path, names, lengths)
            events += rows
            size += part_size
        events += len(snap.journal_rows)
        size += len(snap.journal_rows) * (size // max(events, 1) or 100)
        count = min(MAX_BUCKETS, -(-size // (pass_bytes or PASS_BYTES)))
        empty = _empty_schema(names, tuple(lengths))
        if count <= 1:
            tables = (_counted(t, tuple(lengths)) for t in _events(snap, names))
            info = ScanInfo(events, len(snap.parts), snap.torn_bytes, 1)
            return reduce(_folded([tables], empty)), info
        with scratch_folder("runner-scan-") as scratch, scratch_errors(scratch):
            spilled = _spill(snap, names, tuple(lengths), count, scratch, empty)
            info = ScanInfo(events, len(snap.parts), snap.torn_bytes, count)
            return reduce(_refolded(_read_spill(p) for p in spilled)), info

    with _system_pool():
        return _retrying(run_dir, read)


def scan_events(
    run_dir: Path,
    columns: Sequence[str],
    reduce: Callable[[Iterator[pa.Table]], _T],
    *,
    pass_bytes: int | None = None,
) -> tuple[_T, ScanInfo]:
    """``reduce`` over the ledger's events (the named columns, plus seq, job_key and state),
    unfolded, a bucket of jobs at a time: each table holds every event of its jobs, in seq
    order (shard after shard), and no other job's. As :func:`scan_folded`, for readers of
    each job's history (transitions between states) that must not hold every event."""
    names = _with_keys(columns)

    def read(snap: _Snapshot) -> tuple[_T, ScanInfo]:
        events, size = 0, 0
        for part in snap.parts:
            rows, part_size = part_size_of(part.path, names)
            events += rows
            size += part_size
        events += len(snap.journal_rows)
        size += len(snap.journal_rows) * (size // max(events, 1) or 100)
        count = min(MAX_BUCKETS, -(-size // (pass_bytes or PASS_BYTES)))
        empty = _empty_schema(names, ())
        if count <= 1:
            tables = [_conformed(t, empty) for t in _events(snap, names)]
            info = ScanInfo(events, len(snap.parts), snap.torn_bytes, 1)
            whole = pa.concat_tables(tables) if tables else empty.empty_table()
            del tables
            return reduce(iter([whole])), info
        with scratch_folder("runner-scan-") as scratch, scratch_errors(scratch):
            spilled = _spill(snap, names, (), count, scratch, empty, prefold=False)
            info = ScanInfo(events, len(snap.parts), snap.torn_bytes, count)
            return reduce(_bucket_tables(spilled, empty)), info

    with _system_pool():
        return _retrying(run_dir, read)


def _bucket_tables(paths: list[Path], empty: pa.Schema) -> Iterator[pa.Table]:
    for path in paths:
        tables = list(_read_spill(path))
        yield pa.concat_tables(tables) if tables else empty.empty_table()
        del tables
        pa.default_memory_pool().release_unused()


@contextmanager
def _system_pool() -> Iterator[None]:
    """Arrow allocates from the C library's malloc meanwhile: a pass's big buffers are
    mapped and unmapped whole, so the process shrinks back after each pass (the default
    pool keeps tens of MB of freed pages: 30 MB more peak at 1M jobs, measured). Buffers
    remember their pool, so switching back is safe at any time."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def system_pool() -> AbstractContextManager[None]:
    """Arrow allocates from the C library's malloc within (see :func:`_system_pool`): for
    a reader that holds big buffers one batch at a time, outside a scan."""
    return _system_pool()


def _with_keys(columns: Sequence[str]) -> list[str]:
    wanted = set(columns) | set(_KEYS)
    return [name for name in LEDGER_SCHEMA.names if name in wanted]


def _empty_schema(names: list[str], lengths: tuple[str, ...]) -> pa.Schema:
    fields = [_LENGTHS.with_name(n) if n in lengths else LEDGER_SCHEMA.field(n) for n in names]
    return pa.schema(fields)


_LENGTHS = pa.field("lengths", pa.list_(pa.null()))


def _folded(buckets: Iterable[Iterable[pa.Table]], empty: pa.Schema) -> Iterator[pa.Table]:
    """Each bucket's events folded: one slice per bucket that has jobs."""
    for events in buckets:
        jobs, _events = fold_tables(events, empty=empty, group_events=GROUP_EVENTS)
        if jobs.num_rows:
            yield jobs
        del jobs
        pa.default_memory_pool().release_unused()


def _refolded(buckets: Iterable[Iterable[pa.Table]]) -> Iterator[pa.Table]:
    """Each bucket's partly folded rows (:func:`_prefold`) folded: one slice per bucket.

    As :func:`runner.ledger.fold.fold_tables` folds its groups' rows: a row's reset flag
    says that its job started an attempt within the events it was folded from."""
    for tables in buckets:
        partials: list[pa.Table] = []
        resets: list[np.ndarray] = []
        group: list[pa.Table] = []
        grouped = 0
        for table in itertools.chain(tables, [None]):
            if table is not None:
                group.append(table)
                grouped += table.num_rows
            if group and (table is None or grouped >= GROUP_EVENTS):
                rows = pa.concat_tables(group)
                group.clear()
                grouped = 0
                folded, reset = _fold([rows.drop_columns([_RESET])], _flags(rows[_RESET]))
                del rows
                partials.append(folded)
                resets.append(reset)
        if len(partials) > 1:
            merged = pa.concat_tables(partials)
            partials = [_fold([merged], np.concatenate(resets))[0]]
            del merged
        if partials and partials[0].num_rows:
            yield partials[0]
        partials.clear()
        pa.default_memory_pool().release_unused()


def _flags(values: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(values.combine_chunks().to_numpy(zero_copy_only=False), dtype=bool)


def _prefold(events: pa.Table) -> pa.Table:
    """A batch's events folded to one row per job, with the flag :func:`_refolded` needs."""
    folded, reset = _fold([events], None)
    return folded.append_column(_RESET, pa.array(reset, pa.bool_()))


def _events(snap: _Snapshot, names: list[str], batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """Every event's named columns, in seq order (shard after shard), a batch at a time."""
    for part in snap.parts:
        yield from iter_part(part.path, names, batch_rows=batch_rows)
    if snap.journal_rows:
        yield rows_to_table(snap.journal_rows).select(names)


def _spill(
    snap: _Snapshot,
    names: list[str],
    lengths: tuple[str, ...],
    count: int,
    scratch: Path,
    schema: pa.Schema,
    *,
    prefold: bool = True,
) -> list[Path]:
    """Every event, read once, folded with the others of its batch (:func:`_prefold`) and
    written to the file of its job's bucket (Arrow IPC, in the order read): a job's rows all
    land in one bucket, in seq order."""
    paths = [scratch / f"bucket-{b:04d}.arrows" for b in range(count)]
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    sinks: dict[int, pa.NativeFile] = {}
    try:
        for table in _events(snap, names):
            table = _conformed(_counted(table, lengths), schema)
            if prefold:
                table = _prefold(table)
            which = keyhash.buckets(table["job_key"], count)
            order = np.argsort(which, kind="stable")
            cuts = np.searchsorted(which[order], np.arange(count + 1))
            ordered = table.take(pa.array(order))
            for b in np.flatnonzero(np.diff(cuts)).tolist():
                if b not in writers:
                    # The first table's own schema, as one fold keeps it (a list's item
                    # is named ``element`` in a part, ``item`` in the journal).
                    sinks[b] = pa.OSFile(str(paths[b]), "wb")
                    writers[b] = pa.ipc.new_stream(sinks[b], ordered.schema)
                writers[b].write_table(ordered.slice(cuts[b], cuts[b + 1] - cuts[b]))
            del ordered, table
    finally:
        for b, writer in writers.items():
            writer.close()
            sinks[b].close()
    return [paths[b] for b in sorted(writers)]


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    table = table.replace_schema_metadata(None)
    return table if table.schema.equals(schema) else table.cast(schema)


def _read_spill(path: Path) -> Iterator[pa.Table]:
    """A bucket's events back, a record batch at a time; the file goes once read."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_stream(source)
        for batch in reader:
            yield pa.Table.from_batches([batch])
    path.unlink()


def _counted(table: pa.Table, lengths: tuple[str, ...]) -> pa.Table:
    """``table`` with each list column of ``lengths`` as a list of nulls of the same length."""
    for name in lengths:
        column = table[name].combine_chunks()
        sizes = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(sizes) + 1, dtype=np.int32)
        np.cumsum(sizes, out=offsets[1:])
        absent = pc.is_null(column)
        counted = pa.ListArray.from_arrays(
            pa.array(offsets), pa.nulls(int(offsets[-1])), mask=absent
        )
        table = table.set_column(table.schema.get_field_index(name), name, counted)
    return table
