"""What makes a row the same row across edits of its manifest, and the keys derived from it.

A row is identified by one of three things, in this order:

- **Its id column.** ``--id-column NAME`` makes column ``NAME`` the identity (a catalog
  keyed by ``sku``); every row must have a value there. Without the flag, a column named
  ``id`` is used where it has a value. A number becomes its text (``17``).
- **Its content**, when it has no id: ``~`` and the first 16 hex digits of the SHA-256 of
  its canonical content (endpoint, request before seed expansion, metadata, ``seeds`` or
  ``variants``), then ``.2``, ``.3``... for the second, third... row of identical content
  (``~3f2a9c04b1d7e6a8``, ``~3f2a9c04b1d7e6a8.2``). Inserting, deleting or reordering rows
  changes no other row's identity; editing a row makes it a new row.
- **Its row number**, ``#`` and the 1-based data-row number (``#4``), only to name a bad
  row without an id, whose content cannot be read.

No explicit id may take the form of the last two (``#`` and digits; ``~`` and hex digits,
optionally ``.`` and digits): such an id is a row error, so they never collide.
The manifest's name and location are never part of a row's identity, except for
the ``invalid`` record of a bad row without an id (:func:`row_identity`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runner.errors import RowProblem
from runner.manifest import cells, idspill
from runner.manifest.idspill import SpilledRun
from runner.manifest.idtable import KeyLines

KEY_HEX_CHARS = 32
CONTENT_HEX_CHARS = 16
SEED_SPACE = 2**31  # derived seeds fall in 0..2**31-1
DEFAULT_ID_COLUMN = "id"
_ROW_NUMBER_ID = re.compile(r"#[0-9]+")
_CONTENT_ID = re.compile(r"~[0-9A-Fa-f]+(?:\.[0-9]+)?")


# Made once: json.dumps with options builds a new encoder per call.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
).encode


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value: sorted keys, compact, non-ASCII kept."""
    return _CANONICAL(value)


def shard_of(identity: str, shards: int) -> int:
    """The shard (0 .. ``shards`` - 1) of a row, from a stable hash of its identity.

    Not the row's position: inserting or reordering rows moves no row to another shard,
    and every variant of a row lands with the row.
    """
    digest = hashlib.sha256(identity.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def job_key(row_id: str, endpoint: str, payload: Mapping[str, Any], variant: int) -> str:
    """A stable key: the same row, endpoint, body and variant give the same key.

    The manifest's name and location are deliberately not part of it, so a
    moved or renamed manifest resumes where it stopped.
    """
    body = {"row": row_id, "endpoint": endpoint, "payload": payload, "variant": variant}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:KEY_HEX_CHARS]


