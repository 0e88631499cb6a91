"""The value types request fields are made of: strict-ish numbers, non-empty text, image sizes
and LoRA weights.

"Strict-ish": integers reject booleans and numbers with a fractional part but accept ``28.0``
and numeric text ``"28"`` (CSV cells arrive as text); floats accept integers and reject
booleans, NaN and infinity. Custom errors carry a predicate that
runner.endpoints.diagnostics appends to ``field=value``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, PlainValidator
from pydantic_core import PydanticCustomError

from runner.endpoints.limits import PRESETS, Preset


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not true/false")
    return value


def _finite(value: Any) -> Any:
    # Checked before the range, which NaN would otherwise fail with a confusing message.
    text = value.strip().lower().lstrip("+-") if isinstance(value, str) else None
    if (isinstance(value, float) and not math.isfinite(value)) or text in (
        "nan",
        "inf",
        "infinity",
    ):
        raise PydanticCustomError("finite_number", "is not a finite number")
    return value


def _not_blank(value: str) -> str:
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_finite), BeforeValidator(_not_bool)]
NonEmpty = Annotated[str, Field(min_length=1), BeforeValidator(_not_blank)]
# The ledger stores seeds as int64: a larger one is a bad row, not a ledger it cannot write.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
Seed = Annotated[Int, Field(ge=SEED_MIN, le=SEED_MAX)]
# FLUX.1 sizes: the seeds state no upper bound, so only "positive" and the ledger's int32
# width/height columns are enforced (a side past them once broke the ledger's money column).
SIDE_MAX = 2**31 - 1
PositiveInt = Annotated[Int, Field(gt=0, le=SIDE_MAX)]


class ImageSize(BaseModel):
    """An explicit output size in pixels."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    width: PositiveInt
    height: PositiveInt


class LoraWeight(BaseModel):
    """One LoRA: a URL, Hugging Face repo id or path, and its scale (usually 0-2, not enforced)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: NonEmpty
    scale: Float = 1.0


_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_image_size(value: str | Mapping[str, Any] | ImageSize) -> str | ImageSize:
    """A preset name, ``"1024x768"`` (``X`` and spaces tolerated) or ``{"width", "height"}``.

    Raises ValueError whose text completes ``image_size=<value> ...``.
    """
    if isinstance(value, ImageSize):
        return value
    if isinstance(value, str):
        name = value.strip()
        if name in PRESETS:
            return name
        match = _WXH.match(name)
        if match is None:
            raise ValueError(
                f"is not a preset ({', '.join(PRESETS)}) or WIDTHxHEIGHT such as 1024x768"
            )
        return _size(int(match[1]), int(match[2]))
    if isinstance(value, Mapping):
        if set(value) != {"width", "height"}:
            raise ValueError("must have exactly the keys width and height")
        return _size(value["width"], value["height"])
    raise ValueError("must be a preset name, WIDTHxHEIGHT or {width, height}")


def _size(width: Any, height: Any) -> ImageSize:
    for side, px in (("width", width), ("height", height)):
        whole = isinstance(px, int) and not isinstance(px, bool)
        whole = whole or (isinstance(px, float) and px.is_integer())
        if not whole or px <= 0:
            raise ValueError(f"has {side} {px!r}; width and height must be positive whole numbers")
        if px > SIDE_MAX:
            raise ValueError(f"has {side} {int(px)}, above the largest side {SIDE_MAX}")
    return ImageSize(width=int(width), height=int(height))


def _image_size_field(value: Any) -> str | ImageSize:
    try:
        return parse_image_size(value)
    except ValueError as exc:
        raise PydanticCustomError("image_size", str(exc)) from exc


def _image_size_json(value: str | ImageSize) -> str | dict[str, int]:
    return value if isinstance(value, str) else {"width": value.width, "height": value.height}


ImageSizeValue = Annotated[
    Preset | ImageSize, PlainValidator(_image_size_field), PlainSerializer(_image_size_json)
]


def size_of(value: str | ImageSize) -> tuple[int, int]:
    """Pixels of a parsed image_size value."""
    return PRESETS[value] if isinstance(value, str) else (value.width, value.height)
