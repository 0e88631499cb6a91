"""What a resumed run holds of its ledger, read in bounded memory: :class:`ResumeState`.

A resume decides per manifest job from its folded ledger record (:func:`resume.decide`:
state, attempt, request_id when in flight, whether it cost nothing), adds what earlier runs
spent to the budget, re-attaches or reconciles the jobs left in flight (their whole records,
few) and downloads what completed jobs still lack. This module folds only those columns, a
range of job keys at a time (as :mod:`runner.ledger.scan` does), and keeps of each job a
few bytes in flat arrays (the key packed in 16 bytes, :mod:`runner.ledger.packedkeys`; a
state code, the attempt, flags) instead of the folded table: about 25 bytes a job.

- ``request_id`` is folded as a flag (present or not); its value is kept only for the jobs
  in flight, from their whole records (the only ones a decision reads it from).
- ``outputs`` is read as its outputs' ``local_path`` only, folded as a flag: a completed job
  with an output lacking a local copy is *pending*. Of pending jobs the state keeps the seq
  span of their events; :func:`read_whole` folds their whole records a chunk at a time
  when the run reaches them (:class:`runner.media.pending.ChunkedPending`).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from runner.ledger.packedkeys import PackedKeys
from runner.ledger.schema import JobRecord, JobState
from runner.ledger.state import JobBrief

_NO_ATTEMPT = np.iinfo(np.int32).min
_STATES = tuple(JobState)
_SCAN_ROWS = 1 << 20
IN_FLIGHT = frozenset(
    {JobState.SUBMITTING, JobState.UNKNOWN, JobState.QUEUED, JobState.IN_PROGRESS}
)


@dataclass(frozen=True, slots=True)
class Pending:
    """Completed jobs with an output to download: their rows in the state ordered by their
    last event (about the order the run made them), in chunks of ``PENDING_CHUNK``; each
    chunk's jobs have all their events within seq [low, high] of the chunk."""

    rows: np.ndarray
    low: np.ndarray
    high: np.ndarray
    size: int = 8_192  # jobs a chunk


PENDING_CHUNK = 8_192


def pack_facts(
    code: np.ndarray, attempt: np.ndarray, retryable: np.ndarray, free: np.ndarray
) -> np.ndarray:
    """A job's facts in one int64: ``attempt << 32 | (code + 1) << 16 | (retryable + 1) << 8
    | free`` (code: index in JobState or -1; attempt: _NO_ATTEMPT when none; retryable: -1
    when unknown). One read a lookup: four arrays cost four cache misses a job."""
    facts = attempt.astype(np.int64) << 32
    facts |= (code.astype(np.int64) + 1) << 16
    facts |= (retryable.astype(np.int64) + 1) << 8
    facts |= free.astype(np.int64)
    return facts


class ResumeState:
    """One job's resume facts per row, looked up by job_key (see the module docstring)."""

    def __init__(
        self,
        keys: PackedKeys,
        facts: np.ndarray,
        *,
        spent: Decimal = Decimal(0),
        records: dict[str, JobRecord] | None = None,
        pending: Pending | None = None,
        odd_states: dict[int, str] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self._index = keys
        self._facts = facts
        self._view = facts.data  # element access: a few times faster than numpy scalars
        self.spent = spent  # every job's latest billed attempt plus its paid re-rolls
        self.records = records or {}  # whole records of the jobs in flight
        self.pending = pending or Pending(*(np.zeros(0, np.int64),) * 3)
        self._odd = odd_states or {}  # rows whose state is not a JobState (raise on brief)
        self.run_dir = run_dir

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, job_key: object) -> bool:
        return isinstance(job_key, str) and self._index.find(job_key) is not None

    def row(self, job_key: str) -> int | None:
        return self._index.find(job_key)

    def key(self, row: int) -> str:
        return self._index.key(row)

    def keys(self, rows: np.ndarray) -> list[str]:
        return self._index.keys(rows)

    def keys_in(self, states: frozenset[JobState]) -> list[str]:
        """The job keys whose latest state is one of ``states`` (in flight, say: few)."""
        # A table of the 256 codes, not np.isin (which imports numpy.ma: ~7 ms of start-up).
        wanted = np.zeros(256, dtype=bool)
        wanted[[_STATES.index(s) + 1 for s in states]] = True
        rows = []
        for start in range(0, len(self._facts), _SCAN_ROWS):
            stored = (self._facts[start : start + _SCAN_ROWS] >> 16) & 0xFF
            rows.append(start + np.flatnonzero(wanted[stored]))
        return self._index.keys(np.concatenate(rows)) if rows else []

    def brief(self, job_key: str) -> JobBrief | None:
        i = self._index.find(job_key)
        if i is None:
            return None
        facts = self._view[i]
        code = ((facts >> 16) & 0xFF) - 1
        state = _STATES[code] if code >= 0 else JobState(self._odd[i])
        attempt = facts >> 32
        retryable = ((facts >> 8) & 0xFF) - 1
        record = self.records.get(job_key) if state in IN_FLIGHT else None
        return JobBrief(
            job_key,
            state,
            None if attempt == _NO_ATTEMPT else attempt,
            record.request_id if record is not None else None,
            None if retryable < 0 else bool(retryable),
            bool(facts & 1),
        )

    @property
    def nbytes(self) -> int:
        pending = (self.pending.rows, self.pending.low, self.pending.high)
        arrays = (self._facts, *pending)
        held = sum(a.nbytes for a in arrays)
        return int(held + self._index.nbytes)
