"""The folded ledger held for admission and resume: :class:`LedgerState`.

One latest record per job, looked up by job_key through a numpy key index
(:mod:`runner.ledger.index`) instead of a Python object per job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.fold import read_folded
from runner.ledger.index import KeyIndex, Strings, Values
from runner.ledger.schema import JobRecord, JobState, record_from_row


@dataclass(frozen=True, slots=True)
class JobBrief:
    """The few fields a resume decision needs, cheap to look up for millions of jobs."""

    job_key: str
    state: JobState
    attempt: int | None
    request_id: str | None
    retryable: bool | None
    cost_nothing: bool = False  # billed 0: a failure that certainly cost nothing


class LedgerState:
    """The folded ledger: one latest record per job, looked up by job_key.

    ``jobs`` is the folded table: every column (:meth:`load`), or what
    :func:`read_admission` reads (``Ledger.state()``). Lookups go through a
    hash index and flat arrays, never a Python object per job: about 20 bytes a
    job on top of the table.
    """

    def __init__(self, jobs: pa.Table) -> None:
        # One chunk per looked-up column, so that the table and the index share it.
        for name in ("job_key", "request_id"):
            if name in jobs.column_names and jobs[name].num_chunks > 1:
                whole = jobs[name].combine_chunks()
                jobs = jobs.set_column(jobs.schema.get_field_index(name), name, whole)
        self.jobs = jobs
        self._index = KeyIndex(jobs["job_key"])
        self._brief: _Briefs | None = None

    @classmethod
    def empty(cls) -> LedgerState:
        """A ledger that has seen nothing."""
        from runner.ledger.schema import LEDGER_SCHEMA

        return cls(LEDGER_SCHEMA.empty_table())

    @classmethod
    def load(cls, run_dir: Path | str) -> LedgerState:
        return cls(read_folded(Path(run_dir)).jobs)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, job_key: object) -> bool:
        return isinstance(job_key, str) and self._index.find(job_key) is not None

    def keys(self) -> Iterator[str]:
        return iter(self._index)

    def keys_in(self, states: frozenset[JobState]) -> list[str]:
        """The job keys whose latest state is one of ``states`` (in flight, say: few)."""
        if len(self) == 0:
            return []
        names = self.jobs["state"]
        if pa.types.is_dictionary(names.type):
            names = names.cast(pa.string())
        value_set = pa.array([s.value for s in states], pa.string())
        mask = pc.is_in(names, value_set=value_set)
        keys: list[str] = self.jobs["job_key"].filter(mask).to_pylist()
        return keys

    def row(self, job_key: str) -> int | None:
        """The row of ``jobs`` holding job_key, or None when never seen."""
        return self._index.find(job_key)

    def record(self, row: int) -> JobRecord:
        """The folded record at a row of ``jobs`` (the columns it has)."""
        # A scalar per column: half the time of a one-row slice's to_pylist().
        names, columns = self.jobs.column_names, self.jobs.columns
        return record_from_row({n: c[row].as_py() for n, c in zip(names, columns, strict=True)})

    def get(self, job_key: str) -> JobRecord | None:
        """The folded record of one job (the columns ``jobs`` has), or None when never seen."""
        i = self._index.find(job_key)
        if i is None:
            return None
        return self.record(i)

    def brief(self, job_key: str) -> JobBrief | None:
        i = self._index.find(job_key)
        if i is None:
            return None
        if self._brief is None:
            self._brief = _Briefs(self.jobs)
        return self._brief.at(job_key, i)

    @property
    def nbytes(self) -> int:
        """Bytes held: the table, the index and the brief arrays."""
        brief = 0 if self._brief is None else self._brief.nbytes
        return int(self.jobs.nbytes) + self._index.nbytes + brief


_STATES = tuple(JobState)
_STATE_VALUES = pa.array([s.value for s in _STATES])


class _Briefs:
    """The fields of JobBrief as flat arrays: a state code, attempt, request_id, retryable."""

    def __init__(self, jobs: pa.Table) -> None:
        self._states = jobs["state"]
        names = (
            self._states.cast(pa.string())
            if pa.types.is_dictionary(self._states.type)
            else self._states
        )
        codes = pc.index_in(names, value_set=_STATE_VALUES).fill_null(-1)
        self._codes = np.asarray(codes.to_numpy(), dtype=np.int8).data
        self._attempt = Values(jobs["attempt"])
        self._retryable = Values(jobs["retryable"])
        self._request_id = Strings(jobs["request_id"])
        billed = jobs["billed_usd"] if "billed_usd" in jobs.column_names else None
        self._free = (
            np.zeros(jobs.num_rows, dtype=bool)
            if billed is None
            else np.asarray(
                pc.equal(billed, pa.scalar(0, billed.type))
                .fill_null(False)
                .to_numpy(zero_copy_only=False),
                dtype=bool,
            )
        )

    @property
    def nbytes(self) -> int:
        """Bytes held besides the table (request_id is read where it is)."""
        return (
            self._codes.nbytes + self._attempt.nbytes + self._retryable.nbytes + self._free.nbytes
        )

    def at(self, job_key: str, i: int) -> JobBrief:
        code = self._codes[i]
        # An unknown state raises ValueError, as JobState(value) does.
        state = _STATES[code] if code >= 0 else JobState(self._states[i].as_py())
        attempt = self._attempt.get(i)
        retryable = self._retryable.get(i)
        return JobBrief(
            job_key,
            state,
            None if attempt is None else int(attempt),
            self._request_id.get(i),
            None if retryable is None else bool(retryable),
            bool(self._free[i]),
        )
