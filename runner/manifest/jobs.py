"""From manifest rows to typed jobs.

This module owns what a row *means*: which endpoint it calls, which columns are
request parameters (the fields of that endpoint's request model), which are
control columns (``seeds``, ``variants``, ``prompt_template``) and which are
metadata (kept as text, never sent); ``--set`` defaults; prompt templates;
expansion into one job per seed or variant; and the stable ``job_key``.

Row identity. A row is identified by its ``id`` cell: text, or a number, which
becomes its text (``17``). A row whose id is missing or blank is ``#`` and its row
number instead: ``#1`` is the first data row (the header and blank lines do not count).
No explicit id can take that form: an id of ``#`` and digits alone (``#3``, after
trimming) is a row error, so the two never collide; ``#a`` or ``a#1`` are fine.
The manifest's name and location are never part of a row's identity, except for
the ``invalid`` record of a bad row without an id (:func:`row_identity`), which
uses the manifest's resolved path.

A bad row becomes a :class:`~runner.errors.RowError` carrying every problem
found in it, yielded in place of its jobs; it never stops the stream.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
import string
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runner.endpoints import catalog
from runner.endpoints.catalog import BaseRequest, EndpointSpec
from runner.errors import RowError, RowProblem, UnknownEndpointError
from runner.manifest import cells
from runner.manifest.idtable import FirstLines
from runner.manifest.reader import RawRow

CONTROL_COLUMNS = frozenset({"seeds", "variants", "prompt_template"})
IDENTITY_COLUMNS = frozenset({"id", "endpoint"})
KEY_HEX_CHARS = 32
SEED_SPACE = 2**31  # derived seeds fall in 0..2**31-1
NEAR_MISS_CUTOFF = 0.8
# The identity of a row without an id; explicit ids of this form are refused.
_ROW_NUMBER_ID = re.compile(r"#[0-9]+")
_EXPANSION_COLUMNS = ("seed", "seeds", "variants")
# Parameters of any catalog endpoint: in a mixed manifest, a column for one
# endpoint's parameter is not metadata on another endpoint's row.
_ALL_PARAMETERS = frozenset(
    name for spec in catalog.CATALOG.values() for name in spec.model.model_fields
)


@dataclass(frozen=True)
class ExpandOptions:
    """How rows become jobs; built once by the CLI."""

    manifest_dir: Path
    default_endpoint: str | None = None
    allowed_endpoints: frozenset[str] = frozenset()
    defaults: Mapping[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    # Duplicate ids cost 21-43 bytes per row to detect; a pass that only counts skips it.
    check_unique_ids: bool = True


@dataclass(frozen=True, slots=True)
class Job:
    """One request to send: a row (or one of its seeds/variants) made typed."""

    job_key: str
    row_id: str
    line: int
    source: str
    variant: int
    endpoint: str
    payload: Mapping[str, Any]
    request: BaseRequest | None
    metadata: Mapping[str, str]


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value: sorted keys, compact, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def job_key(row_id: str, endpoint: str, payload: Mapping[str, Any], variant: int) -> str:
    """A stable key: the same row, endpoint, body and variant give the same key.

    The manifest's name and location are deliberately not part of it, so a
    moved or renamed manifest resumes where it stopped.
    """
    body = {"row": row_id, "endpoint": endpoint, "payload": payload, "variant": variant}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:KEY_HEX_CHARS]


def row_number_id(index: int) -> str:
    """The identity of the row at 0-based data-row ``index`` when it has no id: ``#1``, ``#2``..."""
    return f"#{index + 1}"


def is_row_number_id(row_id: str) -> bool:
    """Whether ``row_id`` stands in for a missing id (no explicit id has this form)."""
    return _ROW_NUMBER_ID.fullmatch(row_id) is not None


def row_identity(problem: RowProblem) -> str:
    """What makes a bad row's ``invalid`` record one record, however the manifest is spelt.

    A row with an id: that id and its line (two bad rows sharing an id are two records),
    and no path, as in :func:`job_key`, so ``/abs/m.csv``, ``m.csv`` and ``dir/m.csv`` are
    one record. A row without one: the manifest's resolved path, its ``#n`` and its line.
    """
    if problem.row_id is not None and not is_row_number_id(problem.row_id):
        return f"id\0{problem.row_id}\0{problem.line}"
    resolved = _resolved(os.getcwd(), problem.file)
    return f"file\0{resolved}\0{problem.row_id}\0{problem.line}"


@functools.lru_cache(maxsize=16)
def _resolved(cwd: str, file: str) -> str:
    # Cached per working directory: a relative spelling means another file elsewhere.
    path = os.path.join(cwd, file)
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop: the absolute spelling is the best left
        return os.path.normpath(path)


