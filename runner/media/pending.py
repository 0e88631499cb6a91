"""What is still to download: completed jobs whose outputs (some or all) have no local copy.

:class:`DownloadItem` is one job's outputs, handed to the download stage;
:func:`pending_downloads` finds the jobs of a folded ledger with an output lacking
local_path (an earlier ``--no-download`` run, or downloads that failed), so a resumed run
fetches only those; :class:`ChunkedPending` does it for a :class:`ResumeState`, reading
their whole records a chunk at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.resumescan import read_whole
from runner.ledger.resumestate import ResumeState
from runner.ledger.schema import JobState, LedgerEvent, OutputImage, record_from_row
from runner.ledger.state import LedgerState

if TYPE_CHECKING:  # --cache only: the cache's modules load when a run uses one
    from runner.media.cache import CacheSlot


@dataclass(frozen=True, slots=True)
class DownloadItem:
    """A completed job whose outputs (some or all) are still to be downloaded.

    ``completed`` is the job's ``completed`` event (or folded record): the event recording
    the downloads repeats it with new outputs, so every completed event stands alone.
    """

    job_key: str
    row_id: str
    outputs: tuple[OutputImage, ...]
    completed: LedgerEvent | None = None
    cache: CacheSlot | None = None  # file the outputs in the cross-run cache once downloaded


class PendingDownloads(Mapping[str, DownloadItem]):
    """Completed jobs of a folded ledger with an output lacking local_path, by job_key.

    Holds a flag per row of the state (a byte a job) and builds each
    :class:`DownloadItem` from its row when asked for: a ledger written with
    ``--no-download`` and resumed with downloads has every completed job pending,
    and a million records held as Python objects would be gigabytes. :meth:`pop`
    hands a job out once (the scheduler reaches a job once per manifest row).
    """

    def __init__(self, state: LedgerState) -> None:
        self._state = state
        self._flags = _unfetched_rows(state.jobs)
        self._count = int(np.count_nonzero(self._flags))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        keys = self._state.jobs["job_key"]
        for start in range(0, len(self._flags), _KEY_BATCH):
            rows = np.flatnonzero(self._flags[start : start + _KEY_BATCH]) + start
            if len(rows):
                yield from keys.take(pa.array(rows)).to_pylist()

    def __getitem__(self, job_key: str) -> DownloadItem:
        row = self._row(job_key)
        if row is None:
            raise KeyError(job_key)
        record = self._state.record(row)
        return DownloadItem(record.job_key, record.row_id or "", record.outputs or (), record)

    def __contains__(self, job_key: object) -> bool:
        return isinstance(job_key, str) and self._row(job_key) is not None

    def pop(self, job_key: str) -> DownloadItem | None:
        """The job's item, or None when it has nothing (left) to download; then never again."""
        row = self._row(job_key)
        if row is None:
            return None
        item = self[job_key]
        self._flags[row] = False
        self._count -= 1
        return item

    def must_read(self, job_key: str) -> bool:
        """Never: every record is held (see :meth:`ChunkedPending.must_read`)."""
        return False

    def _row(self, job_key: str) -> int | None:
        row = self._state.row(job_key)
        return row if row is not None and self._flags[row] else None


_KEY_BATCH = 65_536


def pending_for(state: LedgerState | ResumeState) -> PendingDownloads | ChunkedPending:
    """The jobs of a folded ledger or a resume's state with downloads pending."""
    if isinstance(state, ResumeState):
        return ChunkedPending(state)
    return PendingDownloads(state)


def pending_downloads(state: LedgerState | pa.Table) -> PendingDownloads:
    """The jobs of a folded ledger (a state, or its table) with downloads pending."""
    return PendingDownloads(state if isinstance(state, LedgerState) else LedgerState(state))


def _unfetched_rows(jobs: pa.Table) -> np.ndarray:
    """Per row: a completed job with an output lacking local_path. Vectorised, chunk by chunk."""
    flags = np.zeros(jobs.num_rows, dtype=bool)
    if jobs.num_rows == 0:
        return flags
    start = 0
    for chunk in jobs["outputs"].chunks:
        flat = pc.list_flatten(chunk)
        if len(flat):
            missing = pc.is_null(pc.struct_field(flat, "local_path"))
            parents = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)
            flags[start + parents[missing.to_numpy(zero_copy_only=False)]] = True
        start += len(chunk)
    done = pc.equal(jobs["state"], JobState.COMPLETED.value).combine_chunks()
    flags &= done.to_numpy(zero_copy_only=False)
    return flags


class ChunkedPending:
    """The pending downloads of a :class:`ResumeState`: a position per job (4 bytes), and
    the whole records of one chunk of them at a time, read from the ledger when the run
    first reaches one of its jobs (:func:`read_whole`; the chunk's seq span only).

    Chunks follow the order of the jobs' last events, which a rerun of the same manifest
    meets in about the same order: each chunk is read about once. A manifest in another
    order reads a chunk per job at worst (slow, never wrong). :meth:`pop` hands a job out
    once.
    """

    def __init__(self, state: ResumeState, *, keep: int = 2) -> None:
        self._state = state
        rows = state.pending.rows
        self._at = np.full(len(state) if len(rows) else 0, -1, dtype=np.int32)
        self._at[rows] = np.arange(len(rows), dtype=np.int32)
        self._count = len(rows)
        self._keep = keep
        self._chunks: OrderedDict[int, tuple[pa.Table, dict[str, int]]] = OrderedDict()

    def __len__(self) -> int:
        return self._count

    def _position(self, job_key: str) -> int | None:
        row = self._state.row(job_key) if self._count else None
        if row is None or self._at[row] < 0:
            return None
        return int(self._at[row])

    def must_read(self, job_key: str) -> bool:
        """Whether :meth:`pop` will read the ledger (a chunk not held): run it in a thread."""
        at = self._position(job_key)
        return at is not None and at // self._state.pending.size not in self._chunks

    def pop(self, job_key: str) -> DownloadItem | None:
        """The job's item, or None when it has nothing (left) to download; then never again."""
        at = self._position(job_key)
        if at is None:
            return None
        table, index = self._chunk(at // self._state.pending.size)
        record = record_from_row(table.slice(index[job_key], 1).to_pylist()[0])
        row = self._state.row(job_key)
        assert row is not None
        self._at[row] = -1
        self._count -= 1
        return DownloadItem(record.job_key, record.row_id or "", record.outputs or (), record)

    def _chunk(self, chunk: int) -> tuple[pa.Table, dict[str, int]]:
        held = self._chunks.get(chunk)
        if held is not None:
            self._chunks.move_to_end(chunk)
            return held
        pending, run_dir = self._state.pending, self._state.run_dir
        assert run_dir is not None
        size = pending.size
        rows = pending.rows[chunk * size : (chunk + 1) * size]
        keys = [self._state.key(int(r)) for r in rows]
        low, high = int(pending.low[chunk]), int(pending.high[chunk])
        table = read_whole(run_dir, keys, low, high)
        held = (table, {k: i for i, k in enumerate(table["job_key"].to_pylist())})
        self._chunks[chunk] = held
        while len(self._chunks) > self._keep:
            self._chunks.popitem(last=False)
        return held
