"""Read-only views of a run directory for ``runner status`` and ``runner export``.

Neither takes the writer lock: both work while a run is writing, reading the
committed parts and journal as they are at that moment.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runner.endpoints.money import trim_usd
from runner.errors import LedgerError
from runner.ledger.exportfile import write_synced
from runner.ledger.exports import BATCH_ROWS as EXPORT_ROWS
from runner.ledger.exports import (
    TEXT_COLUMNS,
    add_kinds,
    export_batches,
    rebatched,
    schema_of,
)
from runner.ledger.fold import _snapshot
from runner.ledger.heap import release_freed
from runner.ledger.identity import COLUMNS as IDENTITY_COLUMNS
from runner.ledger.identity import HashedIdentities, exact_superseded, superseded_and_last_seqs
from runner.ledger.journal import fsync_dir
from runner.ledger.lastseqs import last_event_seqs
from runner.ledger.meta import read_run_meta
from runner.ledger.ordered import OrderedJobs, StreamedJobs, ordered_jobs
from runner.ledger.scan import scan_folded, system_pool
from runner.ledger.schema import LEDGER_SCHEMA, JobState
from runner.ledger.totals import COLUMNS as TOTALS_COLUMNS
from runner.ledger.totals import LENGTHS as TOTALS_LENGTHS
from runner.ledger.totals import EndpointTotals, Totals, merge_totals, totals
from runner.ledger.versions import SUPERSEDED

ExportFormat = Literal["csv", "jsonl", "parquet"]
_ZERO = Decimal(0)
_EMPTY = LEDGER_SCHEMA.empty_table()
_MARK = pa.field(SUPERSEDED, pa.bool_(), nullable=False)
_NO_KEYS = pa.array([], pa.string())
_EXPORTS = itertools.count()  # this process's exports, for their temp names


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
    # Older versions of rows recorded again (runner.ledger.versions): left out of the counts
    # and sums above unless ``all_versions``; what they were billed is still spent.
    superseded: int = 0
    superseded_billed_usd: Decimal = _ZERO
    superseded_estimated_usd: Decimal = _ZERO
    all_versions: bool = False
    # Re-rolls of flagged outputs, every version: paid, on top of what billed_usd counts.
    reroll_usd: Decimal = _ZERO

    @property
    def spent_usd(self) -> Decimal:
        """Everything billed: superseded versions and re-rolls included, whatever the counts
        show."""
        older = _ZERO if self.all_versions else self.superseded_billed_usd
        return trim_usd(self.billed_usd + older + self.reroll_usd)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's ledger, journal or run.json."""
    return any((path / name).exists() for name in ("ledger", "journal", "run.json"))


def not_a_run_dir(path: Path) -> str:
    return f"{path} is not a run directory (no ledger/, journal/ or run.json)"


def _require_run_dir(run_dir: Path) -> None:
    if not is_run_dir(run_dir):
        raise LedgerError(not_a_run_dir(run_dir))


def status_summary(run_dir: Path | str, *, all_versions: bool = False) -> StatusSummary:
    """Counts and spend of a run directory; takes no lock, so it works during a run.

    Superseded jobs (:mod:`runner.ledger.versions`) are counted apart unless ``all_versions``.
    Read in buckets of jobs with only the columns the totals need
    (:func:`runner.ledger.scan.scan_folded`), so memory does not grow with the ledger; each
    job's identity is kept as 20 bytes (:class:`runner.ledger.identity.HashedIdentities`),
    and two more scans tell superseded versions apart, only when there are some.
    """
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    columns = [*TOTALS_COLUMNS, "at", *IDENTITY_COLUMNS]

    def reduce(slices: Iterator[pa.Table]) -> tuple[list[Totals], np.ndarray, Any]:
        parts, identities, last = [], HashedIdentities(), None
        for jobs in slices:
            parts.append(totals(jobs))
            identities.add(jobs)
            at = pc.max(jobs["at"]).as_py()
            last = at if last is None or (at is not None and at > last) else last
        return parts, identities.candidates(), last

    (parts, candidates, last_at), read = scan_folded(
        run_dir, columns, reduce, lengths=TOTALS_LENGTHS
    )
    every = merge_totals(parts) if parts else totals(_EMPTY)
    old_keys = exact_superseded(run_dir, candidates)
    old = totals(_EMPTY)
    counted = every
    if len(old_keys):

        def split(slices: Iterator[pa.Table]) -> tuple[list[Totals], list[Totals]]:
            current, superseded = [], []
            for jobs in slices:
                gone = pc.is_in(jobs["job_key"], value_set=old_keys)
                superseded.append(totals(jobs.filter(gone)))
                current.append(totals(jobs.filter(pc.invert(gone))))
            return current, superseded

        (current, superseded), _ = scan_folded(
            run_dir, TOTALS_COLUMNS, split, lengths=TOTALS_LENGTHS
        )
        old = merge_totals(superseded)
        counted = every if all_versions else merge_totals(current)
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
        superseded=old.jobs,
        superseded_billed_usd=old.billed_usd,
        superseded_estimated_usd=old.estimated_usd,
        all_versions=all_versions,
        reroll_usd=every.reroll_usd,
    )


