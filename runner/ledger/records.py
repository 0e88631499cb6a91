"""Whole records of the few jobs an earlier run left in flight: what admission does not
hold for every job (the acknowledged URLs of jobs to re-attach, the intents of jobs to
reconcile, and every request each already followed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.fold import _retrying, _Snapshot
from runner.ledger.folding import fold_tables
from runner.ledger.schema import LEDGER_SCHEMA, JobRecord, record_from_row


def read_records(run_dir: Path, keys: Sequence[str]) -> dict[str, JobRecord]:
    """The whole folded records of a few jobs (every column), by job_key.

    For what admission does not hold for every job: the acknowledged URLs of jobs to
    re-attach, the intent of jobs to reconcile. Reads every part, keeps only their events.
    """
    if not keys:
        return {}
    value_set = pa.array(list(keys), pa.string())

    def read(snap: _Snapshot) -> dict[str, JobRecord]:
        wanted = (t.filter(pc.is_in(t["job_key"], value_set=value_set)) for t in snap.tables())
        full, _events = fold_tables(wanted)
        return {row["job_key"]: record_from_row(row) for row in full.to_pylist()}

    return _retrying(run_dir, read)


def read_requests_seen(run_dir: Path, keys: Sequence[str]) -> dict[str, frozenset[str]]:
    """Every request id each of a few jobs was ever acknowledged under, by job_key: the
    requests its earlier attempts followed (the fold keeps only the latest)."""
    if not keys:
        return {}
    value_set = pa.array(list(keys), pa.string())

    def read(snap: _Snapshot) -> dict[str, frozenset[str]]:
        seen: dict[str, set[str]] = {}
        for table in snap.tables(["job_key", "request_id"]):
            rows = table.filter(pc.is_in(table["job_key"], value_set=value_set))
            for key, rid in zip(rows["job_key"].to_pylist(), rows["request_id"].to_pylist(),
                                strict=True):  # fmt: skip
                if rid:
                    seen.setdefault(key, set()).add(rid)
        return {k: frozenset(v) for k, v in seen.items()}

    return _retrying(run_dir, read)


def read_event_columns(run_dir: Path, columns: Sequence[str]) -> pa.Table:
    """Every event's ``columns`` (parts, then the journal), unfolded: the history over
    time. Columns an older part lacks read as null. A compacted ledger holds only each
    job's latest event."""

    def read(snap: _Snapshot) -> pa.Table:
        tables = list(snap.tables(columns))
        if not tables:
            return LEDGER_SCHEMA.empty_table().select(list(columns))
        return pa.concat_tables(tables)

    return _retrying(run_dir, read)
