"""The CSV export's list cells made by the JSONL kernels are the texts ``json.dumps`` (its
default ``ensure_ascii``) writes of each list, as :func:`runner.ledger.texts.json_structs`
and :func:`runner.ledger.texts.json_lists` (the reference) make them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from runner.ledger import csvcells, texts

AWKWARD = [
    "plain", 'a "quote"', "back\\slash", "tab\there", "new\nline", "nul\x00", "ctl\x01\x1f",
    "del\x7f", "caf\u00e9", "😀👍🏽", "line\u2028", "", "~!#[]", "\\u00e9",
]  # fmt: skip


def _expected(values: pa.Array) -> list[str | None]:
    return [None if v is None else json.dumps(v) for v in values.to_pylist()]


def test_outputs_cells_are_json_dumps_of_each_list() -> None:
    image = pa.struct([("url", pa.string()), ("width", pa.int32()), ("n", pa.int64()),
                       ("local_path", pa.string()), ("score", pa.float64()),
                       ("ok", pa.bool_())])  # fmt: skip
    lists: list[object] = [
        [{"url": "https://cdn.example/a.png", "width": 64, "n": -(2**40), "local_path": None,
          "score": 0.5, "ok": True}],
        [], None,
        [None, {"url": None, "width": None, "n": 0, "local_path": "out/b.png", "score": None,
                "ok": None}],
        *([{"url": t, "width": 1, "n": 1, "local_path": t, "score": 1e-7, "ok": False}]
          for t in AWKWARD),
        [{"url": "x", "width": 2, "n": 3, "local_path": "y", "score": float("nan"),
          "ok": True}] * 3,
        [{"url": "x", "width": 2, "n": 3, "local_path": "y", "score": 3.0, "ok": True}],
    ]  # fmt: skip
    values = pa.array(lists, pa.list_(image))
    for sliced in (values, values.slice(2), values.slice(3, 6), values.slice(len(lists) - 2)):
        made = csvcells.json_cells(sliced)
        assert made.to_pylist() == _expected(sliced)
        assert made.to_pylist() == texts.json_structs(sliced).to_pylist()


def test_lists_of_texts_are_json_dumps_of_each_list() -> None:
    lists = [None, [], *([t, None, "b"] for t in AWKWARD), None, [AWKWARD[0]]]
    values = pa.array(lists, pa.list_(pa.string()))
    for sliced in (values, values.slice(1), values.slice(4, 5)):
        assert csvcells.json_cells(sliced).to_pylist() == _expected(sliced)
        assert csvcells.json_cells(sliced).equals(texts.json_lists(sliced))


def test_a_column_without_nulls_or_odd_texts_takes_the_kernels_alone() -> None:
    values = pa.array([["a", "b"], [], ["c"]], pa.list_(pa.string()))
    assert csvcells.json_cells(values).to_pylist() == ['["a", "b"]', "[]", '["c"]']


def test_times_in_a_list_are_refused_as_json_dumps_refuses_them() -> None:
    when = pa.array([[datetime(2026, 1, 1, tzinfo=UTC)]], pa.list_(pa.timestamp("us", "UTC")))
    with pytest.raises(TypeError, match="not JSON serializable"):
        csvcells.json_cells(when)
