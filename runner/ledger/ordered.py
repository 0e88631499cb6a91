"""The folded ledger in the order one fold gives it (by each job's last event), read in
bounded memory: what ``runner export`` writes.

A scan (:func:`runner.ledger.scan.scan_folded`) hands out slices of jobs, each in the order
of their last events but slices in no order. Each slice, once the reader has chosen its
rows (:class:`OrderedJobs`' ``select``), is written to a scratch file (Arrow IPC) and its
seqs kept (8 bytes a job); then the slices are merged by seq, ``batch_rows`` jobs at a time,
each file read from its start to its end once. Memory holds the seqs, one batch and a few
record batches of each file; the scratch files take the chosen rows' size on disk.
Jobs with equal seqs (a sharded run directory: each shard counts its own) come in the order
of their slices.

Given the seq of every job's last event (:func:`ordered_jobs`' ``last_seqs``), a run directory
of one shard is instead folded as it is read (:class:`StreamedJobs`): the events, read once in
seq order a batch at a time, are folded with the rows of the jobs begun and not yet finished
(the *carry*); a row whose seq is its job's last is finished, and the rows finished by a batch
come in seq order after those of every batch before (a seq is one event's). Chosen, they go
to one scratch file, read back in order: no bucket, no merge. Memory holds a batch, the carry
and the seqs. A job's events lie close together as a run writes them (the carry holds the jobs
in flight); past CARRY_ROWS jobs begun and not finished at once (a run resumed long after),
the buckets and merge above are used instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import LedgerError
from runner.ledger.ahead import ahead
from runner.ledger.fold import _retrying, _Snapshot
from runner.ledger.folding import _fold
from runner.ledger.scan import _conformed, _empty_schema, _events, _with_keys, scan_folded
from runner.ledger.schema import LEDGER_SCHEMA
from runner.ledger.scratch import scratch_errors, scratch_folder

STREAM_EVENTS = 32_768  # events a streamed fold reads at once
CARRY_ROWS = 100_000  # jobs begun and not finished at once a streamed fold holds, at most
_FILE_ROWS = 128  # rows per record batch of a slice's scratch file: what each holds while merging


@dataclass
class OrderedJobs:
    """The chosen jobs of every slice, to be read back in order with :meth:`batches`."""

    schema: pa.Schema | None
    rows: int
    _files: list[Path]
    _seqs: list[np.ndarray]

    def batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Every chosen job, by the seq of its last event, ``batch_rows`` a table (one chunk)."""
        if not self._files:
            return
        sizes = [len(s) for s in self._seqs]
        seqs = np.concatenate(self._seqs)
        self._seqs = []
        order = np.argsort(seqs, kind="stable")
        del seqs
        source = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)[order]
        del order
        readers = [_Reader(path) for path in self._files]
        try:
            for start in range(0, len(source), batch_rows):
                chunk = source[start : start + batch_rows]
                counts = np.bincount(chunk, minlength=len(readers))
                pieces = [b for i, n in enumerate(counts) if n for b in readers[i].take(int(n))]
                table = pa.Table.from_batches(pieces)
                del pieces
                # Rows come grouped by slice; put them back in seq order, a column at a time,
                # letting go of each column once taken: one copy of the batch, not two.
                by_slice = np.argsort(chunk, kind="stable")
                place = np.empty(len(chunk), dtype=np.int64)
                place[by_slice] = np.arange(len(chunk))
                indices = pa.array(place)
                schema = table.schema
                columns = []
                for _name in schema.names:
                    columns.append(table.column(0).take(indices))
                    table = table.remove_column(0)
                del table
                ordered = pa.Table.from_arrays(columns, schema=schema)
                del columns
                yield ordered
                del ordered
                pa.default_memory_pool().release_unused()
        finally:
            for reader in readers:
                reader.close()


class _Reader:
    """A slice's scratch file, read forward ``n`` rows at a time."""

    def __init__(self, path: Path) -> None:
        self._source = pa.OSFile(str(path), "rb")
        self._stream = pa.ipc.open_stream(self._source)
        self._held: deque[pa.RecordBatch] = deque()  # read, not yet taken (the first in part)
        self._rows = 0

    def take(self, n: int) -> list[pa.RecordBatch]:
        """The next ``n`` rows, as slices of the file's record batches (no table per call:
        the merge asks every file for a few rows per batch)."""
        while self._rows < n:
            batch = self._stream.read_next_batch()
            self._held.append(batch)
            self._rows += batch.num_rows
        taken: list[pa.RecordBatch] = []
        need = n
        while need:
            first = self._held[0]
            if first.num_rows <= need:
                taken.append(self._held.popleft())
                need -= first.num_rows
            else:
                taken.append(first.slice(0, need))
                self._held[0] = first.slice(need)
                need = 0
        self._rows -= n
        return taken

    def close(self) -> None:
        self._source.close()


