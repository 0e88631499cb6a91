"""The export's req_*/meta_* columns parsed as vectors (runner.ledger.jsoncolumns) are those the
per-row reading made (``json.loads`` per text, the reference below, as export did before), byte
for byte in every format: on hypothesis requests and metadata with every kind of JSON value,
nesting, names that collide, texts Arrow reads otherwise than ``json.loads`` (null, NaN,
Infinity, -0, integers past int64, empty objects, lists, times), invalid ones, in batches
that mix them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.ledger import exportfile, exports
from runner.ledger.exports import (
    BATCH_ROWS,
    MONEY_COLUMNS,
    _cell,
    _extra,
    _kind,
    export_batches,
    export_money,
    export_schema,
    schema_of,
)
from runner.ledger.jsoncolumns import parse_fields
from runner.ledger.schema import LEDGER_SCHEMA
from tests.torture_support import LONG

FUZZ = settings(
    max_examples=150 if LONG else 40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _reference_schema(jobs: pa.Table) -> pa.Schema:
    kinds: dict[str, set[str]] = {}
    for request, metadata in zip(jobs["request"].to_pylist(), jobs["metadata"].to_pylist(),
                                 strict=True):  # fmt: skip
        for name, value in _extra(request, metadata).items():
            kinds.setdefault(name, set()).add(_kind(value))
    return schema_of(jobs.schema, kinds)


def _reference_batches(jobs: pa.Table, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The per-row export of each batch, as it was before the vectors."""
    extra = [f for f in schema if f.name not in jobs.column_names]
    for batch in jobs.to_batches(max_chunksize=BATCH_ROWS):
        texts = zip(batch["request"].to_pylist(), batch["metadata"].to_pylist(), strict=True)
        rows = [_extra(request, metadata) for request, metadata in texts]
        columns: list[pa.Array] = []
        for field in schema:
            if field.name in MONEY_COLUMNS:
                columns.append(export_money(batch[field.name]))
            elif field.name in batch.schema.names:
                columns.append(batch[field.name])
        for field in extra:
            values = [_cell(row.get(field.name), field.type) for row in rows]
            columns.append(pa.array(values, field.type))
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def _jobs(texts: list[tuple[str | None, str | None]]) -> pa.Table:
    n = len(texts)
    columns = {f.name: pa.nulls(n, f.type) for f in LEDGER_SCHEMA}
    columns["seq"] = pa.array(np.arange(1, n + 1), pa.int64())
    columns["job_key"] = pa.array([f"k{i}" for i in range(n)])
    columns["request"] = pa.array([r for r, _m in texts], pa.string())
    columns["metadata"] = pa.array([m for _r, m in texts], pa.string())
    return pa.Table.from_pydict(columns, schema=LEDGER_SCHEMA)


def _written(batches: Iterator[pa.RecordBatch], schema: pa.Schema, fmt: str) -> bytes:
    out = io.BytesIO()
    exportfile.write_batches(batches, schema, out, fmt)
    return out.getvalue()


def _check(texts: list[tuple[str | None, str | None]], formats: tuple[str, ...]) -> None:
    jobs = _jobs(texts)
    expected_schema = _reference_schema(jobs)
    schema = export_schema(jobs)
    assert schema == expected_schema
    assert schema.names == expected_schema.names
    for fmt in formats:
        try:
            expected = _written(_reference_batches(jobs, schema), schema, fmt)
        except (pa.ArrowException, ValueError):  # the per-row export fails too
            with pytest.raises((pa.ArrowException, ValueError)):
                _written(export_batches(jobs, schema), schema, fmt)
            continue
        assert _written(export_batches(jobs, schema), schema, fmt) == expected


NAMES = ["a", "b", "a_b", "b_c", "image_size", "width", "", "é", "x y"]
KEYS = st.sampled_from([*NAMES, "null"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 10**18, 10**19]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.1, 1e300, 5.0, 1e-320, 2.5e-8]),
    st.text(alphabet='ab {}[]"\\\n\t:,0-9énul\u2028😀', max_size=8),
    st.sampled_from(
        ["2024-01-01", "2024-01-01T10:00:00", "2024-01-01 10:00:00Z", "null", "NaN", "-0", "12:30"]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=6,
)
OBJECTS = st.dictionaries(KEYS, VALUES, max_size=5)
# What Arrow's reader takes (no null, list or empty object): fields of one type each.
PLAIN = {
    "bool": st.booleans(),
    "int": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(alphabet='ab "\\\t:,0-9é\u2028😀', max_size=6),
    "time": st.sampled_from(["2024-01-01", "2024-01-01T10:00:00", "2024-01-01 10:00"]),
}
SHAPES = st.recursive(
    st.sampled_from(sorted(PLAIN)),
    lambda inner: st.dictionaries(st.sampled_from(NAMES), inner, min_size=1, max_size=3),
    max_leaves=6,
)


