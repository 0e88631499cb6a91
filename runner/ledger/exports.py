"""The columns of ``runner export``: the folded ledger made easy to query.

One row per job, with, beside every column of the ledger (``request`` and ``metadata``
kept as JSON text):

- ``superseded``: bool, an older version of a row recorded again
  (:mod:`runner.ledger.versions`); only true under ``--all-versions``.
- ``req_<field>``: each field of the ``request`` column (the request as the manifest gives
  it: local paths, not upload URLs). A nested object's fields are
  ``req_<field>_<key>`` (``image_size`` given as ``{"width": 1024, "height": 768}`` gives
  ``req_image_size_width`` and ``req_image_size_height``; given as ``"square_hd"``, it is
  ``req_image_size``). Lists (``image_urls``, ``loras``) are JSON text.
- ``meta_<column>``: each metadata column of the manifest row (text).

Endpoints take different fields: the export has the union of every job's columns, null
where a job has no such field. A column's type is the narrowest that holds all its values:
bool, int64, float64 (ints and floats mixed), else text (a value that is not text written
as JSON). Where two fields would flatten to one name, the first in the request wins.
Money (``estimated_usd``, ``billed_usd``) is ``decimal(18,6)``: rounded half-even to the
micro-dollar, in every format (the ledger's parts keep the exact value, at 18 places).

The jobs are read twice in batches (once for the columns and their types, once to write),
so memory holds one batch of parsed requests. The texts are parsed as vectors
(:mod:`runner.ledger.jsoncolumns`); the few rows Arrow's JSON reader would read otherwise
than ``json.loads`` are read here, one by one, as they always were.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.jsoncolumns import KINDS, NESTED_SEPARATOR, Fields, parse_fields

REQUEST_PREFIX = "req_"
METADATA_PREFIX = "meta_"
EXPORT_MONEY = pa.decimal128(18, 6)
MONEY_COLUMNS = ("estimated_usd", "billed_usd", "reroll_usd")
BATCH_ROWS = 50_000
TEXT_COLUMNS = ("request", "metadata")  # what add_kinds reads
SLOW = "slow"  # add_kinds' parsed fields: the rows read one by one (no req_/meta_ name)
_INT64 = (-(2**63), 2**63 - 1)


# json.loads gives exactly these types, so a lookup by type() (no isinstance chain).
_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def _kind(value: Any) -> str:
    kind = _KINDS.get(type(value), "json")
    if kind == "int" and not _INT64[0] <= value <= _INT64[1]:
        return "json"
    return kind


def flatten_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """``{"req_prompt": ..., "req_image_size_width": ...}``: a request's fields as columns."""
    out: dict[str, Any] = {}
    _flatten(request, REQUEST_PREFIX, out)
    return out


