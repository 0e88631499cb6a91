"""The seq of every job's last event, from the seq and job_key columns alone (no fold).

What :func:`runner.ledger.ordered.ordered_jobs` needs to fold a run directory as it reads
it, for a fraction of a scan's cost: a job's last event is the one with its key's highest
seq. A job key is 32 lowercase hex digits (:func:`runner.manifest.identity.job_key`), held
here as the 16 bytes they spell, exactly: two keys are one job only when equal (so no
upper case: ``AB..`` and ``ab..`` spell the same bytes but are two jobs to a fold). A
ledger with any other key (or a sharded run directory, each shard with its own seqs) gives
None: the caller reads it another way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.ledger.fold import _retrying, _Snapshot
from runner.ledger.parts import iter_part, part_rows
from runner.ledger.schema import rows_to_table

KEY_HEX = 32
READ_ROWS = 262_144
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_KEY = np.dtype([("high", np.uint64), ("low", np.uint64)])


def last_event_seqs(run_dir: Path) -> np.ndarray | None:
    """The seq of each job's last event, sorted (8 bytes a job); None when sharded or a
    job key is not 32 lowercase hex digits. Takes no lock."""

    def read(snap: _Snapshot) -> np.ndarray | None:
        if snap.shards:
            return None
        # Each batch's keys once (a job's events lie close together: ~1/3 of the events),
        # into arrays sized once for every event (no list of pieces joined at the end).
        size = sum(part_rows(part.path) for part in snap.parts) + len(snap.journal_rows)
        kept = [np.empty(size, np.uint64), np.empty(size, np.uint64), np.empty(size, np.int64)]
        count = 0
        for events in _key_events(snap):
            packed = packed_keys(events["job_key"])
            if packed is None:
                return None
            seq = np.asarray(events["seq"].to_numpy(), np.int64)
            last = _last_of_each([packed["high"], packed["low"], seq])
            stop = count + len(last[0])
            if stop > len(kept[0]):  # the journal grew since it was read: not expected
                kept = [np.resize(a, stop) for a in kept]
            for whole, piece in zip(kept, last, strict=True):
                whole[count:stop] = piece
            count = stop
        kept = [a[:count] for a in kept]
        return np.sort(_last_of_each(kept)[2])

    return _retrying(run_dir, read)


def _key_events(snap: _Snapshot) -> Iterator[pa.Table]:
    for part in snap.parts:
        yield from iter_part(part.path, ["seq", "job_key"], batch_rows=READ_ROWS)
    if snap.journal_rows:
        yield rows_to_table(snap.journal_rows).select(["seq", "job_key"])


def packed_keys(values: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Each job key as the 16 bytes its 32 hex digits spell (a record of two uint64), or
    None if any key is null or not 32 lowercase hex digits."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    n = len(values)
    if n == 0:
        return np.zeros(0, _KEY)
    if values.null_count or not pa.types.is_string(values.type):
        return None
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], np.int32, count=n + 1, offset=values.offset * 4)
    if not bool(np.all(np.diff(offsets) == KEY_HEX)):
        return None
    start = int(offsets[0])
    text = np.frombuffer(buffers[2], np.uint8, count=n * KEY_HEX, offset=start)
    nibbles = _NIBBLE[text].reshape(n, KEY_HEX)
    if bool((nibbles == 255).any()):
        return None
    spelled = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(spelled).view(_KEY).ravel()


def _last_of_each(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """One entry per distinct key (high and low halves, then seqs: taken out of
    ``arrays``, so each is let go of once sorted): the key and its highest seq."""
    seqs, low, high = arrays.pop(), arrays.pop(), arrays.pop()
    if len(high) == 0:
        return [high, low, seqs]
    order = np.argsort(high, kind="stable")
    high = high[order]
    low = low[order]
    if bool(np.any((high[1:] == high[:-1]) & (low[1:] != low[:-1]))):
        again = np.lexsort((low, high))  # 64 bits shared: sort by all 128
        high, low, order = high[again], low[again], order[again]
    seqs = seqs[order]
    del order
    starts = np.flatnonzero(
        np.concatenate(([True], (high[1:] != high[:-1]) | (low[1:] != low[:-1])))
    )
    return [high[starts], low[starts], np.maximum.reduceat(seqs, starts)]
