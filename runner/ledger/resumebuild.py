"""Folded slices of a ledger reduced to a :class:`ResumeState` (see :mod:`resumescan`).

Each slice is a range of job keys folded (:func:`fold_tables`); of each job the builder keeps
its key packed in 16 bytes (:mod:`runner.ledger.packedkeys`; other keys as text), a state
code, the attempt and two flags, the packed keys sorted. Slices arrive in key order, so
their sorted keys join into one sorted array (and are sorted again should they not).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerCorruptError
from runner.ledger import packedkeys, resumestate
from runner.ledger.folding import _to_bool, fold_tables
from runner.ledger.heap import release_freed
from runner.ledger.packedkeys import PackedKeys
from runner.ledger.resumestate import Pending, ResumeState, pack_facts
from runner.ledger.schema import JobState

GROUP_EVENTS = 100_000
UNFETCHED = "outputs_unfetched"
_NO_ATTEMPT = np.iinfo(np.int32).min
_STATES = tuple(JobState)
_STATE_VALUES = pa.array([s.value for s in _STATES])
_GAP_MAX = np.iinfo(np.int32).max


class Builder:
    """Each folded slice reduced to flat arrays, then joined into one ResumeState.

    Until :meth:`finish` a job's row is coded: ``r >= 0`` is the r-th packed key in key
    order, ``-1 - r`` the r-th other key (its row once the packed ones are counted).
    """

    def __init__(self, downloads: bool, empty: pa.Schema) -> None:
        self.downloads = downloads
        self.empty = empty
        self.packed: list[list[np.ndarray]] = [[], [], []]  # hi, lo, facts
        self.others: list[list[np.ndarray]] = [[]]  # facts
        self.other_keys = _KeyBuffer()
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.odd: dict[int, str] = {}
        self.spent = Decimal(0)
        self.counts = [0, 0]  # packed, others

    def add_slice(self, events: Iterator[pa.Table]) -> None:
        firsts: list[pa.Table] = []

        def noted(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
            for table in tables:
                if self.downloads and table.num_rows:
                    firsts.append(_first_seq(table))
                yield table

        jobs, _ = fold_tables(noted(events), empty=self.empty, group_events=GROUP_EVENTS)
        if jobs.num_rows == 0:
            return
        names = jobs["state"].combine_chunks()
        codes = pc.index_in(names, value_set=_STATE_VALUES).fill_null(-1)
        code = np.asarray(codes.to_numpy(), dtype=np.int8)
        attempt = pc.cast(jobs["attempt"], pa.int32()).fill_null(int(_NO_ATTEMPT))
        retry = pc.cast(jobs["retryable"], pa.int8()).fill_null(-1)
        billed = jobs["billed_usd"]
        free = pc.equal(billed, pa.scalar(0, billed.type)).fill_null(False)
        for name in ("billed_usd", "reroll_usd"):
            self.spent += Decimal(pc.sum(jobs[name]).as_py() or 0)
        facts = pack_facts(code, _np(attempt, np.int32), _np(retry, np.int8), _to_bool(free))
        where = self._add_rows(jobs["job_key"].combine_chunks(), (facts,))
        for i in np.flatnonzero(code < 0):
            self.odd[int(where[i])] = str(names[int(i)].as_py())
        if self.downloads:
            done = pc.equal(jobs["state"], JobState.COMPLETED.value)
            flag = pc.and_(done, jobs[UNFETCHED].fill_null(False))
            rows = np.flatnonzero(_to_bool(flag))
            if len(rows):
                self.pending.append(_pending(jobs, rows, where, firsts))

    def _add_rows(self, keys: pa.Array, columns: tuple[np.ndarray, ...]) -> np.ndarray:
        """Keep the slice's jobs (packed keys sorted); each one's coded row."""
        ok, hi, lo = packedkeys.pack(keys)
        packed = np.flatnonzero(ok)
        packed = packed[np.lexsort((lo[packed], hi[packed]))]
        others = np.flatnonzero(~ok)
        where = np.empty(len(keys), dtype=np.int64)
        where[packed] = self.counts[0] + np.arange(len(packed))
        where[others] = -1 - (self.counts[1] + np.arange(len(others)))
        for held, values in zip(self.packed, (hi, lo, *columns), strict=True):
            held.append(values[packed])
        if len(others):
            for held, values in zip(self.others, columns, strict=True):
                held.append(values[others])
            self.other_keys.add(keys.take(pa.array(others)))
        self.counts[0] += len(packed)
        self.counts[1] += len(others)
        return where

    def finish(self) -> ResumeState:
        n, m = self.counts
        pending = None
        in_order = _slices_ascending(self.packed[0], self.packed[1])
        if in_order and self.pending:  # first, while the columns are still in pieces
            pending = self._chunked(lambda coded: _row_of(coded, n, None))
            release_freed()
        hi, lo = _join(self.packed[0], np.uint64), _join(self.packed[1], np.uint64)
        self.packed[0].clear()
        self.packed[1].clear()
        columns = []
        for packed, others in zip(self.packed[2:], self.others, strict=True):
            columns.append(np.concatenate([_join(packed, np.int64), _join(others, np.int64)]))
            packed.clear()  # each slice's arrays freed as soon as joined
            others.clear()
        self.packed, self.others = [], []
        release_freed()
        new_row: np.ndarray | None = None  # a packed key's row when the slices were not in order
        if not in_order:
            order = np.lexsort((lo, hi))
            hi, lo = hi[order], lo[order]
            columns = [np.concatenate([c[:n][order], c[n:]]) for c in columns]
            new_row = np.empty(n, dtype=np.int64)
            new_row[order] = np.arange(n)
            if self.pending:
                pending = self._chunked(lambda coded: _row_of(coded, n, new_row))
        odd = {int(_row_of(np.array([r]), n, new_row)[0]): s for r, s in self.odd.items()}
        keys = PackedKeys(hi, lo, self.other_keys.array())
        self.other_keys = _KeyBuffer()
        assert len(keys) == n + m
        return ResumeState(keys, *columns, spent=self.spent, pending=pending, odd_states=odd)

    def _chunked(self, row_of: Callable[[np.ndarray], np.ndarray]) -> Pending:
        """The pending jobs ordered by their last event, and each chunk's seq span."""
        rows, gaps, last = (list(c) for c in zip(*self.pending, strict=True))
        self.pending.clear()
        last_seq = np.concatenate(last)
        del last
        order = np.argsort(last_seq, kind="stable").astype(np.int32)
        starts = np.arange(0, len(order), resumestate.PENDING_CHUNK)
        last_seq = last_seq[order]
        high = np.maximum.reduceat(last_seq, starts)
        gap = np.concatenate(gaps)[order]
        del gaps
        first = last_seq - gap
        first[gap == _GAP_MAX] = 0  # a span too long to note: read from the start
        del last_seq, gap
        low = np.minimum.reduceat(first, starts)
        del first
        ordered = row_of(np.concatenate(rows)[order])
        return Pending(ordered, low, high, resumestate.PENDING_CHUNK)


