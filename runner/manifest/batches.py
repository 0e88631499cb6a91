"""A manifest as batches of jobs: the reader every command uses.

CSV and TSV are read in Arrow batches (:mod:`runner.manifest.arrowcsv`) and typed as vectors
(:mod:`runner.manifest.vector`); a row the vectors do not vouch for, and every JSONL and
Parquet row, goes through :class:`runner.manifest.jobs._Expander` one by one, as
:func:`iter_jobs` does, so its problems read the same. A block's plain ids are claimed at
once, the slow rows' one by one as the block is walked; the first line of an id is the
least that gave it whichever way a row goes, so duplicates read as in row order.

``materialize=True`` (``run``, ``plan --ledger``) makes every job, with the key and content
identity :func:`iter_jobs` gives. ``materialize=False`` (``validate``, ``plan``) makes only the
jobs that name a local file (they are checked or sized one by one) and counts the others,
grouped by what their cost depends on, so a million plain rows cost no Python object each.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints import catalog
from runner.errors import RowError
from runner.manifest import vector
from runner.manifest.arrowcsv import ArrowRows, arrow_blocks, row_chunks
from runner.manifest.costkinds import CostGroup, cost_groups
from runner.manifest.identity import row_number_id
from runner.manifest.jobs import (
    _ALL_PARAMETERS,
    _EXPANSION_COLUMNS,
    ExpandOptions,
    Job,
    _Expander,
    _Row,
    iter_jobs,
)
from runner.manifest.masks import to_arrow, to_numpy
from runner.manifest.reader import RawRow, detect_format, read_rows


@dataclass
class JobBatch:
    """Some rows' jobs: ``items`` in row order, and jobs only counted (``counted``)."""

    items: list[Job | RowError] = field(default_factory=list)
    counted: int = 0
    groups: list[CostGroup] = field(default_factory=list)


def iter_job_batches(
    path: Path, fmt: str | None, options: ExpandOptions, *, materialize: bool
) -> Iterator[JobBatch]:
    """The manifest's jobs in batches; raises as :func:`read_rows` does for the whole file."""
    if options.default_endpoint is not None:
        catalog.get_endpoint(options.default_endpoint, allowed=options.allowed_endpoints)
    kind = detect_format(path, fmt)
    expander = _Expander(options)
    if kind in ("csv", "tsv"):
        blocks: Iterator[ArrowRows | list[RawRow]] = arrow_blocks(
            path, "\t" if kind == "tsv" else ","
        )
    else:
        blocks = row_chunks(read_rows(path, fmt=fmt))
    return _batches(blocks, expander, materialize)


def iter_manifest_jobs(
    path: Path, fmt: str | None, options: ExpandOptions
) -> Iterator[Job | RowError]:
    """Every job and bad row, in order: :func:`iter_jobs` over :func:`read_rows`, faster."""
    batches = iter_job_batches(path, fmt, options, materialize=True)
    return (item for batch in batches for item in batch.items)


def _batches(
    blocks: Iterator[ArrowRows | list[RawRow]], expander: _Expander, materialize: bool
) -> Iterator[JobBatch]:
    for block in blocks:
        if isinstance(block, ArrowRows):
            yield _typed_batch(block, expander, materialize)
        else:
            batch = JobBatch()
            for raw in block:
                batch.items.extend(expander.expand(raw))
            yield batch


def _values(block: ArrowRows, options: ExpandOptions, id_column: str) -> dict[str, pa.Array] | None:
    """The columns with ``--set`` defaults filled in, as :meth:`_Expander._with_defaults`."""
    values = dict(zip(block.batch.schema.names, block.batch.columns, strict=True))
    rows = block.batch.num_rows
    for key, text in options.defaults.items():
        if key in (id_column, "endpoint"):
            continue
        if key in _EXPANSION_COLUMNS:
            return None  # which rows chose their own expansion: row by row
        column = values.get(key)
        if column is None:
            values[key] = pa.array([text] * rows, pa.string())
        else:
            blank = pc.equal(pc.utf8_trim_whitespace(column), "")
            values[key] = pc.if_else(blank, text, column)
    return values


def _typed_batch(block: ArrowRows, expander: _Expander, materialize: bool) -> JobBatch:
    options = expander.options
    rows = block.batch.num_rows
    values = _values(block, options, expander.id_column)
    typed: list[vector.Typed] = []
    slow = np.ones(rows, dtype=bool)
    if values is not None:
        typed = _by_endpoint(values, expander, rows)
        for group in typed:
            slow[group.positions] = group.slow
    return _sequence(block, expander, typed, slow, materialize)