def variant_seed(row_id: str, variant: int) -> int:
    """The seed of variant ``variant`` of a row: deterministic, in 0..2**31-1."""
    digest = hashlib.sha256(f"{row_id}\x1f{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_SPACE


def row_number_id(index: int) -> str:
    """The name of the bad row at 0-based data-row ``index`` when it has no id: ``#1``..."""
    return f"#{index + 1}"


def is_row_number_id(row_id: str) -> bool:
    """Whether ``row_id`` stands in for a missing id (no explicit id has this form)."""
    return _ROW_NUMBER_ID.fullmatch(row_id) is not None


def is_content_id(row_id: str) -> bool:
    """Whether ``row_id`` is of the content form ``~hex[.n]`` (no explicit id has it)."""
    return _CONTENT_ID.fullmatch(row_id) is not None


def reserved_form(row_id: str) -> str | None:
    """Why an explicit id cannot be ``row_id`` (it has a derived id's form), or None."""
    if is_row_number_id(row_id):
        return "# and a row number"
    if is_content_id(row_id):
        return "~ and hex digits"
    return None


def content_hash(content: Mapping[str, Any]) -> int:
    """A row's content as a signed 64-bit int: the first 16 hex of SHA-256 of its canonical JSON."""
    digest = hashlib.sha256(canonical_json(content).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def content_id(digest: int, occurrence: int) -> str:
    """``~`` and 16 hex digits, then ``.n`` for the n-th (n >= 2) row of identical content."""
    text = f"~{digest & 0xFFFF_FFFF_FFFF_FFFF:0{CONTENT_HEX_CHARS}x}"
    return text if occurrence == 1 else f"{text}.{occurrence}"


def identity_notice(columns: Iterable[str], id_column: str | None) -> str:
    """The one-time notice of which identity a manifest's rows get, from its first columns."""
    if id_column is not None:
        return f"rows are identified by the column {id_column}"
    if DEFAULT_ID_COLUMN in columns:
        return (
            f"rows are identified by the column {DEFAULT_ID_COLUMN} "
            "(a row with it empty by its content)"
        )
    return "no id column: rows are identified by their content (--id-column NAME to use one)"


class Occurrences:
    """How many times each 64-bit content hash has been seen, at 12 bytes a slot.

    A row of content already seen is the next occurrence of it. Open addressing with
    linear probing over flat arrays, kept at most three quarters full: 16-32 bytes per
    distinct content, against ~100 for a ``dict[int, int]``. Key 0 marks an empty slot,
    so its counts are kept aside. Past ``SPILL_AT`` contents the table is written to disk
    as one sorted run (:class:`runner.manifest.idspill.SpilledRun`, ~2.5 bytes a content
    left in memory) and starts again empty (unless no temporary file can be written); a
    content is counted where it is held.
    """

    MAX_LOAD = 0.75
    SPILL_AT = 1 << 19

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, not {capacity}")
        self._capacity = capacity
        self._spilled: list[SpilledRun] = []
        self._spills = True  # False once a temporary file could not be written
        self._zero = 0
        self._empty()

    def _empty(self) -> None:
        self._keys = array("q", [0]) * self._capacity
        # 32-bit counts; widened past 4,294,967,295 identical rows.
        self._counts = array("I", [0]) * self._capacity
        self._used = 0

    def __len__(self) -> int:
        return self._used + (self._zero > 0) + sum(map(len, self._spilled))

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: the table and the spilled runs' filters."""
        held = sum(run.nbytes for run in self._spilled)
        return (
            held + self._keys.itemsize * len(self._keys) + self._counts.itemsize * len(self._counts)
        )

    def next(self, key: int) -> int:
        """The occurrence of this sighting of ``key``: 1 the first time, then 2, 3..."""
        if key == 0:
            self._zero += 1
            return self._zero
        keys = self._keys
        mask = len(keys) - 1
        slot = key & mask
        while True:
            found = keys[slot]
            if found == key:
                count = self._counts[slot] + 1
                if count > 0xFFFF_FFFF and self._counts.typecode == "I":
                    self._counts = array("q", self._counts)
                self._counts[slot] = count
                return count
            if found == 0:
                break
            slot = (slot + 1) & mask
        for run in self._spilled:
            held = run.find(key)
            if held is not None:
                run.set_line(held[2], held[1] + 1)
                return held[1] + 1
        keys[slot] = key
        self._counts[slot] = 1
        self._used += 1
        spilled = self._used >= self.SPILL_AT and self._spills and self._spill()
        if not spilled and self._used > self.MAX_LOAD * len(keys):
            self._grow()
        return 1

    def _spill(self) -> bool:
        """Write the table to disk and empty it; False if no temporary file can be written."""
        keys = np.frombuffer(self._keys, dtype=np.int64)
        counts = np.frombuffer(self._counts, dtype=np.dtype(self._counts.typecode))
        used = np.flatnonzero(keys)
        order = used[np.argsort(keys[used])]
        checks = np.zeros(len(order), dtype=np.uint32)
        try:
            spilled = idspill.spill(keys[order], checks, counts[order])
        except OSError:  # held in memory from now on, as before
            self._spills = False
            return False
        idspill.push(self._spilled, spilled)
        self._capacity = len(self._keys)  # filled again at this size: no regrowth
        self._empty()
        return True

    def _grow(self) -> None:
        keys, counts = self._keys, self._counts
        size = 2 * len(keys)
        self._keys = new_keys = array("q", [0]) * size
        self._counts = new_counts = array(counts.typecode, [0]) * size
        mask = size - 1
        for key, count in zip(keys, counts, strict=True):
            if key:
                slot = key & mask
                while new_keys[slot]:
                    slot = (slot + 1) & mask
                new_keys[slot] = key
                new_counts[slot] = count


def given_id(
    values: Mapping[str, Any], column: str, *, required: bool
) -> tuple[str | None, str | None]:
    """A row's id from its id column (None: it has none), and why that cell cannot be one."""
    given = values.get(column)
    if cells.is_blank(given):
        if not required:
            return None, None
        state = "empty" if column in values else "missing"
        return None, f"{column} is {state}: --id-column {column} needs a value on every row"
    if isinstance(given, bool) or not isinstance(given, str | int | float):
        return None, f"{column}={cells.show(given)} is not text or a number"
    row_id = given.strip() if isinstance(given, str) else canonical_json(given)
    form = reserved_form(row_id)
    if form is not None:
        return None, f"{column} {row_id!r} has the form kept for rows without an id ({form})"
    return row_id, None


def id_key(row_id: str) -> tuple[int, int]:
    """The 96-bit key an id is held by in :class:`SeenRows` (never the text itself): a
    64-bit key and a 32-bit check.

    A dict of the ids themselves cost ~120 bytes per row. Telling a duplicate from two ids
    that share their key would need the first id, so such a pair would be reported as a
    duplicate; with 96 bits that is ~n**2 / 2**97 (6e-18 at 1M rows, 6e-16 at 10M). Both
    halves are ``hash()`` (salted SipHash, 20 ns against 520 for blake2b), of the id and of
    the id after a NUL: outputs for distinct texts, independent under one process's salt
    (unless PYTHONHASHSEED is set), so such a pair is an accident of one run, not of the ids.
    """
    return hash(row_id), id_check(row_id)


def id_check(row_id: str) -> int:
    """The 32-bit check of :func:`id_key`."""
    return hash(row_id + "\0") & 0xFFFF_FFFF


class SeenRows:
    """One manifest's ids and contents so far: the first line of each id, the count of each
    content, never the text. In memory: 16 bytes per id up to a million ids and 24 per
    distinct content up to half a million, ~2.5 bytes for each past that (the rest in an
    unnamed temporary file, 20 bytes each)."""

    def __init__(self) -> None:
        self.first_lines = KeyLines()
        self._occurrences = Occurrences()

    def claim(self, row_id: str, line: int) -> int:
        """The first line that gave ``row_id``; ``line`` itself if none did."""
        key, check = id_key(row_id)
        return self.first_lines.claim(key, line, check)

    def by_content(self, content: Mapping[str, Any]) -> str:
        """The content identity of the next row of this content: ``~hex``, ``~hex.2``..."""
        digest = content_hash(content)
        return content_id(digest, self._occurrences.next(digest))


def row_identity(problem: RowProblem) -> str:
    """What makes a bad row's ``invalid`` record one record, however the manifest is spelt.

    A row with an id: that id and its line (two bad rows sharing an id are two records),
    and no path, as in :func:`job_key`, so ``/abs/m.csv``, ``m.csv`` and ``dir/m.csv`` are
    one record. A row without one: the manifest's resolved path, its ``#n`` and its line.
    """
    if problem.row_id is not None and not is_row_number_id(problem.row_id):
        return f"id\0{problem.row_id}\0{problem.line}"
    resolved = _resolved(os.getcwd(), problem.file)
    return f"file\0{resolved}\0{problem.row_id}\0{problem.line}"


@functools.lru_cache(maxsize=16)
def _resolved(cwd: str, file: str) -> str:
    # Cached per working directory: a relative spelling means another file elsewhere.
    path = os.path.join(cwd, file)
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop: the absolute spelling is the best left
        return os.path.normpath(path)
