"""Sorted runs of hashed ids kept on disk, with ~2.5 bytes a key left in memory.

A long manifest's id table (:class:`runner.manifest.idtable.KeyLines`) would otherwise
hold 16 bytes for every id it has seen (~160 MB at 10,000,000 rows). Once it holds
``SPILL_AT`` keys in memory, its oldest run is written to a temporary file as records of
(key, check, line), and only a filter of it stays in memory: where each bucket of 8-16 keys
(by their top bits) starts (``uint32``), and the next 16 bits of each key (``uint16``),
2.25-2.5 bytes a key. A probe reads the disk (``os.pread``, not ``mmap``, whose touched
pages would count in the resident set) only where those 16 bits match: for a key the run
does not hold, about once in 4,000-8,000 probes; for a duplicate id, once.

The file is made by :func:`tempfile.TemporaryFile` in :func:`tempfile.gettempdir` (``$TMPDIR``):
on Linux it never has a name (``O_TMPFILE``, or unlinked as soon as made), so the kernel frees
its 20 bytes a spilled key when the process ends, however it ends (SIGKILL included), and a
rerun finds no leftovers.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from typing import IO

import numpy as np

RECORD = np.dtype([("key", "<i8"), ("check", "<u4"), ("line", "<i8")])  # 20 bytes, packed
_LINE_AT = 12  # the line's offset in a record
_SIGN = np.uint64(1 << 63)
_WRITE_RECORDS = 1 << 16  # records converted and written at a time (1.3 MB)


class SpillFile:
    """An unnamed temporary file the spilled runs of one table are appended to."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._records = 0

    @property
    def fd(self) -> int:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="runner-ids-", buffering=0)  # noqa: SIM115 (closed by close or the finalizer)
            weakref.finalize(self, self._file.close)
        return self._file.fileno()

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._records * RECORD.itemsize

    def append(self, keys: np.ndarray, checks: np.ndarray, lines: np.ndarray) -> int:
        """Write the records at the end; the index of the first."""
        first = self._records
        fd = self.fd
        for start in range(0, len(keys), _WRITE_RECORDS):
            end = start + _WRITE_RECORDS
            chunk = np.empty(len(keys[start:end]), dtype=RECORD)
            chunk["key"], chunk["check"], chunk["line"] = (
                keys[start:end],
                checks[start:end],
                lines[start:end],
            )
            offset = (first + start) * RECORD.itemsize
            data = chunk.tobytes()
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        self._records += len(keys)
        return first

    def read(self, index: int, count: int) -> np.ndarray:
        """``count`` records from record ``index``."""
        size = count * RECORD.itemsize
        data = os.pread(self.fd, size, index * RECORD.itemsize)
        if len(data) != size:
            raise OSError(f"the id table's spill file is short: {len(data)} of {size} bytes")
        return np.frombuffer(data, dtype=RECORD)

    def write_line(self, index: int, line: int) -> None:
        offset = index * RECORD.itemsize + _LINE_AT
        os.pwrite(self.fd, np.array([line], dtype="<i8").tobytes(), offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SpilledRun:
    """A sorted run of distinct keys written to a :class:`SpillFile`; its filter in memory."""

    def __init__(
        self, file: SpillFile, keys: np.ndarray, checks: np.ndarray, lines: np.ndarray
    ) -> None:
        self._file = file
        self._count = len(keys)
        self._bits = max(1, (len(keys) // 16).bit_length())
        buckets, self._rems = self._split(keys)
        edges = np.arange((1 << self._bits) + 1, dtype=np.uint64)
        self._starts = np.searchsorted(buckets, edges).astype(np.uint32)
        self._first = file.append(keys, checks, lines)

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._rems.nbytes + self._starts.nbytes

    def _split(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each key's bucket (its top bits) and the 16 bits after them."""
        unsigned = keys.astype(np.int64).view(np.uint64) ^ _SIGN
        buckets = unsigned >> np.uint64(64 - self._bits)
        rems = (unsigned >> np.uint64(48 - self._bits)).astype(np.uint16)
        return buckets, rems

    def probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Of ``keys``, those the run holds: (their indices, checks, lines, places in the run)."""
        buckets, rems = self._split(keys)
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
        found: list[tuple[int, int, int, int]] = []
        for i in maybe.tolist():
            hit = self._read(int(keys[i]), int(low[i]), int(end[i]), int(rems[i]))
            if hit is not None:
                found.append((i, *hit))
        if not found:
            none = np.zeros(0, dtype=np.int64)
            return none, none.astype(np.uint32), none, none
        index, checks, lines, places = (np.array(column) for column in zip(*found, strict=True))
        return index.astype(np.int64), checks.astype(np.uint32), lines.astype(np.int64), places

    def find(self, key: int) -> tuple[int, int, int] | None:
        """(check, line, place in the run) held for ``key``, None when the run has no such key."""
        unsigned = (key & 0xFFFF_FFFF_FFFF_FFFF) ^ (1 << 63)
        bucket = unsigned >> (64 - self._bits)
        rem = (unsigned >> (48 - self._bits)) & 0xFFFF
        low, end = int(self._starts[bucket]), int(self._starts[bucket + 1])
        at = low + int(np.searchsorted(self._rems[low:end], rem))
        if at < end and int(self._rems[at]) == rem:
            return self._read(key, at, end, rem)
        return None

    def _read(self, key: int, at: int, end: int, rem: int) -> tuple[int, int, int] | None:
        """Read the records from ``at`` that share ``rem``; (check, line, place) of ``key``'s."""
        stop = at + 1
        while stop < end and int(self._rems[stop]) == rem:
            stop += 1
        records = self._file.read(self._first + at, stop - at)
        for offset in np.flatnonzero(records["key"] == key).tolist():
            record = records[offset]
            return int(record["check"]), int(record["line"]), at + offset
        return None

    def set_line(self, place: int, line: int) -> None:
        """Hold ``line`` for the key at ``place`` (from :meth:`probe` or :meth:`find`)."""
        self._file.write_line(self._first + place, line)
