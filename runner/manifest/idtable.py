"""Compact tables of hashed ids: the first line that claimed each (duplicate-id checks).

Holding every row id of a 1,000,000-row manifest as ``dict[str, int]`` costs ~120 bytes a
row. :class:`KeyLines` (what :class:`runner.manifest.identity.SeenRows` uses) keeps a 96-bit
hash of the id (a 64-bit key and a 32-bit check) and its line in sorted numpy runs, 16 bytes
a row, and takes a block's keys at once; past ``SPILL_AT`` keys its older runs go to an
unnamed temporary file (:mod:`runner.manifest.idspill`), ~2.5 bytes a row left in memory.
:class:`FirstLines`, an open-addressing table in flat arrays, 21-43 bytes a row.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np

from runner.manifest import idspill
from runner.manifest.idspill import SpilledRun


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


# Past this many keys in memory runs, the oldest run goes to disk (idspill): 16 MB held at
# most (24 B a key while two runs merge), then ~2.5 B a key.
SPILL_AT = 1 << 20
# Scalar claims gather here until there are this many, then become one sorted run.
_PENDING_MAX = 65_536
# A run this long gets a directory of where each range of keys starts (~8 keys a range), so a
# lookup searches a few neighbouring keys instead of the whole run (cache misses at 10M keys).
_DIRECTORY_MIN = 1 << 17


class KeyLines:
    """The least line claimed for each (64-bit key, 32-bit check): 16 bytes a key.

    A run is a sorted ``int64`` array of keys beside its ``uint32`` checks and lines. Two
    ids are one only when key and check both agree (96 bits). Claims arrive one at a time
    (:meth:`claim`, into a small dict flushed into a run every 65,536) or a batch at a time
    (:meth:`lookup` then :meth:`add`); runs of like size are merged up to ``RUN_MAX`` keys,
    so a key is found with one binary search in each of about
    n / RUN_MAX + log4(RUN_MAX / 65,536) runs. A key held with another check (two
    ids sharing 64 bits, ~n**2 / 2**65) is kept aside in :attr:`_clashes`, so the runs hold
    each key once.

    The least line wins: a claim of a line below the one held takes the key over (the
    vector path claims a batch's plain rows before its slow rows claim theirs one by one)
    and the line taken over is put in :attr:`displaced`, for the batch to visit.

    Past ``SPILL_AT`` keys in memory runs the oldest run is written to an unnamed temporary
    file (:class:`runner.manifest.idspill.SpilledRun`), leaving ~2.5 bytes a key in memory;
    where no temporary file can be written, the runs stay in memory.
    """

    def __init__(self) -> None:
        # (keys, checks, lines, directory): the directory of a long run, else None
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._spilled: list[SpilledRun] = []  # older than every run in memory
        self._spills = True  # False once a temporary file could not be written
        self._pending: dict[int, tuple[int, int]] = {}  # key -> (check, line)
        self._clashes: dict[tuple[int, int], int] = {}  # (key, check) -> line
        self.displaced: set[int] = set()

    def __len__(self) -> int:
        held = sum(len(keys) for keys, _, _, _ in self._runs) + sum(map(len, self._spilled))
        return held + len(self._pending) + len(self._clashes)

    @property
    def nbytes(self) -> int:
        """Bytes of the runs held in memory (spilled runs: their filters)."""
        return sum(
            keys.nbytes + checks.nbytes + lines.nbytes + (0 if d is None else d.nbytes)
            for keys, checks, lines, d in self._runs
        ) + sum(run.nbytes for run in self._spilled)

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the spilled runs' temporary files (20 a spilled key)."""
        return sum(run.file_bytes for run in self._spilled)

    def claim(self, key: int, line: int, check: int = 0) -> int:
        """The least line claimed for ``(key, check)``, this one included."""
        held = self._find(key)
        if held is None:
            self._pending[key] = (check, line)
            if len(self._pending) >= _PENDING_MAX:
                self._flush()
            return line
        if held[0] != check:
            first = self._clashes.setdefault((key, check), line)
            if line < first:
                self.displaced.add(first)
                self._clashes[key, check] = line
                return line
            return first
        first = held[1]
        if first <= line:
            return first
        self.displaced.add(first)
        self._set(key, line)
        return line

    def lookup(self, keys: np.ndarray, checks: np.ndarray | None = None) -> np.ndarray:
        """The line held for each (key, check) (``int64``), 0 for one not claimed."""
        self._flush()
        if checks is None:
            checks = np.zeros(len(keys), dtype=np.uint32)
        found, _ = self._held(keys, checks)
        return found

    def _held(self, keys: np.ndarray, checks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The line held for each (key, check), 0 if none; whether the key is held at all."""
        found = np.zeros(len(keys), dtype=np.int64)
        taken = np.zeros(len(keys), dtype=bool)  # the key is held, maybe with another check
        for index, held_checks, held_lines in self._probes(keys):
            same = held_checks == checks[index]
            found[index[same]] = held_lines[same]
            taken[index] = True
            for i in index[~same].tolist():
                found[i] = self._clashes.get((int(keys[i]), int(checks[i])), 0)
        return found, taken

    def _probes(self, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each run, the keys it holds: (their indices in ``keys``, checks, lines)."""
        for run_keys, run_checks, run_lines, directory in self._runs:
            at = _search(run_keys, directory, keys)
            at[at == len(run_keys)] = 0
            index = np.flatnonzero(run_keys[at] == keys)
            yield index, run_checks[at[index]], run_lines[at[index]]
        for run in self._spilled:
            index, held_checks, held_lines, _ = run.probe(keys)
            yield index, held_checks, held_lines

    def claim_many(self, keys: np.ndarray, checks: np.ndarray, lines: np.ndarray) -> np.ndarray:
        """:meth:`lookup` then :meth:`add` of those not held, in one search of the runs.

        The pairs must be distinct; the line held for each is returned (its own if new).
        """
        self._flush()
        # In key order: each run is then searched front to back (numpy starts each search
        # where the last ended), and the new keys are a sorted run already.
        order = np.argsort(keys)
        keys, checks, lines = keys[order], checks[order], lines[order]
        found, taken = self._held(keys, checks)
        new = found == 0
        if new.any():
            aside = new & taken
            for i in np.flatnonzero(aside).tolist():
                self._clashes[int(keys[i]), int(checks[i])] = int(lines[i])
            fresh = new & ~taken
            self._add(keys[fresh], lines[fresh], checks[fresh], held=False)
        held = np.empty(len(keys), dtype=np.int64)
        held[order] = np.where(new, lines, found)
        return held

    def add(self, keys: np.ndarray, lines: np.ndarray, checks: np.ndarray | None = None) -> None:
        """Hold new (key, check) pairs (distinct, none held yet) with their lines."""
        if checks is None:
            checks = np.zeros(len(keys), dtype=np.uint32)
        self._add(keys, lines, checks, held=True)

    def _add(self, keys: np.ndarray, lines: np.ndarray, checks: np.ndarray, *, held: bool) -> None:
        """:meth:`add`; ``held=False``: none of the keys is in a run (the caller looked)."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        keys, checks, lines = keys[order].astype(np.int64), checks[order], lines[order]
        # A key already held (with another check), or twice among these: kept aside.
        aside = np.zeros(len(keys), dtype=bool)
        aside[1:] = keys[1:] == keys[:-1]
        for index, _, _ in self._probes(keys) if held else ():
            aside[index] = True
        for i in np.flatnonzero(aside).tolist():
            self._clashes[int(keys[i]), int(checks[i])] = int(lines[i])
        keep = ~aside
        self._push(keys[keep], checks[keep].astype(np.uint32), _narrow(lines[keep]))

    def _find(self, key: int) -> tuple[int, int] | None:
        """(check, line) held for ``key``, None when no id holds it."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        for run_keys, run_checks, run_lines, _ in self._runs:
            at = int(np.searchsorted(run_keys, key))
            if at < len(run_keys) and run_keys[at] == key:
                return int(run_checks[at]), int(run_lines[at])
        for run in self._spilled:
            found = run.find(key)
            if found is not None:
                return found[0], found[1]
        return None

    def _set(self, key: int, line: int) -> None:
        pending = self._pending.get(key)
        if pending is not None:
            self._pending[key] = (pending[0], line)
            return
        for number, (run_keys, run_checks, run_lines, directory) in enumerate(self._runs):
            at = int(np.searchsorted(run_keys, key))
            if at < len(run_keys) and run_keys[at] == key:
                if line > np.iinfo(run_lines.dtype).max:
                    run_lines = run_lines.astype(np.int64)
                    self._runs[number] = (run_keys, run_checks, run_lines, directory)
                run_lines[at] = line
                return
        for run in self._spilled:
            found = run.find(key)
            if found is not None:
                run.set_line(found[2], line)
                return

    def _flush(self) -> None:
        if self._pending:
            count = len(self._pending)
            keys = np.fromiter(self._pending.keys(), np.int64, count)
            held = self._pending.values()
            checks = np.fromiter((c for c, _ in held), np.uint32, count)
            lines = np.fromiter((n for _, n in held), np.int64, count)
            self._pending = {}
            self._add(keys, lines, checks, held=False)

    def _push(self, keys: np.ndarray, checks: np.ndarray, lines: np.ndarray) -> None:
        if not len(keys):
            return
        runs = self._runs
        runs.append((keys, checks, lines, None))
        while len(runs) > 1 and _merge(len(runs[-2][0]), len(runs[-1][0])):
            (old_keys, old_checks, old_lines, _), (new_keys, new_checks, new_lines, _) = runs[-2:]
            # A linear merge: each new key goes after the old keys below it.
            at = np.searchsorted(old_keys, new_keys) + np.arange(len(new_keys))
            old = np.ones(len(old_keys) + len(new_keys), dtype=bool)
            old[at] = False
            keys = np.empty(len(old), dtype=np.int64)
            keys[at], keys[old] = new_keys, old_keys
            checks = np.empty(len(old), dtype=np.uint32)
            checks[at], checks[old] = new_checks, old_checks
            lines = np.empty(len(old), dtype=np.result_type(old_lines, new_lines))
            lines[at], lines[old] = new_lines, old_lines
            runs[-2:] = [(keys, checks, lines, None)]
        keys, checks, lines, directory = runs[-1]
        if directory is None and len(keys) >= _DIRECTORY_MIN:
            runs[-1] = (keys, checks, lines, _directory(keys))
        while self._spills and runs and sum(len(keys) for keys, *_ in runs) > SPILL_AT:
            try:
                spilled = idspill.spill(*runs[0][:3])
            except OSError:  # no temporary space: held in memory from now on, as before
                self._spills = False
                break
            runs.pop(0)
            idspill.push(self._spilled, spilled)


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
