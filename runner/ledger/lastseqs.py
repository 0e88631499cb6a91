"""The seq of every job's last event, from the seq and job_key columns alone (no fold).

What :func:`runner.ledger.ordered.ordered_jobs` needs to fold a run directory as it reads
it, for a fraction of a scan's cost: a job's last event is the one with its key's highest
seq. A job key is 32 hex digits (:func:`runner.manifest.identity.job_key`), held here as
the 16 bytes they spell, exactly: two keys are one job only when equal. A ledger with any
other key (or a sharded run directory, each shard with its own seqs) gives None: the caller
reads it another way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.ledger.fold import _retrying, _Snapshot
from runner.ledger.parts import iter_part
from runner.ledger.schema import rows_to_table

KEY_HEX = 32
READ_ROWS = 262_144
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_KEY = np.dtype([("high", np.uint64), ("low", np.uint64)])


def last_event_seqs(run_dir: Path) -> np.ndarray | None:
    """The seq of each job's last event, sorted (8 bytes a job); None when sharded or a
    job key is not 32 hex digits. Takes no lock."""

    def read(snap: _Snapshot) -> np.ndarray | None:
        if snap.shards:
            return None
        keys: list[np.ndarray] = []
        seqs: list[np.ndarray] = []
        for events in _key_events(snap):
            packed = packed_keys(events["job_key"])
            if packed is None:
                return None
            seq = np.asarray(events["seq"].to_numpy(), np.int64)
            # Each batch's keys once (a job's events lie close together): ~1/3 of the events.
            packed, seq = _last_of_each(packed, seq)
            keys.append(packed)
            seqs.append(seq)
        if not keys:
            return np.zeros(0, np.int64)
        every, last = np.concatenate(keys), np.concatenate(seqs)
        keys.clear()
        seqs.clear()
        return np.sort(_last_of_each(every, last)[1])

    return _retrying(run_dir, read)


def _key_events(snap: _Snapshot) -> Iterator[pa.Table]:
    for part in snap.parts:
        yield from iter_part(part.path, ["seq", "job_key"], batch_rows=READ_ROWS)
    if snap.journal_rows:
        yield rows_to_table(snap.journal_rows).select(["seq", "job_key"])


def packed_keys(values: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Each job key as the 16 bytes its 32 hex digits spell (a record of two uint64), or
    None if any key is null or not 32 hex digits."""
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


def _last_of_each(keys: np.ndarray, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One entry per distinct key: the key and its highest seq."""
    if len(keys) == 0:
        return keys, seqs
    order = np.argsort(keys["high"], kind="stable")
    high, low = keys["high"][order], keys["low"][order]
    if bool(np.any((high[1:] == high[:-1]) & (low[1:] != low[:-1]))):
        order = np.lexsort((keys["low"], keys["high"]))  # 64 bits shared: sort by all 128
        high, low = keys["high"][order], keys["low"][order]
    starts = np.flatnonzero(
        np.concatenate(([True], (high[1:] != high[:-1]) | (low[1:] != low[:-1])))
    )
    return keys[order[starts]], np.maximum.reduceat(seqs[order], starts)