def _flatten(value: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, item in value.items():
        name = prefix + key
        if type(item) is dict and item:
            _flatten(item, name + NESTED_SEPARATOR, out)
        elif item is not None and name not in out:
            out[name] = item


def _parsed(text: str | None) -> Mapping[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if type(value) is dict else {}


def _extra(request: str | None, metadata: str | None) -> dict[str, Any]:
    fields = flatten_request(_parsed(request))
    for name, value in _parsed(metadata).items():
        fields.setdefault(f"{METADATA_PREFIX}{name}", value)
    return fields


def _type_of(kinds: set[str]) -> pa.DataType:
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds and kinds <= {"int", "float"}:
        return pa.float64()
    return pa.string()


def export_schema(jobs: pa.Table) -> pa.Schema:
    """The export's columns for these folded jobs: the ledger's, then req_*, then meta_*."""
    kinds: dict[str, set[str]] = {}
    add_kinds(jobs, kinds)
    return schema_of(jobs.schema, kinds)


def add_kinds(jobs: pa.Table, kinds: dict[str, set[str]]) -> pa.Table | None:
    """Add the kinds of value each req_*/meta_* column of ``jobs`` holds to ``kinds``.

    Returns the fields parsed, when ``jobs`` is one batch (not over BATCH_ROWS rows, one
    chunk): :func:`export_batches` takes them back (``parsed``) instead of parsing again."""
    batches = jobs.select(list(TEXT_COLUMNS)).to_batches(max_chunksize=BATCH_ROWS)
    for batch in batches:
        fields = _fields(batch)
        for name, values in fields.columns.items():
            if fields.present(name):
                kinds.setdefault(name, set()).add(KINDS[values.type])
        for row in _slow_rows(batch, fields.slow):
            for name, value in row.items():
                kinds.setdefault(name, set()).add(_kind(value))
    if len(batches) != 1:
        return None
    return pa.table({**fields.columns, SLOW: pa.array(fields.slow, pa.bool_())})


def _unpacked(parsed: pa.Table) -> Fields:
    columns = {name: parsed[name].combine_chunks() for name in parsed.column_names}
    slow = columns.pop(SLOW)
    return Fields(columns, np.asarray(slow.to_numpy(zero_copy_only=False), dtype=bool))


def _fields(batch: pa.RecordBatch) -> Fields:
    return parse_fields(batch["request"], batch["metadata"], (REQUEST_PREFIX, METADATA_PREFIX))


def _slow_rows(batch: pa.RecordBatch, slow: np.ndarray) -> list[dict[str, Any]]:
    """The fields of the rows marked ``slow``, read one by one."""
    if not slow.any():
        return []
    rows = pa.array(np.flatnonzero(slow))
    requests = batch["request"].take(rows).to_pylist()
    metadata = batch["metadata"].take(rows).to_pylist()
    return [_extra(r, m) for r, m in zip(requests, metadata, strict=True)]


def schema_of(ledger: pa.Schema, kinds: Mapping[str, set[str]]) -> pa.Schema:
    """The export's columns: those of the folded ``ledger`` schema, then req_* and meta_*."""
    taken = set(ledger.names)
    extra = [pa.field(name, _type_of(kinds[name])) for name in sorted(kinds) if name not in taken]
    fields = [f.with_type(EXPORT_MONEY) if f.name in MONEY_COLUMNS else f for f in ledger]
    return pa.schema([*fields, *extra], metadata=ledger.metadata)


def export_batches(
    jobs: pa.Table, schema: pa.Schema, parsed: pa.Table | None = None
) -> Iterator[pa.RecordBatch]:
    """The folded jobs as record batches of ``schema`` (from :func:`export_schema`);
    ``parsed``: what :func:`add_kinds` returned for these jobs (in one chunk or more), if
    it did."""
    extra = [f for f in schema if f.name not in jobs.column_names]
    if parsed is not None and parsed.num_rows != jobs.num_rows:
        parsed = None
    offset = 0
    for batch in jobs.to_batches(max_chunksize=BATCH_ROWS):
        if parsed is None:
            fields = _fields(batch)
        else:
            fields = _unpacked(parsed.slice(offset, batch.num_rows))
        offset += batch.num_rows
        slow = fields.slow.copy()
        for field in extra:
            values = fields.columns.get(field.name)
            if values is not None and not _castable(values.type, field.type):
                slow |= _valid(values)  # a double as text: was it 5 or 5.0? json.loads knows
        rows = _slow_rows(batch, slow)
        mask = pa.array(slow) if rows else None
        columns: list[pa.Array] = []
        for field in schema:
            if field.name in MONEY_COLUMNS:
                columns.append(export_money(batch[field.name]))
            elif field.name in batch.schema.names:
                columns.append(batch[field.name])
        for field in extra:
            values = fields.columns.get(field.name)
            if values is None:
                column = pa.nulls(batch.num_rows, field.type)
            else:
                column = values if values.type == field.type else _cast(values, field.type)
            if mask is not None:
                cells = [_cell(row.get(field.name), field.type) for row in rows]
                column = pc.replace_with_mask(column, mask, pa.array(cells, field.type))
            columns.append(column)
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def _castable(kind: pa.DataType, to: pa.DataType) -> bool:
    """Whether Arrow's cast gives what :func:`_cell` makes of json.loads' value."""
    if kind == to:
        return True
    if pa.types.is_floating(to):
        return bool(pa.types.is_integer(kind))
    return bool(pa.types.is_string(to) and (kind == pa.bool_() or pa.types.is_integer(kind)))


def _cast(values: pa.Array, to: pa.DataType) -> pa.Array:
    # An integer past 2**53 as a float: rounded to the nearest, as float() does.
    return pc.cast(values, to, safe=False)


def _valid(values: pa.Array) -> np.ndarray:
    return np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def export_money(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Exact ledger money as ``decimal(18,6)``, rounded half-even to the micro-dollar."""
    rounded = pc.round(values, ndigits=6, round_mode="half_to_even")
    return pc.cast(rounded, EXPORT_MONEY)


def _cell(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if pa.types.is_floating(kind):
        return float(value)
    return value


def rebatched(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in tables of ``rows`` rows (the last fewer), one chunk each."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        held.append(table)
        count += table.num_rows
        while count >= rows:
            joined = pa.concat_tables(held)
            held = [joined.slice(rows)]
            count -= rows
            yield joined.slice(0, rows).combine_chunks()
            del joined
    if count:
        yield pa.concat_tables(held).combine_chunks()
