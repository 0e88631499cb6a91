"""A batch of export rows as JSONL lines built by Arrow kernels, byte for byte what
:func:`runner.ledger.texts.jsonl_row_lines` (``json.dumps`` of each row) writes.

Each column becomes one text per row, ``"name": value``, and the members are joined row by
row. A row whose value the kernels cannot promise to write as ``json.dumps`` does is marked
and written by ``json.dumps`` itself (the rows path, kept as the reference):

- a text holding a control character other than ``\\n \\r \\t \\b \\f`` (``\\u00XX``);
- a float that Python's ``repr`` writes in exponent form, or Arrow does (NaN, infinities,
  magnitudes under 1e-4, large ones Arrow writes with an exponent from ~1e14 on); elsewhere
  both write the shortest digits that read back (checked over 15M random doubles);
- a time outside the years 1-9999 (Python has no such datetime: the rows path raises);
- a ``metadata`` text that is not already as ``json.dumps`` writes it again (a flat object of
  texts holding no quote, backslash or control character, ``", "`` and ``": "`` between them,
  keys in strictly ascending order, so none given twice: the ledger's own form);
- a value of a type this module does not know (every row of that batch).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.texts import jsonl_row_lines, usd_texts

# Input bytes per piece of a batch turned into lines at once: the lines and the members they
# are joined from are held together (~4 times this).
PIECE_BYTES = 8 * 2**20
_ESCAPES: tuple[tuple[str, str], ...] = (
    ("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
    ("\b", "\\b"), ("\f", "\\f"),
)  # fmt: skip
_SHORT = r"[\x00-\x07\x0b\x0e-\x1f]"  # control characters json.dumps writes as \u00XX
_PLAIN = r'"[^"\\\x00-\x1f]*"'
_CANONICAL_OBJECT = rf"^\{{({_PLAIN}: {_PLAIN}(, {_PLAIN}: {_PLAIN})*)?\}}$"
_POSITIONAL = r"^-?[0-9]+(\.[0-9]+)?$"
_FIRST_US = -62135596800 * 10**6  # 0001-01-01T00:00:00 UTC, microseconds since the epoch
_LAST_US = 253402300799 * 10**6 + 999_999  # 9999-12-31T23:59:59.999999

Texts = tuple[pa.Array, np.ndarray]  # each value's JSON text ("null" for null), rows to redo


def write_jsonl(batch: pa.RecordBatch, handle: Any, *, piece_bytes: int | None = None) -> None:
    """Write ``batch`` as JSONL lines to the binary ``handle``, about ``piece_bytes`` (else
    PIECE_BYTES) of its columns at a time."""
    size = PIECE_BYTES if piece_bytes is None else piece_bytes
    rows = max(1, size * max(batch.num_rows, 1) // max(batch.nbytes, 1))
    for start in range(0, batch.num_rows, rows):
        _write_lines(batch.slice(start, rows), handle)


def _write_lines(piece: pa.RecordBatch, handle: Any) -> None:
    """The lines of ``piece``; in halves when they pass the 2 GiB a text array holds (rows
    far longer than the batch's average, e.g. prompts of megabytes side by side)."""
    try:
        lines = jsonl_lines(piece)
    except (pa.ArrowInvalid, pa.ArrowCapacityError) as exc:
        if "overflow" not in str(exc) or piece.num_rows < 2:
            raise
        half = piece.num_rows // 2
        _write_lines(piece.slice(0, half), handle)
        _write_lines(piece.slice(half), handle)
        return
    offsets = np.frombuffer(lines.buffers()[1], np.int32, len(lines) + 1, lines.offset * 4)
    data = lines.buffers()[2]
    if data is not None:
        handle.write(memoryview(data)[int(offsets[0]) : int(offsets[-1])])


def jsonl_lines(batch: pa.RecordBatch) -> pa.Array:
    """Each row of ``batch`` as ``json.dumps`` writes it (``default`` for times and money,
    ``metadata`` parsed), with its newline."""
    n = batch.num_rows
    names = batch.schema.names
    odd = np.zeros(n, dtype=bool)
    parts: list[pa.Array | str] | None = ["{"]
    if len(set(names)) != len(names) or "metadata" not in names:
        parts = None  # a row dict holds one value a name; no metadata: the rows path raises
    for index, (field, column) in enumerate(zip(batch.schema, batch.columns, strict=True)):
        if parts is None:
            break
        made = _member(column, field.name == "metadata")
        if made is None:
            parts = None
            break
        parts += [", " * bool(index) + json.dumps(field.name, ensure_ascii=False) + ": "]
        parts += made[0]
        odd |= made[1]
    if parts is None or odd.all():
        return pa.array(jsonl_row_lines(batch), pa.string())
    lines = _joined([*parts, "}\n"], n)
    del parts
    if odd.any():
        again = jsonl_row_lines(batch.filter(pa.array(odd)))
        lines = pc.replace_with_mask(lines, pa.array(odd), pa.array(again, pa.string()))
    return lines


def _member(
    values: pa.Array, metadata: bool = False
) -> tuple[list[pa.Array | str], np.ndarray] | None:
    """A column's texts as pieces to join: a null column one word, a text, time or money
    column without nulls its quotes as words (no copy of the column to add them)."""
    n = len(values)
    kind = values.type
    if metadata:
        made = _metadata(values)
    elif values.null_count == n:
        return ["null"], np.zeros(n, dtype=bool)
    elif values.null_count == 0 and pa.types.is_string(kind):
        text, odd = _escaped(values)
        return ['"', text, '"'], odd
    elif values.null_count == 0 and _is_time(kind):
        text, odd = _bare_times(values)
        return ['"', text, '+00:00"'], odd
    elif values.null_count == 0 and _is_money(kind):
        return ['"', usd_texts(values), '"'], np.zeros(n, dtype=bool)
    else:
        made = _texts(values)
    return None if made is None else ([made[0]], made[1])


def _joined(parts: list[pa.Array | str], n: int) -> pa.Array:
    """The pieces joined row by row, runs of words joined first."""
    merged: list[pa.Array | str] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    if len(merged) == 1:
        only = merged[0]
        return pa.repeat(pa.scalar(only), n) if isinstance(only, str) else only
    return pc.binary_join_element_wise(*merged, "")


def _is_time(kind: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz == "UTC")


def _is_money(kind: pa.DataType) -> bool:
    # str(trim_usd(value)): a scale and precision for which Decimal's str never takes
    # exponent form nor its context rounds.
    return bool(pa.types.is_decimal128(kind) and 0 < kind.scale <= 6 and kind.precision <= 28)


def json_texts(values: pa.Array) -> Texts | None:
    """``values`` as ``json.dumps`` (``ensure_ascii=False``, default separators) writes each,
    and the rows it may write otherwise; None for a type not known here."""
    made = _member(values)
    return None if made is None else (_joined(made[0], len(values)), made[1])


def _texts(values: pa.Array) -> Texts | None:
    kind = values.type
    n = len(values)
    if pa.types.is_boolean(kind):
        text = pc.if_else(values, "true", "false")
    elif pa.types.is_integer(kind):
        text = pc.cast(values, pa.string())
    elif pa.types.is_floating(kind):
        return _floats(values)
    elif pa.types.is_string(kind):
        return _strings(values)
    elif _is_time(kind):
        return _times(values)
    elif _is_money(kind):
        text = pc.binary_join_element_wise('"', usd_texts(values), '"', "")
    elif pa.types.is_list(kind):
        return _lists(values)
    elif pa.types.is_struct(kind):
        return _structs(values)
    elif pa.types.is_null(kind):
        text = pa.nulls(n, pa.string())
    else:
        return None
    return text.fill_null("null"), np.zeros(n, dtype=bool)


def _mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where ``values`` (bools) is true; null is false."""
    return np.asarray(values.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _strings(values: pa.Array) -> Texts:
    """Texts as json.dumps writes them, quoted."""
    text, odd = _escaped(values)
    return pc.binary_join_element_wise('"', text, '"', "").fill_null("null"), odd


def _escaped(values: pa.Array) -> Texts:
    """Texts escaped as json.dumps does: backslash, quote and the five short control
    escapes; another control character (written ``\\u00XX``) sends its row the slow way.
    Which to look for is found in the texts' bytes (memchr and numpy: a regex over them costs
    ten times as much)."""
    data = _bytes_of(values)
    text = values
    odd = np.zeros(len(values), dtype=bool)
    for plain, escaped in _ESCAPES[:2]:
        if data.find(plain.encode()) >= 0:
            text = pc.replace_substring(text, plain, escaped)
    if data and np.frombuffer(data, np.uint8).min() < 0x20:
        odd = _mask(pc.match_substring_regex(values, _SHORT))
        for plain, escaped in _ESCAPES[2:]:
            text = pc.replace_substring(text, plain, escaped)
    return text, odd


def _bytes_of(values: pa.Array) -> bytes:
    """The bytes of the texts, one after another (a null's, if any, too)."""
    buffers = values.buffers()
    if buffers[2] is None or len(values) == 0:
        return b""
    offsets = np.frombuffer(buffers[1], np.int32, len(values) + 1, values.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    return memoryview(buffers[2])[start:end].tobytes()


def _floats(values: pa.Array) -> Texts:
    """Floats as ``repr``: Arrow's shortest digits where both write them positionally
    (1e-4 <= |x| and no exponent in Arrow's text), with ``.0`` on a whole number."""
    text = pc.cast(values, pa.string())
    small = pc.and_(pc.less(pc.abs(values), 1e-4), pc.not_equal(values, 0))
    plain = pc.and_(pc.match_substring_regex(text, _POSITIONAL), pc.invert(small))
    odd = _mask(pc.invert(plain))
    whole = pc.invert(pc.match_substring(text, "."))
    text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
    return text.fill_null("null"), odd


def _times(values: pa.Array) -> Texts:
    """Times as ``datetime.isoformat()``: ``T``, microseconds only when not zero, ``+00:00``."""
    text, odd = _bare_times(values)
    return pc.binary_join_element_wise('"', text, '+00:00"', "").fill_null("null"), odd


def _bare_times(values: pa.Array) -> Texts:
    """The times' texts without quotes or zone, and those outside the years 1-9999 (no
    ``datetime``: json.dumps' row raises). Formatted as naive times, the same instants:
    Arrow formats a zoned time ~30 times slower."""
    micros = values.view(pa.int64())
    odd = _mask(pc.or_(pc.less(micros, _FIRST_US), pc.greater(micros, _LAST_US)))
    text = pc.cast(micros.cast(pa.timestamp("us")), pa.string())  # 2026-05-28 20:26:43.000000
    text = pc.replace_substring(pc.replace_substring(text, ".000000", ""), " ", "T")
    return text, odd


def _metadata(values: pa.Array) -> Texts | None:
    """The ledger's metadata texts as they are, where ``json.dumps(json.loads(text))`` gives
    them back (see the module docstring); the others the slow way."""
    if not pa.types.is_string(values.type):
        return None
    canonical = pc.match_substring_regex(values, _CANONICAL_OBJECT)
    odd = _mask(pc.invert(canonical))
    # In a canonical text every quote delimits a string: keys are each 4th piece from the 2nd.
    pieces = pc.split_pattern(pc.if_else(canonical, values, "{}"), '"')
    keys = pc.list_slice(pieces, 1, None, 4)
    named = pc.list_flatten(keys)
    if len(named) > 1:
        rows = np.asarray(pc.list_parent_indices(keys).to_numpy(zero_copy_only=False))
        same = rows[1:] == rows[:-1]
        ascending = _mask(pc.less(named.slice(0, len(named) - 1), named.slice(1)))
        odd[rows[1:][same & ~ascending]] = True
    return values.fill_null("null"), odd


def _items_odd(values: pa.Array, odd_items: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The rows of ``values`` (lists, valid) holding an item marked in ``odd_items``."""
    counts = np.concatenate(([0], np.cumsum(odd_items)))[offsets - offsets[0]]
    held: np.ndarray = (np.diff(counts) > 0) & _mask(pc.is_valid(values))
    return held


def _lists(values: pa.Array) -> Texts | None:
    """Lists as ``[a, b]`` of their items' texts."""
    offsets = values.offsets.to_numpy(zero_copy_only=False)
    items = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    made = json_texts(items)
    if made is None:
        return None
    words, odd_items = made
    lists = pa.ListArray.from_arrays(
        pa.array(offsets - offsets[0], pa.int32()), words, mask=pc.is_null(values)
    )
    text = pc.binary_join_element_wise("[", pc.binary_join(lists, ", "), "]", "")
    return text.fill_null("null"), _items_odd(values, odd_items, offsets)


def _structs(values: pa.Array) -> Texts | None:
    """Structs as ``{"key": value, ...}`` in the struct's order."""
    names = [field.name for field in values.type]
    if len(set(names)) != len(names):
        return None  # a dict holds one value a name
    parts: list[pa.Array | str] = ["{"]
    odd = np.zeros(len(values), dtype=bool)
    for index, (name, child) in enumerate(zip(names, values.flatten(), strict=True)):
        made = _member(child)
        if made is None:
            return None
        parts += [", " * bool(index) + json.dumps(name, ensure_ascii=False) + ": ", *made[0]]
        odd |= made[1]
    valid = pc.is_valid(values)
    text = pc.if_else(valid, _joined([*parts, "}"], len(values)), "null")
    return text, odd & _mask(valid)
