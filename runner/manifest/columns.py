"""A manifest's columns and templates: misspelt parameter names, and ``{column}`` prompts."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

from runner.endpoints import catalog
from runner.manifest import cells

CONTROL_COLUMNS = frozenset({"seeds", "variants", "prompt_template"})
IDENTITY_COLUMNS = frozenset({"id", "endpoint"})
NEAR_MISS_CUTOFF = 0.8


def column_warnings(columns: Iterable[str], endpoint_ids: Iterable[str]) -> list[str]:
    """Warnings for metadata columns that look like misspelt parameter names.

    Called once per file with its header (and ``--set`` keys) and the
    endpoints it uses; unknown endpoints contribute no parameter names.
    """
    specs = [catalog.CATALOG[e] for e in dict.fromkeys(endpoint_ids) if e in catalog.CATALOG]
    params = {name for spec in specs for name in spec.model.model_fields}
    known = params | CONTROL_COLUMNS | IDENTITY_COLUMNS
    by_lower = {name.lower(): name for name in sorted(known)}
    where = ", ".join(spec.id for spec in specs) or "any known endpoint"
    warnings = []
    for column in dict.fromkeys(columns):
        if column in known:
            continue
        import difflib  # here: only an unknown column needs it (~1 ms of CPU to import)

        close = difflib.get_close_matches(column.lower(), by_lower, n=1, cutoff=NEAR_MISS_CUTOFF)
        if close:
            warnings.append(
                f"column {column!r} is not a parameter of {where} and is kept as metadata "
                f"(never sent); did you mean {by_lower[close[0]]!r}?"
            )
    return warnings


def fill_template(template: str, values: Mapping[str, Any]) -> str:
    """``{column}`` placeholders filled from a row's cells.

    Raises ValueError naming every placeholder whose column is missing or
    empty, or describing a malformed template.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt_template is not a valid template: {exc}") from exc
    out: list[str] = []
    missing: list[str] = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        if not name or spec or conversion or any(c in name for c in ".[]"):
            raise ValueError(
                f"prompt_template placeholder {{{name}}} is not a plain {{column}} name"
            )
        value = values.get(name)
        if cells.is_blank(value):
            missing.append(name)
        else:
            out.append(as_text(value))
    if missing:
        names = ", ".join(f"{{{m}}}" for m in dict.fromkeys(missing))
        raise ValueError(f"prompt_template needs {names} but the column is missing or empty")
    return "".join(out)


def as_text(value: Any) -> str:
    """A cell as text: a string stripped, anything else as canonical JSON."""
    from runner.manifest.identity import canonical_json

    if isinstance(value, str):
        return value.strip()
    return canonical_json(value)
