"""The CSV export's cells of its list columns (``outputs``, ``duplicate_request_ids``) as
``json.dumps`` writes each list (``ensure_ascii`` on: its default), made by the JSONL export's
kernels (:func:`runner.ledger.jsonl.json_texts`) instead of a regex over every text.

Those kernels write as ``json.dumps(..., ensure_ascii=False)`` does, which differs only in
the characters ``ensure_ascii`` escapes: DEL (``\\x7f``) and every one past ASCII. A row whose
text holds such a byte, or that the kernels mark, is written by ``json.dumps`` itself; so is
every row of a column of a type ``json.dumps`` has no text for (times, decimals: it raises).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger import jsonl, texts

_NOT_ASCII = r"[^\x00-\x7e]"  # what ensure_ascii escapes besides what json.dumps always does


def flat_for_csv(jobs: pa.Table) -> pa.Table:
    """:func:`runner.ledger.texts.flat_for_csv`, its lists' JSON made by :func:`json_cells`."""
    return texts.flat_for_csv(jobs, lists=json_cells)


def json_cells(values: pa.Array) -> pa.Array:
    """Each list as ``json.dumps`` writes it (null stays null: an empty cell)."""
    made = jsonl.json_texts(values) if _dumped_alike(values.type) else None
    if made is None:
        return texts.json_lists(values)  # json.dumps of each row: it refuses alike
    text, odd = made
    odd = odd | _not_ascii(text)
    valid = pc.is_valid(values)
    if values.null_count:
        text = pc.if_else(valid, text, pa.scalar(None, pa.string()))
    rows = np.flatnonzero(odd & np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool))
    return texts.dumped_rows(text, values, rows)


def _dumped_alike(kind: pa.DataType) -> bool:
    """Whether every value of ``kind`` is one json.dumps writes with no ``default``."""
    if pa.types.is_list(kind):
        return _dumped_alike(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_dumped_alike(field.type) for field in kind)
    tests = (pa.types.is_string, pa.types.is_integer, pa.types.is_floating,
             pa.types.is_boolean, pa.types.is_null)  # fmt: skip
    return any(test(kind) for test in tests)


def _not_ascii(text: pa.Array) -> np.ndarray:
    """The rows whose text holds DEL or a byte past ASCII (found in the bytes first: a regex
    over every text costs far more than a look at the largest byte)."""
    buffers = text.buffers()
    odd = np.zeros(len(text), dtype=bool)
    if buffers[2] is None or len(text) == 0:
        return odd
    offsets = np.frombuffer(buffers[1], np.int32, len(text) + 1, text.offset * 4)
    data = np.frombuffer(buffers[2], np.uint8)[int(offsets[0]) : int(offsets[-1])]
    if len(data) and data.max() >= 0x7F:
        odd = np.asarray(
            pc.match_substring_regex(text, _NOT_ASCII)
            .fill_null(False)
            .to_numpy(zero_copy_only=False),
            dtype=bool,
        )
    return odd
