"""Cell syntax: what a user may type in one manifest cell, parsed into JSON values.

This module owns the small languages of a cell: ``loras`` (JSON or the
``path:scale;path:scale`` shorthand), ``image_urls`` (JSON list or ``|``-separated),
``image_size`` (preset, ``WxH`` or a JSON object), ``seeds`` (``1,2,3`` or a JSON
list), and scalars typed by the request field they fill. Every function is pure
and raises :class:`CellError`, whose message names the column and the value
(``num_images='two' is not an integer``). Final range checks belong to the
endpoint's request model, not here; a native value (JSONL, Parquet) of a type the
model cannot check safely (a number where text goes) is refused here. JSON in a
cell is parsed by :func:`runner.manifest.reader.load_json`, within its limits.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

from runner.endpoints import catalog
from runner.endpoints.fields import SEED_MAX, SEED_MIN
from runner.manifest.reader import JSONLimitError, load_json

Kind = Literal["bool", "int", "float", "str", "json", "any"]

MAX_EXPANSION = 1000
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# Only a trailing ":<number>" is a scale, so URLs with ports keep their colons.
_SCALE_SUFFIX = re.compile(r"^(?P<path>.+):(?P<scale>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")
# "https://host:8080" has no path: its trailing number is a port, not a scale.
_BARE_ORIGIN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*$")
_SHOW_LIMIT = 60


class CellError(ValueError):
    """A cell's text does not parse; ``column`` names the cell, ``str()`` says why."""

    def __init__(self, column: str, message: str) -> None:
        self.column = column
        super().__init__(message)


def show(value: Any) -> str:
    """A short repr of a cell value for messages."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 4] + "...'"


def is_blank(value: Any) -> bool:
    """Whether a cell means "not given": None or whitespace-only text."""
    return value is None or (isinstance(value, str) and not value.strip())


def _load_json(column: str, text: str) -> Any:
    try:
        return load_json(text)
    except JSONLimitError as exc:
        raise CellError(column, f"{column}={show(text)} {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CellError(column, f"{column}={show(text)} is not valid JSON: {exc.msg}") from exc


# --- loras -------------------------------------------------------------------------


def parse_loras(column: str, value: Any) -> list[dict[str, Any]]:
    """``[{"path", "scale"}]`` from JSON, the shorthand, or native lists of dicts."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{":
            value = _load_json(column, text)
        else:
            return [_lora_shorthand(column, item) for item in _split(text, ";")]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list | tuple):
        raise CellError(column, f"{column}={show(value)} is not a list of LoRAs")
    return [_lora_item(column, item) for item in value]


def _lora_shorthand(column: str, item: str) -> dict[str, Any]:
    match = _SCALE_SUFFIX.match(item)
    if match is None or _BARE_ORIGIN.match(match["path"]):
        return {"path": item, "scale": 1.0}
    return {"path": match["path"].strip(), "scale": float(match["scale"])}


