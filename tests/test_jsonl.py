"""The vector JSONL writer (runner.ledger.jsonl) against the row-by-row one it replaced
(runner.ledger.texts.write_jsonl_rows, json.dumps of each row): the same bytes, for seeded
random rows and hand-picked awkward ones, and the vector path taken for ordinary rows."""

from __future__ import annotations

import io
import json
import random
import struct
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from runner.ledger import jsonl, texts
from runner.ledger.exports import EXPORT_MONEY
from runner.ledger.schema import OUTPUT_TYPE

_METADATA = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode  # as the ledger writes
AWKWARD_TEXTS = [
    "", " ", '"', "\\", '\\"', "\n", "\r\n", "\t", "\b", "\f", "\x00", "\x01", "\x0b", "\x1f",
    "\x7f", "\x80", "é", "日本", "\u2028", "\u2029", "\ufeff", "😀", "a\\nb", "</script>",
    '{"a": 1}', "null", "true", "1e5", "-0", "NaN", "2026-05-28 20:26:43.000000Z",
]  # fmt: skip
AWKWARD_FLOATS = [
    0.0, -0.0, 5.0, -5.0, 0.1, 1e-4, 1e-5, 9.99e-5, 1.5e-4, 1e14, 1e15, 1e16, 1e17, 1e22,
    123456789012345.6, 1234567890123456.7, 9999999999999998.0, 2.0**53, 2.0**63, 5e-324,
    2.2250738585072014e-308, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf"),
    0.30000000000000004, 1 / 3, 100.0, 1e3,
]  # fmt: skip
AWKWARD_METADATA = [
    "{}", "{ }", '{"a": "1"}', '{"a":"1"}', '{"b": "1", "a": "2"}', '{"a": "1", "a": "2"}',
    '{"a": "1", "b": "2", "a": "3"}', '{"a": 1}', '{"a": 1.0}', '{"a": null}', '{"a": true}',
    '{"a": [1, 2]}', '{"a": {"b": "c"}}', '{"é": "\\u00e9"}', '{"é": "é"}', '{"a": "\\"q\\""}',
    '{"a": "x\\", ", "b": "y"}', '{"a": "\\n"}', '{"a": "\\u0001"}', '{"a": "\\/"}',
    '{"": ""}', '{"a": ""}', '"text"', "5", "[]", "[1]", "null", " {}", '{"a": "1"} ',
    '{"a": "\u2028"}', '{"a": "1",  "b": "2"}', '{"a":  "1"}', '{"a" : "1"}', '{"a": "1" }',
    '{"😀": "x", "a": "y"}', '{"a": "y", "😀": "x"}',
]  # fmt: skip


def _text(rng: random.Random) -> str | None:
    if rng.random() < 0.1:
        return None
    if rng.random() < 0.3:
        return rng.choice(AWKWARD_TEXTS)
    pool = "abc XYZ019-_/:.,é日😀" + ('"\\\n\t\x01' if rng.random() < 0.2 else "")
    return "".join(rng.choice(pool) for _ in range(rng.randrange(12)))


def _float(rng: random.Random) -> float | None:
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.3:
        return rng.choice(AWKWARD_FLOATS)
    if pick < 0.5:
        return float(struct.unpack("<d", rng.randbytes(8))[0])
    return round(rng.random() * 10.0 ** rng.randrange(-7, 19), rng.randrange(8))


def _int(rng: random.Random) -> int | None:
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.3:
        return rng.choice([0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 10**18])
    return rng.randrange(-(10**6), 10**6)


def _time(rng: random.Random) -> datetime | None:
    if rng.random() < 0.1:
        return None
    start = (
        datetime(1, 1, 1, tzinfo=UTC) if rng.random() < 0.1 else datetime(2026, 1, 1, tzinfo=UTC)
    )
    moment = start + timedelta(seconds=rng.randrange(10**9))
    if rng.random() < 0.05:
        return rng.choice([datetime(1, 1, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC)])
    return moment.replace(microsecond=rng.choice([0, 0, 1, 999_999, rng.randrange(10**6)]))


def _money(rng: random.Random) -> Decimal | None:
    if rng.random() < 0.1:
        return None
    units = rng.choice([0, 1, 10, 25_000, 3_000, 1_000_000, 10**12 - 1, rng.randrange(10**12)])
    return Decimal(units * rng.choice([1, -1])).scaleb(-6)


def _metadata(rng: random.Random) -> str | None:
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.3:
        return rng.choice(AWKWARD_METADATA)
    keys = [_text(rng) or "k" for _ in range(rng.randrange(5))]
    return _METADATA({key: _text(rng) or "" for key in keys})


def _maybe(rng: random.Random, make: Any, p: float = 0.1) -> Any:
    return None if rng.random() < p else make()