def _row_of(coded: np.ndarray, n: int, new_row: np.ndarray | None) -> np.ndarray:
    """The rows of coded rows (see :class:`Builder`), ``n`` packed keys before the others."""
    rows = np.array(coded, dtype=np.int32)
    if new_row is not None:
        packed = rows >= 0
        rows[packed] = new_row[rows[packed]]
    other = rows < 0
    rows[other] = n - 1 - rows[other]
    return rows


def _pending(
    jobs: pa.Table, rows: np.ndarray, where: np.ndarray, firsts: list[pa.Table]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coded row, seq span, last seq) of a slice's pending jobs ``rows``: 12 bytes a job."""
    mins = pa.concat_tables(firsts).group_by("job_key", use_threads=False)
    mins = mins.aggregate([("seq_min", "min")])
    keys = jobs["job_key"].take(pa.array(rows))
    at = pc.index_in(keys, value_set=mins["job_key"].combine_chunks())
    first = _np(mins["seq_min_min"].combine_chunks().take(at), np.int64)
    last = _np(jobs["seq"].take(pa.array(rows)), np.int64)
    gap = np.minimum(last - first, _GAP_MAX).astype(np.int32)
    if len(last) and last.max() <= _GAP_MAX:  # seqs below 2**31: 4 bytes each
        last = last.astype(np.int32)
    return where[rows].astype(np.int32), gap, last


def _join(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def _slices_ascending(his: list[np.ndarray], los: list[np.ndarray]) -> bool:
    """Whether slices each sorted by (hi, lo) follow one another in that order."""
    ends = [
        ((int(hi[0]), int(lo[0])), (int(hi[-1]), int(lo[-1])))
        for hi, lo in zip(his, los, strict=True)
        if len(hi)
    ]
    return all(a[1] < b[0] for a, b in itertools.pairwise(ends))


class _KeyBuffer:
    """Job keys appended slice by slice into one growing buffer (no second copy to join)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ends: list[np.ndarray] = [np.zeros(1, dtype=np.int32)]

    def add(self, keys: pa.Array) -> None:
        n = len(keys)
        _, offsets_buffer, data = keys.buffers()
        offsets = np.frombuffer(offsets_buffer, np.int32, n + 1, keys.offset * 4)
        base = len(self.data)
        if base + int(offsets[-1]) - int(offsets[0]) >= 2**31:
            raise LedgerCorruptError("the ledger's job keys exceed 2 GiB")
        if data is not None:
            self.data += memoryview(data)[offsets[0] : offsets[-1]]
        self.ends.append(offsets[1:] - offsets[0] + np.int32(base))

    def array(self) -> pa.Array:
        offsets = np.concatenate(self.ends)
        n = len(offsets) - 1
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(self.data)]
        return pa.Array.from_buffers(pa.string(), n, buffers)


def _first_seq(table: pa.Table) -> pa.Table:
    """Per job_key of a batch, its lowest seq (column ``seq_min``)."""
    grouped = table.select(["job_key", "seq"]).group_by("job_key", use_threads=False)
    return grouped.aggregate([("seq", "min")])


def _np(values: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=dtype)