def _lora_item(column: str, item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return _lora_shorthand(column, item.strip())
    if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
        raise CellError(column, f"{column}: LoRA {show(item)} needs a text 'path'")
    # Parquet structs carry every field; a null scale means "not given".
    return {str(k): v for k, v in item.items() if v is not None}


def _split(text: str, separator: str) -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


# --- image_urls, image_size, seeds, counts -------------------------------------------


def parse_image_urls(column: str, value: Any) -> list[str]:
    """A list of URLs or paths from a JSON list, ``a|b|c``, or a native list."""
    if isinstance(value, str):
        text = value.strip()
        value = _load_json(column, text) if text.startswith("[") else _split(text, "|")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise CellError(column, f"{column}={show(value)} is not a list of image URLs")
    urls = [v.strip() for v in value if v.strip()]
    if not urls:
        raise CellError(column, f"{column} lists no image URLs")
    return urls


def parse_image_size(column: str, value: Any) -> str | dict[str, int]:
    """A preset name or ``{"width", "height"}``, checked by the catalog."""
    if isinstance(value, str) and value.strip().startswith("{"):
        value = _load_json(column, value.strip())
    elif isinstance(value, str):
        value = value.strip()
    if not isinstance(value, str | Mapping | catalog.ImageSize):
        raise CellError(column, f"{column}={show(value)} is not an image size")
    try:
        size = catalog.parse_image_size(value)
    except (ValueError, TypeError) as exc:
        raise CellError(column, f"{column}={show(value)} {_first_line(exc)}") from exc
    if isinstance(size, str):
        return size
    return {"width": size.width, "height": size.height}


def parse_seeds(column: str, value: Any) -> list[int]:
    """Seeds from ``1,2,3``, a JSON list, one integer, or a native list."""
    if isinstance(value, str):
        text = value.strip()
        value = _load_json(column, text) if text.startswith("[") else _split(text, ",")
    items = value if isinstance(value, list | tuple) else [value]
    seeds = [_integer(column, item, f"{column} value {show(item)}") for item in items]
    if not seeds:
        raise CellError(column, f"{column} lists no seeds")
    if len(seeds) > MAX_EXPANSION:
        raise CellError(column, f"{column} lists {len(seeds)} seeds; at most {MAX_EXPANSION}")
    seen: set[int] = set()
    for seed in seeds:
        if not SEED_MIN <= seed <= SEED_MAX:
            raise CellError(column, f"{column} value {seed} is outside the 64-bit seed range")
        if seed in seen:
            raise CellError(column, f"{column} repeats the seed {seed}")
        seen.add(seed)
    return seeds


def parse_count(column: str, value: Any, *, low: int = 1, high: int = MAX_EXPANSION) -> int:
    """An integer count such as ``variants``, within ``low..high``."""
    count = _integer(column, value, f"{column}={show(value)}")
    if not low <= count <= high:
        raise CellError(column, f"{column}={count} is not between {low} and {high}")
    return count


def _integer(column: str, value: Any, subject: str) -> int:
    if isinstance(value, bool):
        raise CellError(column, f"{subject} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            number = _float_or_none(text)
            if number is not None and number.is_integer():
                return int(number)
    raise CellError(column, f"{subject} is not an integer")


def _float_or_none(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --- scalars typed by the request field --------------------------------------------


def field_kind(annotation: Any) -> Kind:
    """How a text cell for a field of this annotation is read."""
    kinds = {_single_kind(arg) for arg in _union_args(annotation)}
    if len(kinds) > 1:
        kinds.discard("any")
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {"int", "float"}:
        return "float"
    return "any"


def _union_args(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _union_args(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return [leaf for arg in args for leaf in _union_args(arg)]
    return [annotation]


def _single_kind(annotation: Any) -> Kind:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        values = typing.get_args(annotation)
        if all(isinstance(v, bool) for v in values):
            return "bool"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "int"
        return "str"
    if origin in (list, tuple, dict, set, frozenset) or annotation in (list, tuple, dict):
        return "json"
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return "bool"
        if issubclass(annotation, int):
            return "int"
        if issubclass(annotation, float):
            return "float"
        if issubclass(annotation, str):
            return "str"
        if issubclass(annotation, BaseModel):
            return "json"
    return "any"


def coerce_text(column: str, text: str, kind: Kind) -> Any:
    """A CSV cell's text as the JSON value a field of ``kind`` expects."""
    text = text.strip()
    if kind == "str":
        return text
    if kind == "bool":
        lowered = text.lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise CellError(column, f"{column}={show(text)} is not a boolean (true/false/yes/no/1/0)")
    if kind == "int":
        return _integer(column, text, f"{column}={show(text)}")
    if kind == "float":
        number = _float_or_none(text)
        if number is None:
            raise CellError(column, f"{column}={show(text)} is not a number")
        return number
    if kind == "json":
        return _load_json(column, text)
    return _guess(column, text)


def guess_text(text: str) -> Any:
    """An untyped cell's best JSON reading: JSON list/object, number, boolean, or text.

    Text that is not JSON stays text; JSON past :func:`load_json`'s limits raises
    :class:`~runner.manifest.reader.JSONLimitError` (it is JSON, just unusable).
    """
    text = text.strip()
    if text[:1] in "[{":
        try:
            return load_json(text)
        except json.JSONDecodeError:
            return text
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"[+-]?\d+", text):
        try:
            return int(text)
        except ValueError:  # past Python's 4300-digit limit: no field takes it as a number
            return text
    number = _float_or_none(text)
    return number if number is not None and re.fullmatch(r"[0-9eE+.-]+", text) else text


def _guess(column: str, text: str) -> Any:
    try:
        return guess_text(text)
    except JSONLimitError as exc:
        raise CellError(column, f"{column}={show(text.strip())} {exc}") from exc


_SYNTAXES = {
    "loras": parse_loras,
    "image_urls": parse_image_urls,
    "image_size": parse_image_size,
}


def parse_cell(column: str, value: Any, kind: Kind) -> Any:
    """A request field's cell as a JSON value: special syntaxes, then text by kind.

    ``kind`` is :func:`field_kind` of the field's annotation (computed once per
    endpoint by the caller). Native (JSONL/Parquet) values other than text pass
    through for the request model to validate, except where text goes: there the
    model's checks assume text, so a number, list or object is refused here.
    """
    syntax = _SYNTAXES.get(column)
    if syntax is not None:
        return syntax(column, value)
    if isinstance(value, str):
        return coerce_text(column, value, kind)
    if kind == "str":
        raise CellError(column, f"{column}={show(value)} is not text")
    return value


def parse_untyped_cell(column: str, value: Any) -> Any:
    """A cell for an endpoint outside the catalog: special syntaxes, else a guess.

    No model checks an untyped request, so a NaN or an infinity anywhere in it (a JSONL
    ``NaN``, a CSV ``1e999``) is refused here: JSON cannot carry it to fal."""
    syntax = _SYNTAXES.get(column)
    if syntax is not None and column != "image_size":
        parsed = syntax(column, value)
    elif isinstance(value, str):
        parsed = _guess(column, value)
    else:
        parsed = value
    if not _finite(parsed):
        raise CellError(column, f"{column}={show(value)} holds NaN or an infinity, which JSON "
                        "cannot carry")  # fmt: skip
    return parsed


def _finite(value: Any) -> bool:
    """Whether every float in ``value`` (nested lists and objects too) is finite."""
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    return True
