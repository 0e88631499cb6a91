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
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from runner.ledger.scan import scan_folded

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
    visit: Callable[[pa.Table], None],
) -> Iterator[OrderedJobs]:
    """Scan the folded ledger; ``select`` chooses (and may add columns to) each slice's
    rows, ``visit`` sees each chosen slice (to learn the columns of the output, say). The
    scratch files last as long as the context."""
    with tempfile.TemporaryDirectory(prefix="runner-ordered-") as scratch:

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
                path = Path(scratch) / f"slice-{len(files):05d}.arrows"
                with (
                    pa.OSFile(str(path), "wb") as sink,
                    pa.ipc.new_stream(sink, chosen.schema) as writer,
                ):
                    for batch in chosen.to_batches(max_chunksize=_FILE_ROWS):
                        writer.write_batch(batch)
                files.append(path)
                seqs.append(np.asarray(chosen["seq"].to_numpy(), dtype=np.int64))
            return OrderedJobs(schema, sum(len(s) for s in seqs), files, seqs)

        found, _info = scan_folded(run_dir, columns, reduce)
        yield found