@contextmanager
def ordered_jobs(
    run_dir: Path,
    columns: Sequence[str] | None,
    select: Callable[[pa.Table], pa.Table],
    visit: Callable[[pa.Table], pa.Table | None],
    *,
    last_seqs: np.ndarray | None = None,
    batch_rows: int = 50_000,
    visit_columns: Sequence[str] | None = None,
) -> Iterator[OrderedJobs | StreamedJobs]:
    """Scan the folded ledger; ``select`` chooses (and may add columns to) each slice's
    rows, ``visit`` sees each chosen slice (to learn the columns of the output, say). The
    scratch files last as long as the context. With ``last_seqs`` (sorted: the seq of each
    job's last event, :func:`runner.ledger.identity.superseded_and_last_seqs`), folded as
    read where it can be (:class:`StreamedJobs`, in record batches of ``batch_rows``: read
    them back with the same); ``visit`` then sees each batch (some may have been seen by an
    attempt given up), only its ``visit_columns`` if named, and what it returns is kept on
    disk beside it (:meth:`StreamedJobs.visited`)."""
    with scratch_folder("runner-ordered-") as scratch:
        if last_seqs is not None:
            path = scratch / "streamed.arrows"
            with scratch_errors(scratch):
                streamed = _streamed(
                    run_dir, columns, select, visit, last_seqs, path, batch_rows, visit_columns
                )
            if streamed is not None:
                yield streamed
                return

        def reduce(slices: Iterator[pa.Table]) -> OrderedJobs:
            files: list[Path] = []
            seqs: list[np.ndarray] = []
            schema: pa.Schema | None = None
            for jobs in slices:
                chosen = select(jobs)
                del jobs
                if chosen.num_rows == 0:
                    continue
                visit(chosen)
                schema = chosen.schema
                path = scratch / f"slice-{len(files):05d}.arrows"
                with (
                    pa.OSFile(str(path), "wb") as sink,
                    pa.ipc.new_stream(sink, chosen.schema) as writer,
                ):
                    for batch in chosen.to_batches(max_chunksize=_FILE_ROWS):
                        writer.write_batch(batch)
                files.append(path)
                seqs.append(np.asarray(chosen["seq"].to_numpy(), dtype=np.int64))
            return OrderedJobs(schema, sum(len(s) for s in seqs), files, seqs)

        with scratch_errors(scratch):
            found, _info = scan_folded(run_dir, columns, reduce)
        yield found


@dataclass
class StreamedJobs:
    """The chosen jobs, folded as read, in one scratch file in seq order."""

    schema: pa.Schema | None
    rows: int
    _path: Path
    _sides: list[Path | None]

    def visited(self) -> Iterator[pa.Table | None]:
        """What ``visit`` returned for each batch of :meth:`batches`, in the same order."""
        for side in self._sides:
            yield None if side is None else pa.ipc.open_stream(pa.memory_map(str(side))).read_all()

    def batches(self, batch_rows: int, *, join: bool = True) -> Iterator[pa.Table]:
        """Every chosen job, by the seq of its last event, ``batch_rows`` a table (the record
        batches :func:`_streamed` wrote for it: joined into one chunk if ``join``, at the
        cost of a second copy of the batch while it is joined)."""
        if not self.rows:
            return
        reader = _Reader(self._path)
        try:
            for start in range(0, self.rows, batch_rows):
                pieces = reader.take(min(batch_rows, self.rows - start))
                table = pa.Table.from_batches(pieces)
                del pieces
                if join and table.column(0).num_chunks != 1:
                    box = [table]
                    del table
                    table = _joined(box)
                # No release_unused here: on the C library's malloc (runner.ledger.scan's
                # system_pool, where export reads) it is malloc_trim(0), every freed page
                # handed back after each batch and faulted in again by the next (a 1M-job
                # Parquet export: 752k -> 99k page faults with the one in _streamed,
                # 2.3 -> 0.95 s system time, peak RSS 291 -> 295 MiB).
                yield table
                del table
        finally:
            reader.close()


def _joined(box: list[pa.Table]) -> pa.Table:
    """The table in ``box`` (taken out) in one chunk, joined a column at a time, letting go
    of each column's pieces once joined: one copy of the batch held, not two."""
    table = box.pop()
    schema = table.schema
    columns = []
    for _name in schema.names:
        columns.append(table.column(0).combine_chunks())
        table = table.remove_column(0)
    return pa.Table.from_arrays(columns, schema=schema)