def export(
    run_dir: Path | str,
    out_path: Path | str,
    fmt: ExportFormat,
    *,
    all_versions: bool = False,
    read_back: bool = False,
) -> int:
    """Write one row per job (latest state) to out_path; returns the number of jobs.

    Joinable with the manifest by row_id (and source/line); the columns are those of
    :mod:`runner.ledger.exports`. Superseded jobs are left out unless ``all_versions``.
    ``read_back``: the caller reads the file at once (staged for stdout), so the pages
    written stay cached (:class:`runner.ledger.ahead.BehindWriter`).
    The file appears whole or not at all (a temp name of its own, then rename). The ledger
    is folded as it is read, in the order of one fold, from the seq of each job's last event
    (:func:`runner.ledger.lastseqs.last_event_seqs`); else a bucket of jobs at a time, put
    back in that order (:mod:`runner.ledger.ordered`).
    """
    if fmt not in ("csv", "jsonl", "parquet"):
        raise ValueError(f"export format must be csv, jsonl or parquet, not {fmt!r}")
    out_path = Path(out_path)
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    # Its own temp name: two exports to one path each write whole and rename (the last wins).
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}-{next(_EXPORTS)}.tmp")
    try:
        with system_pool():
            to = _Target(tmp, fmt, read_back)
            rows = _export_streamed(run_dir, to, all_versions)
            if rows is None:
                rows = _export_known(run_dir, to, all_versions)
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except OSError as exc:
        _remove(tmp)
        if exc.filename is not None and Path(exc.filename) not in (tmp, out_path, out_path.parent):
            raise  # the ledger's own files (read as the rows are written): named as such
        # The one boundary for the export's own file: a folder that is missing, read-only
        # or full is one line naming the file (exit 4), not a traceback.
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)
        raise LedgerError(f"cannot write the export {_shown(out_path)}: {reason}") from exc
    except BaseException:
        _remove(tmp)
        raise
    return rows


def _export_streamed(run_dir: Path, to: _Target, all_versions: bool) -> int | None:
    """The export folded as read, its superseded versions found after (None: the ledger
    cannot be read so; see :func:`runner.ledger.lastseqs.last_event_seqs`).

    The jobs' identities are kept as they are folded (:class:`HashedIdentities`); only a
    ledger with rows recorded again is read once more (:func:`exact_superseded`), and
    only one whose superseded jobs are left out has its scratch read once more, for the
    columns and types of the jobs shown."""
    last_seqs = last_event_seqs(run_dir)
    if last_seqs is None:
        return None
    kinds: dict[str, set[str]] = {}
    identities = HashedIdentities()

    def select(jobs: pa.Table) -> pa.Table:
        identities.add(jobs)  # seen again (an attempt given up): no version of itself
        current = pa.array(np.zeros(jobs.num_rows, dtype=bool))
        return jobs.append_column(_MARK, current)

    with ordered_jobs(run_dir, None, select, lambda jobs: add_kinds(jobs, kinds),
                      last_seqs=last_seqs, batch_rows=EXPORT_ROWS,
                      visit_columns=TEXT_COLUMNS) as jobs:  # fmt: skip
        candidates = identities.candidates()
        identities = HashedIdentities()  # 20 bytes a job, not held while writing
        old_keys = exact_superseded(run_dir, candidates)
        if len(old_keys) and not all_versions:
            if not isinstance(jobs, StreamedJobs):
                return None  # its rows can be read once only: found first, then
            kinds = {}
            for table in jobs.batches(EXPORT_ROWS, join=False):
                shown = table.select(list(TEXT_COLUMNS)).filter(_current(table, old_keys))
                add_kinds(shown, kinds)
                del table, shown
        return _write_file(run_dir, to, jobs, kinds, old_keys, all_versions)


