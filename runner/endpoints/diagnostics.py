"""Readable messages for request validation errors: ``guidance_scale=40 is above the maximum 35``.

Pydantic's messages name Python types; a manifest author needs the column, the value they
wrote, the limit and the endpoint. :func:`describe` maps each pydantic error type to one such
sentence. Custom errors raised by the catalog carry a predicate ("is not a preset ...") that is
appended to ``field=value``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from runner.endpoints.limits import BOUNDS

_PREDICATES = {
    "int_from_float": "must be a whole number",
    "int_parsing": "is not a whole number",
    "int_type": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "string_type": "is not text",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}


def describe(
    exc: ValidationError, endpoint_id: str, known_fields: Collection[str] = ()
) -> list[tuple[str, str]]:
    """(column, message) per error; column is the top-level field ('' if none)."""
    return [_one(err, endpoint_id, known_fields) for err in exc.errors(include_url=False)]


def _one(err: ErrorDetails, ep: str, known: Collection[str]) -> tuple[str, str]:
    loc = err["loc"]
    column = str(loc[0]) if loc else ""
    where = _where(loc) or "request"
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    shown = f"{where}={show(err.get('input'))}"
    if kind == "missing":
        return column, f"{where} is required for {ep}"
    if kind == "extra_forbidden":
        return column, _unknown_key(loc, ep, known)
    if kind in ("string_too_short", "blank"):
        return column, f"{where} must not be empty"
    if kind in ("too_long", "too_short"):
        return column, _count(kind, where, ctx, ep)
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return column, f"{shown} {_limit(kind, ctx)} for {ep}{_bound_note(ep, loc)}"
    if kind == "literal_error":
        return column, f"{shown} is not one of {ctx.get('expected', '?')} for {ep}"
    predicate = _PREDICATES.get(kind, err["msg"])
    return column, f"{shown} {predicate} for {ep}"


def _where(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def show(value: Any) -> str:
    """A value as the user wrote it: numbers bare, 40.0 as 40, text quoted unless numeric."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        text = value if _numeric(value) else repr(value)
    else:
        try:
            text = json.dumps(value, default=str, separators=(",", ":"))
        except ValueError:
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _limit(kind: str, ctx: dict[str, Any]) -> str:
    if kind == "greater_than_equal":
        return f"is below the minimum {show(ctx.get('ge'))}"
    if kind == "less_than_equal":
        return f"is above the maximum {show(ctx.get('le'))}"
    if kind == "greater_than":
        return f"must be greater than {show(ctx.get('gt'))}"
    return f"must be less than {show(ctx.get('lt'))}"


def _bound_note(ep: str, loc: tuple[int | str, ...]) -> str:
    bound = BOUNDS.get(ep, {}).get(str(loc[0])) if len(loc) == 1 else None
    if bound is None:
        return ""
    note = bound.note or ("" if bound.confirmed else "unconfirmed")
    return f" ({note})" if note else ""


def _count(kind: str, where: str, ctx: dict[str, Any], ep: str) -> str:
    actual = ctx.get("actual_length")
    if kind == "too_short":
        return f"{where} has {actual} items; {ep} needs at least {ctx.get('min_length')}"
    text = f"{where} has {actual} items; {ep} accepts at most {ctx.get('max_length')}"
    if where == "image_urls":
        text += " (fal would silently use only the first ones)"
    return text


def _unknown_key(loc: tuple[int | str, ...], ep: str, known: Collection[str]) -> str:
    name = str(loc[-1]) if loc else "?"
    if len(loc) > 1:
        return f"{_where(loc[:-1])} has an unknown key {name!r} for {ep}"
    if name == "loras":
        return f"{ep} takes no loras"
    text = f"unknown parameter {name!r} for {ep}"
    import difflib  # here: only an unknown parameter needs it (~1 ms of CPU to import)

    close = difflib.get_close_matches(name, list(known), n=1)
    return text + (f" (did you mean {close[0]!r}?)" if close else "")