def random_batch(seed: int, rows: int) -> pa.RecordBatch:
    """Rows with the export's kinds of column, each value drawn from ``seed``."""
    rng = random.Random(seed)

    def output() -> dict[str, Any] | None:
        def one() -> dict[str, Any]:
            width = _maybe(rng, lambda: rng.randrange(-(2**31), 2**31))
            url, kind, sha = _text(rng), _text(rng), _text(rng)
            return {"url": url, "width": width, "height": 768, "content_type": kind,
                    "local_path": None, "sha256": sha}  # fmt: skip

        return _maybe(rng, one)  # type: ignore[no-any-return]

    def listed(make: Any) -> Any:
        return _maybe(rng, lambda: [make() for _ in range(rng.randrange(4))])

    columns = {
        "seq": pa.array([rng.randrange(10**9) for _ in range(rows)], pa.int64()),
        "at": pa.array([_time(rng) for _ in range(rows)], pa.timestamp("us", tz="UTC")),
        "state": pa.array([_text(rng) for _ in range(rows)], pa.string()),
        # Columns without nulls (written with their quotes as words) and one of nulls only.
        "job_key": pa.array([_text(rng) or "" for _ in range(rows)], pa.string()),
        "submitted_at": pa.array(
            [_time(rng) or datetime(1, 1, 1, tzinfo=UTC) for _ in range(rows)],
            pa.timestamp("us", tz="UTC"),
        ),
        "billed_usd": pa.array([_money(rng) or Decimal(0) for _ in range(rows)], EXPORT_MONEY),
        "variant": pa.array([_int(rng) and rng.randrange(9) for _ in range(rows)], pa.int32()),
        "request": pa.array(
            [_maybe(rng, lambda: json.dumps({"p": _text(rng)})) for _ in range(rows)], pa.string()
        ),
        "metadata": pa.array([_metadata(rng) for _ in range(rows)], pa.string()),
        "estimated_usd": pa.array([_money(rng) for _ in range(rows)], EXPORT_MONEY),
        "queue_s": pa.array([_float(rng) for _ in range(rows)], pa.float64()),
        "outputs": pa.array([listed(output) for _ in range(rows)], pa.list_(OUTPUT_TYPE)),
        "nsfw": pa.array(
            [listed(lambda: _maybe(rng, lambda: rng.random() < 0.5)) for _ in range(rows)],
            pa.list_(pa.bool_()),
        ),
        "retryable": pa.array(
            [_maybe(rng, lambda: rng.random() < 0.5, 0.5) for _ in range(rows)], pa.bool_()
        ),
        "duplicate_request_ids": pa.array(
            [listed(lambda: _text(rng)) for _ in range(rows)], pa.list_(pa.string())
        ),
        "superseded": pa.array([rng.random() < 0.1 for _ in range(rows)], pa.bool_()),
        'meta_é "q"': pa.array([_text(rng) for _ in range(rows)], pa.string()),
        "req_seed": pa.array([_int(rng) for _ in range(rows)], pa.int64()),
        "req_guidance": pa.array([_float(rng) for _ in range(rows)], pa.float64()),
        "req_nothing": pa.nulls(rows, pa.string()),
    }
    return pa.RecordBatch.from_pydict(columns)


def _both(batch: pa.RecordBatch, piece_bytes: int = jsonl.PIECE_BYTES) -> tuple[bytes, bytes]:
    fast, rows = io.BytesIO(), io.BytesIO()
    jsonl.write_jsonl(batch, fast, piece_bytes=piece_bytes)
    texts.write_jsonl_rows(batch, rows)
    return fast.getvalue(), rows.getvalue()


@pytest.mark.parametrize("seed", range(6))
def test_random_rows_give_the_bytes_json_dumps_writes(seed: int) -> None:
    batch = random_batch(seed, 700)
    for piece in (batch, batch.slice(3, 400)):  # an offset into every buffer
        fast, rows = _both(piece, piece_bytes=[jsonl.PIECE_BYTES, 20_000][seed % 2])
        assert fast == rows


def test_a_piece_whose_lines_pass_2_gib_is_written_in_halves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lines past a text array's 2 GiB (megabyte prompts side by side) overflow its offsets;
    # the piece is split until each half fits, and the bytes are the same.
    batch = random_batch(9, 300)
    made = jsonl.jsonl_lines
    sizes: list[int] = []

    def at_most_40_rows(piece: pa.RecordBatch) -> pa.Array:
        if piece.num_rows > 40:
            raise pa.ArrowInvalid("offset overflow while concatenating arrays")
        sizes.append(piece.num_rows)
        return made(piece)

    monkeypatch.setattr(jsonl, "jsonl_lines", at_most_40_rows)
    fast, rows = _both(batch)
    assert fast == rows and sum(sizes) == 300 and max(sizes) <= 40