def _fill(draw: Any, shape: Any) -> Any:
    """A value of ``shape``: some of its fields, each of its type."""
    if isinstance(shape, str):
        return draw(PLAIN[shape])
    keys = draw(st.lists(st.sampled_from(sorted(shape)), min_size=1, unique=True))
    return {key: _fill(draw, shape[key]) for key in keys}


@st.composite
def texts(draw: Any, shapes: list[dict[str, Any]]) -> str | None:
    """A request or metadata text: mostly objects of one of ``shapes`` (as most rows are),
    else any JSON object, none, or a text that is not one."""
    kind = draw(st.sampled_from(["plain"] * 12 + ["json", "none", "raw", "nested-plain"]))
    if kind == "none":
        return None
    if kind == "raw":
        return str(draw(st.sampled_from([
            "", "{}", " {\"a\": 1}", "{\"a\": 1} ", "[1]", "5", "\"x\"", "null", "{\"a\":1,}",
            "{\"a\":1,\"a\":2}", "{\"a\":1}{\"b\":2}", "{\"a\":-0}", "{\"a\":Inf}",
            "{\"a\":Infinity}", "{\"a\":01}", "{\"a\":\"\\ud83d\\ude00\"}", "{\n\"a\": 1}",
            "{\"a\":123456789012345678901}", "{\"a\":{}}", "{\"a\":[]}", "{\"a\":1e400}",
            "{\"a\":{\"b\":1},\"a_b\":2}", "{\"a_b\":2,\"a\":{\"b\":1}}", "{\"a\":\"x\ty\"}",
        ])))  # fmt: skip
    value = _fill(draw, draw(st.sampled_from(shapes))) if kind == "plain" else draw(OBJECTS)
    if kind == "nested-plain":  # what most requests are: the vector path's
        value = {"prompt": draw(st.text(max_size=6)), "image_size": {"width": 8, "height": 8}}
    sort = draw(st.booleans())
    compact = draw(st.booleans())
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(value, sort_keys=sort, separators=separators,
                      ensure_ascii=draw(st.booleans()))  # fmt: skip


@st.composite
def ledgers(draw: Any) -> list[tuple[str | None, str | None]]:
    """Rows of requests and metadata, each of two shapes (a field's type may differ)."""
    names = st.sampled_from(NAMES)
    request = draw(st.lists(st.dictionaries(names, SHAPES, min_size=1), min_size=2, max_size=2))
    flat = st.dictionaries(names, st.sampled_from(sorted(PLAIN)), min_size=1)  # as a manifest's
    metadata = draw(st.lists(st.one_of(flat, flat, st.dictionaries(names, SHAPES, min_size=1)),
                             min_size=2, max_size=2))  # fmt: skip
    rows = st.tuples(texts(request), texts(metadata))
    drawn: list[tuple[str | None, str | None]] = draw(st.lists(rows, min_size=1, max_size=40))
    return drawn


@FUZZ
@given(ledgers(), st.integers(1, 12))
def test_columns_are_those_of_the_per_row_reading(
    rows: list[tuple[str | None, str | None]], batch_rows: int
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exports, "BATCH_ROWS", batch_rows)
        _check(rows, ("parquet", "csv", "jsonl"))


def _plain(i: int) -> tuple[str | None, str | None]:
    request = {"prompt": f"mug {i}", "seed": i, "guidance_scale": 3.5 if i % 2 else 3,
               "image_size": {"width": 512, "height": 768} if i % 3 else "square_hd",
               "sync_mode": i % 5 == 0}  # fmt: skip
    metadata = {"sku": f"SKU-{i}", "shelf": "AB"[i % 2], "date": "2024-01-0" + str(1 + i % 9)}
    return json.dumps(request, sort_keys=True, separators=(",", ":")), json.dumps(metadata)


