"""From manifest rows to typed jobs.

This module owns what a row *means*: which endpoint it calls, which columns are
request parameters (the fields of that endpoint's request model), which are
control columns (``seeds``, ``variants``, ``prompt_template``) and which are
metadata (kept as text, never sent); ``--set`` defaults; prompt templates;
expansion into one job per seed or variant; and the stable ``job_key``.

Row identity (an id column, else the row's content) is :mod:`runner.manifest.identity`;
``ExpandOptions.id_column`` names the column, and :func:`identity_notice` says which is in use.

A bad row becomes a :class:`~runner.errors.RowError` carrying every problem
found in it, yielded in place of its jobs; it never stops the stream.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runner.endpoints import catalog
from runner.endpoints.catalog import BaseRequest, EndpointSpec
from runner.errors import RowError, RowProblem, UnknownEndpointError
from runner.manifest import cells
from runner.manifest.columns import (
    CONTROL_COLUMNS,
    as_text,
    fill_template,
)
from runner.manifest.identity import (
    DEFAULT_ID_COLUMN,
    SeenRows,
    given_id,
)

# Re-exported: the identity functions lived here, and callers still import them from here.
from runner.manifest.identity import canonical_json as canonical_json
from runner.manifest.identity import identity_notice as identity_notice
from runner.manifest.identity import is_row_number_id as is_row_number_id
from runner.manifest.identity import job_key as job_key
from runner.manifest.identity import row_identity as row_identity
from runner.manifest.identity import row_number_id as row_number_id
from runner.manifest.identity import variant_seed as variant_seed
from runner.manifest.reader import RawRow

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
    # The column that identifies a row (--id-column); None: ``id`` where given, else content.
    id_column: str | None = None
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
    """Row expansion state for one manifest: options, endpoint cache, ids and contents seen."""

    def __init__(self, options: ExpandOptions) -> None:
        self.options = options
        self.id_column = options.id_column or DEFAULT_ID_COLUMN
        self.identity_columns = frozenset({self.id_column, "endpoint"})
        self.specs: dict[str, EndpointSpec | None] = {}
        self.seen = SeenRows()
        self.cost_requests: dict[Any, BaseRequest] = {}  # the batch reader's, per cost kind

    def expand(self, raw: RawRow) -> list[Job] | list[RowError]:
        required = self.options.id_column is not None
        given, id_problem = given_id(raw.cells, self.id_column, required=required)
        row = _Row(raw, given if given is not None else row_number_id(raw.index))
        if given is not None:
            # Claim the id first, even for a row that cannot be parsed, so a later row
            # reusing it is reported now rather than once this one is fixed.
            self._check_unique_id(row)
        if raw.problem is not None:
            row.problem(None, raw.problem)
            return [row.error()]
        if id_problem is not None:
            row.problem(self.id_column, id_problem)
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
        payload, metadata, failed = _split_columns(row, values, spec, self.identity_columns)
        if template is not None and values["prompt"] is None:
            failed.add("prompt")
        expansion = _expansion(row, values, payload)
        if row.problems:
            # Validate what parsed anyway so the user sees every problem at once.
            _validate(row, endpoint, spec, payload, failed)
            return [row.error()]
        return self.finish(row, endpoint, spec, payload, metadata, failed, expansion, given)

    def finish(
        self,
        row: _Row,
        endpoint: str,
        spec: EndpointSpec | None,
        payload: Mapping[str, Any],
        metadata: Mapping[str, str],
        failed: Collection[str],
        expansion: tuple[int, ...] | int | None,
        given: str | None,
    ) -> list[Job] | list[RowError]:
        """A parsed row's jobs: its request validated, its identity, one job per variant.

        The vector path (:mod:`runner.manifest.batches`) enters here with cells it typed
        itself, so a job's key and payload are made by one piece of code either way.
        """
        base: BaseRequest | None = None
        if given is None:
            base = _validate(row, endpoint, spec, payload, failed)
            if spec is not None and base is None:
                return [row.error()]
            self._identify_by_content(row, endpoint, base, payload, metadata, expansion)
        jobs = [
            self._job(row, endpoint, spec, payload, metadata, failed, variant, seed, base)
            for variant, seed in _variants(row.row_id, expansion)
        ]
        if row.problems:
            return [row.error()]
        return [job for job in jobs if job is not None]

    def _identify_by_content(
        self,
        row: _Row,
        endpoint: str,
        base: BaseRequest | None,
        payload: Mapping[str, Any],
        metadata: Mapping[str, str],
        expansion: tuple[int, ...] | int | None,
    ) -> None:
        """Name a row without an id by its content and how many identical rows came before."""
        sent = base.to_payload() if base is not None else json.loads(canonical_json(payload))
        content = {
            "endpoint": endpoint,
            "payload": sent,
            # An empty cell says nothing: adding an empty column must not renew every row.
            "metadata": {k: v for k, v in metadata.items() if v != ""},
            "expansion": list(expansion) if isinstance(expansion, tuple) else expansion,
        }
        row.row_id = self.seen.by_content(content)

    def _check_unique_id(self, row: _Row) -> None:
        if not self.options.check_unique_ids:
            return
        first = self.seen.claim(row.row_id, row.raw.line)
        if first != row.raw.line:
            message = f"{self.id_column} {row.row_id!r} is already used on line {first}"
            row.problem(self.id_column, message)

    def _with_defaults(self, raw_cells: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(raw_cells)
        # seed, seeds and variants exclude each other: a row giving one of
        # them has chosen its expansion, and a --set of another must not clash.
        chosen = any(not cells.is_blank(values.get(key)) for key in _EXPANSION_COLUMNS)
        for key, text in self.options.defaults.items():
            if key in self.identity_columns or (chosen and key in _EXPANSION_COLUMNS):
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
        base: BaseRequest | None,
    ) -> Job | None:
        body = dict(payload) if seed is None else {**payload, "seed": seed}
        # A row identified by content has its request validated already (``base``).
        known = base if seed is None else None
        request = known or _validate(row, endpoint, spec, body, failed)
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


def _template_text(template: Any) -> str:
    if not isinstance(template, str):
        raise ValueError(f"prompt_template={cells.show(template)} is not text")
    return template


def _first_given(*candidates: Any) -> Any:
    return next((c for c in candidates if not cells.is_blank(c)), None)


def _split_columns(
    row: _Row, values: Mapping[str, Any], spec: EndpointSpec | None, identity: Collection[str]
) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """The request body, the metadata, and the parameter columns that failed to parse."""
    fields = _field_kinds(spec) if spec is not None else None
    payload: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    failed: set[str] = set()
    for column, value in values.items():
        if column in CONTROL_COLUMNS or column in identity:
            continue
        if fields is not None and column not in fields:
            if column not in _ALL_PARAMETERS:
                metadata[column] = "" if value is None else as_text(value)
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
) -> tuple[int, ...] | int | None:
    """The row's seeds (a tuple), its number of variants (an int), or None for one job."""
    seeds_cell, variants_cell = values.get("seeds"), values.get("variants")
    has_seeds, has_variants = not cells.is_blank(seeds_cell), not cells.is_blank(variants_cell)
    if has_seeds and has_variants:
        row.problem("seeds", "give either seeds or variants, not both")
        return None
    if (has_seeds or has_variants) and "seed" in payload:
        other = "seeds" if has_seeds else "variants"
        row.problem("seed", f"give either seed or {other}, not both")
        return None
    try:
        if has_seeds:
            return tuple(cells.parse_seeds("seeds", seeds_cell))
        if has_variants:
            return cells.parse_count("variants", variants_cell)
    except cells.CellError as exc:
        row.problem(exc.column, str(exc))
    return None


def _variants(row_id: str, expansion: tuple[int, ...] | int | None) -> list[tuple[int, int | None]]:
    """(variant, seed) pairs: one per seed, one per variant (seeded by the row's identity)."""
    if isinstance(expansion, tuple):
        return list(enumerate(expansion))
    if isinstance(expansion, int):
        return [(i, variant_seed(row_id, i)) for i in range(expansion)]
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
