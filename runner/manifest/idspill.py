"""Sorted runs of hashed ids kept on disk, with ~2.5 bytes a key left in memory.

A long manifest's id table (:class:`runner.manifest.idtable.KeyLines`) would otherwise
hold 16 bytes for every id it has seen (~160 MB at 10,000,000 rows). Once it holds
``SPILL_AT`` keys in memory, its oldest run is written to a temporary file as records of
(key, check, line) (:func:`spill`), and only a filter of it stays in memory: where each
bucket of 8-16 keys (by their top bits) starts (``uint32``), and the next 16 bits of each
key (``uint16``), 2.25-2.5 bytes a key. A probe reads the disk (``os.pread``, not ``mmap``,
whose touched pages would count in the resident set) only where those 16 bits match: for a
key the run does not hold, about once in 4,000-8,000 probes; for a duplicate id, once.
Runs of like size are merged a chunk at a time (:func:`push`), so a key is looked for in
about log2(spilled / SPILL_AT) runs.

Each run's file is made by :func:`tempfile.TemporaryFile` in :func:`tempfile.gettempdir`
(``$TMPDIR``): on Linux it never has a name (``O_TMPFILE``, or unlinked as soon as made), so
the kernel frees its 20 bytes a key when it is closed or the process ends, however it ends
(SIGKILL included), and a rerun finds no leftovers. At most the spilled keys and, during a
merge, the two runs merged again: 40 bytes a key.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import tempfile
import weakref
from collections.abc import Iterator
from typing import IO

import numpy as np

from runner.errors import ManifestError

RECORD = np.dtype([("key", "<i8"), ("check", "<u4"), ("line", "<i8")])  # 20 bytes, packed
_LINE_AT = 12  # the line's offset in a record
_SIGN = np.uint64(1 << 63)
_RECORDS = 1 << 16  # records written or merged at a time (1.3 MB)


class SpillFile:
    """An unnamed temporary file of records, written front to back, then read and patched."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._records = 0

    @property
    def fd(self) -> int:
        if self._file is None:
            # Closed by close(), or by the finalizer once the table is dropped.
            self._file = tempfile.TemporaryFile(prefix="runner-ids-", buffering=0)  # noqa: SIM115
            weakref.finalize(self, self._file.close)
        return self._file.fileno()

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._records * RECORD.itemsize

    def append(self, records: np.ndarray) -> None:
        """Write ``RECORD`` records at the end."""
        data = memoryview(records.tobytes())
        offset = self.size
        while data:
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written
        self._records += len(records)

    def read(self, index: int, count: int) -> np.ndarray:
        """``count`` records from record ``index``."""
        size = count * RECORD.itemsize
        with _unreadable():
            data = os.pread(self.fd, size, index * RECORD.itemsize)
        if len(data) != size:
            raise _lost(f"{len(data)} of {size} bytes read back")
        return np.frombuffer(data, dtype=RECORD)

    def gather(self, indices: list[int]) -> np.ndarray:
        """The record at each index (one ``pread`` each)."""
        size, fd = RECORD.itemsize, self.fd
        with _unreadable():
            data = b"".join([os.pread(fd, size, index * size) for index in indices])
        if len(data) != size * len(indices):
            raise _lost(f"{len(data)} of {size * len(indices)} bytes read back")
        return np.frombuffer(data, dtype=RECORD)

    def write_line(self, index: int, line: int) -> None:
        offset = index * RECORD.itemsize + _LINE_AT
        with _unreadable():
            os.pwrite(self.fd, np.array([line], dtype="<i8").tobytes(), offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def _unreadable() -> Iterator[None]:
    """An I/O error on a spilled run (written already, so it cannot fall back to memory) is
    the manifest's check failing, said in one line: not a traceback, and not taken for the
    "no room" a failed write means."""
    try:
        yield
    except OSError as e:
        raise _lost(e.strerror or str(e)) from None


def _lost(why: str) -> ManifestError:
    return ManifestError(
        "the duplicate-id check lost its temporary file in "
        f"{tempfile.gettempdir()} ({why}); set TMPDIR to a disk with free space and run again"
    )


def _bits(count: int) -> int:
    """How many top bits of a key pick its bucket: 8-16 keys a bucket."""
    return max(1, (count // 16).bit_length())


def _split(keys: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Each key's bucket (its top ``bits`` bits) and the 16 bits after them."""
    unsigned = keys.astype(np.int64).view(np.uint64) ^ _SIGN
    buckets = unsigned >> np.uint64(64 - bits)
    rems = (unsigned >> np.uint64(48 - bits)).astype(np.uint16)
    return buckets, rems


class _Writer:
    """Writes a run of ``count`` records, given in key order, and builds its filter."""

    def __init__(self, count: int) -> None:
        self.file = SpillFile()
        self.bits = _bits(count)
        self.rems = np.empty(count, dtype=np.uint16)
        self.sizes = np.zeros(1 << self.bits, dtype=np.int64)  # keys in each bucket
        self.done = 0

    def add(self, records: np.ndarray) -> None:
        self.file.append(records)
        buckets, rems = _split(records["key"], self.bits)
        self.rems[self.done : self.done + len(records)] = rems
        self.sizes += np.bincount(buckets.astype(np.int64), minlength=len(self.sizes))
        self.done += len(records)

    def run(self) -> SpilledRun:
        starts = np.zeros(len(self.sizes) + 1, dtype=np.uint32)
        np.cumsum(self.sizes, out=starts[1:])
        return SpilledRun(self.file, self.bits, self.rems[: self.done], starts)


def spill(keys: np.ndarray, checks: np.ndarray, lines: np.ndarray) -> SpilledRun:
    """A run on disk of these (distinct, sorted) keys with their checks and lines."""
    writer = _Writer(len(keys))
    for start in range(0, len(keys), _RECORDS):
        end = start + _RECORDS
        records = np.empty(len(keys[start:end]), dtype=RECORD)
        records["key"], records["check"] = keys[start:end], checks[start:end]
        records["line"] = lines[start:end]
        writer.add(records)
    return writer.run()


def merge(older: SpilledRun, newer: SpilledRun) -> SpilledRun:
    """One run of both (no key in both), read and written a chunk at a time; both closed."""
    writer = _Writer(len(older) + len(newer))
    older_chunks, newer_chunks = older.chunks(), newer.chunks()
    first, second = next(older_chunks, None), next(newer_chunks, None)
    while first is not None and second is not None:
        # Everything up to the lower of the two chunks' last keys can be written now.
        bound = min(first["key"][-1], second["key"][-1])
        cut_first = int(np.searchsorted(first["key"], bound, side="right"))
        cut_second = int(np.searchsorted(second["key"], bound, side="right"))
        writer.add(_interleave(first[:cut_first], second[:cut_second]))
        first = first[cut_first:] if cut_first < len(first) else next(older_chunks, None)
        second = second[cut_second:] if cut_second < len(second) else next(newer_chunks, None)
    for rest, chunks in ((first, older_chunks), (second, newer_chunks)):
        while rest is not None:
            writer.add(rest)
            rest = next(chunks, None)
    older.close()
    newer.close()
    return writer.run()


def _interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The records of two sorted arrays (no key in both) in key order."""
    at = np.searchsorted(first["key"], second["key"]) + np.arange(len(second))
    out = np.empty(len(first) + len(second), dtype=RECORD)
    mine = np.ones(len(out), dtype=bool)
    mine[at] = False
    out[at], out[mine] = second, first
    return out


def push(runs: list[SpilledRun], run: SpilledRun) -> None:
    """Add a run (newest last), merging the newest two while the older is under twice the
    newer: about log2(spilled / first run) runs, each key rewritten as often."""
    runs.append(run)
    while len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
        try:
            merged = merge(runs[-2], runs[-1])
        except OSError:  # no room for the merged run: both stay as they are
            return
        runs[-2:] = [merged]


class SpilledRun:
    """A sorted run of distinct keys in its own :class:`SpillFile`; its filter in memory."""

    def __init__(self, file: SpillFile, bits: int, rems: np.ndarray, starts: np.ndarray) -> None:
        self._file = file
        self._count = len(rems)
        self._bits = bits
        self._rems = rems
        self._starts = starts
        # For one key at a time: indexing a memoryview gives an int at a tenth of numpy's cost.
        self._starts_at, self._rems_at = self._starts.data, self._rems.data

    def chunks(self) -> Iterator[np.ndarray]:
        """The records in key order, ``_RECORDS`` at a time."""
        for start in range(0, self._count, _RECORDS):
            yield self._file.read(start, min(_RECORDS, self._count - start))

    @property
    def file_bytes(self) -> int:
        """Bytes of its file (20 a key)."""
        return self._file.size

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._rems.nbytes + self._starts.nbytes

    def probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Of ``keys``, those the run holds: (their indices, checks, lines, places in the run)."""
        buckets, rems = _split(keys, self._bits)
        low = self._starts[buckets].astype(np.int64)
        high = self._starts[buckets + np.uint64(1)].astype(np.int64)
        end = high
        held = self._rems
        last = max(len(held) - 1, 0)
        # The first place in each key's bucket whose 16 bits are not below the key's.
        while True:
            open_ = low < high
            if not open_.any():
                break
            middle = (low + high) >> 1
            below = open_ & (held[np.minimum(middle, last)] < rems)
            low = np.where(below, middle + 1, low)
            high = np.where(open_ & ~below, middle, high)
        maybe = np.flatnonzero((low < end) & (held[np.minimum(low, last)] == rems))
        # Mostly one record shares a key's 16 bits: read each one's first, parsed at once.
        at = low[maybe]
        records = self._file.gather(at.tolist())
        hit = records["key"] == keys[maybe]
        index, places = maybe[hit], at[hit]
        checks = records["check"][hit].astype(np.uint32)
        lines = records["line"][hit].astype(np.int64)
        # Where that first record was another key's, read on through those sharing the bits.
        on = ~hit & (at + 1 < end[maybe]) & (held[np.minimum(at + 1, last)] == rems[maybe])
        found = []
        for i in maybe[on].tolist():
            more = self._read(int(keys[i]), int(low[i]) + 1, int(end[i]), int(rems[i]))
            if more is not None:
                found.append((i, *more))
        if found:
            extra = [np.array(column) for column in zip(*found, strict=True)]
            order = np.argsort(np.concatenate([index, extra[0]]), kind="stable")
            index, checks, lines, places = (
                np.concatenate([mine, theirs]).astype(mine.dtype)[order]
                for mine, theirs in zip((index, checks, lines, places), extra, strict=True)
            )
        return index.astype(np.int64), checks, lines, places.astype(np.int64)

    def find(self, key: int) -> tuple[int, int, int] | None:
        """(check, line, place in the run) held for ``key``, None when the run has no such key."""
        unsigned = (key & 0xFFFF_FFFF_FFFF_FFFF) ^ (1 << 63)
        bucket = unsigned >> (64 - self._bits)
        rem = (unsigned >> (48 - self._bits)) & 0xFFFF
        rems = self._rems_at
        end = self._starts_at[bucket + 1]
        at = bisect.bisect_left(rems, rem, self._starts_at[bucket], end)
        if at < end and rems[at] == rem:
            return self._read(key, at, end, rem)
        return None

    def _read(self, key: int, at: int, end: int, rem: int) -> tuple[int, int, int] | None:
        """Read the records from ``at`` that share ``rem``; (check, line, place) of ``key``'s."""
        stop = at + 1
        while stop < end and self._rems_at[stop] == rem:
            stop += 1
        records = self._file.read(at, stop - at)
        for offset in np.flatnonzero(records["key"] == key).tolist():
            record = records[offset]
            return int(record["check"]), int(record["line"]), at + offset
        return None

    def set_line(self, place: int, line: int) -> None:
        """Hold ``line`` for the key at ``place`` (from :meth:`probe` or :meth:`find`)."""
        self._file.write_line(place, line)
