"""The CSV export's own writer writes the bytes Arrow's CSV writer (quoting "needed", the
export's writer before it) writes of the same table."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.ledger import csvtext, texts
from runner.ledger.exports import EXPORT_MONEY

AWKWARD = [
    'say "hi"',
    '"',
    "a,b",
    "line\nbreak",
    "carriage\rreturn",
    "\r\n",
    "",
    None,
    "ünïcödé 😀 €",
    " padded ",
    '""',
    "tab\there",
]


def _arrow(table: pa.Table) -> bytes:
    out = io.BytesIO()
    with pacsv.CSVWriter(out, table.schema) as writer:
        writer.write_table(table)
    return out.getvalue()


def _ours(table: pa.Table) -> bytes:
    out = io.BytesIO()
    out.write(csvtext.header(table.schema))
    csvtext.write_rows(table, out)
    return out.getvalue()


def _at(year: int, month: int, day: int, *time: int) -> datetime:
    hour, minute, second, micro = (*time, 0, 0, 0, 0)[:4]
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def _awkward_table() -> pa.Table:
    n = len(AWKWARD)
    times = [_at(2026, 5, 28, 20, 26, 43), _at(2026, 5, 28, 20, 26, 43, 1000), None,
             _at(1969, 12, 31, 23, 59, 59, 999999), _at(1, 1, 1), _at(9999, 12, 31, 23, 59, 59),
             _at(2026, 1, 1, 0, 0, 0, 1), _at(2026, 1, 1, 0, 0, 0, 500000)]  # fmt: skip
    money = [Decimal("0.025"), None, Decimal("0"), Decimal("12.5"), Decimal("0.000001"),
             Decimal("-3.100000"), Decimal("1000")]  # fmt: skip
    doubles = [1.5, None, 1e20, 0.1, -0.0, float("nan"), float("inf"), 1 / 3, 1e-7]
    return pa.table(
        {
            "text": pa.array(AWKWARD),
            "int64": pa.array([None, 0, -1, 2**63 - 1, -(2**63), *range(n - 5)], pa.int64()),
            "int32": pa.array([1, None, *range(n - 2)], pa.int32()),
            "double": pa.array((doubles * 2)[:n], pa.float64()),
            "bool": pa.array([True, False, None] * (n // 3), pa.bool_()),
            "at": pa.array((times * 2)[:n], pa.timestamp("us", tz="UTC")),
            "naive": pa.array(
                [t and t.replace(tzinfo=None) for t in (times * 2)[:n]], pa.timestamp("us")
            ),
            "seconds": pa.array((times * 2)[:n], pa.timestamp("s", tz="UTC")),
            "usd": texts.usd_texts(pa.array((money * 2)[:n], EXPORT_MONEY)),
            "null": pa.nulls(n),
            'a "quoted", name\n': pa.array(AWKWARD[::-1]),
        }
    )


def _with_nul(table: pa.Table) -> pa.Table:
    """A NUL byte in a text of the columns after the last timestamp."""
    texts = ["nul\x00byte", *AWKWARD[1:]]
    return table.append_column("nul", pa.array(texts))


@pytest.mark.parametrize("made", [_awkward_table, lambda: _with_nul(_awkward_table())])
def test_awkward_values_are_written_as_arrow_writes_them(made: Callable[[], pa.Table]) -> None:
    table = made()
    ours = _ours(table)
    assert ours == _arrow(table)
    assert b'"say ""hi""",' in ours and b'"line\nbreak"' in ours and b"\n," in ours


@pytest.mark.parametrize("made", [_awkward_table, lambda: _with_nul(_awkward_table())])
def test_slices_and_chunks_are_written_as_arrow_writes_them(made: Callable[[], pa.Table]) -> None:
    table = made()
    chunked = pa.concat_tables([table.slice(1, 5), table.slice(3), table.slice(0, 0)])
    assert chunked.column(0).num_chunks == 3
    assert _ours(chunked) == _arrow(chunked)
    mixed = chunked.set_column(0, "text", chunked.column(0).combine_chunks())
    assert _ours(mixed) == _arrow(mixed)
    assert _ours(table.slice(2, 4)) == _arrow(table.slice(2, 4))


@pytest.mark.parametrize("made", [_awkward_table, lambda: _with_nul(_awkward_table())])
def test_no_rows_is_the_header_alone(made: Callable[[], pa.Table]) -> None:
    empty = made().slice(0, 0)
    assert _ours(empty) == _arrow(empty)


def test_rows_ending_in_a_timestamp_or_with_no_timestamp() -> None:
    table = _awkward_table()
    for names in (["text", "at"], ["at", "seconds"], ["text", "usd"], ["at"], ["text"]):
        assert _ours(table.select(names)) == _arrow(table.select(names))
    twice = pa.table([table["text"], table["at"], table["usd"]], names=["x", "x", "x"])
    assert _ours(twice) == _arrow(twice)


@pytest.mark.parametrize(
    "values",
    [
        pa.array([b"x"]),
        pa.array(["a"], pa.large_string()),
        pa.array(["a"]).dictionary_encode(),
    ],
)
def test_texts_with_a_nul_byte_beside_a_type_the_export_never_has_are_refused(
    values: pa.Array,
) -> None:
    table = pa.table({"nul": pa.array(["a\x00"]), "v": values})
    with pytest.raises(TypeError, match="no CSV text"):
        csvtext.write_rows(table, io.BytesIO())


_micros = st.integers(-(2**50), 2**50)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.none() | st.text(),
            st.none() | st.integers(-(2**63), 2**63 - 1),
            st.none() | st.floats(allow_nan=True, allow_infinity=True),
            st.none() | st.booleans(),
            st.none() | _micros,
        ),
        max_size=12,
    )
)
def test_any_values_are_written_as_arrow_writes_them(rows: list[tuple[object, ...]]) -> None:
    columns = list(zip(*rows, strict=True)) or [()] * 5
    text, ints, floats, bools, micros = (list(column) for column in columns)
    table = pa.table(
        {
            "text": pa.array(text, pa.string()),
            "int": pa.array(ints, pa.int64()),
            "float": pa.array(floats, pa.float64()),
            "bool": pa.array(bools, pa.bool_()),
            "at": pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )
    assert _ours(table) == _arrow(table)
