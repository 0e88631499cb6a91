"""Arrow columns as the texts a CSV export writes of them, by Arrow kernels: money as
``str(trim_usd(value))``, lists as ``json.dumps`` writes them (a value per job, no Python
value per row but for the rare ones json.dumps must escape); a batch as the lines of JSONL,
row by row (the reference of :mod:`runner.ledger.jsonl`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints.money import trim_usd
from runner.ledger.exports import MONEY_COLUMNS


def usd_texts(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Decimals as ``str(trim_usd(value))`` does: no trailing zeros, no exponent (a vector).

    Their text has a point (a scale over 0): its trailing zeros go, then the point if it
    ends the text (two trims: ~0.04 CPU s a 1M column, a regex ~0.11)."""
    if values.type.scale <= 0:  # "100" would lose its zeros: only money's decimal(18,6) comes
        raise ValueError(f"usd_texts takes decimals with a scale, not {values.type}")
    digits = pc.utf8_rtrim(pc.cast(values, pa.string()), characters="0")
    return pc.utf8_rtrim(digits, characters=".")


# What json.dumps writes as it is in a string (ensure_ascii: printable ASCII but " and \).
_PLAIN_TEXT = r"^[ !#-\[\]-~]*$"


def json_structs(values: pa.Array) -> pa.Array:
    """Lists of structs of texts and numbers as ``json.dumps`` writes them (keys in the
    struct's order; null stays null). A list with a text json.dumps escapes, a float or a
    nested value is written by json.dumps itself."""
    offsets = values.offsets.to_numpy(zero_copy_only=False)
    items = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    parts: list[pa.Array | str] = ["{"]
    odd = np.zeros(len(items), dtype=bool)
    for n, (field, child) in enumerate(zip(items.type, items.flatten(), strict=True)):
        if pa.types.is_string(field.type):
            plain = pc.match_substring_regex(child, _PLAIN_TEXT).fill_null(True)
            odd |= ~np.asarray(plain.to_numpy(zero_copy_only=False), dtype=bool)
            text = pc.binary_join_element_wise('"', child, '"', "")
        elif pa.types.is_integer(field.type):
            text = pc.cast(child, pa.string())
        else:
            odd |= True
            text = pa.nulls(len(child), pa.string())
        parts += [", " * bool(n) + json.dumps(field.name) + ": ", text.fill_null("null")]
    words = pc.binary_join_element_wise(*parts, "}", "")
    words = pc.if_else(pc.is_valid(items), words, "null")
    lists = pa.ListArray.from_arrays(
        pa.array(offsets - offsets[0], pa.int32()), words, mask=pc.is_null(values)
    )
    texts = pc.binary_join_element_wise("[", pc.binary_join(lists, ", "), "]", "")
    counts = np.concatenate(([0], np.cumsum(odd)))[offsets - offsets[0]]
    valid = np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False), dtype=bool)
    return dumped_rows(texts, values, np.flatnonzero((np.diff(counts) > 0) & valid))


def dumped_rows(texts: pa.Array, values: pa.Array, rows: np.ndarray) -> pa.Array:
    """``texts`` with each of ``rows`` (indices) written by ``json.dumps`` of its value:
    the rows a vector path cannot promise to write alike."""
    if not len(rows):
        return texts
    again = [json.dumps(v) for v in values.take(pa.array(rows)).to_pylist()]
    mask = np.zeros(len(values), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(texts, pa.array(mask), pa.array(again, pa.string()))


def json_bools(values: pa.Array) -> pa.Array:
    """Lists of bools as ``json.dumps`` writes them (``[true, false]``; null stays null)."""
    offsets = values.offsets.to_numpy(zero_copy_only=False)
    items = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    words = pc.if_else(items, "true", "false").fill_null("null")
    lists = pa.ListArray.from_arrays(
        pa.array(offsets - offsets[0], pa.int32()), words, mask=pc.is_null(values)
    )
    return pc.binary_join_element_wise("[", pc.binary_join(lists, ", "), "]", "")


def json_lists(values: pa.Array) -> pa.Array:
    """Lists as ``json.dumps`` writes each, one by one (null stays null)."""
    return pa.array([None if v is None else json.dumps(v) for v in values.to_pylist()], pa.string())


def flat_for_csv(jobs: pa.Table, lists: Callable[[pa.Array], pa.Array] | None = None) -> pa.Table:
    """CSV has no nested types: outputs and nsfw become JSON text, money its shortest text.

    ``lists`` makes the JSON texts of outputs and duplicate_request_ids (by default
    :func:`json_structs` and :func:`json_lists`: the reference of
    :func:`runner.ledger.csvcells.json_cells`)."""
    for name, made in (
        ("outputs", lists or json_structs),
        ("duplicate_request_ids", lists or json_lists),
    ):
        index = jobs.schema.get_field_index(name)
        jobs = jobs.set_column(index, name, made(jobs[name].combine_chunks()))
    index = jobs.schema.get_field_index("nsfw")
    jobs = jobs.set_column(index, "nsfw", json_bools(jobs["nsfw"].combine_chunks()))
    for name in MONEY_COLUMNS:
        index = jobs.schema.get_field_index(name)
        jobs = jobs.set_column(index, name, usd_texts(jobs[name]))
    return jobs


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(trim_usd(value))
    raise TypeError(f"cannot export {type(value).__name__}")


def jsonl_row_lines(batch: pa.RecordBatch) -> list[str]:
    """Each row of ``batch`` as ``json.dumps`` writes it, with its newline: the reference
    (and the fallback) of :mod:`runner.ledger.jsonl`, which builds the same lines as vectors."""
    rows = batch.to_pylist()
    for row in rows:
        if row["metadata"] is not None:
            row["metadata"] = json.loads(row["metadata"])
    return [json.dumps(row, default=_json_default, ensure_ascii=False) + "\n" for row in rows]


def write_jsonl_rows(batch: pa.RecordBatch, handle: Any) -> None:
    """The JSONL lines of ``batch`` made row by row (the export's writer before the vectors)."""
    lines = jsonl_row_lines(batch)
    if lines:
        handle.write("".join(lines).encode())
