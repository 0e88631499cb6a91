"""Typing a batch of text cells as vectors, for the rows whose every cell is plain.

For one endpoint of the catalog and a batch of CSV text columns (:class:`ArrowRows`), this
finds the rows the per-row path would accept without a second look: integers, numbers,
booleans, enums, size presets and ``WxH`` within the request model's ranges, required
fields given, no cell in a form that needs parsing (``loras``, ``image_urls``, ``seeds``,
``variants``), another endpoint's parameter left empty, ``{column}`` templates whose
columns are given. Every other row is left to :meth:`_Expander.expand`, which words its
problems. A kept row is still validated by the request model when its job is made (the
model's errors would be the per-row path's), so this only decides which rows are cheap.
"""

from __future__ import annotations

import string
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints.catalog import PRESETS, EndpointSpec
from runner.manifest import cells
from runner.manifest.columns import CONTROL_COLUMNS
from runner.manifest.masks import to_arrow, to_numpy

_INT = r"^-?[0-9]{1,15}$"
_FLOAT = r"^-?(?:[0-9]{1,20}\.?[0-9]{0,20}|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?$"
_WXH = r"^(?P<w>[0-9]{1,9})[xX](?P<h>[0-9]{1,9})$"
_TRUE = ["true", "1", "yes"]
_FALSE = ["false", "0", "no"]
_REMOTE = r"^https?://"
_RESERVED = r"^(?:#[0-9]+|~[0-9A-Fa-f]+(?:\.[0-9]+)?)$"
SYNTAX_FIELDS = frozenset({"loras", "image_urls"})
FILE_FIELDS = ("image_url", "mask_url")
MAX_TEMPLATES = 16


@dataclass
class Typed:
    """One endpoint's rows of a batch, typed: which must go row by row, and the values."""

    endpoint: str
    spec: EndpointSpec
    positions: np.ndarray  # positions in the batch
    slow: np.ndarray  # per position: left to the per-row path
    needs_files: np.ndarray  # per position: names a local file (checked, sized per job)
    fields: dict[str, pa.Array]  # request field -> typed values (null: not given)
    metadata: dict[str, pa.Array]  # metadata column -> its text as read (stripped when used)
    ids: pa.Array | None  # the given id, stripped (null: identified by content)


class _Blank:
    """Stripped columns and their blank masks, each computed once."""

    def __init__(self, values: Mapping[str, pa.Array]) -> None:
        self.values = values
        self._trimmed: dict[str, pa.Array] = {}
        self._blank: dict[str, np.ndarray] = {}

    def trimmed(self, name: str) -> pa.Array:
        found = self._trimmed.get(name)
        if found is None:
            found = self._trimmed[name] = pc.utf8_trim_whitespace(self.values[name])
        return found

    def blank(self, name: str) -> np.ndarray:
        found = self._blank.get(name)
        if found is None:
            found = self._blank[name] = to_numpy(pc.equal(self.trimmed(name), ""))
        return found


def type_rows(
    endpoint: str,
    spec: EndpointSpec,
    values: Mapping[str, pa.Array],
    positions: np.ndarray,
    *,
    id_column: str,
    id_required: bool,
    template: str | None,
    all_parameters: frozenset[str],
) -> Typed:
    """Type the rows ``values`` holds (already one endpoint's, defaults applied)."""
    size = len(positions)
    cols = _Blank(values)
    slow = np.zeros(size, dtype=bool)
    fields: dict[str, pa.Array] = {}
    metadata: dict[str, pa.Array] = {}
    model_fields = spec.model.model_fields
    identity = {id_column, "endpoint"}
    templated = _templated(cols, template, slow)
    for name in values:
        if name in identity:
            continue
        if name in CONTROL_COLUMNS:
            if name != "prompt_template":
                slow |= ~cols.blank(name)
            continue
        if name not in model_fields:
            if name in all_parameters:
                slow |= ~cols.blank(name)  # another endpoint's parameter: the row says why
            else:
                metadata[name] = values[name]
            continue
        fields[name] = _typed_field(name, spec, cols, slow, skip=templated)
    if templated is not None:
        filled, rows = templated
        given = fields.get("prompt", pa.nulls(size, pa.string()))
        fields["prompt"] = pc.if_else(pa.array(rows), filled, given)
    for name, info in model_fields.items():
        if info.is_required():
            given = fields.get(name)
            slow |= np.ones(size, dtype=bool) if given is None else to_numpy(pc.is_null(given))
    needs_files = np.zeros(size, dtype=bool)
    for name in FILE_FIELDS:
        if name in fields:
            local = pc.invert(pc.match_substring_regex(fields[name], _REMOTE))
            needs_files |= to_numpy(pc.fill_null(local, False))
    ids = _ids(cols, id_column, id_required, slow)
    return Typed(endpoint, spec, positions, slow, needs_files, fields, metadata, ids)


