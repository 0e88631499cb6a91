"""Read-only views of a run directory for ``runner status`` and ``runner export``.

Neither takes the writer lock: both work while a run is writing, reading the
committed parts and journal as they are at that moment.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from runner.endpoints.money import trim_usd
from runner.errors import LedgerError
from runner.ledger.journal import fsync_dir
from runner.ledger.meta import read_run_meta
from runner.ledger.scan import scan_folded
from runner.ledger.schema import LEDGER_SCHEMA, JobState
from runner.ledger.totals import COLUMNS as TOTALS_COLUMNS
from runner.ledger.totals import LENGTHS as TOTALS_LENGTHS
from runner.ledger.totals import EndpointTotals, Totals, merge_totals, totals

ExportFormat = Literal["csv", "jsonl", "parquet"]
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """Counts by state and endpoint and the spend so far, from the folded ledger."""

    run_dir: Path
    jobs: int
    events: int
    by_state: Mapping[JobState, int]
    by_endpoint: tuple[EndpointTotals, ...]
    estimated_usd: Decimal  # sum of estimates over every job in the ledger
    billed_usd: Decimal  # sum of output-based cost of each job's latest attempt
    possible_duplicates: int  # jobs resubmitted after an unknown outcome (durable)
    possible_duplicate_usd: Decimal  # their estimates
    unknown_outcomes: int  # jobs whose latest submit outcome is still unknown
    reconciled: Mapping[str, int]  # how fal's history settled unknown outcomes
    duplicates_found: int  # other billed requests the history showed
    duplicates_found_usd: Decimal
    last_event_at: datetime | None
    torn_bytes: int  # journal bytes ignored as a torn tail (a writer mid-append or a crash)
    run_meta: Mapping[str, Any] | None


def _require_run_dir(run_dir: Path) -> None:
    if not any((run_dir / name).exists() for name in ("ledger", "journal", "run.json")):
        raise LedgerError(f"{run_dir} is not a run directory (no ledger/, journal/ or run.json)")


def status_summary(run_dir: Path | str) -> StatusSummary:
    """Counts and spend of a run directory; takes no lock, so it works during a run."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)

    def reduce(slices: Iterator[pa.Table]) -> tuple[Totals, datetime | None]:
        parts, last = [], None
        for jobs in slices:
            parts.append(totals(jobs))
            at = pc.max(jobs["at"]).as_py()
            last = at if last is None or (at is not None and at > last) else last
        return merge_totals(parts), last

    (counted, last_at), read = scan_folded(
        run_dir, [*TOTALS_COLUMNS, "at"], reduce, lengths=TOTALS_LENGTHS
    )
    return StatusSummary(
        run_dir=run_dir,
        jobs=counted.jobs,
        events=read.events,
        by_state=counted.by_state,
        by_endpoint=counted.endpoints,
        estimated_usd=counted.estimated_usd,
        billed_usd=counted.billed_usd,
        possible_duplicates=counted.possible_duplicates,
        possible_duplicate_usd=counted.possible_duplicate_usd,
        unknown_outcomes=counted.unknown_outcomes,
        reconciled=counted.reconciled,
        duplicates_found=counted.duplicates_found,
        duplicates_found_usd=counted.duplicates_found_usd,
        last_event_at=last_at,
        torn_bytes=read.torn_bytes,
        run_meta=read_run_meta(run_dir),
    )


def export(run_dir: Path | str, out_path: Path | str, fmt: ExportFormat) -> int:
    """Write one row per job (latest state) to out_path; returns the number of jobs.

    Joinable with the manifest by row_id (and source/line). The file appears
    whole or not at all (temp name, then rename). Written a slice of jobs at a time
    (:func:`runner.ledger.scan.scan_folded`), so memory does not grow with the ledger. A
    ledger that fits one pass is one slice, its rows in the order of each job's last
    event; a bigger one comes a range of job keys after another, each so ordered.
    """
    if fmt not in ("csv", "jsonl", "parquet"):
        raise ValueError(f"export format must be csv, jsonl or parquet, not {fmt!r}")
    out_path = Path(out_path)
    _require_run_dir(Path(run_dir))
    tmp = out_path.with_name(f".{out_path.name}.tmp")

    try:
        with open(tmp, "wb") as handle:

            def write(slices: Iterator[pa.Table]) -> int:
                # Called again from the start when a writer compacts mid-read.
                handle.seek(0)
                handle.truncate()
                return _write_slices(slices, handle, fmt)

            count, _read = scan_folded(Path(run_dir), None, write)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except OSError as exc:
        _remove(tmp)
        if exc.filename is not None and os.fsdecode(exc.filename) != str(tmp):
            raise  # reading the run directory failed (the file named), not the export
        # The one boundary for the export's own file: a folder that is missing, read-only
        # or full is one line naming the file (exit 4), not a traceback.
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)
        raise LedgerError(f"cannot write the export {_shown(out_path)}: {reason}") from exc
    except BaseException:
        _remove(tmp)
        raise
    return count


def _write_slices(slices: Iterator[pa.Table], handle: Any, fmt: ExportFormat) -> int:
    """Write the folded slices one after the other (one file, one header); returns rows."""
    rows = 0
    writer: Any = None
    for jobs in slices:
        rows += jobs.num_rows
        if fmt == "jsonl":
            _write_jsonl(jobs, handle)
            continue
        table = _flat_for_csv(jobs) if fmt == "csv" else jobs
        if writer is None:
            writer = (
                pacsv.CSVWriter(handle, table.schema)
                if fmt == "csv"
                else pq.ParquetWriter(handle, table.schema, compression="zstd")
            )
        writer.write_table(table)
    if writer is None and fmt != "jsonl":
        empty = LEDGER_SCHEMA.empty_table()
        if fmt == "parquet":
            pq.write_table(empty, handle, compression="zstd")
        else:
            pacsv.write_csv(_flat_for_csv(empty), handle)
    if writer is not None:
        writer.close()
    return rows


def _remove(tmp: Path) -> None:
    """Remove a half-written temp file, if there is one to remove."""
    with contextlib.suppress(OSError):  # its folder is unusable: the error raised says so
        tmp.unlink(missing_ok=True)


def _shown(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)


def _flat_for_csv(jobs: pa.Table) -> pa.Table:
    """CSV has no nested types: outputs and nsfw become JSON text, money exact text."""
    for name in ("outputs", "nsfw", "duplicate_request_ids"):
        values = [None if v is None else json.dumps(v) for v in jobs[name].to_pylist()]
        column = pa.array(values, pa.string())
        jobs = jobs.set_column(jobs.schema.get_field_index(name), name, column)
    for name in ("estimated_usd", "billed_usd"):
        values = [None if v is None else str(trim_usd(v)) for v in jobs[name].to_pylist()]
        column = pa.array(values, pa.string())
        jobs = jobs.set_column(jobs.schema.get_field_index(name), name, column)
    return jobs


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(trim_usd(value))
    raise TypeError(f"cannot export {type(value).__name__}")


def _write_jsonl(jobs: pa.Table, handle: Any) -> None:
    for batch in jobs.to_batches(max_chunksize=10_000):
        rows = batch.to_pylist()
        for row in rows:
            if row["metadata"] is not None:
                row["metadata"] = json.loads(row["metadata"])
        lines = [json.dumps(row, default=_json_default, ensure_ascii=False) for row in rows]
        if lines:
            handle.write(("\n".join(lines) + "\n").encode())
