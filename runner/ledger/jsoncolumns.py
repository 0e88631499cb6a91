"""The ``req_*`` and ``meta_*`` columns of a batch of jobs, parsed as vectors.

The request and metadata texts of a batch are handed to Arrow's JSON reader as one
newline-delimited buffer: nested objects become struct columns (flattened here into
``req_<field>_<key>``), scalars bool, int64, double or string columns. What Arrow reads
differently from ``json.loads`` is kept out of that path, row by row, for
:func:`runner.ledger.exports._extra` (the per-row reading) to decide:

- a text that is not one line from ``{`` to ``}``, or that holds ``null`` (a field set to null
  is no field in a request, a text field in metadata; Arrow cannot tell it from an absent
  one), ``{}`` (an empty object is a JSON value, not a group of fields), ``NaN`` or ``Inf``
  (``json.loads`` reads NaN, Infinity and -Infinity only), a run of 19 digits (an integer
  past int64 is a JSON value; Arrow reads it as a double) or a lone ``-0`` (``json.loads``
  reads an integer, Arrow -0.0);
- a value that is a list, or an object in metadata (both written as JSON text);
- two fields that flatten to one name (the first in the request wins);
- a whole batch Arrow does not read (invalid JSON, a key given twice, a field whose type
  changes between rows).

Arrow reads a text that looks like a time as a timestamp: such fields are read again as text.
The matches above are on bytes, strings included, so they only ever send a row the slow way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

NESTED_SEPARATOR = "_"
# Rows whose text Arrow's reader would read otherwise than json.loads (see the docstring).
_SLOW = r"null|NaN|Inf|\{\s*\}|[0-9]{19}|-0([^0-9.eE]|$)|[\n\r]"
# The kind (runner.ledger.exports._kind) of each scalar type Arrow reads.
KINDS = {pa.bool_(): "bool", pa.int64(): "int", pa.float64(): "float", pa.string(): "str"}


@dataclass(slots=True)
class Fields:
    """A batch's fields as columns, and the rows to read one by one instead."""

    columns: dict[str, pa.Array]  # the fast rows' values (bool, int64, float64 or string)
    slow: np.ndarray  # bool per row: its fields are json.loads' (runner.ledger.exports)

    def present(self, name: str) -> bool:
        """Whether a fast row has a value for ``name``."""
        values = self.columns[name]
        return bool(np.any(_valid(values) & ~self.slow))


def parse_fields(request: pa.Array, metadata: pa.Array, prefixes: tuple[str, str]) -> Fields:
    """The request's fields (flattened) and metadata's, named with ``prefixes``."""
    columns: dict[str, pa.Array] = {}
    slow = _parse(request, prefixes[0], True, columns)
    slow |= _parse(metadata, prefixes[1], False, columns)
    return Fields(columns, slow)


def _parse(texts: pa.Array, prefix: str, nested: bool, out: dict[str, pa.Array]) -> np.ndarray:
    n = len(texts)
    if texts.null_count == n:
        return np.zeros(n, dtype=bool)
    plain = pc.and_(pc.starts_with(texts, "{"), pc.ends_with(texts, "}"))
    odd = pc.or_(pc.invert(plain), pc.match_substring_regex(texts, _SLOW))
    slow: np.ndarray = _valid(odd) & _true(odd)
    if slow.all():
        return slow
    lines = pc.if_else(pa.array(slow | ~_valid(texts)), "{}", texts)
    table = _read(lines)
    if table is None:
        return np.ones(n, dtype=bool)
    found: dict[str, list[pa.Array]] = {}
    for field, column in zip(table.schema, table.columns, strict=True):
        _walk(prefix + field.name, column.combine_chunks(), nested, found, slow)
    for name, sources in found.items():
        if len(sources) == 1:
            out[name] = sources[0]
        else:  # names that collide: json.loads' order decides
            for values in sources:
                slow |= _valid(values)
    return slow


def _walk(
    name: str, values: pa.Array, nested: bool, found: dict[str, list[pa.Array]], slow: np.ndarray
) -> None:
    kind = values.type
    if kind in KINDS:
        found.setdefault(name, []).append(values)
    elif pa.types.is_struct(kind) and nested:
        assert isinstance(values, pa.StructArray)
        for child, child_values in zip(kind, values.flatten(), strict=True):
            _walk(name + NESTED_SEPARATOR + child.name, child_values, nested, found, slow)
    elif not pa.types.is_null(kind):  # lists, metadata objects: JSON text, one by one
        slow |= _valid(values)


def _read(lines: pa.Array) -> pa.Table | None:
    """One row per line (None: Arrow does not read them as json.loads would, or at all)."""
    joined = pc.binary_join_element_wise(lines, "\n", "")
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32, count=len(joined) + 1,
                            offset=joined.offset * 4)  # fmt: skip
    data = joined.buffers()[2]
    assert data is not None
    buffer = data[int(offsets[0]) : int(offsets[-1])]
    options = pajson.ReadOptions(use_threads=False, block_size=max(len(buffer) + 1, 1024))
    try:
        table = pajson.read_json(pa.BufferReader(buffer), read_options=options)
        if not _all_plain(table.schema):  # timestamps: read those fields again as text
            schema = pa.schema([f.with_type(_as_text(f.type)) for f in table.schema])
            parse = pajson.ParseOptions(explicit_schema=schema)
            table = pajson.read_json(pa.BufferReader(buffer), read_options=options,
                                     parse_options=parse)  # fmt: skip
    except pa.ArrowInvalid:
        return None
    return table if table.num_rows == len(lines) else None


def _all_plain(schema: pa.Schema) -> bool:
    return all(_as_text(f.type) == f.type for f in schema)


def _as_text(kind: pa.DataType) -> pa.DataType:
    """``kind`` with every leaf that is not bool, int64, double, string or null as string."""
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_as_text(f.type)) for f in kind])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_as_text(kind.value_type)))
    if kind in KINDS or pa.types.is_null(kind):
        return kind
    return pa.string()


def _valid(values: pa.Array) -> np.ndarray:
    if values.null_count == 0:
        return np.ones(len(values), dtype=bool)
    return np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _true(values: pa.Array) -> np.ndarray:
    return np.asarray(values.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
