"""Looking up a folded ledger's rows by job_key without a Python object per job.

A dict from job_key to row costs ~150 bytes a job (the key string, the
entry, the int); a million jobs held that way is ~150 MB before any field is
read. :class:`KeyIndex` keeps 64-bit hashes sorted into buckets in numpy
arrays (16-24 bytes a job) and confirms a hit against the key's bytes in the
Arrow column itself. :class:`Strings` and :class:`Values` read one element of
an Arrow column through memoryviews, a few times faster than an Arrow scalar.

Python's ``hash(str)`` is salted per process: an index lives in the process
that built it and is never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

_MASK = (1 << 64) - 1
_HASH_BATCH = 65_536


def _one_chunk(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values


class Strings:
    """Element access to a string column: ``get(i)`` is its i-th value or None."""

    def __init__(self, values: pa.Array | pa.ChunkedArray) -> None:
        array = _one_chunk(values)
        if array.type != pa.string():
            array = array.cast(pa.string())
        self.array = array
        n = len(array)
        offsets = array.buffers()[1]
        data = array.buffers()[2]
        self._offsets = (
            np.frombuffer(offsets, dtype=np.int32, count=n + 1, offset=array.offset * 4)
            if offsets is not None
            else np.zeros(n + 1, dtype=np.int32)
        ).data
        self._data = memoryview(data if data is not None else b"")
        self._valid = _validity(array)

    def __len__(self) -> int:
        return len(self.array)

    def get(self, i: int) -> str | None:
        if self._valid is not None and not self._valid[i]:
            return None
        return str(self._data[self._offsets[i] : self._offsets[i + 1]], "utf-8")


class Values:
    """Element access to an integer or boolean column: ``get(i)`` is a Python int/bool or None."""

    def __init__(self, values: pa.Array | pa.ChunkedArray) -> None:
        array = _one_chunk(values)
        zero = False if pa.types.is_boolean(array.type) else 0
        filled = array.fill_null(zero) if array.null_count else array
        self._values = np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).data
        self._valid = _validity(array)

    @property
    def nbytes(self) -> int:
        return self._values.nbytes + (0 if self._valid is None else self._valid.nbytes)

    def get(self, i: int) -> int | bool | None:
        if self._valid is not None and not self._valid[i]:
            return None
        value: int | bool = self._values[i]
        return value


def _validity(array: pa.Array) -> memoryview | None:
    if array.null_count == 0:
        return None
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(valid, dtype=bool).data


class KeyIndex:
    """Row numbers of the distinct strings of an Arrow column, by value.

    Buckets are the top bits of the hash (about one key per bucket); a lookup
    scans its bucket's sorted hashes and compares the key's bytes on a match,
    so a hash collision never confuses two keys. ``hasher`` is for tests.
    """

    def __init__(
        self, keys: pa.Array | pa.ChunkedArray, *, hasher: Callable[[str], int] = hash
    ) -> None:
        self._hash = hasher
        self.keys = Strings(keys)
        n = len(self.keys)
        hashes = np.empty(n, dtype=np.uint64)
        for start in range(0, n, _HASH_BATCH):
            batch = self.keys.array.slice(start, _HASH_BATCH).to_pylist()
            got = np.fromiter(map(hasher, batch), dtype=np.int64, count=len(batch))
            hashes[start : start + len(batch)] = got.view(np.uint64)
        bits = max((n - 1).bit_length(), 1)
        self._shift = 64 - bits
        rows = np.argsort(hashes, kind="stable")
        ordered = hashes[rows]
        row_type = np.int32 if n < 2**31 else np.int64
        buckets = np.arange((1 << bits) + 1, dtype=np.uint64)
        starts = np.searchsorted(ordered >> np.uint64(self._shift), buckets)
        self._rows = rows.astype(row_type).data
        self._hashes = ordered.data
        self._starts = starts.astype(row_type).data

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes held besides the key column itself."""
        return sum(m.nbytes for m in (self._rows, self._hashes, self._starts))

    def find(self, key: str) -> int | None:
        """The row holding ``key``, or None."""
        h = self._hash(key) & _MASK
        starts, hashes = self._starts, self._hashes
        bucket = h >> self._shift
        j, end = starts[bucket], starts[bucket + 1]
        while j < end:
            if hashes[j] == h:
                row: int = self._rows[j]
                if self.keys.get(row) == key:
                    return row
            j += 1
        return None

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.keys), _HASH_BATCH):
            yield from self.keys.array.slice(start, _HASH_BATCH).to_pylist()
