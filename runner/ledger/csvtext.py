"""The bytes of a CSV export, made by Arrow kernels a column at a time: the same bytes
``pyarrow.csv.CSVWriter`` writes with its defaults (quoting style "needed"), faster.

What that writer does, and so what this does: a header of every column name in double
quotes; a line per row ending in ``\\n``, its cells joined by ``,``; a null an empty cell;
every text (even empty) in double quotes, a ``"`` in it doubled, nothing else escaped
(commas, ``\\r`` and ``\\n`` kept as they are, inside the quotes); numbers, bools and
timestamps as Arrow casts them to text, never quoted. Arrow's writer casts a timestamp in
``UTC`` through the time-zone database (~0.9 CPU s per column of a 1M-job export); the same
instant cast as a naive timestamp, then ``Z``, is the same text in ~0.03 s. Arrow's quoting
style "none" cannot do the quoting instead: it refuses any value with a quote, comma or
line break in it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_CELLS = pc.JoinOptions(null_handling="replace", null_replacement="")
# Arrow scalars, not Python texts: each Python value a kernel is given is converted anew.
_QUOTE, _Z, _NEWLINE, _COMMA, _NONE = (pa.scalar(t) for t in ('"', "Z", "\n", ",", ""))
_QUOTE_BYTE = ord('"')


def header(schema: pa.Schema) -> bytes:
    """The header line: every name quoted, a ``"`` in it doubled."""
    names = (f'"{name.replace(chr(34), chr(34) * 2)}"' for name in schema.names)
    return (",".join(names) + "\n").encode()


def cells(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as its CSV cells (null stays null: an empty cell)."""
    kind = values.type
    if pa.types.is_string(kind):
        if _has_quote(values):
            values = pc.replace_substring(values, '"', '""')
        return pc.binary_join_element_wise(_QUOTE, values, _QUOTE, _NONE)
    if pa.types.is_timestamp(kind) and kind.tz == "UTC":
        naive = values.cast(pa.timestamp(kind.unit))  # the same instant, its digits as in UTC
        return pc.binary_join_element_wise(naive.cast(pa.string()), _Z, _NONE)
    plain = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_null,
             pa.types.is_timestamp)  # fmt: skip
    if any(test(kind) for test in plain):
        return values.cast(pa.string())
    raise TypeError(f"no CSV text for a column of {kind}")  # an export has no other type


def _has_quote(values: pa.ChunkedArray) -> bool:
    """Whether any text of ``values`` may hold a ``"`` (its chunks' bytes, sliced or not)."""
    for chunk in values.chunks:
        data = chunk.buffers()[2]
        if data is not None and bool((np.frombuffer(data, np.uint8) == _QUOTE_BYTE).any()):
            return True
    return False


def lines(table: pa.Table) -> pa.ChunkedArray:
    """Each row of ``table`` as its CSV line, ``\\n`` included."""
    columns = [cells(column) for column in table.columns]
    last = pc.binary_join_element_wise(columns.pop(), _NEWLINE, _NONE, options=_CELLS)
    return pc.binary_join_element_wise(*columns, last, _COMMA, options=_CELLS)


def write_rows(table: pa.Table, handle: Any) -> None:
    """Write the lines of ``table``'s rows to ``handle`` (a binary file), as they are in
    Arrow's memory (no copy to Python)."""
    for chunk in lines(table).chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)
        start, end = offsets[chunk.offset], offsets[chunk.offset + len(chunk)]
        if end > start:
            handle.write(chunk.buffers()[2][start:end])
