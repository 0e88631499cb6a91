"""64-bit hashes of Arrow text columns, vectorised with numpy (pyarrow has no hash kernel).

:func:`text_hashes` hashes every byte of each value: equal texts always hash alike, and two
different texts share a hash with a chance of about 2**-64, so a reader may group by the
hash and check exact values only where a group matters (:mod:`runner.ledger.identity`).
:func:`buckets` spreads values over ``n`` buckets from their first and last 8 bytes only
(cheap enough to run on every event of a ledger); equal texts always share a bucket.
Deterministic across processes (no salt): a value's hash does not change between passes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_CHUNK_BYTES = 1 << 20  # bytes hashed at once: a few arrays of 8 bytes per byte
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit number per input."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray(z ^ (z >> np.uint64(31)))


def _parts(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets as int64 into ``data``, data bytes, validity) of a string/binary array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not (pa.types.is_string(values.type) or pa.types.is_binary(values.type)):
        values = values.cast(pa.string())
    n = len(values)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=n + 1, offset=values.offset * 4)
    data = np.zeros(0, np.uint8) if buffers[2] is None else np.frombuffer(buffers[2], np.uint8)
    if values.null_count == 0:
        valid = np.ones(n, dtype=bool)
    else:
        valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return offsets.astype(np.int64), data, valid


def text_hashes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(a 64-bit hash of every byte of each value, whether each value is present)."""
    offsets, data, valid = _parts(values)
    n = len(offsets) - 1
    out = np.zeros(n, dtype=np.uint64)
    start = 0
    while start < n:
        stop = start + 1
        # As many values as fit in one chunk of bytes (at least one).
        limit = offsets[start] + _CHUNK_BYTES
        stop = max(start + 1, int(np.searchsorted(offsets, limit, side="right")) - 1)
        stop = min(stop, n)
        out[start:stop] = _hash_range(offsets[start : stop + 1], data)
        start = stop
    return out, valid


def _hash_range(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    first = int(offsets[0])
    total = int(offsets[-1]) - first
    sums = np.zeros(len(lengths), dtype=np.uint64)
    if total:
        chunk = data[first : first + total].astype(np.uint64)
        starts = offsets[:-1] - first
        position = np.arange(total, dtype=np.uint64) - np.repeat(starts, lengths).astype(np.uint64)
        per_byte = mix(chunk | (position << np.uint64(8)))
        nonempty = lengths > 0
        with np.errstate(over="ignore"):
            sums[nonempty] = np.add.reduceat(per_byte, starts[nonempty])
    with np.errstate(over="ignore"):
        return mix(sums ^ (lengths.astype(np.uint64) * _GOLDEN))


def buckets(values: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """A bucket in ``range(n)`` per value, from its length and first and last 8 bytes."""
    offsets, data, _valid = _parts(values)
    count = len(offsets) - 1
    if n <= 1 or count == 0:
        return np.zeros(count, dtype=np.int64)
    padded = np.concatenate((np.zeros(8, np.uint8), data, np.zeros(8, np.uint8)))
    starts, ends = offsets[:-1] + 8, offsets[1:] + 8
    lane = np.arange(8)
    head_at = starts[:, None] + lane
    tail_at = ends[:, None] - 8 + lane
    head = np.where(head_at < ends[:, None], padded[head_at], 0).astype(np.uint8)
    tail = np.where(tail_at >= starts[:, None], padded[tail_at], 0).astype(np.uint8)
    lengths = (ends - starts).astype(np.uint64)
    with np.errstate(over="ignore"):
        word = mix(head.view(np.uint64).ravel() ^ mix(tail.view(np.uint64).ravel() ^ lengths))
    return np.asarray(word % np.uint64(n), dtype=np.int64)
