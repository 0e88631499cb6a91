"""Folded slices of a ledger reduced to a :class:`ResumeState` (see :mod:`resumescan`).

Each slice is a range of job keys folded (:func:`fold_tables`); of each job the builder keeps
its key packed in 16 bytes (:mod:`runner.ledger.packedkeys`; other keys as text), a state
code, the attempt and two flags, the packed keys sorted. Slices arrive in key order, so
their sorted keys join into one sorted array (and are sorted again should they not).
"""

from __future__ import annotations

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
        # Grown in place (realloc: a big block is remapped, not copied), so never joined.
        self.packed = [_Grown(np.uint64), _Grown(np.uint64), _Grown(np.int64)]  # hi, lo, facts
        self.others = [_Grown(np.int64)]  # facts
        self.other_keys = _KeyBuffer()
        self.pending = (_PendingRows(), _PendingRows())  # of packed keys, of others
        self.odd: dict[int, str] = {}
        self.spent = Decimal(0)
        self.counts = [0, 0]  # packed, others
        self.ascending = True  # whether each slice's packed keys follow the last's
        self.end: tuple[int, int] | None = None  # the last packed key so far

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
                coded, gap, last = _pending(jobs, rows, where, firsts)
                for group, index in zip(self.pending, (coded, -1 - coded), strict=True):
                    mine = index >= 0
                    group.add(index[mine], gap[mine], last[mine])

    def _add_rows(self, keys: pa.Array, columns: tuple[np.ndarray, ...]) -> np.ndarray:
        """Keep the slice's jobs (packed keys sorted); each one's coded row."""
        ok, hi, lo = packedkeys.pack(keys)
        packed = np.flatnonzero(ok)
        packed = packed[np.lexsort((lo[packed], hi[packed]))]
        if len(packed):
            first, last = packed[0], packed[-1]
            if self.end is not None and self.end >= (int(hi[first]), int(lo[first])):
                self.ascending = False
            self.end = (int(hi[last]), int(lo[last]))
        others = np.flatnonzero(~ok)
        where = np.empty(len(keys), dtype=np.int64)
        where[packed] = self.counts[0] + np.arange(len(packed))
        where[others] = -1 - (self.counts[1] + np.arange(len(others)))
        for held, values in zip(self.packed, (hi, lo, *columns), strict=True):
            held.add(values[packed])
        if len(others):
            for held, values in zip(self.others, columns, strict=True):
                held.add(values[others])
            self.other_keys.add(keys.take(pa.array(others)))
        self.counts[0] += len(packed)
        self.counts[1] += len(others)
        return where

    def finish(self) -> ResumeState:
        n, m = self.counts
        pending = None
        in_order = self.ascending
        if in_order and self.has_pending():  # first, while fewer arrays are held
            pending = self._chunked(lambda coded: _row_of(coded, n, None))
            release_freed()
        hi, lo = self.packed[0].array(), self.packed[1].array()
        columns = []
        for packed, others in zip(self.packed[2:], self.others, strict=True):
            columns.append(packed.append(others.array()))  # the others after, in place
        self.packed, self.others = [], []
        release_freed()
        new_row: np.ndarray | None = None  # a packed key's row when the slices were not in order
        if not in_order:
            order = np.lexsort((lo, hi))
            hi, lo = hi[order], lo[order]
            columns = [np.concatenate([c[:n][order], c[n:]]) for c in columns]
            new_row = np.empty(n, dtype=np.int64)
            new_row[order] = np.arange(n)
            if self.has_pending():
                pending = self._chunked(lambda coded: _row_of(coded, n, new_row))
        odd = {int(_row_of(np.array([r]), n, new_row)[0]): s for r, s in self.odd.items()}
        keys = PackedKeys(hi, lo, self.other_keys.array())
        self.other_keys = _KeyBuffer()
        assert len(keys) == n + m
        return ResumeState(keys, *columns, spent=self.spent, pending=pending, odd_states=odd)

    def has_pending(self) -> bool:
        return any(group.flags.count for group in self.pending)

    def _chunked(self, row_of: Callable[[np.ndarray], np.ndarray]) -> Pending:
        """The pending jobs ordered by their last event, and each chunk's seq span: each
        job's rank in that order (from a bitmap of the last seqs, when small) written over
        its last seq, then each job's row written at its rank. 8 bytes a job at most, not a
        sort's permutation (8) beside a copy of each array."""
        groups = [group.arrays() for group in self.pending]
        self.pending = (_PendingRows(), _PendingRows())
        total = sum(len(last) for _, _, last in groups)
        top = max((int(last.max()) for _, _, last in groups if len(last)), default=0)
        chunks = -(-total // resumestate.PENDING_CHUNK)
        low = np.full(chunks, np.iinfo(np.int64).max, dtype=np.int64)
        high = np.full(chunks, -1, dtype=np.int64)
        rank = _seq_ranks([last for _, _, last in groups], top, total)
        for g, (_, gap, last) in enumerate(groups):
            for start in range(0, len(last), _BLOCK):
                at = last[start : start + _BLOCK]
                gaps = gap[start : start + _BLOCK]
                ranks = rank(g, start, at)
                chunk = ranks // resumestate.PENDING_CHUNK
                np.maximum.at(high, chunk, at)
                first = np.where(gaps == _GAP_MAX, 0, at.astype(np.int64) - gaps)
                np.minimum.at(low, chunk, first)  # a span too long to note: from the start
                at[:] = ranks
        del rank
        if top <= _GAP_MAX:  # seqs below 2**31: 4 bytes each
            low, high = low.astype(np.int32), high.astype(np.int32)
        flagged = [(flags, ranks) for flags, _, ranks in groups]
        groups.clear()  # the spans freed
        rows = np.empty(total, dtype=np.int32)
        for (flags, ranks), sign in zip(flagged, (1, -1), strict=True):
            done = 0
            for start in range(0, len(flags), _BLOCK // 8):  # a bit a coded row
                bits = np.unpackbits(flags[start : start + _BLOCK // 8], bitorder="little")
                index = np.flatnonzero(bits) + 8 * start
                coded = index if sign > 0 else -1 - index
                rows[ranks[done : done + len(index)]] = row_of(coded)
                done += len(index)
        flagged.clear()
        return Pending(rows, low, high, resumestate.PENDING_CHUNK)


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


_ONE = np.uint64(1)
_BLOCK = 1 << 16  # pending jobs a step of the chunking (its temporaries: ~5 MiB)


def _seq_ranks(
    lasts: list[np.ndarray], top: int, total: int
) -> Callable[[int, int, np.ndarray], np.ndarray]:
    """Each pending job's rank by its last seq (``lasts``: per group, ``top`` the highest):
    a job's last event is its own, so the seqs are distinct and a bitmap of them (a bit a
    seq, 1.25 MiB per 10M seqs) ranks each by the set bits before it. Should the bitmap be
    large or seqs repeat, a stable sort of their positions instead."""
    if hasattr(np, "bitwise_count") and top // 8 <= max(4 * total, 1 << 24):
        words = np.zeros(top // 64 + 1, dtype=np.uint64)
        for last in lasts:
            for start in range(0, len(last), _BLOCK):
                at = last[start : start + _BLOCK].astype(np.int64)
                np.bitwise_or.at(words, at >> 6, _ONE << (at & 63).astype(np.uint64))
        counts = np.bitwise_count(words)
        before = np.cumsum(counts, dtype=np.int64)
        if int(before[-1]) == total:
            before -= counts

            def by_bits(_group: int, _start: int, at: np.ndarray) -> np.ndarray:
                seq = at.astype(np.int64)
                word = seq >> 6
                below = words[word] & ((_ONE << (seq & 63).astype(np.uint64)) - _ONE)
                ranks: np.ndarray = before[word] + np.bitwise_count(below)
                return ranks

            return by_bits
        del words, counts, before
    joined = np.concatenate(lasts)
    order = np.argsort(joined, kind="stable")
    del joined
    ranks = np.empty(total, dtype=np.int64)
    ranks[order] = np.arange(total)
    del order
    offsets = np.cumsum([0, *(len(last) for last in lasts)])

    def by_sort(group: int, start: int, at: np.ndarray) -> np.ndarray:
        begin = int(offsets[group]) + start
        return ranks[begin : begin + len(at)]

    return by_sort


class _Grown:
    """A flat array appended to in place: numpy's resize is a realloc, which moves a big
    block's pages (mremap) instead of copying them, so it is never joined from pieces (a
    join holds the pieces and the whole: twice the bytes)."""

    def __init__(self, dtype: type) -> None:
        self._a: np.ndarray = np.zeros(0, dtype=dtype)
        self.count = 0

    def _room(self, need: int) -> None:
        if need > len(self._a):  # exactly: resize zero-fills the room, making it resident
            self._a.resize(need, refcheck=False)

    def add(self, values: np.ndarray) -> None:
        if values.dtype.itemsize > self._a.dtype.itemsize:  # seqs past 2**31, say
            self._a = self._a.astype(values.dtype)
        need = self.count + len(values)
        self._room(need)
        self._a[self.count : need] = values
        self.count = need

    def mark(self, index: np.ndarray) -> None:
        """Bits (of a uint8 array, little-endian): grown to cover ``index``, set there."""
        need = (int(index.max()) >> 3) + 1 if len(index) else 0
        if need > self.count:
            self._room(need)
            self._a[self.count : need] = 0
            self.count = need
        np.bitwise_or.at(self._a, index >> 3, np.left_shift(1, index & 7).astype(np.uint8))

    def array(self) -> np.ndarray:
        """The array (this one then empty): trimmed in place."""
        values, self._a = self._a, np.zeros(0, dtype=self._a.dtype)
        values.resize(self.count, refcheck=False)
        self.count = 0
        return values

    def append(self, tail: np.ndarray) -> np.ndarray:
        self.add(tail)
        return self.array()


class _PendingRows:
    """Pending jobs of one kind of key: a bit per coded row, and of each flagged row, in
    row order, the span (last - first seq) and last seq of its events: 8 bytes a job."""

    def __init__(self) -> None:
        self.flags = _Grown(np.uint8)
        self.gap = _Grown(np.int32)
        self.last = _Grown(np.int32)

    def add(self, index: np.ndarray, gap: np.ndarray, last: np.ndarray) -> None:
        """Rows ``index`` (each above those added before) with their span and last seq."""
        order = np.argsort(index)
        self.flags.mark(index)
        self.gap.add(gap[order])
        self.last.add(last[order])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.flags.array(), self.gap.array(), self.last.array()


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
