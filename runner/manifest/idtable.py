"""A compact table of 64-bit keys: the first line that claimed each (duplicate-id checks).

Holding every row id of a 1,000,000-row manifest as ``dict[str, int]`` costs ~120 bytes a
row; this table keeps a 64-bit hash of the id and its line in flat arrays, 16-32 bytes a
row. Used by :mod:`runner.manifest.jobs`.
"""

from __future__ import annotations

from array import array


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