def _streamed(
    run_dir: Path,
    columns: Sequence[str] | None,
    select: Callable[[pa.Table], pa.Table],
    visit: Callable[[pa.Table], pa.Table | None],
    last_seqs: np.ndarray,
    path: Path,
    batch_rows: int,
    visit_columns: Sequence[str] | None,
) -> StreamedJobs | None:
    """The ledger folded as read into ``path``, ``batch_rows`` jobs a record batch (None:
    sharded, or too many jobs in flight). Events past the last of ``last_seqs`` came after
    its scan and are left out."""
    names = LEDGER_SCHEMA.names if columns is None else _with_keys(columns)
    empty = _empty_schema(names, ())
    top = int(last_seqs[-1]) if len(last_seqs) else 0

    def read(snap: _Snapshot) -> StreamedJobs | None:
        if snap.shards:
            return None
        carry: pa.Table | None = None
        carry_resets = np.zeros(0, dtype=bool)
        finished = rows = 0
        schema: pa.Schema | None = None
        writer: pa.ipc.RecordBatchStreamWriter | None = None
        # The visit's columns of the rows written and not yet visited: fewer than batch_rows.
        pending: list[pa.Table] = []
        sides: list[Path | None] = []  # what visit made of each batch written, kept

        def visit_pending(last: bool) -> None:
            held = pa.concat_tables(pending)
            pending.clear()
            while held.num_rows >= (1 if last else batch_rows):
                batch = held.slice(0, batch_rows).combine_chunks()
                held = held.slice(batch_rows)
                sides.append(_side(visit(batch), path.with_name(f"side-{len(sides):06d}.arrows")))
                del batch  # its pages reused by the next (see StreamedJobs.batches)
            if held.num_rows:
                pending.append(held)

        read_ahead = ahead(_events(snap, names, STREAM_EVENTS))  # read while folded
        with pa.OSFile(str(path), "wb") as sink, closing(read_ahead):
            try:
                for events in read_ahead:
                    events = _within(_conformed(events, empty), top)
                    folded, resets = _fold([events], None)
                    del events
                    if carry is not None and carry.num_rows:
                        folded, resets = _with_carry(carry, carry_resets, folded, resets)
                    seqs = np.asarray(folded["seq"].to_numpy(), np.int64)
                    done = _in_sorted(seqs, last_seqs)
                    carry, carry_resets = folded.filter(pa.array(~done)), resets[~done]
                    if carry.num_rows > CARRY_ROWS:
                        return None
                    ended = folded.filter(pa.array(done))
                    seqs = seqs[done]
                    if len(seqs) > 1 and not bool(np.all(seqs[1:] > seqs[:-1])):
                        ended = ended.take(pa.array(np.argsort(seqs, kind="stable")))
                    del folded
                    finished += ended.num_rows
                    chosen = select(ended)
                    del ended
                    if not chosen.num_rows:
                        continue
                    if writer is None:
                        schema = chosen.schema
                        writer = pa.ipc.new_stream(sink, schema)
                    # Written as they come (:meth:`StreamedJobs.batches` joins a batch's
                    # record batches as it reads them back): only the visit's columns wait.
                    writer.write_table(chosen)
                    rows += chosen.num_rows
                    if visit_columns is not None:
                        chosen = chosen.select(list(visit_columns))
                    pending.append(chosen)
                    del chosen
                    if sum(t.num_rows for t in pending) >= batch_rows:
                        visit_pending(last=False)
                if pending:
                    visit_pending(last=True)
            finally:
                if writer is not None:
                    writer.close()
        if finished != len(last_seqs) or (carry is not None and carry.num_rows):
            raise LedgerError("ledger changed between two passes of one read")
        return StreamedJobs(schema, rows, path, sides)

    return _retrying(run_dir, read)


def _side(table: pa.Table | None, path: Path) -> Path | None:
    """``table`` kept in a scratch file at ``path``."""
    if table is None:
        return None
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _with_carry(
    carry: pa.Table, carry_resets: np.ndarray, folded: pa.Table, resets: np.ndarray
) -> tuple[pa.Table, np.ndarray]:
    """A batch's ``folded`` rows, those of carried jobs folded again with their carried rows,
    and the other carried rows (in no particular order: a fold sorts them by seq)."""
    again = np.asarray(
        pc.is_in(folded["job_key"], value_set=carry["job_key"].combine_chunks()).to_numpy(
            zero_copy_only=False
        ),
        dtype=bool,
    )
    if not again.any():
        return pa.concat_tables([carry, folded]), np.concatenate([carry_resets, resets])
    box = [pa.concat_tables([carry, folded.filter(pa.array(again))])]
    merged, merged_resets = _fold(box, np.concatenate([carry_resets, resets[again]]))
    rows = pa.concat_tables([merged, folded.filter(pa.array(~again))])
    return rows, np.concatenate([merged_resets, resets[~again]])


def _within(events: pa.Table, top: int) -> pa.Table:
    seq = np.asarray(events["seq"].to_numpy(), np.int64)
    if not len(seq) or seq.max() <= top:
        return events
    return events.filter(pa.array(seq <= top))


def _in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return np.asarray(sorted_values[at] == values)