def _ids(cols: _Blank, column: str, required: bool, slow: np.ndarray) -> pa.Array | None:
    if column not in cols.values:
        if required:
            slow |= True
        return None
    blank = cols.blank(column)
    if required:
        slow |= blank
    trimmed = cols.trimmed(column)
    slow |= to_numpy(pc.match_substring_regex(trimmed, _RESERVED))
    return _nulled(trimmed, blank)


def _nulled(text: pa.Array, blank: np.ndarray) -> pa.Array:
    return pc.if_else(to_arrow(blank), pa.scalar(None, pa.string()), text)


def _typed_field(
    name: str,
    spec: EndpointSpec,
    cols: _Blank,
    slow: np.ndarray,
    skip: tuple[pa.Array, np.ndarray] | None = None,
) -> pa.Array:
    """The column as the field's values (null where blank); rows it cannot type go slow.

    ``skip``: rows whose prompt a template makes (their ``prompt`` cell is not read).
    """
    if name != "prompt" and _few_distinct(cols.values[name]):
        # A column of few distinct cells (sizes, counts, presets): each stripped and typed once.
        encoded = pc.dictionary_encode(cols.values[name])
        distinct: pa.Array = pc.utf8_trim_whitespace(encoded.dictionary)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        once = np.zeros(len(distinct), dtype=bool)
        values = _typed_text(name, spec, distinct, to_numpy(pc.equal(distinct, "")), once)
        slow |= once[codes]
        return values.take(encoded.indices)
    text = cols.trimmed(name)
    blank = cols.blank(name)
    if skip is not None and name == "prompt":
        blank = blank | skip[1]
    return _typed_text(name, spec, text, blank, slow)


def _few_distinct(text: pa.Array) -> bool:
    """Whether the column seems to hold few distinct cells (judged from its first rows)."""
    if len(text) < 4 * _SAMPLE:
        return False
    head = pc.count_distinct(text.slice(0, _SAMPLE)).as_py()
    return bool(head * 8 <= _SAMPLE)


_SAMPLE = 256


def _typed_text(
    name: str, spec: EndpointSpec, text: pa.Array, blank: np.ndarray, slow: np.ndarray
) -> pa.Array:
    """:func:`_typed_field` of stripped ``text``, ``blank`` where it is not given."""
    if name == "image_size":
        return _image_size(text, blank, spec, slow)
    kind = _kind(spec, name)
    if kind == "str":
        allowed = _literal(spec.model.model_fields[name].annotation)
        if allowed is not None:
            slow |= ~blank & ~to_numpy(pc.is_in(text, pa.array(allowed)))
        return _nulled(text, blank)
    if kind == "bool":
        lowered = pc.utf8_lower(text)
        true = to_numpy(pc.is_in(lowered, pa.array(_TRUE)))
        false = to_numpy(pc.is_in(lowered, pa.array(_FALSE)))
        slow |= ~blank & ~true & ~false
        return pa.array(np.where(true, True, False), mask=blank | (~true & ~false))
    if name == "loras":
        return _loras(text, blank, spec, slow)
    if kind in ("int", "float"):
        numbers, ok = _numbers(text, blank, kind)
        slow |= ~blank & ~ok
        low, high = _bounds(spec, name)
        within = np.isfinite(numbers) if kind == "float" else np.ones(len(numbers), dtype=bool)
        if low is not None:
            within &= numbers >= low
        if high is not None:
            within &= numbers <= high
        slow |= ok & ~within
        return pa.array(numbers, mask=~ok)
    slow |= ~blank  # loras, image_urls, JSON and the like: parsed row by row
    return pa.nulls(len(text), pa.string())