def test_other_arrow_errors_are_not_split_away(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(piece: pa.RecordBatch) -> pa.Array:
        raise pa.ArrowInvalid("something else")

    monkeypatch.setattr(jsonl, "jsonl_lines", broken)
    with pytest.raises(pa.ArrowInvalid, match="something else"):
        jsonl.write_jsonl(random_batch(1, 10), io.BytesIO())


def test_awkward_values_one_column_at_a_time() -> None:
    values = {
        "s": pa.array([*AWKWARD_TEXTS, None], pa.string()),
        "f": pa.array([*AWKWARD_FLOATS, None], pa.float64()),
        "metadata": pa.array([*AWKWARD_METADATA, None], pa.string()),
    }
    for name, array in values.items():
        other = "s" if name == "metadata" else "metadata"
        batch = pa.RecordBatch.from_pydict({name: array, other: pa.nulls(len(array), pa.string())})
        for start in range(len(array)):
            one = batch.slice(start, 1)
            if name == "metadata" and not _loads(array[start].as_py()):
                continue  # json.loads raises on it: the rows path's error (tested below)
            fast, rows = _both(one)
            assert fast == rows, array[start]


def _loads(text: str | None) -> bool:
    try:
        json.loads(text) if text is not None else None
    except ValueError:
        return False
    return True


def test_ordinary_rows_take_the_vector_path() -> None:
    ordinary = pa.RecordBatch.from_pydict(
        {
            "at": pa.array(
                [datetime(2026, 5, 28, 20, 26, 43, 1000, tzinfo=UTC)] * 3,
                pa.timestamp("us", tz="UTC"),
            ),
            "metadata": ['{"color": "matte black", "sku": "SKU-1", "title": "mug é"}'] * 3,
            "request": ['{"prompt":"a \\"b\\"\\nc","seed":1}'] * 3,
            "queue_s": [1.0, 0.1, 12345.678],
            "billed_usd": pa.array([Decimal("0.025")] * 3, EXPORT_MONEY),
            "outputs": pa.array(
                [[{"url": "https://x/é.jpg", "width": 1024}]] * 3, pa.list_(OUTPUT_TYPE)
            ),
        }
    )
    for column in ordinary.columns:
        if column.type == pa.string() and column is ordinary["metadata"]:
            continue
        made = jsonl.json_texts(column)
        assert made is not None and not made[1].any(), column.type
    assert not jsonl._metadata(ordinary["metadata"])[1].any()  # type: ignore[index]
    fast, rows = _both(ordinary)
    assert fast == rows


def test_rows_the_vectors_cannot_promise_are_written_by_json_dumps() -> None:
    odd = {
        "s": pa.array(["a\x01b"], pa.string()),
        "f": pa.array([1e-5], pa.float64()),
        "metadata": pa.array(['{"b": "1", "a": "2"}'], pa.string()),
    }
    for name, array in odd.items():
        made = jsonl._metadata(array) if name == "metadata" else jsonl.json_texts(array)
        assert made is not None and made[1].all(), name


def test_rows_the_old_writer_refuses_are_refused_alike() -> None:
    just_out = [253402300800 * 10**6, -62135596800 * 10**6 - 1, 380 * 10**15]  # years 1-9999
    texts_ = ['{"a": ', '{"a": "\\ud800"}']  # not JSON; a lone surrogate (not UTF-8)
    bad = [("metadata", pa.array([text], pa.string())) for text in texts_]
    bad += [
        ("at", pa.array([us], pa.int64()).cast(pa.timestamp("us", tz="UTC"))) for us in just_out
    ]
    for name, array in bad:
        columns = {name: array, "metadata": array} if name == "metadata" else {name: array}
        columns.setdefault("metadata", pa.nulls(1, pa.string()))
        batch = pa.RecordBatch.from_pydict(columns)
        with pytest.raises((ValueError, OverflowError)):
            texts.write_jsonl_rows(batch, io.BytesIO())
        with pytest.raises((ValueError, OverflowError)):
            jsonl.write_jsonl(batch, io.BytesIO())


def test_no_metadata_column_or_unknown_types_go_the_rows_way() -> None:
    binary = pa.RecordBatch.from_pydict(
        {"b": pa.array([b"x"], pa.binary()), "metadata": pa.nulls(1, pa.string())}
    )
    for batch in (pa.RecordBatch.from_pydict({"a": [1]}), binary):
        with pytest.raises((KeyError, TypeError)):
            texts.write_jsonl_rows(batch, io.BytesIO())
        with pytest.raises((KeyError, TypeError)):
            jsonl.write_jsonl(batch, io.BytesIO())
    empty = random_batch(0, 5).slice(0, 0)
    assert _both(empty) == (b"", b"")
