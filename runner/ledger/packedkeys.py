"""Job keys held as 16-byte numbers, looked up by value: :class:`PackedKeys`.

A job key is 32 lowercase hex digits (:func:`runner.manifest.identity.job_key`): 16 bytes
of information. Held as an Arrow string with a hash index (:class:`KeyIndex`) it costs about
54 bytes a job; held as its two 64-bit halves, sorted, about 17. The halves read big-endian
sort as the keys do (byte order), so a range of sorted keys packs into sorted halves.

Any other key (an older ledger's, a test's) is kept as text in a :class:`KeyIndex` after the
packed ones: rows ``0 .. packed-1`` are the packed keys in key order, the rest the others.
A key is in one group or the other by its spelling alone, so a lookup is never ambiguous.
"""

from __future__ import annotations

import bisect
import struct

import numpy as np
import pyarrow as pa

from runner.ledger.index import KeyIndex

HEX_CHARS = 32
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_KEYS_PER_BUCKET = 4
_HALVES = struct.Struct(">QQ")


def pack(keys: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(whether each key is packable, its high half, its low half) of a string array;
    the halves are 0 where a key is not 32 lowercase hex digits."""
    n = len(keys)
    _, offsets_buffer, data_buffer = keys.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32, n + 1, keys.offset * 4).astype(np.int64)
    ok = np.diff(offsets) == HEX_CHARS
    if keys.null_count:
        ok &= np.asarray(keys.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    hi, lo = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    rows = np.flatnonzero(ok)
    if len(rows) == 0 or data_buffer is None:
        return np.zeros(n, bool), hi, lo
    data = np.frombuffer(data_buffer, np.uint8)
    digits = _NIBBLE[data[offsets[rows, None] + np.arange(HEX_CHARS)]]
    good = (digits < 16).all(axis=1)
    ok[rows[~good]] = False
    rows, digits = rows[good], digits[good]
    raw = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])
    halves = raw.view(">u8").astype(np.uint64)
    hi[rows], lo[rows] = halves[:, 0], halves[:, 1]
    return ok, hi, lo


def unpack(hi: int, lo: int) -> str:
    return f"{hi:016x}{lo:016x}"


class PackedKeys:
    """Rows of distinct job keys: packed ones sorted by (``hi``, ``lo``), then ``others``."""

    def __init__(self, hi: np.ndarray, lo: np.ndarray, others: pa.Array) -> None:
        self.packed = len(hi)
        self.others = KeyIndex(others)
        bits = max((self.packed // _KEYS_PER_BUCKET).bit_length(), 1)
        self._shift = 64 - bits
        # A bucket b starts at the first hi >= b << shift (no shifted copy of hi: 8 B a key).
        buckets = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self._shift)
        starts = np.append(np.searchsorted(hi, buckets), len(hi))
        self._starts = starts.astype(np.int32 if self.packed < 2**31 else np.int64).data
        self._hi = np.ascontiguousarray(hi, np.uint64).data
        self._lo = np.ascontiguousarray(lo, np.uint64).data

    def __len__(self) -> int:
        return self.packed + len(self.others)

    @property
    def nbytes(self) -> int:
        held = self._hi.nbytes + self._lo.nbytes + self._starts.nbytes
        return int(held + self.others.nbytes + self.others.keys.array.nbytes)

    def find(self, key: str) -> int | None:
        """The row of ``key``, or None."""
        try:  # 16 bytes: 32 hex digits, no space between
            raw = bytes.fromhex(key) if len(key) == HEX_CHARS else b""
        except ValueError:  # (a context manager would double a lookup's time)
            raw = b""
        if len(raw) == 16 and (key.islower() or key.isdigit()):  # and none of "A-F"
            hi, lo = _HALVES.unpack(raw)
            starts, his = self._starts, self._hi
            bucket = hi >> self._shift
            end: int = starts[bucket + 1]
            j = bisect.bisect_left(his, hi, starts[bucket], end)
            while j < end and his[j] == hi:
                if self._lo[j] == lo:
                    return j
                j += 1
            return None  # a key spelled as 32 hex digits is never among the others
        if not len(self.others):
            return None
        row = self.others.find(key)
        return None if row is None else self.packed + row

    def key(self, row: int) -> str:
        if row < self.packed:
            return unpack(self._hi[row], self._lo[row])
        key = self.others.keys.get(row - self.packed)
        assert key is not None
        return key

    def keys(self, rows: np.ndarray) -> list[str]:
        """The keys of ``rows`` (any order)."""
        rows = np.asarray(rows, dtype=np.int64)
        hi = np.asarray(self._hi)
        lo = np.asarray(self._lo)
        return [
            unpack(int(hi[r]), int(lo[r])) if r < self.packed else self.key(r)
            for r in rows.tolist()
        ]
