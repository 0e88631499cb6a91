"""The emulated queue: a pure, event-driven scheduler over an injected clock.

Nothing here sleeps or reads a clock. The app calls :meth:`QueueModel.advance`
with "now" on every request; the scheduler replays every event up to that
instant in time order (slots freeing, queued jobs starting, start deadlines
expiring), so a job's start and finish times are exact however rarely it is
polled. Tests move a fake clock forward instead of waiting.

Ordering is fal's: FIFO among normal-priority jobs, then FIFO among
``low``-priority ones; at most ``concurrency`` jobs are IN_PROGRESS.

A finished job is kept ``retention_s`` (clock seconds) after it ends, then
forgotten: :meth:`QueueModel.find` stops returning it at that instant, and the
next :meth:`QueueModel.advance` drops it from memory, so a long run holds only the
jobs in flight and those still within retention.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    QUEUED = "IN_QUEUE"
    RUNNING = "IN_PROGRESS"
    DONE = "COMPLETED"


class Ending(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # ran, then failed with a planned error_type
    CANCELLED = "cancelled"
    START_TIMEOUT = "start_timeout"  # X-Fal-Request-Timeout passed before it started


@dataclass(frozen=True, slots=True)
class StoredResult:
    """What a result GET replays: status code, JSON body and extra headers."""

    status_code: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None


@dataclass(eq=False, slots=True)
class Job:
    """One request in the queue. Times are clock seconds (already scaled)."""

    request_id: str
    endpoint: str
    app_path: str  # owner/app, the prefix of its status/result/cancel URLs
    submitted_at: float
    service_s: float
    low_priority: bool = False
    deadline_at: float | None = None
    failure: str | None = None  # planned error_type, decided at submit
    context: Any = None  # whatever the app needs to build the result
    seq: int = 0
    phase: Phase = Phase.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    ending: Ending | None = None
    result: StoredResult | None = None

    @property
    def finish_due(self) -> float:
        assert self.started_at is not None
        return self.started_at + self.service_s


class QueueModel:
    """Queue state advanced to "now" on demand. Not thread-safe; one event loop."""

    def __init__(self, *, concurrency: int, now: float, retention_s: float = math.inf) -> None:
        self.concurrency = concurrency
        self.retention_s = retention_s
        self.jobs: dict[str, Job] = {}  # in flight, or ended less than retention_s ago
        self._normal: deque[Job] = deque()
        self._low: deque[Job] = deque()
        self._running: list[Job] = []
        self._deadlines: list[tuple[float, int, Job]] = []
        self._cursor = now
        self._seq = 0
        self._ended: list[Job] = []
        # (forget_at, request_id) in end order. Jobs end in time order (events are replayed
        # in order, the cursor never goes back), so the head is always the next to forget.
        self._forget: deque[tuple[float, str]] = deque()
        self.ended_count = 0
        self.busy_done_s = 0.0
        self.version = 0  # bumped on every state change, so watchers know to look again

    @property
    def now(self) -> float:
        return self._cursor

    @property
    def running(self) -> tuple[Job, ...]:
        return tuple(self._running)

    @property
    def queued_count(self) -> int:
        return len(self._normal) + len(self._low)

    def find(self, request_id: str, now: float) -> Job | None:
        """The job with this id, unless unknown or ended ``retention_s`` or more before ``now``."""
        job = self.jobs.get(request_id)
        if job is None or job.finished_at is None:
            return job
        return job if now < job.finished_at + self.retention_s else None

    def submit(self, job: Job) -> None:
        """Enqueue at the current cursor (call :meth:`advance` first)."""
        self._seq += 1
        job.seq = self._seq
        self.version += 1
        self.jobs[job.request_id] = job
        (self._low if job.low_priority else self._normal).append(job)
        if job.deadline_at is not None:
            heapq.heappush(self._deadlines, (job.deadline_at, job.seq, job))
        self._fill()

    def advance(self, now: float) -> list[Job]:
        """Replay every event up to ``now``; return the jobs that ended, in order."""
        while True:
            self._fill()
            due = self._next_event_at()
            if due is None or due > now:
                break
            self._cursor = due
            for job in [j for j in self._running if j.finish_due <= due]:
                self._running.remove(job)
                self._end(job, Ending.FAILED if job.failure else Ending.SUCCEEDED, job.finish_due)
            self._expire_deadlines(due)
        self._cursor = max(self._cursor, now)
        self._forget_expired(self._cursor)
        ended, self._ended = self._ended, []
        return ended

    def next_event_at(self) -> float | None:
        """When the next finish or deadline happens (for the background waker)."""
        self._prune_deadlines()
        return self._next_event_at()

    def position(self, job: Job) -> int:
        """How many queued requests are ahead of ``job`` (0 = next to start)."""
        if job.low_priority:
            return len(self._normal) + self._low.index(job)
        return self._normal.index(job)

    def cancel(self, job: Job) -> list[Job]:
        """Cancel at the cursor. A queued job never runs; a running one ends now."""
        if job.phase is Phase.QUEUED:
            (self._low if job.low_priority else self._normal).remove(job)
        elif job.phase is Phase.RUNNING:
            self._running.remove(job)
        else:
            return []
        self._end(job, Ending.CANCELLED, self._cursor)
        self._fill()
        ended, self._ended = self._ended, []
        return ended

    def busy_s(self) -> float:
        """Slot-seconds spent on jobs so far, running ones counted up to the cursor."""
        live = sum(
            self._cursor - job.started_at for job in self._running if job.started_at is not None
        )
        return self.busy_done_s + live

    def _fill(self) -> None:
        self._expire_deadlines(self._cursor)
        while len(self._running) < self.concurrency and (self._normal or self._low):
            job = (self._normal or self._low).popleft()
            job.phase = Phase.RUNNING
            job.started_at = self._cursor
            self.version += 1
            self._running.append(job)

    def _expire_deadlines(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, job = heapq.heappop(self._deadlines)
            if job.phase is Phase.QUEUED:
                (self._low if job.low_priority else self._normal).remove(job)
                self._end(job, Ending.START_TIMEOUT, deadline)

    def _forget_expired(self, now: float) -> None:
        forget = self._forget
        while forget and forget[0][0] <= now:
            self.jobs.pop(forget.popleft()[1], None)

    def _prune_deadlines(self) -> None:
        while self._deadlines and self._deadlines[0][2].phase is not Phase.QUEUED:
            heapq.heappop(self._deadlines)

    def _next_event_at(self) -> float | None:
        self._prune_deadlines()
        times = [job.finish_due for job in self._running]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times) if times else None

    def _end(self, job: Job, ending: Ending, at: float) -> None:
        if job.started_at is not None:
            self.busy_done_s += at - job.started_at
        job.phase = Phase.DONE
        job.ending = ending
        job.finished_at = at
        self.ended_count += 1
        self.version += 1
        self._ended.append(job)
        if self.retention_s < math.inf:
            self._forget.append((at + self.retention_s, job.request_id))
