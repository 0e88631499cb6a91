"""An export's file: its batches written as Parquet, CSV or JSONL (:mod:`runner.ledger.views`
makes the batches), synced before it is renamed into place."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runner.ledger import csvcells, csvtext, jsonl
from runner.ledger.ahead import BehindWriter

CSV_ROWS = 10_000  # rows a CSV export makes the lines of at once (2,000: ~1 CPU s more at 1M)
# Columns with a value per job (ids, times, URLs, texts): a Parquet dictionary of them only
# costs time before the writer gives it up (a 1M-job export: 2.5 -> 1.8 CPU s, 163 -> 143 MB).
_PER_JOB = frozenset(
    {
        *("seq", "at", "job_key", "row_id", "line", "request", "metadata", "seed", "outputs"),
        *("request_id", "gateway_request_id", "payload_sha256"),
        *("submitted_at", "started_at", "completed_at"),
        *("status_url", "response_url", "cancel_url"),
    }
)


def write_synced(
    path: Path,
    batches: Iterator[pa.RecordBatch | pa.Table],
    schema: pa.Schema,
    fmt: str,
    *,
    read_back: bool,
) -> None:
    """Write ``batches`` to a new file at ``path`` and sync it. CSV and JSONL lines are made
    while the last are written (a thread, :class:`BehindWriter`), which lets the written
    pages go unless the file is ``read_back`` at once."""
    with open(path, "wb") as handle:
        if fmt == "parquet":
            write_batches(batches, schema, handle, fmt)
        else:
            with BehindWriter(handle, let_go=not read_back) as behind:
                write_batches(batches, schema, behind, fmt)
        handle.flush()
        os.fsync(handle.fileno())


def write_batches(
    batches: Iterator[pa.RecordBatch | pa.Table], schema: pa.Schema, handle: Any, fmt: str
) -> None:
    if fmt == "parquet":
        coded = [name for name in schema.names if name not in _PER_JOB]
        with pq.ParquetWriter(handle, schema, compression="zstd", use_dictionary=coded) as writer:
            for batch in batches:
                writer.write(batch)  # a row group (a table: its chunks as they came)
                del batch  # not held while the next is made
        return
    if fmt == "csv":
        handle.write(csvtext.header(csvcells.flat_for_csv(schema.empty_table()).schema))
        for batch in batches:
            for piece in _pieces(batch, CSV_ROWS):
                csvtext.write_rows(
                    csvcells.flat_for_csv(pa.Table.from_batches([piece], schema)), handle
                )
            del batch
        return
    for batch in batches:
        jsonl.write_jsonl(batch, handle)  # in pieces of its own (PIECE_BYTES)
        del batch


def _pieces(batch: pa.RecordBatch, rows: int) -> Iterator[pa.RecordBatch]:
    """``batch`` in slices of ``rows`` rows: what a CSV export makes the lines of at once
    (the lines are the same; a whole batch at once holds more)."""
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)
