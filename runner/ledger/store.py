"""The ledger writer: lock, recovery, group commit, checkpoints, compaction, run.json.

Redaction: a ledger opened with ``redact=`` (the run's one redaction function,
:meth:`runner.config.RunConfig.redactor`) passes every text of every event through it
before the event is written, and :func:`write_run_meta` does the same for run.json. The
exports (:func:`runner.ledger.views.export`) and the report (:mod:`runner.report`) read
only the ledger and run.json, so they are covered by this redaction and need none of
their own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

import anyio
import anyio.to_thread
import pyarrow as pa

from runner.errors import LedgerError
from runner.ledger.commits import CommitGroup
from runner.ledger.fold import (
    JOURNAL_DIR,
    LEDGER_DIR,
    read_admission,
)
from runner.ledger.folding import fold_tables
from runner.ledger.heap import release_freed
from runner.ledger.journal import (
    SegmentWriter,
    encode_line,
    fsync_dir,
    list_segments,
    read_back,
    read_segment,
    segment_name,
)
from runner.ledger.lock import RunLock
from runner.ledger.parts import (
    PartFile,
    part_rows,
    read_part,
    scan_parts,
    stale_temp_files,
    write_part,
)
from runner.ledger.redaction import Redact, redacted_event
from runner.ledger.schema import LedgerEvent, encode_event, rows_to_table
from runner.ledger.state import LedgerState

CHECKPOINT_EVENTS = 50_000


class Ledger:
    """The single writer of a run directory. Build it with :meth:`open`.

    ``append()`` assigns the next seq and buffers; ``await commit()`` makes
    every event appended so far durable with one write + fsync, shared by all
    the tasks that await it meanwhile (group commit); every
    ``checkpoint_events`` committed events are folded into a Parquet part.
    Between checkpoints committed events live in the journal only: a
    checkpoint reads its closed segments back, a few thousand lines at a time,
    so memory does not grow with the events waiting for a part.
    """

    def __init__(
        self,
        run_dir: Path,
        lock: RunLock,
        next_seq: int,
        checkpoint_events: int,
        redact: Redact | None = None,
        run_id: str | None = None,
    ):
        self.run_dir = run_dir
        self._redact = redact
        self.run_id = run_id
        self.ledger_dir = run_dir / LEDGER_DIR
        self.journal_dir = run_dir / JOURNAL_DIR
        self._lock = lock
        self._checkpoint_events = checkpoint_events
        self._io = threading.Lock()  # guards the fields below; never held during I/O
        self._write = threading.Lock()  # serialises journal writes, keeps seq order
        self._checkpointing = threading.Lock()  # one part writer at a time
        self._next_seq = next_seq
        self._durable_seq = next_seq - 1
        self._folded_seq = next_seq - 1  # every event up to here is in a part
        self._pending: list[bytes] = []
        self._retired: list[Path] = []  # closed segments: events after _folded_seq, in order
        self._segment = SegmentWriter(self.journal_dir / segment_name(next_seq))
        self._segment_first = next_seq
        self._flushing: anyio.Event | None = None  # set when the flush under way ends
        self._closed = False
        self._broken: OSError | None = None
        # Shards in one process commit in shared rounds (None: this ledger's own thread trip).
        self.commits: CommitGroup | None = None

    @classmethod
    def open(
        cls,
        run_dir: Path | str,
        *,
        checkpoint_events: int = CHECKPOINT_EVENTS,
        redact: Redact | None = None,
        run_id: str | None = None,
    ) -> Ledger:
        """Lock the run directory, recover from any crash, and start a new journal segment.

        ``run_id``, when given, is stamped on every event appended (its own wins over one
        an event copied from an earlier record carries)
        (:func:`runner.ledger.meta.new_run_id`: one per invocation of ``runner run``).

        ``redact``, when given, is applied to every text of every event appended
        (:func:`redacted_event`): what it removes never reaches the journal, a part, an
        export or the report.
        """
        run_dir = Path(run_dir)
        lock = RunLock(run_dir)
        try:
            if not run_dir.is_dir():
                run_dir.mkdir(parents=True)
                fsync_dir(run_dir.parent)
            lock.acquire()
        except OSError as exc:
            raise LedgerError(f"cannot use run directory {run_dir}: {exc}") from exc
        try:
            return cls(run_dir, lock, _recover(run_dir), checkpoint_events, redact, run_id)
        except OSError as exc:
            lock.release()
            raise LedgerError(f"cannot recover the ledger in {run_dir}: {exc}") from exc
        except BaseException:
            lock.release()
            raise

    @property
    def last_seq(self) -> int:
        """The seq of the last appended event (0 when none)."""
        return self._next_seq - 1

    @property
    def committed_seq(self) -> int:
        """Every event up to this seq is durable."""
        return self._durable_seq

    def append(self, event: LedgerEvent) -> int:
        """Buffer one event and return its seq. It is durable only after commit()."""
        if self._redact is not None:
            event = redacted_event(event, self._redact)
        with self._io:
            self._check_usable()
            seq = self._next_seq
            self._next_seq += 1
            encoded = encode_event(event, seq)
            if self.run_id is not None:
                # This invocation wrote it, even when it copies an earlier run's record.
                encoded["run_id"] = self.run_id
            self._pending.append(encode_line(encoded))
        return seq

    async def commit(self) -> None:
        """Make every event appended before this call durable (one fsync for all waiters).

        One flush at a time: a caller that finds one under way waits for it to end, then
        starts the next only if its events were appended too late for it. An event ends
        a flush, not a lock: every waiter wakes at once, and nothing is tied to the event
        loop beyond the flush itself (a ledger may outlive one ``anyio.run``)."""
        target = self.last_seq
        while self._durable_seq < target:
            flushing = self._flushing
            if flushing is not None:
                await flushing.wait()
                continue
            self._flushing = done = anyio.Event()
            try:
                # A shielded flush: cancelling a waiter must not cancel a half-done write.
                with anyio.CancelScope(shield=True):
                    if self.commits is None:
                        await anyio.to_thread.run_sync(self._flush)
                    else:
                        await self.commits.flush(self._flush)
            finally:
                self._flushing = None
                done.set()
        if self._checkpoint_due() and not self._checkpointing.locked():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._checkpoint_if_due)

    def _checkpoint_due(self) -> bool:
        return self._durable_seq - self._folded_seq >= self._checkpoint_events

    def _checkpoint_if_due(self) -> None:
        # Several committers can see the threshold before the first one's checkpoint
        # starts; the later ones would each write a part of a few events.
        with self._checkpointing:
            if self._checkpoint_due():
                self._checkpoint_locked()

    def commit_sync(self) -> None:
        self._flush()
        if self._checkpoint_due():
            self._checkpoint_if_due()

    def _flush(self) -> None:
        with self._write:
            self._flush_locked()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise LedgerError(
                f"the journal in {self.journal_dir} could not be written earlier "
                f"({self._broken}); events committed before that are safe"
            )
        if self._closed:
            raise LedgerError(f"ledger in {self.run_dir} is closed")

    def _flush_locked(self) -> None:
        with self._io:
            self._check_usable()
            if not self._pending:
                return
            data = b"".join(self._pending)
            last = self._next_seq - 1  # append() adds a line and a seq under this lock
            self._pending = []
        try:
            self._segment.write(data)
            self._segment.sync()
        except OSError as exc:
            # A half-written line may now end the segment and a failed fsync
            # cannot be retried safely: refuse every later write.
            self._broken = exc
            raise LedgerError(f"cannot write the journal in {self.journal_dir}: {exc}") from exc
        with self._io:
            self._durable_seq = last

    async def checkpoint(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.checkpoint_sync)

    def checkpoint_sync(self) -> None:
        """Fold committed journal events into a durable part, then drop their segments."""
        with self._checkpointing:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        with self._write:
            self._flush_locked()
            last = self._durable_seq
            if last == self._folded_seq:
                return
            if last >= self._segment_first:
                # Every event up to `last` is in the old segment; later ones go to the new.
                new = SegmentWriter(self.journal_dir / segment_name(last + 1))
                old, self._segment, self._segment_first = self._segment, new, last + 1
                old.close()
                self._retired.append(old.path)
        table = read_back(self._retired, self._folded_seq + 1, last)
        tail = self._small_tail()
        if tail is not None:
            table = pa.concat_tables([read_part(tail.path), table])
        write_part(self.ledger_dir, table)
        self._folded_seq = last
        # Only now that the part is durable may the journal lines and the tail go
        # (a tail left behind is covered by the new part: recovery deletes it).
        if tail is not None:
            tail.path.unlink(missing_ok=True)
            fsync_dir(self.ledger_dir)
        retired, self._retired = self._retired, []
        for path in retired:
            path.unlink(missing_ok=True)
        fsync_dir(self.journal_dir)
        del table
        # The part's table and its encoding are garbage, and the run's small allocations
        # since the last checkpoint have fragmented the heap: return the free pages.
        release_freed()

    def _small_tail(self) -> PartFile | None:
        """The newest part when it is smaller than a checkpoint's, to be merged into the next.

        A close, or the recovery after a crash, writes whatever the journal held;
        merged at the next checkpoint, such parts never pile up run after run.
        """
        parts, _covered = scan_parts(self.ledger_dir)
        if not parts or parts[-1].last_seq != self._folded_seq:
            return None
        tail = parts[-1]
        return tail if part_rows(tail.path) < self._checkpoint_events else None

    def compact(self) -> int:
        """Fold all parts into one holding only the latest state per job; returns parts removed.

        History (earlier events of a job) is dropped; the folded rows carry
        every field forward, so folding the result gives the same state.
        """
        self.checkpoint_sync()
        with self._checkpointing:
            parts, covered = scan_parts(self.ledger_dir)
            if len(parts) <= 1:
                return 0
            folded, _events = fold_tables(read_part(p.path) for p in parts)
            write_part(
                self.ledger_dir, folded, first_seq=parts[0].first_seq, last_seq=parts[-1].last_seq
            )
            for part in [*parts, *covered]:
                part.path.unlink()
            fsync_dir(self.ledger_dir)
            return len(parts)

    def state(self, *, downloads: bool = True) -> LedgerState:
        """What a run resuming this ledger needs of it (every committed event, maybe more).

        Only the columns admission reads (:func:`read_admission`), plus the whole
        record of completed jobs with outputs still to download when ``downloads``:
        pass False when the run downloads nothing. ``runner status``, ``export``
        and ``report`` fold every column themselves.
        """
        state = LedgerState(read_admission(self.run_dir, downloads=downloads))
        # Folding allocates several times the result; hand the rest back to the OS.
        pa.default_memory_pool().release_unused()
        return state

    def close(self) -> None:
        """Commit, checkpoint, and release the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.checkpoint_sync()
            with self._io:
                self._closed = True
            self._segment.close()
            if os.path.getsize(self._segment.path) == 0:
                self._segment.path.unlink()
                fsync_dir(self.journal_dir)
        finally:
            self._closed = True
            self._lock.release()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def compact(run_dir: Path | str) -> int:
    """Fold a run directory's parts into one (takes the writer lock); returns parts removed."""
    with Ledger.open(run_dir) as ledger:
        return ledger.compact()


def _recover(run_dir: Path) -> int:
    """Bring a locked run directory to a clean state; return the next seq.

    Each step is safe to interrupt: temp files and covered parts are garbage,
    journal events already in a part are filtered by seq, and the journal is
    deleted only after the part holding its events is durable.
    """
    ledger_dir = run_dir / LEDGER_DIR
    journal_dir = run_dir / JOURNAL_DIR
    for directory in (ledger_dir, journal_dir):
        if not directory.exists():
            directory.mkdir()
            fsync_dir(run_dir)
    parts, covered = scan_parts(ledger_dir)
    garbage = [p.path for p in covered] + stale_temp_files(ledger_dir)
    for path in garbage:
        path.unlink()
    if garbage:
        fsync_dir(ledger_dir)
    max_seq = parts[-1].last_seq if parts else 0
    segments = list_segments(journal_dir)
    rows = [r for s in segments for r in read_segment(s).rows if r["seq"] > max_seq]
    if rows:
        write_part(ledger_dir, rows_to_table(rows))
        max_seq = rows[-1]["seq"]
    for segment in segments:
        segment.unlink()
    if segments:
        fsync_dir(journal_dir)
    return max_seq + 1
