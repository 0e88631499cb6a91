"""Folding events into one row per job (the latest state, attempt-level fields from the
job's latest attempt): pure, over Arrow tables, in bounded groups. :mod:`runner.ledger.fold`
reads a run directory's events and folds them with these."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.schema import (
    ATTEMPT_FIELDS,
    EVENT_FIELDS,
    LEDGER_SCHEMA,
    OUTCOME_FIELDS,
    JobState,
)

FOLD_GROUP_EVENTS = 1_000_000
# Per event: does it carry outputs and lack a local copy of any? Folded like outputs.
UNFETCHED = "outputs_unfetched"
_ATTEMPT_LEVEL = frozenset({*ATTEMPT_FIELDS, UNFETCHED})
# Columns a job takes from its latest event, null or not (run_id: an event an older
# runner wrote belongs to no invocation).
_LATEST_ONLY = frozenset({*OUTCOME_FIELDS, *EVENT_FIELDS})
_PICKS_BYTES = 32 * 2**20  # the rows to take kept for columns with the same nulls, at most


def fold_tables(
    tables: Iterable[pa.Table], *, empty: pa.Schema = LEDGER_SCHEMA, group_events: int = 0
) -> tuple[pa.Table, int]:
    """Fold event tables given in seq order; returns (jobs, events seen).

    The tables may hold any columns of the schema as long as seq, job_key and
    state are among them; ``empty`` is the schema of the result when there are none.
    ``group_events`` (default FOLD_GROUP_EVENTS) sets the size of the groups.

    Tables are folded in groups of about FOLD_GROUP_EVENTS events, so memory
    holds one group of events plus the folded rows, never every event. Each
    group folds to one row per job plus a flag saying whether a new attempt
    started in it; folding those rows again, with the flags as attempt
    boundaries, gives the same result as folding all events at once.
    """
    partials: list[pa.Table] = []
    resets: list[np.ndarray] = []
    events = 0
    group: list[pa.Table] = []
    grouped = 0

    def fold_group() -> None:
        box = [pa.concat_tables(group)]
        group.clear()
        folded, reset = _fold(box, None)
        partials.append(folded)
        resets.append(reset)
        # The group's events are garbage now: hand their pages back before the next.
        pa.default_memory_pool().release_unused()

    for table in tables:
        events += table.num_rows
        group.append(table)
        grouped += table.num_rows
        if grouped >= (group_events or FOLD_GROUP_EVENTS):
            fold_group()
            grouped = 0
    if group:
        fold_group()
    if not partials:
        return empty.empty_table(), 0
    if len(partials) == 1:
        return partials[0], events
    box = [pa.concat_tables(partials)]
    partials.clear()
    jobs, _reset = _fold(box, np.concatenate(resets))
    return jobs, events


def fold(events: pa.Table) -> pa.Table:
    """One row per job (sorted by seq) in LEDGER_SCHEMA: its latest state."""
    return _fold([events], None)[0]


def _fold(box: list[pa.Table], resets: np.ndarray | None) -> tuple[pa.Table, np.ndarray]:
    """(folded rows, whether each job started an attempt within the events).

    Takes the events out of ``box`` and lets go of each column once folded, so a
    caller that hands over its only reference never holds input and output whole.
    ``resets`` marks extra rows (already folded ones) that start an attempt.
    """
    events = box.pop()
    n = events.num_rows
    if n == 0:
        return events.schema.empty_table(), np.zeros(0, dtype=bool)
    codes = _job_codes(events["job_key"], mostly_distinct=resets is not None)
    seq = events["seq"].to_numpy()
    if n < 2 or bool(np.all(seq[1:] >= seq[:-1])):
        order = np.argsort(codes, kind="stable")
    else:
        order = np.lexsort((seq, codes))
    sorted_codes = codes[order]
    del codes
    change = sorted_codes[1:] != sorted_codes[:-1]
    del sorted_codes
    starts = np.concatenate(([True], change))
    ends = np.concatenate((change, [True]))
    del change
    last = np.flatnonzero(ends)
    last = last[np.argsort(seq[order[last]], kind="stable")]
    del ends, seq
    index = np.arange(n)
    job_start = np.maximum.accumulate(np.where(starts, index, 0))[last]
    submitting = _to_bool(pc.equal(events["state"], JobState.SUBMITTING.value))
    if resets is not None:
        submitting = submitting | resets
    submitting = submitting[order]
    attempt_row = np.maximum.accumulate(np.where(starts | submitting, index, 0))[last]
    reset = submitting[attempt_row]
    del starts, submitting
    latest = order[last]
    schema = events.schema
    inputs = events.columns[::-1]
    del events
    columns = []
    picks = _Picks(order, index, last, latest, job_start, attempt_row)
    for field in schema:
        column = inputs.pop()
        columns.append(picks.folded(column, field))
        del column
    return pa.Table.from_arrays(columns, schema=schema), reset


def _job_codes(keys: pa.ChunkedArray, *, mostly_distinct: bool) -> np.ndarray:
    """A number per job_key, equal for equal keys.

    dictionary_encode is twice as fast as ranking (a sort), but its hash table
    grows with the distinct keys: +136 MB for 1M distinct keys against +16 MB
    (measured). Events of a group repeat keys; folded rows hardly do.
    """
    if mostly_distinct:
        return np.asarray(pc.rank(keys, tiebreaker="dense").to_numpy())
    return np.asarray(pc.dictionary_encode(keys.combine_chunks()).indices.to_numpy())


class _Picks:
    """Which event row each job's value of a column comes from, by the column's nulls.

    Columns set by the same events have the same nulls (the URLs a submit sets, the
    outcome's fields): their rows to take are found once, the validity as bytes the key
    (at a 1M-job export, 21 of 27 columns with nulls in each fold), and kept up to
    _PICKS_BYTES (a fold of many events keeps fewer)."""

    def __init__(
        self,
        order: np.ndarray,
        index: np.ndarray,
        last: np.ndarray,
        latest: np.ndarray,
        job_start: np.ndarray,
        attempt_start: np.ndarray,
    ) -> None:
        self.order, self.index, self.last = order, index, last
        self.job_start, self.attempt_start = job_start, attempt_start
        self.latest = pa.array(latest)
        self.found: dict[tuple[bool, bytes], pa.Array] = {}

    def folded(self, column: pa.ChunkedArray, field: pa.Field) -> pa.Array | pa.ChunkedArray:
        """A column's value for each job: the last non-null one since the job or attempt
        start."""
        n = len(column)
        if column.null_count == 0 or field.name in _LATEST_ONLY:
            return column.take(self.latest)
        if column.null_count == n:
            return pa.nulls(len(self.last), field.type)
        valid = _to_bool(pc.is_valid(column))
        attempt = field.name in _ATTEMPT_LEVEL
        key = (attempt, valid.tobytes())
        rows = self.found.get(key)
        if rows is None:
            since = self.attempt_start if attempt else self.job_start
            last_valid = np.maximum.accumulate(np.where(valid[self.order], self.index, -1))
            last_valid = last_valid[self.last]
            keep = last_valid >= since
            source = self.order[np.where(keep, last_valid, 0)]
            rows = pa.array(source, mask=~keep)
            if (len(self.found) + 1) * (n + 9 * len(self.last)) <= _PICKS_BYTES:
                self.found[key] = rows
        return column.take(rows)


def _to_bool(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)