def variant_seed(row_id: str, variant: int) -> int:
    """The seed of variant ``variant`` of a row: deterministic, in 0..2**31-1."""
    digest = hashlib.sha256(f"{row_id}\x1f{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_SPACE


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
            out.append(_as_text(value))
    if missing:
        names = ", ".join(f"{{{m}}}" for m in dict.fromkeys(missing))
        raise ValueError(f"prompt_template needs {names} but the column is missing or empty")
    return "".join(out)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return canonical_json(value)


def iter_jobs(rows: Iterable[RawRow], options: ExpandOptions) -> Iterator[Job | RowError]:
    """Lazily turn rows into jobs; a bad row yields one RowError instead.

    Raises UnknownEndpointError at once when ``options.default_endpoint`` is
    neither in the catalog nor allowed (it is a flag, so the run cannot start).
    """
    if options.default_endpoint is not None:
        catalog.get_endpoint(options.default_endpoint, allowed=options.allowed_endpoints)
    expander = _Expander(options)
    return (item for row in rows for item in expander.expand(row))


@dataclass
class _Row:
    """A row while it is being expanded: where it is, and the problems found so far."""

    raw: RawRow
    row_id: str
    problems: list[RowProblem] = field(default_factory=list)

    def problem(self, column: str | None, message: str) -> None:
        problem = RowProblem(self.raw.file, self.raw.line, column, message, self.row_id)
        if problem not in self.problems:
            self.problems.append(problem)

    def error(self) -> RowError:
        return RowError(self.problems)


class _Expander:
    """Row expansion state for one manifest: options, endpoint cache, ids seen."""

    def __init__(self, options: ExpandOptions) -> None:
        self.options = options
        self.specs: dict[str, EndpointSpec | None] = {}
        self.first_lines = FirstLines()

    def expand(self, raw: RawRow) -> list[Job] | list[RowError]:
        row_id, id_problem = _row_id(raw)
        row = _Row(raw, row_id)
        # Claim the id first, even for a row that cannot be parsed, so a later row
        # reusing it is reported now rather than once this one is fixed.
        self._check_unique_id(row)
        if raw.problem is not None:
            row.problem(None, raw.problem)
            return [row.error()]
        if id_problem is not None:
            row.problem("id", id_problem)
        values = self._with_defaults(raw.cells)
        endpoint = self._endpoint(row, values)
        template = _first_given(values.get("prompt_template"), self.options.prompt_template)
        if template is not None:
            try:
                values["prompt"] = fill_template(_template_text(template), values)
            except ValueError as exc:
                row.problem("prompt_template", str(exc))
                values["prompt"] = None
        if endpoint is None:
            return [row.error()]
        spec = self.specs[endpoint]
        payload, metadata, failed = _split_columns(row, values, spec)
        if template is not None and values["prompt"] is None:
            failed.add("prompt")
        variants = _expansion(row, values, payload)
        if row.problems:
            # Validate what parsed anyway so the user sees every problem at once.
            _validate(row, endpoint, spec, payload, failed)
            return [row.error()]
        jobs = [
            self._job(row, endpoint, spec, payload, metadata, failed, variant, seed)
            for variant, seed in variants
        ]
        if row.problems:
            return [row.error()]
        return [job for job in jobs if job is not None]

    def _check_unique_id(self, row: _Row) -> None:
        if not self.options.check_unique_ids or is_row_number_id(row.row_id):
            return  # a row number is unique by construction
        # An id is held as two independent hashes (of the id, and of the id plus a
        # separator): a dict of the ids themselves cost ~120 bytes per row. Telling a
        # duplicate from two ids that share both hashes would need the first id, so
        # such a pair (96 bits alike: ~n**2 / 2**97, 6e-18 at 1M rows) is reported as
        # a duplicate. hash() over blake2b: 20 ns against 520 per id; its per-process
        # salt (unless PYTHONHASHSEED is set) makes even that an accident of one run.
        row_id = row.row_id
        first = self.first_lines.claim(
            hash(row_id), row.raw.line, hash(row_id + "\x1f") & 0xFFFF_FFFF
        )
        if first != row.raw.line:
            row.problem("id", f"id {row.row_id!r} is already used on line {first}")

    def _with_defaults(self, raw_cells: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(raw_cells)
        # seed, seeds and variants exclude each other: a row giving one of
        # them has chosen its expansion, and a --set of another must not clash.
        chosen = any(not cells.is_blank(values.get(key)) for key in _EXPANSION_COLUMNS)
        for key, text in self.options.defaults.items():
            if key in IDENTITY_COLUMNS or (chosen and key in _EXPANSION_COLUMNS):
                continue
            if cells.is_blank(values.get(key)):
                values[key] = text
        return values

    def _endpoint(self, row: _Row, values: Mapping[str, Any]) -> str | None:
        given = values.get("endpoint")
        if not cells.is_blank(given) and not isinstance(given, str):
            row.problem("endpoint", f"endpoint={cells.show(given)} is not text")
            return None
        endpoint = given.strip() if isinstance(given, str) and given.strip() else None
        endpoint = endpoint or self.options.default_endpoint
        if endpoint is None:
            row.problem("endpoint", "no endpoint: add an endpoint column or pass --endpoint")
            return None
        if endpoint not in self.specs:
            try:
                allowed = self.options.allowed_endpoints
                self.specs[endpoint] = catalog.get_endpoint(endpoint, allowed=allowed)
            except UnknownEndpointError as exc:
                row.problem("endpoint", str(exc))
                return None
        return endpoint

    def _job(
        self,
        row: _Row,
        endpoint: str,
        spec: EndpointSpec | None,
        payload: Mapping[str, Any],
        metadata: Mapping[str, str],
        failed: Collection[str],
        variant: int,
        seed: int | None,
    ) -> Job | None:
        body = dict(payload) if seed is None else {**payload, "seed": seed}
        request = _validate(row, endpoint, spec, body, failed)
        if spec is not None and request is None:
            return None
        sent = request.to_payload() if request is not None else json.loads(canonical_json(body))
        return Job(
            job_key=job_key(row.row_id, endpoint, sent, variant),
            row_id=row.row_id,
            line=row.raw.line,
            source=row.raw.file,
            variant=variant,
            endpoint=endpoint,
            payload=sent,
            request=request,
            metadata=metadata,
        )


def _row_id(raw: RawRow) -> tuple[str, str | None]:
    """The row's identity, and why its id cell cannot be one (its row number stands in)."""
    given = raw.cells.get("id")
    fallback = row_number_id(raw.index)
    if cells.is_blank(given):
        return fallback, None
    if isinstance(given, bool) or not isinstance(given, str | int | float):
        return fallback, f"id={cells.show(given)} is not text or a number"
    row_id = given.strip() if isinstance(given, str) else _as_text(given)
    if is_row_number_id(row_id):
        return fallback, (
            f"id {row_id!r} has the form kept for rows without an id (# and a row number)"
        )
    return row_id, None


def _template_text(template: Any) -> str:
    if not isinstance(template, str):
        raise ValueError(f"prompt_template={cells.show(template)} is not text")
    return template


def _first_given(*candidates: Any) -> Any:
    return next((c for c in candidates if not cells.is_blank(c)), None)


def _split_columns(
    row: _Row, values: Mapping[str, Any], spec: EndpointSpec | None
) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """The request body, the metadata, and the parameter columns that failed to parse."""
    fields = _field_kinds(spec) if spec is not None else None
    payload: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    failed: set[str] = set()
    for column, value in values.items():
        if column in CONTROL_COLUMNS or column in IDENTITY_COLUMNS:
            continue
        if fields is not None and column not in fields:
            if column not in _ALL_PARAMETERS:
                metadata[column] = "" if value is None else _as_text(value)
            elif not cells.is_blank(value):
                # Another endpoint's parameter (a mixed manifest): dropping it
                # silently would change what the user asked for.
                assert spec is not None
                row.problem(
                    column, f"{column} is not a parameter of {spec.id}; leave it empty on this row"
                )
            continue
        if cells.is_blank(value):
            continue
        try:
            if fields is None:
                payload[column] = cells.parse_untyped_cell(column, value)
            else:
                payload[column] = cells.parse_cell(column, value, fields[column])
        except cells.CellError as exc:
            failed.add(column)
            row.problem(column, str(exc))
    return payload, metadata, failed


@functools.cache
def _field_kinds(spec: EndpointSpec) -> dict[str, cells.Kind]:
    """How each request field's text cells are read; once per endpoint."""
    return {name: cells.field_kind(f.annotation) for name, f in spec.model.model_fields.items()}


def _expansion(
    row: _Row, values: Mapping[str, Any], payload: Mapping[str, Any]
) -> list[tuple[int, int | None]]:
    """(variant, seed) pairs: one per seed, one per variant, or a single (0, None)."""
    seeds_cell, variants_cell = values.get("seeds"), values.get("variants")
    has_seeds, has_variants = not cells.is_blank(seeds_cell), not cells.is_blank(variants_cell)
    if has_seeds and has_variants:
        row.problem("seeds", "give either seeds or variants, not both")
        return []
    if (has_seeds or has_variants) and "seed" in payload:
        other = "seeds" if has_seeds else "variants"
        row.problem("seed", f"give either seed or {other}, not both")
        return []
    try:
        if has_seeds:
            seeds = cells.parse_seeds("seeds", seeds_cell)
            return list(enumerate(seeds))
        if has_variants:
            count = cells.parse_count("variants", variants_cell)
            return [(i, variant_seed(row.row_id, i)) for i in range(count)]
    except cells.CellError as exc:
        row.problem(exc.column, str(exc))
        return []
    return [(0, None)]


def _validate(
    row: _Row,
    endpoint: str,
    spec: EndpointSpec | None,
    body: Mapping[str, Any],
    failed: Collection[str],
) -> BaseRequest | None:
    """The typed request, or None after recording its problems on the row."""
    if spec is None:
        return None
    try:
        return catalog.parse_request(endpoint, body)
    except ValidationError as exc:
        for where, message in catalog.describe_errors(exc, endpoint):
            column = where.split(".", 1)[0] if where else None
            # A column whose text did not parse is already reported; its
            # absence must not also be reported as "missing".
            if column not in failed:
                row.problem(column, message)
        return None