def _numbers(text: pa.Array, blank: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The cells as int64 or float64, and which of them are numbers both readers agree on.

    Integers are cast at once first: what Arrow reads as an int64 (``-`` and digits) ``int()``
    reads the same, except hexadecimal (``0x1F``, which ``int()`` refuses), so a block with an
    ``x`` in the column is not cast at once. Past 15 digits, and in any block where the cast
    fails, the :data:`_INT` pattern decides, as it does for every number cell.
    """
    if kind == "int" and not pc.any(pc.match_substring(text, "x", ignore_case=True)).as_py():
        try:
            cast = pc.cast(_nulled(text, blank).fill_null("0"), pa.int64())
        except pa.ArrowInvalid:
            pass
        else:
            numbers = cast.to_numpy(zero_copy_only=False)
            return numbers, ~blank & (np.abs(numbers) < 10**15)
    pattern = _INT if kind == "int" else _FLOAT
    ok = to_numpy(pc.match_substring_regex(text, pattern)) & ~blank
    cast = pc.cast(
        pc.if_else(pa.array(ok), text, "0"), pa.int64() if kind == "int" else pa.float64()
    )
    return cast.to_numpy(zero_copy_only=False), ok


def _loras(text: pa.Array, blank: np.ndarray, spec: EndpointSpec, slow: np.ndarray) -> pa.Array:
    """One remote LoRA in the ``url[:scale]`` shorthand, as :func:`cells.parse_loras` reads it.

    Kept only where the cell is plain ASCII with no control character (so RE2's ``.`` and
    digits are Python's), no ``;`` (one LoRA), a remote path (no local file to check or
    size), and a scale in a form whose text both readers turn into the same double. The
    rest (JSON, lists, local files, a bare ``https://host:port``) go row by row.
    """
    size = len(text)
    if spec.max_loras == 0 or blank.all():
        slow |= ~blank
        return pa.nulls(size, _LORAS)
    plain = to_numpy(pc.string_is_ascii(text))
    plain &= ~to_numpy(pc.match_substring_regex(text, _LORA_NOT_PLAIN))
    parts = pc.extract_regex(text, _LORA_SCALED)
    scaled = to_numpy(pc.is_valid(parts))
    path = pc.if_else(pa.array(scaled), pc.utf8_trim_whitespace(parts.field(0)), text)
    scale_text = parts.field(1)
    exact = to_numpy(pc.fill_null(pc.match_substring_regex(scale_text, _LORA_SCALE), False))
    ok = plain & (~scaled | exact) & to_numpy(pc.match_substring_regex(path, _REMOTE))
    ok &= ~to_numpy(pc.match_substring_regex(path, _BARE_ORIGIN))
    slow |= ~blank & ~ok
    keep = ok & ~blank
    scale = pc.cast(pc.if_else(pa.array(keep & scaled), scale_text, "1"), pa.float64())
    items = pa.StructArray.from_arrays([path, scale], fields=list(_LORAS.value_type))
    offsets = pa.array(np.arange(size + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, items, type=_LORAS, mask=pa.array(~keep))


_LORAS = pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())]))
# cells._SCALE_SUFFIX and cells._BARE_ORIGIN, on ASCII text without line breaks.
_LORA_SCALED = r"^(?P<path>.+):(?P<scale>[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)$"
_LORA_SCALE = r"^[0-9]{1,9}(?:\.[0-9]{1,15})?$"
_LORA_NOT_PLAIN = r"[\x00-\x1f\x7f;]|^[\[{]"
_BARE_ORIGIN = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*$"


def _image_size(
    text: pa.Array, blank: np.ndarray, spec: EndpointSpec, slow: np.ndarray
) -> pa.Array:
    preset = to_numpy(pc.is_in(text, pa.array(list(PRESETS))))
    wxh = to_numpy(pc.match_substring_regex(text, _WXH)) & ~preset
    ok = preset | wxh
    if wxh.any():
        parts = pc.extract_regex(pc.if_else(to_arrow(wxh), text, "1x1"), _WXH)
        width = pc.cast(parts.field(0), pa.int64()).to_numpy()
        height = pc.cast(parts.field(1), pa.int64()).to_numpy()
        low, high = spec.side_limits or (1, None)
        fits = (width >= max(low, 1)) & (height >= max(low, 1))
        if high is not None:
            fits &= (width <= high) & (height <= high)
        ok &= ~wxh | fits
    if spec.side_limits is not None and preset.any():
        low, high = spec.side_limits
        fine = [n for n, (w, h) in PRESETS.items() if low <= w <= high and low <= h <= high]
        ok &= ~preset | to_numpy(pc.is_in(text, pa.array(fine)))
    slow |= ~blank & ~ok
    return _nulled(text, blank)


def _templated(
    cols: _Blank, fallback: str | None, slow: np.ndarray
) -> tuple[pa.Array, np.ndarray] | None:
    """The prompts templates fill in, and which rows have one; None: no row has a template."""
    values = cols.values
    if "prompt_template" in values:
        blank = cols.blank("prompt_template")
        raw = values["prompt_template"]
        if fallback is not None:
            raw = pc.if_else(to_arrow(blank), fallback, raw)
            blank = np.zeros(len(raw), dtype=bool)
    elif fallback is not None:
        raw = pa.array([fallback] * len(slow), pa.string())
        blank = np.zeros(len(raw), dtype=bool)
    else:
        return None
    if blank.all():
        return None
    encoded = pc.dictionary_encode(raw)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    prompt: pa.Array = pa.nulls(len(raw), pa.string())
    for code, template in enumerate(encoded.dictionary.to_pylist()):
        rows = (codes == code) & ~blank
        if not rows.any():
            continue
        if code >= MAX_TEMPLATES:
            slow |= rows
            continue
        parts = _template_parts(template, values)
        if parts is None:
            slow |= rows
            continue
        pieces: list[Any] = []
        for literal, name in parts:
            pieces.append(literal)
            if name is not None:
                slow |= rows & cols.blank(name)
                pieces.append(cols.trimmed(name))
        filled = pc.utf8_trim_whitespace(pc.binary_join_element_wise(*pieces, ""))
        slow |= rows & to_numpy(pc.equal(filled, ""))
        prompt = pc.if_else(pa.array(rows), filled, prompt)
    return prompt, ~blank


def _template_parts(
    template: str, values: Mapping[str, Any]
) -> list[tuple[str, str | None]] | None:
    """(literal, column) pairs of a plain ``{column}`` template whose columns exist, or None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    parts: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (
            not name or spec or conversion or any(c in name for c in ".[]") or name not in values
        ):
            return None
        parts.append((literal, name))
    return parts


def _kind(spec: EndpointSpec, name: str) -> cells.Kind:
    return cells.field_kind(spec.model.model_fields[name].annotation)


def _literal(annotation: Any) -> list[str] | None:
    args = [a for a in cells._union_args(annotation)]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        values = typing.get_args(args[0])
        if all(isinstance(v, str) for v in values):
            return list(values)
    return None


def _bounds(spec: EndpointSpec, name: str) -> tuple[float | None, float | None]:
    low = high = None
    for item in spec.model.model_fields[name].metadata:
        if getattr(item, "ge", None) is not None:
            low = item.ge
        if getattr(item, "le", None) is not None:
            high = item.le
        if getattr(item, "gt", None) is not None or getattr(item, "lt", None) is not None:
            return float("inf"), None  # strict bounds: left to the model
    return low, high


def row_value(spec: EndpointSpec, name: str, value: Any) -> Any:
    """A typed cell as the per-row path parses it (``image_size``: preset or width/height)."""
    if name == "image_size" and value not in PRESETS:
        width, height = value.lower().split("x")
        return {"width": int(width), "height": int(height)}
    return value
