"""Compact tables of 64-bit keys: the first line that claimed each (duplicate-id checks).

Holding every row id of a 1,000,000-row manifest as ``dict[str, int]`` costs ~120 bytes a
row. :class:`KeyLines` (what :class:`runner.manifest.identity.SeenRows` uses) keeps a 64-bit
hash of the id and its line in sorted numpy runs, 12 bytes a row, and takes a block's keys
at once; :class:`FirstLines`, an open-addressing table in flat arrays, 21-43 bytes a row.
"""

from __future__ import annotations

from array import array

import numpy as np


class FirstLines:
    """The line of the first claim of each (64-bit key, 32-bit check), at 16 bytes a slot.

    Open addressing with linear probing over flat arrays (key, check, line), kept at
    most three quarters full: 21-43 bytes a key, against ~120 for a ``dict[str, int]``
    of ids. Two ids are taken as one only when both their key and their check agree:
    with independent hashes that is a 96-bit match (~1e-17 for a pair among 1,000,000
    ids). Key 0 marks an empty slot, so its claims are kept aside.
    """

    MAX_LOAD = 0.75

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, not {capacity}")
        self._keys = array("q", [0]) * capacity
        self._checks = array("I", [0]) * capacity
        # 32-bit lines; widened for a manifest past 4,294,967,295 lines.
        self._lines = array("I", [0]) * capacity
        self._zero: dict[int, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count + len(self._zero)

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def claim(self, key: int, line: int, check: int = 0) -> int:
        """The line first claimed for ``(key, check)``; ``line`` if it is new.

        ``key`` is a signed 64-bit int, ``check`` an unsigned 32-bit one.
        """
        if key == 0:
            return self._zero.setdefault(check, line)
        keys, checks = self._keys, self._checks
        mask = len(keys) - 1
        slot = key & mask
        while True:
            found = keys[slot]
            if found == 0:
                self._put(slot, key, check, line)
                return line
            if found == key and checks[slot] == check:
                return self._lines[slot]
            slot = (slot + 1) & mask

    def _put(self, slot: int, key: int, check: int, line: int) -> None:
        if line > 0xFFFF_FFFF and self._lines.typecode == "I":
            self._lines = array("q", self._lines)
        self._keys[slot] = key
        self._checks[slot] = check
        self._lines[slot] = line
        self._count += 1
        if self._count > self.MAX_LOAD * len(self._keys):
            self._grow()

    def _grow(self) -> None:
        keys, checks, lines = self._keys, self._checks, self._lines
        size = 2 * len(keys)
        self._keys = new_keys = array("q", [0]) * size
        self._checks = new_checks = array("I", [0]) * size
        self._lines = new_lines = array(lines.typecode, [0]) * size
        mask = size - 1
        for key, check, line in zip(keys, checks, lines, strict=True):
            if key:
                slot = key & mask
                while new_keys[slot]:
                    slot = (slot + 1) & mask
                new_keys[slot] = key
                new_checks[slot] = check
                new_lines[slot] = line


# Scalar claims gather here until there are this many, then become one sorted run.
_PENDING_MAX = 65_536
# A run this long gets a directory of where each range of keys starts (~8 keys a range), so a
# lookup searches a few neighbouring keys instead of the whole run (cache misses at 10M keys).
_DIRECTORY_MIN = 1 << 17


class KeyLines:
    """The least line claimed for each 64-bit key, as sorted runs of (key, line): 12 bytes a key.

    A run is a sorted ``int64`` array of keys beside its ``uint32`` lines. Claims arrive
    one at a time (:meth:`claim`, into a small dict flushed into a run every 65,536) or a
    batch at a time (:meth:`lookup` then :meth:`add`); runs of like size are merged up to
    ``RUN_MAX`` keys, so a key is found with one binary search in each of about
    n / RUN_MAX + log4(RUN_MAX / 65,536) runs.

    The least line wins: a claim of a line below the one held takes the key over (the
    vector path claims a batch's plain rows before its slow rows claim theirs one by one)
    and the line taken over is put in :attr:`displaced`, for the batch to visit.
    """

    def __init__(self) -> None:
        # (keys, lines, directory): the directory of a long run, else None
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._pending: dict[int, int] = {}
        self.displaced: set[int] = set()

    def __len__(self) -> int:
        return sum(len(keys) for keys, _, _ in self._runs) + len(self._pending)

    @property
    def nbytes(self) -> int:
        sizes = [(keys, lines, d if d is not None else keys[:0]) for keys, lines, d in self._runs]
        return sum(keys.nbytes + lines.nbytes + d.nbytes for keys, lines, d in sizes)

    def claim(self, key: int, line: int) -> int:
        """The least line claimed for ``key``, this one included."""
        first = self._pending.get(key)
        if first is None:
            first = self._find(key)
        if first and first <= line:
            return first
        if first:
            self.displaced.add(first)
            self._set(key, line)
        else:
            self._pending[key] = line
            if len(self._pending) >= _PENDING_MAX:
                self._flush()
        return line

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The line held for each key (``int64``), 0 for a key not claimed."""
        self._flush()
        found = np.zeros(len(keys), dtype=np.int64)
        for run_keys, run_lines, directory in self._runs:
            at = _search(run_keys, directory, keys)
            at[at == len(run_keys)] = 0
            hit = run_keys[at] == keys
            found[hit] = run_lines[at[hit]]
        return found

    def add(self, keys: np.ndarray, lines: np.ndarray) -> None:
        """Hold new keys (distinct, none held yet) with their lines, as one more run."""
        if len(keys):
            order = np.argsort(keys, kind="stable")
            self._push(keys[order].astype(np.int64), _narrow(lines[order]))

    def _find(self, key: int) -> int:
        for run_keys, run_lines, _ in self._runs:
            at = int(np.searchsorted(run_keys, key))
            if at < len(run_keys) and run_keys[at] == key:
                return int(run_lines[at])
        return 0

    def _set(self, key: int, line: int) -> None:
        if key in self._pending:
            self._pending[key] = line
            return
        for run_keys, run_lines, _ in self._runs:
            at = int(np.searchsorted(run_keys, key))
            if at < len(run_keys) and run_keys[at] == key:
                if line > np.iinfo(run_lines.dtype).max:
                    self._pending[key] = line  # found there first from now on
                    return
                run_lines[at] = line
                return

    def _flush(self) -> None:
        if self._pending:
            keys = np.fromiter(self._pending.keys(), np.int64, len(self._pending))
            lines = np.fromiter(self._pending.values(), np.int64, len(self._pending))
            self._pending = {}
            self.add(keys, lines)

    def _push(self, keys: np.ndarray, lines: np.ndarray) -> None:
        runs = self._runs
        runs.append((keys, lines, None))
        while len(runs) > 1 and _merge(len(runs[-2][0]), len(runs[-1][0])):
            (old_keys, old_lines, _), (new_keys, new_lines, _) = runs[-2], runs[-1]
            # A linear merge: each new key goes after the old keys below it.
            at = np.searchsorted(old_keys, new_keys) + np.arange(len(new_keys))
            old = np.ones(len(old_keys) + len(new_keys), dtype=bool)
            old[at] = False
            keys = np.empty(len(old), dtype=np.int64)
            keys[at], keys[old] = new_keys, old_keys
            lines = np.empty(len(old), dtype=np.result_type(old_lines, new_lines))
            lines[at], lines[old] = new_lines, old_lines
            runs[-2:] = [(keys, lines, None)]
        keys, lines, directory = runs[-1]
        if directory is None and len(keys) >= _DIRECTORY_MIN:
            runs[-1] = (keys, lines, _directory(keys))


# Runs stop growing at this many keys (24 MB): a merge holds both runs and the merged one
# at once, so unbounded runs made a 10M-id manifest peak ~150 MB above the 120 MB held
# (measured); capped, a lookup searches one more run per RUN_MAX keys.
RUN_MAX = 1 << 21


def _merge(older: int, newer: int) -> bool:
    """Whether the two newest runs merge: of like size, and not past RUN_MAX together."""
    return older <= 4 * newer and older + newer <= RUN_MAX


def _search(run_keys: np.ndarray, directory: np.ndarray | None, keys: np.ndarray) -> np.ndarray:
    """``np.searchsorted(run_keys, keys)``, through the run's directory if it has one."""
    if directory is None:
        found: np.ndarray = np.searchsorted(run_keys, keys)
        return found
    bits = (len(directory) - 2).bit_length()
    bucket = (keys.view(np.uint64) ^ _SIGN) >> np.uint64(64 - bits)
    low: np.ndarray = directory[bucket]
    high: np.ndarray = directory[bucket + 1]
    last = len(run_keys) - 1
    while True:
        open_ = low < high
        if not open_.any():
            return low
        middle = (low + high) >> 1
        below = open_ & (run_keys[np.minimum(middle, last)] < keys)
        low = np.where(below, middle + 1, low)
        high = np.where(open_ & ~below, middle, high)


_SIGN = np.uint64(1 << 63)


def _directory(run_keys: np.ndarray) -> np.ndarray:
    """Where each of 2**bits ranges of keys (by their top bits) starts in the run, and its end."""
    bits = max(1, (len(run_keys) // 16).bit_length())
    edges = (np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits)) ^ _SIGN
    starts = np.searchsorted(run_keys, edges.view(np.int64))
    return np.append(starts, len(run_keys)).astype(np.int64)


def _narrow(lines: np.ndarray) -> np.ndarray:
    """Lines as ``uint32`` while they fit (a manifest past 4,294,967,295 lines: ``int64``)."""
    wide = len(lines) > 0 and int(lines.max()) > 0xFFFF_FFFF
    return lines.astype(np.int64 if wide else np.uint32)