def _by_endpoint(values: dict[str, pa.Array], expander: _Expander, rows: int) -> list[vector.Typed]:
    options = expander.options
    default = options.default_endpoint
    if "endpoint" in values:
        # The cells as read, encoded; each distinct cell stripped (and defaulted) once.
        encoded = pc.dictionary_encode(values["endpoint"])
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        named = pc.utf8_trim_whitespace(encoded.dictionary).to_pylist()
        if default is not None:
            named = [name or default for name in named]
    elif default is not None:
        codes, named = np.zeros(rows, dtype=np.int64), [default]
    else:
        return []
    found = []
    for endpoint in dict.fromkeys(named):
        spec = catalog.CATALOG.get(endpoint)
        if spec is None:
            continue  # unknown or allowed-untyped: row by row
        mask = np.isin(codes, [code for code, name in enumerate(named) if name == endpoint])
        positions = np.flatnonzero(mask)
        own = values if mask.all() else {k: v.take(pa.array(positions)) for k, v in values.items()}
        found.append(
            vector.type_rows(
                endpoint,
                spec,
                own,
                positions,
                id_column=expander.id_column,
                id_required=options.id_column is not None,
                template=options.prompt_template,
                all_parameters=_ALL_PARAMETERS,
            )
        )
    return found


def _sequence(
    block: ArrowRows,
    expander: _Expander,
    typed: list[vector.Typed],
    slow: np.ndarray,
    materialize: bool,
) -> JobBatch:
    """Walk the rows in order: expand slow rows and duplicates, make or count the others.

    The plain rows' ids are claimed for the whole block at once (:func:`_claim_block`);
    only the rows that make something (slow, duplicate, wanted) are visited in Python.
    """
    batch = JobBatch()
    rows = block.batch.num_rows
    owner = np.full(rows, -1, dtype=np.int64)
    within = np.zeros(rows, dtype=np.int64)
    visit = slow.copy()
    for number, group in enumerate(typed):
        owner[group.positions] = number
        within[group.positions] = np.arange(len(group.positions))
        if materialize:
            visit[group.positions] = True
        else:
            visit[group.positions[group.needs_files]] = True
    seen = expander.seen.first_lines
    again = np.zeros(rows, dtype=bool)  # plain rows expanded row by row: duplicates
    if expander.options.check_unique_ids:
        again[_claim_block(block, typed, slow, expander)] = True
        visit |= again
    seen.displaced.clear()
    makers = [_Maker(group, block, expander) for group in typed]
    ids: list[list[Any] | None] = [None] * len(typed)
    todo = np.flatnonzero(visit).tolist()
    later: list[int] = []  # plain rows a slow row's id took over, found while walking
    lines = block.lines
    owner_list, within_list = owner.tolist(), within.tolist()
    next_todo = 0
    while next_todo < len(todo) or later:
        if later and (next_todo == len(todo) or later[0] <= todo[next_todo]):
            position = heapq.heappop(later)
            if next_todo < len(todo) and todo[next_todo] == position:
                next_todo += 1
        else:
            position = todo[next_todo]
            next_todo += 1
        if slow[position]:
            batch.items.extend(expander.expand(block.raw(position)))
            if seen.displaced:
                _take_over(seen.displaced, lines, position, again, visit, later)
            continue
        if again[position]:
            batch.items.extend(expander.expand(block.raw(position)))
            continue
        number, at = owner_list[position], within_list[position]
        own = ids[number]
        if own is None:
            group_ids = typed[number].ids
            own = ids[number] = [None] * len(typed[number].positions)
            if group_ids is not None:
                own = ids[number] = group_ids.to_pylist()
        batch.items.extend(makers[number].make(position, at, own[at]))
    for number, group in enumerate(typed):
        counted = ~visit[group.positions]
        batch.counted += int(counted.sum())
        if counted.any():
            requests = expander.cost_requests
            groups = cost_groups(group, counted, makers[number].request_fields, requests)
            batch.groups.extend(groups)
    return batch


