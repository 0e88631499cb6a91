"""Reading the folded ledger in bounded memory: the columns a reader needs, a range of jobs
at a time.

:func:`scan_folded` folds only the named columns (plus seq, job_key and state) and hands
the reader the folded rows in *slices*: the jobs are split into ranges of job_key, and each
range is folded in a pass of its own over every part (read a batch at a time, the other
ranges' events dropped as they are read). Every job is in exactly one slice, folded from all
of its events, so a reader that reduces each slice and combines the results (sums, counts,
a file written slice after slice) sees what one fold of the whole ledger gives. Memory holds
one range's events and folded rows; the number of ranges follows the ledger's size (about
``PASS_EVENTS`` events each), the time grows with it (each pass decodes the columns again).

Within a slice, rows are in the order of each job's last event (as :func:`fold` returns
them); slices come in job_key order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.fold import _retrying, _Snapshot, fold_tables
from runner.ledger.parts import iter_part, part_size_of
from runner.ledger.schema import LEDGER_SCHEMA, rows_to_table

# Bytes of the named columns (uncompressed, as the parts' footers count them) folded per
# pass, a range of job keys: a job's events lie close together in seq, so a pass holds
# about one folded row per job of its range plus one group of GROUP_EVENTS events, and the
# fold's peak is a few times its range's bytes.
PASS_BYTES = 32 * 2**20
GROUP_EVENTS = 150_000
_SAMPLE_ROWS = 4_096  # job keys sampled per part to place the range boundaries
_KEYS = ("seq", "job_key", "state")
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
    else, for when a writer checkpoints or compacts mid-read the scan starts over and calls
    it again. Takes no lock.
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
        bounds = _boundaries(snap, -(-size // (pass_bytes or PASS_BYTES)))
        info = ScanInfo(events, len(snap.parts), snap.torn_bytes, len(bounds) + 1)
        return reduce(_slices(snap, names, tuple(lengths), bounds)), info

    with _system_pool():
        return _retrying(run_dir, read)


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


def _with_keys(columns: Sequence[str]) -> list[str]:
    wanted = set(columns) | set(_KEYS)
    return [name for name in LEDGER_SCHEMA.names if name in wanted]


def _slices(
    snap: _Snapshot, names: list[str], lengths: tuple[str, ...], bounds: list[str]
) -> Iterator[pa.Table]:
    empty = pa.schema([_LENGTHS if n in lengths else LEDGER_SCHEMA.field(n) for n in names])
    empty = pa.schema([f.with_name(n) for f, n in zip(empty, names, strict=True)])
    edges: list[str | None] = [None, *bounds, None]
    for low, high in itertools.pairwise(edges):
        events = (_counted(t, lengths) for t in _events_in(snap, names, low, high))
        jobs, _events = fold_tables(events, empty=empty, group_events=GROUP_EVENTS)
        if jobs.num_rows:
            yield jobs
        del jobs
        pa.default_memory_pool().release_unused()


_LENGTHS = pa.field("lengths", pa.list_(pa.null()))


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


def _events_in(
    snap: _Snapshot, names: list[str], low: str | None, high: str | None
) -> Iterator[pa.Table]:
    """The events whose job_key is in [low, high), in seq order, a batch at a time."""

    def keep(table: pa.Table) -> pa.Table:
        keys = table["job_key"]
        mask = None
        if low is not None:
            mask = pc.greater_equal(keys, low)
        if high is not None:
            below = pc.less(keys, high)
            mask = below if mask is None else pc.and_(mask, below)
        return table if mask is None else table.filter(mask)

    for part in snap.parts:
        for table in iter_part(part.path, names):
            yield keep(table)
    if snap.journal_rows:
        yield keep(rows_to_table(snap.journal_rows).select(names))


def _boundaries(snap: _Snapshot, ranges: int) -> list[str]:
    """``ranges - 1`` job keys splitting a sample of the ledger's keys into equal ranges."""
    if ranges <= 1:
        return []
    samples = []
    for part in snap.parts:
        first = next(iter_part(part.path, ["job_key"], batch_rows=_SAMPLE_ROWS), None)
        if first is not None:
            samples.append(first["job_key"])
    if snap.journal_rows:
        samples.append(pa.chunked_array([[r["job_key"] for r in snap.journal_rows[::64]]]))
    keys = pc.unique(pa.chunked_array(samples, pa.string()).combine_chunks())
    keys = keys.take(pc.sort_indices(keys))
    if len(keys) < 2:
        return []
    step = len(keys) / ranges
    picked = {keys[int(step * i)].as_py() for i in range(1, ranges) if int(step * i) > 0}
    return sorted(k for k in picked if k is not None)
