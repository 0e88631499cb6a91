"""The bytes of a CSV export: the same bytes ``pyarrow.csv.CSVWriter`` writes with its
defaults (quoting style "needed"), faster.

What that writer does: a header of every column name in double quotes; a line per row
ending in ``\\n``, its cells joined by ``,``; a null an empty cell; every text (even empty)
in double quotes, a ``"`` in it doubled, nothing else escaped (commas, ``\\r`` and ``\\n``
kept as they are, inside the quotes); numbers, bools and timestamps as Arrow casts them to
text, never quoted. Its one slow part: a timestamp in ``UTC`` is cast through the time-zone
database (~0.9 CPU s per column of a 1M-job export), while the same instant cast as a naive
timestamp, then ``Z``, is the same text in ~0.03 s.

So a piece of rows is cut at its ``UTC`` timestamp columns: those are cast here, and the
columns between each two are written by Arrow's writer itself with a NUL byte ending each
row instead of ``\\n``, which tells the rows apart (a text holding a NUL byte cannot: those
columns are then made cell by cell, by kernels); the parts of each row are then joined. Arrow's
quoting style "none" cannot help: it refuses any value with a quote, comma or line break.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

_ROWS_ENDED = pacsv.WriteOptions(include_header=False, eol="\x00")
_CELLS = pc.JoinOptions(null_handling="replace", null_replacement="")
# Arrow scalars, not Python texts: each Python value a kernel is given is converted anew.
_QUOTE, _Z, _NONE = (pa.scalar(t) for t in ('"', "Z", ""))
_COMMA, _NEWLINE, _NO_TEXT, _LARGE_Z = (
    pa.scalar(t, pa.large_string()) for t in (",", "\n", "", "Z")
)


def header(schema: pa.Schema) -> bytes:
    """The header line: every name quoted, a ``"`` in it doubled."""
    names = (f'"{name.replace(chr(34), chr(34) * 2)}"' for name in schema.names)
    return (",".join(names) + "\n").encode()


def lines(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """Each row of ``table`` as its CSV line, ``\\n`` included (64-bit offsets: a piece of
    long rows may pass 2 GiB)."""
    runs: list[list[int]] = [[]]  # columns by index: a name may be there twice
    for index, field in enumerate(table.schema):
        if _is_utc(field.type):
            runs += [[index], []]
        else:
            runs[-1].append(index)
    runs = [run for run in runs if run]
    parts: list[pa.Array | pa.ChunkedArray | pa.Scalar] = []
    for n, run in enumerate(runs):
        end = _NEWLINE if n == len(runs) - 1 else _COMMA
        if len(run) == 1 and _is_utc(table.schema.field(run[0]).type):
            parts += [_utc_texts(table.column(run[0]), large=True), end]  # null: an empty cell
        else:
            parts.append(_written(table.select(run), end))
    if len(parts) == 1:
        return parts[0]  # a written run: an array
    return pc.binary_join_element_wise(*parts, _NO_TEXT, options=_CELLS)


def _is_utc(kind: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(kind) and kind.tz == "UTC")


def _utc_texts(values: pa.ChunkedArray, large: bool = False) -> pa.ChunkedArray:
    """Timestamps in UTC as Arrow's writer writes them, ``2026-05-28 20:26:43.000000Z``
    (null stays null; ``large``: 64-bit offsets)."""
    naive = values.cast(pa.timestamp(values.type.unit))  # the same instant, its digits in UTC
    z, none = (_LARGE_Z, _NO_TEXT) if large else (_Z, _NONE)
    return pc.binary_join_element_wise(naive.cast(z.type), z, none)


def _written(table: pa.Table, end: pa.Scalar) -> pa.Array | pa.ChunkedArray:
    """The cells of each row as Arrow's writer writes them, then ``end``."""
    out = pa.BufferOutputStream()
    pacsv.write_csv(table, out, _ROWS_ENDED)
    data = np.frombuffer(out.getvalue(), np.uint8)  # the stream's own bytes, changed in place
    ends = np.flatnonzero(data == 0)
    if len(ends) != table.num_rows:  # a text holds a NUL byte
        return _joined_cells(table, end)
    data[ends] = ord(end.as_py())
    offsets = np.zeros(table.num_rows + 1, np.int64)
    offsets[1:] = ends + 1
    return pa.LargeStringArray.from_buffers(
        table.num_rows, pa.py_buffer(offsets), pa.py_buffer(data)
    )


def _joined_cells(table: pa.Table, end: pa.Scalar) -> pa.ChunkedArray:
    """The cells of each row made by kernels, then ``end`` (slower than Arrow's writer)."""
    cells = [_cells(column).cast(pa.large_string()) for column in table.columns]
    last = pc.binary_join_element_wise(cells.pop(), end, _NO_TEXT, options=_CELLS)
    return pc.binary_join_element_wise(*cells, last, _COMMA, options=_CELLS)


def _cells(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as its CSV cells (null stays null: an empty cell)."""
    kind = values.type
    if pa.types.is_string(kind):
        escaped = pc.replace_substring(values, '"', '""')
        return pc.binary_join_element_wise(_QUOTE, escaped, _QUOTE, _NONE)
    if _is_utc(kind):
        return _utc_texts(values)
    plain = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_null,
             pa.types.is_timestamp)  # fmt: skip
    if any(test(kind) for test in plain):
        return values.cast(pa.string())
    raise TypeError(f"no CSV text for a column of {kind}")  # an export has no other type


def write_rows(table: pa.Table, handle: Any) -> None:
    """Write the lines of ``table``'s rows to ``handle`` (a binary file), as they are in
    Arrow's memory (no copy to Python)."""
    made = lines(table)
    for chunk in made.chunks if isinstance(made, pa.ChunkedArray) else [made]:
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)
        start, end = offsets[chunk.offset], offsets[chunk.offset + len(chunk)]
        if end > start:
            handle.write(chunk.buffers()[2][start:end])