def test_plain_rows_take_the_vector_path_and_match() -> None:
    rows = [_plain(i) for i in range(300)]
    # One endpoint's rows (image_size a size everywhere): not one row goes json.loads' way.
    sized = [_plain(i) for i in range(300) if i % 3]
    jobs = _jobs(sized)
    fields = parse_fields(jobs["request"].combine_chunks(), jobs["metadata"].combine_chunks(),
                          ("req_", "meta_"))  # fmt: skip
    assert not fields.slow.any()
    assert fields.columns["meta_date"].type == pa.string()  # a time, kept as its text
    assert fields.columns["req_image_size_width"].type == pa.int64()
    assert fields.columns["req_guidance_scale"].type == pa.float64()
    # With a list, a null and a field of two types mixed in: equal, whatever path each row took.
    rows[7] = (json.dumps({"loras": [{"path": "a", "scale": 0.5}], "seed": 7}), None)
    rows[9] = (json.dumps({"prompt": None, "seed": 9}), json.dumps({"sku": None}))
    _check(rows, ("parquet", "csv", "jsonl"))
    _check(sized, ("parquet", "csv", "jsonl"))


# Each a case Arrow's reader reads otherwise than json.loads, beside plain rows.
CASES: dict[str, list[tuple[str | None, str | None]]] = {
    "null in metadata": [(None, '{"n": null}')],
    "null beside an int": [(None, '{"n": 5}'), (None, '{"n": null}')],
    "null in a request": [('{"a": null, "b": 1}', None), ('{"a": 2}', None)],
    "minus zero": [('{"a": -0}', None), ('{"a": 1.5}', None)],
    "past int64": [('{"a": 123456789012345678901}', None), ('{"a": 1}', None)],
    "empty object": [('{"a": {}}', None), ('{"a": {"b": 1}}', None)],
    "nan and infinity": [('{"a": NaN}', None), ('{"a": Infinity}', None), ('{"a": 1.5}', None)],
    "inf": [('{"a": Inf}', None), ('{"a": 1}', None)],
    "lists": [('{"a": [1, 2.5, "x"]}', '{"m": {"x": 1}}'), ('{"a": [1]}', '{"m": "y"}')],
    "names that collide": [
        ('{"a": {"b": 1}, "a_b": 2}', None),
        ('{"a_b": 2, "a": {"b": 1}}', None),
    ],
    "times": [('{"t": "2024-01-01"}', '{"d": "2024-01-01 10:00"}'), ('{"t": 5}', None)],
    "an int as text": [('{"a": 5}', None), ('{"a": "x"}', None)],
    "a double as text": [('{"a": 5}', None), ('{"a": 2.5}', None), ('{"a": "x"}', None)],
    "lines": [('{"a": 1,\n"b": 2}', '{\r"m": "x"}'), ('{"a": 1}', None)],
    "spaces": [(' {"a": 1}', '{"m": 1} '), ('{"a": 2}', '{"m": 2}')],
    "not objects": [("[1]", "5"), ('"x"', ""), ('{"a": 1}{"b": 2}', '{"a": 1,}')],
    "a key twice": [('{"a": 1, "a": 2.5}', '{"m": "x", "m": 1}')],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch_rows", [1, 2, 50])
def test_texts_arrow_reads_otherwise(case: str, batch_rows: int) -> None:
    rows = [*CASES[case], *[_plain(i) for i in range(3)], *CASES[case]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exports, "BATCH_ROWS", batch_rows)
        _check(rows, ("parquet", "csv", "jsonl"))


def test_fields_parsed_for_the_kinds_are_those_the_export_parses() -> None:
    requests = ['{"prompt": "a", "seed": 1}', '{"seed": 2.5, "x": null}', None, '{"n": [1]}']
    metadata = ['{"sku": "A"}', None, '{"sku": 3}', '{"sku": {"a": 1}}']
    jobs = pa.table({"request": requests * 3, "metadata": metadata * 3})
    kinds: dict[str, set[str]] = {}
    parsed = exports.add_kinds(jobs, kinds)
    assert parsed is not None and exports.SLOW in parsed.column_names
    schema = pa.schema([*jobs.schema, *(pa.field(n, exports._type_of(k)) for n, k in
                                          sorted(kinds.items()))])  # fmt: skip
    again = list(export_batches(jobs, schema))
    assert list(export_batches(jobs, schema, parsed)) == again
    many = pa.table(
        {"request": ['{"seed": 1}'] * (BATCH_ROWS + 1), "metadata": [None] * (BATCH_ROWS + 1)}
    )
    assert exports.add_kinds(many, {}) is None  # two batches: parsed again, batch by batch