def _claim_block(
    block: ArrowRows, typed: list[vector.Typed], slow: np.ndarray, expander: _Expander
) -> np.ndarray:
    """Claim the ids of the block's plain rows; the positions of those already claimed.

    Ids are hashed once per distinct id in the block (``dictionary_encode``), and looked up
    and added with numpy. The slow rows claim theirs one by one while the block is walked;
    one that comes before a plain row of its id takes the id over (:func:`_take_over`).
    """
    parts = [(g.positions, g.ids) for g in typed if g.ids is not None]
    if not parts:
        return np.zeros(0, dtype=np.int64)
    positions: np.ndarray = np.concatenate([p for p, _ in parts])
    given = pa.concat_arrays([i for _, i in parts])
    keep = ~slow[positions] & to_numpy(pc.is_valid(given))
    positions, given = positions[keep], given.filter(to_arrow(keep))
    if len(parts) > 1:  # more than one endpoint: their rows in block order
        order = np.argsort(positions, kind="stable")
        positions, given = positions[order], given.take(pa.array(order))
    if len(positions) == 0:
        return positions
    encoded = pc.dictionary_encode(given)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    distinct = encoded.dictionary.to_pylist()
    # The block's distinct ids, exactly (by their text), with their first row in the block:
    # codes are given in order of first appearance, so a row whose code tops all before it.
    top = np.maximum.accumulate(codes)
    first = np.flatnonzero(codes > np.concatenate(([-1], top[:-1])))
    where = codes
    if len(first) != len(distinct):
        used, first, where = np.unique(codes, return_index=True, return_inverse=True)
        distinct = [distinct[code] for code in used.tolist()]
    texts = distinct
    keys = np.fromiter(map(hash, texts), np.int64, len(texts))
    # id_check's hash of the id and a NUL, its low 32 bits (a map in C: 4x faster).
    suffixed = map(operator.add, texts, itertools.repeat("\0"))
    checks = np.fromiter(map(hash, suffixed), np.int64, len(texts)).astype(np.uint32)
    lines = np.asarray(block.lines, dtype=np.int64)[positions]
    firsts = expander.seen.first_lines.claim_many(keys, checks, lines[first])
    claimed: np.ndarray = positions[firsts[where.reshape(-1)] != lines]
    return claimed


def _take_over(
    displaced: set[int],
    lines: list[int],
    position: int,
    again: np.ndarray,
    visit: np.ndarray,
    later: list[int],
) -> None:
    """A slow row's id was first given by a plain row below it: that row is a duplicate now."""
    for line in displaced:
        found = bisect.bisect_left(lines, line)
        if position < found < len(lines) and lines[found] == line:
            again[found] = True
            if not visit[found]:
                visit[found] = True
                heapq.heappush(later, found)
    displaced.clear()


# A maker reads its first this many rows cell by cell, then converts its columns at once.
_FEW_ROWS = 16


class _Maker:
    """Jobs of typed rows, made by the per-row path's own :meth:`_Expander.finish`."""

    def __init__(self, group: vector.Typed, block: ArrowRows, expander: _Expander) -> None:
        self.group = group
        self.block = block
        self.expander = expander
        self._fields: dict[str, list[Any]] | None = None
        self._metadata: dict[str, list[Any]] | None = None
        self._stripped: dict[str, pa.Array] | None = None
        self._calls = 0

    def request_fields(self, at: int) -> dict[str, Any]:
        """The request body of row ``at``, as the per-row path parses it."""
        spec = self.group.spec
        self._calls += 1
        if self._calls <= _FEW_ROWS:  # a few rows (cost groups, files): cell by cell
            fields = {k: v[at].as_py() for k, v in self.group.fields.items()}
            return {k: vector.row_value(spec, k, v) for k, v in fields.items() if v is not None}
        if self._fields is None:
            self._fields = {k: v.to_pylist() for k, v in self.group.fields.items()}
        return {
            name: vector.row_value(spec, name, column[at])
            for name, column in self._fields.items()
            if column[at] is not None
        }

    def metadata(self, at: int) -> dict[str, str]:
        """Row ``at``'s metadata cells, stripped (a block's columns once a job is made)."""
        if self._stripped is None:
            raw = self.group.metadata.items()
            self._stripped = {k: pc.utf8_trim_whitespace(v) for k, v in raw}
        if self._calls <= _FEW_ROWS:
            return {k: v[at].as_py() for k, v in self._stripped.items()}
        if self._metadata is None:
            self._metadata = {k: v.to_pylist() for k, v in self._stripped.items()}
        return {name: column[at] for name, column in self._metadata.items()}

    def make(self, position: int, at: int, row_id: str | None) -> list[Job] | list[RowError]:
        block = self.block
        raw = RawRow(block.file, block.lines[position], block.first_index + position, {}, False)
        row = _Row(raw, row_id if row_id is not None else row_number_id(raw.index))
        payload, metadata = self.request_fields(at), self.metadata(at)
        group = self.group
        return self.expander.finish(
            row, group.endpoint, group.spec, payload, metadata, (), None, row_id
        )


__all__ = ["CostGroup", "JobBatch", "iter_job_batches", "iter_jobs", "iter_manifest_jobs"]