def _export_known(run_dir: Path, to: _Target, all_versions: bool) -> int:
    """The export with its superseded versions found first (a scan of their columns): a
    sharded run directory, or one a streamed fold cannot read."""
    old_keys, last_seqs = superseded_and_last_seqs(run_dir)
    kinds: dict[str, set[str]] = {}

    def select(jobs: pa.Table) -> pa.Table:
        gone = pc.is_in(jobs["job_key"], value_set=old_keys)
        marked = jobs.append_column(_MARK, gone)
        return marked if all_versions else marked.filter(pc.invert(gone))

    with ordered_jobs(run_dir, None, select, lambda jobs: add_kinds(jobs, kinds),
                      last_seqs=last_seqs, batch_rows=EXPORT_ROWS,
                      visit_columns=TEXT_COLUMNS) as jobs:  # fmt: skip
        return _write_file(run_dir, to, jobs, kinds, _NO_KEYS, all_versions)


def _current(table: pa.Table, old_keys: pa.Array) -> pa.ChunkedArray:
    return pc.invert(pc.is_in(table["job_key"], value_set=old_keys))


@dataclass(frozen=True)
class _Target:
    """Where an export is written (its temp name), in which format, and whether it is read
    back at once."""

    tmp: Path
    fmt: str
    read_back: bool


def _write_file(
    run_dir: Path,
    to: _Target,
    jobs: OrderedJobs | StreamedJobs,
    kinds: Mapping[str, set[str]],
    old_keys: pa.Array,
    all_versions: bool,
) -> int:
    """Write the jobs to ``to.tmp`` (synced); ``old_keys`` marked superseded (with
    ``all_versions``) or left out. Returns the number of rows written."""
    release_freed()  # the fold's free heap pages, before the writer's batches
    ledger = _marked_schema(run_dir) if jobs.schema is None else jobs.schema
    schema = schema_of(ledger.with_metadata(_first_metadata(run_dir)), kinds)
    written = [0]
    batches = _export_batches(jobs, schema, old_keys, all_versions, written, to.fmt)
    write_synced(to.tmp, batches, schema, to.fmt, read_back=to.read_back)
    return written[0]


def _export_batches(
    jobs: OrderedJobs | StreamedJobs,
    schema: pa.Schema,
    old_keys: pa.Array,
    all_versions: bool,
    written: list[int],
    fmt: str,
) -> Iterator[pa.RecordBatch | pa.Table]:
    """The export's record batches, holding one merged batch at a time (a loop variable
    would keep the last one while the next is merged); counts the rows in ``written``."""
    if isinstance(jobs, StreamedJobs):
        # As written, in pieces (not joined into one chunk: a copy of every column). A
        # Parquet row group is one table whatever its chunks (see :func:`_write`).
        tables = jobs.batches(EXPORT_ROWS, join=False)
        parsed = jobs.visited()
    else:
        tables, parsed = jobs.batches(EXPORT_ROWS), None
    if len(old_keys) and not all_versions:
        # The jobs shown, in batches of EXPORT_ROWS again (each a row group), parsed anew.
        tables = rebatched((t.filter(_current(t, old_keys)) for t in tables), EXPORT_ROWS)
        parsed = None
    while (table := next(tables, None)) is not None:
        fields = None if parsed is None else next(parsed)
        if len(old_keys) and all_versions:
            gone = pc.is_in(table["job_key"], value_set=old_keys)
            table = table.set_column(table.schema.get_field_index(SUPERSEDED), _MARK, gone)
        written[0] += table.num_rows
        pieces = export_batches(table, schema, fields)  # for Parquet, one table: a row group
        yield from ([pa.Table.from_batches(list(pieces), schema)] if fmt == "parquet" else pieces)
        del fields
        del table


def _marked_schema(run_dir: Path) -> pa.Schema:
    """The folded ledger's columns with the superseded mark: an export of no job."""
    return pa.schema([*LEDGER_SCHEMA, _MARK])


def _first_metadata(run_dir: Path) -> Any:
    """The schema metadata one fold of the ledger carries: its first part's (else the
    journal's, the schema's own)."""
    parts = _snapshot(run_dir).parts
    if parts:
        try:
            return pq.read_schema(parts[0].path).metadata
        except (OSError, pa.ArrowException):
            pass
    return LEDGER_SCHEMA.metadata


def _remove(tmp: Path) -> None:
    """Remove a half-written temp file, if there is one to remove."""
    with contextlib.suppress(OSError):  # its folder is unusable: the error raised says so
        tmp.unlink(missing_ok=True)


def _shown(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)
