"""A compact table of 64-bit keys: the first line that claimed each (duplicate-id checks).

Holding every row id of a 1,000,000-row manifest as ``dict[str, int]`` costs ~120 bytes a
row; this table keeps a 64-bit hash of the id and its line in flat arrays, 16-32 bytes a
row. Used by :mod:`runner.jobs`.
"""

from __future__ import annotations

from array import array


class FirstLines:
    """The line of the first claim of each 64-bit key, exactly, at 12 bytes a slot.

    Open addressing with linear probing over two flat arrays (key, line), kept at
    most three quarters full: 16-32 bytes a key, against ~120 for a ``dict[str, int]``
    of ids. Key 0 marks an empty slot, so its line is kept aside.
    """

    MAX_LOAD = 0.75

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, not {capacity}")
        self._keys = array("q", [0]) * capacity
        # 32-bit lines; widened for a manifest past 4,294,967,295 lines.
        self._lines = array("I", [0]) * capacity
        self._zero_line: int | None = None
        self._count = 0

    def __len__(self) -> int:
        return self._count + (self._zero_line is not None)

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def claim(self, key: int, line: int) -> int:
        """The line first claimed for ``key`` (a signed 64-bit int); ``line`` if it is new."""
        if key == 0:
            if self._zero_line is None:
                self._zero_line = line
            return self._zero_line
        keys = self._keys
        mask = len(keys) - 1
        slot = key & mask
        while (found := keys[slot]) != key:
            if found == 0:
                self._put(slot, key, line)
                return line
            slot = (slot + 1) & mask
        return self._lines[slot]

    def _put(self, slot: int, key: int, line: int) -> None:
        if line > 0xFFFF_FFFF and self._lines.typecode == "I":
            self._lines = array("q", self._lines)
        self._keys[slot] = key
        self._lines[slot] = line
        self._count += 1
        if self._count > self.MAX_LOAD * len(self._keys):
            self._grow()

    def _grow(self) -> None:
        keys, lines = self._keys, self._lines
        self._keys = new_keys = array("q", [0]) * (2 * len(keys))
        self._lines = new_lines = array(lines.typecode, [0]) * (2 * len(keys))
        mask = len(new_keys) - 1
        for key, line in zip(keys, lines, strict=True):
            if key:
                slot = key & mask
                while new_keys[slot]:
                    slot = (slot + 1) & mask
                new_keys[slot] = key
                new_lines[slot] = line
