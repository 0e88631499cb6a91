"""Immutable Parquet parts: ``ledger/part-<first seq>-<last seq>.parquet``.

A part is written under a hidden temporary name (``.part-….parquet.tmp``, which
no ``*.parquet`` glob and no pyarrow dataset scan picks up), fsynced, renamed
into place and the directory fsynced: a reader sees a whole part or none.
The seq range in the name lets recovery drop a part that another part covers
(a compaction that crashed before deleting its inputs) without opening it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import LedgerCorruptError
from runner.ledger.journal import fsync_dir
from runner.ledger.schema import LEDGER_SCHEMA, check_schema

_PART_RE = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
TMP_PREFIX = ".part-"
TMP_SUFFIX = ".tmp"
ROW_GROUP_SIZE = 128 * 1024


@dataclass(frozen=True, slots=True, order=True)
class PartFile:
    first_seq: int
    last_seq: int
    path: Path


def part_name(first_seq: int, last_seq: int) -> str:
    return f"part-{first_seq:012d}-{last_seq:012d}.parquet"


def scan_parts(ledger_dir: Path) -> tuple[list[PartFile], list[PartFile]]:
    """(live parts in seq order, parts covered by a wider part and safe to delete)."""
    try:
        names = os.listdir(ledger_dir)
    except FileNotFoundError:
        return [], []
    found = []
    for name in names:
        match = _PART_RE.match(name)
        if match:
            found.append(PartFile(int(match[1]), int(match[2]), ledger_dir / name))
    found.sort(key=lambda p: (p.first_seq, -p.last_seq))
    live: list[PartFile] = []
    covered: list[PartFile] = []
    for part in found:
        if live and part.last_seq <= live[-1].last_seq:
            covered.append(part)
        else:
            live.append(part)
    return live, covered


def stale_temp_files(ledger_dir: Path) -> list[Path]:
    try:
        names = os.listdir(ledger_dir)
    except FileNotFoundError:
        return []
    return [ledger_dir / n for n in names if n.startswith(TMP_PREFIX) and n.endswith(TMP_SUFFIX)]


def write_part(
    ledger_dir: Path,
    table: pa.Table,
    *,
    first_seq: int | None = None,
    last_seq: int | None = None,
) -> PartFile:
    """Write a non-empty table (sorted by seq) as a durable, complete part.

    The seq range named defaults to the table's; compaction names the wider
    range of the parts it replaces, so that they count as covered.
    """
    seqs = table.column("seq")
    first = int(seqs[0].as_py()) if first_seq is None else first_seq
    last = int(seqs[-1].as_py()) if last_seq is None else last_seq
    final = ledger_dir / part_name(first, last)
    tmp = ledger_dir / f"{TMP_PREFIX}{first:012d}-{last:012d}.parquet{TMP_SUFFIX}"
    table = table.replace_schema_metadata(LEDGER_SCHEMA.metadata)
    with open(tmp, "wb") as handle:
        pq.write_table(table, handle, row_group_size=ROW_GROUP_SIZE, compression="zstd")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(ledger_dir)
    return PartFile(first, last, final)


def read_part(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one part (every column, or those named); any unreadable or foreign file is
    LedgerCorruptError naming it.

    FileNotFoundError passes through: a reader racing a compaction retries.
    """
    try:
        with pq.ParquetFile(path) as handle:
            schema = handle.schema_arrow
            _check_part_schema(schema, path)
            wanted = LEDGER_SCHEMA.names if columns is None else list(columns)
            present = [n for n in wanted if n in schema.names]
            # One part at a time on few cores: threads cost more than they give.
            table = handle.read(columns=present, use_threads=False)
            if len(present) < len(wanted):
                table = _with_missing_columns(table, wanted)
            return table
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise LedgerCorruptError(f"ledger part {path} cannot be read: {exc}") from exc


def iter_part(
    path: Path, columns: Sequence[str] | None = None, *, batch_rows: int = 65_536
) -> Iterator[pa.Table]:
    """One part in tables of at most ``batch_rows`` rows (every column, or those named), so
    a part of millions of rows (a compacted ledger) is never read whole. Errors as read_part.
    """
    try:
        with pq.ParquetFile(path) as handle:
            schema = handle.schema_arrow
            _check_part_schema(schema, path)
            wanted = LEDGER_SCHEMA.names if columns is None else list(columns)
            present = [n for n in wanted if n in schema.names]
            batches = handle.iter_batches(batch_rows, columns=present, use_threads=False)
            for batch in batches:
                table = pa.Table.from_batches([batch])
                yield table if len(present) == len(wanted) else _with_missing_columns(table, wanted)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise LedgerCorruptError(f"ledger part {path} cannot be read: {exc}") from exc


def _check_part_schema(schema: pa.Schema, path: Path) -> None:
    check_schema(schema, str(path))
    # An older version's columns are a prefix of today's (columns are only appended).
    have = len(schema)
    if have > len(LEDGER_SCHEMA) or not all(
        schema.field(i).equals(LEDGER_SCHEMA.field(i)) for i in range(have)
    ):
        raise LedgerCorruptError(f"ledger part {path} has an unexpected schema")


def _with_missing_columns(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """``table`` with the columns ``names`` in that order, the absent ones all null."""
    columns = [
        table[name] if name in table.column_names
        else pa.nulls(table.num_rows, LEDGER_SCHEMA.field(name).type)
        for name in names
    ]  # fmt: skip
    fields = [LEDGER_SCHEMA.field(name) for name in names]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def part_rows(path: Path) -> int:
    """How many rows a part holds (from its footer); LedgerCorruptError when unreadable."""
    try:
        with pq.ParquetFile(path) as handle:
            rows: int = handle.metadata.num_rows
            return rows
    except (pa.ArrowException, OSError) as exc:
        raise LedgerCorruptError(f"ledger part {path} cannot be read: {exc}") from exc


def part_size_of(
    path: Path, columns: Sequence[str], lengths: Sequence[str] = ()
) -> tuple[int, int]:
    """(rows, uncompressed bytes of ``columns``) of a part, from its footer; a column of
    ``lengths`` (read for its lengths only) counts 4 bytes a row."""
    try:
        with pq.ParquetFile(path) as handle:
            meta = handle.metadata
            wanted = set(columns) - set(lengths)
            size = 4 * len(lengths) * meta.num_rows
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    chunk = group.column(c)
                    if chunk.path_in_schema.split(".")[0] in wanted:
                        size += chunk.total_uncompressed_size
            return meta.num_rows, size
    except (pa.ArrowException, OSError) as exc:
        raise LedgerCorruptError(f"ledger part {path} cannot be read: {exc}") from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace a file so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
