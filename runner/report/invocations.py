"""One line per invocation of ``runner run`` on a run directory: when it ran, its jobs, its
spend and its exit status. Pure: the ledger's events (``run_id``, ``at``, ``job_key``,
``state``, ``billed_usd``) and run.json's ``invocations`` in, frozen lines out.

Where each figure comes from:

- when: run.json's ``started_at`` / ``ended_at``; without them, the invocation's first
  and last event;
- exit: run.json's ``exit_code`` and ``message``. An invocation whose end run.json never
  recorded (killed by SIGKILL, a power cut) has none: it *did not finish*;
- jobs and spend: run.json's counts when the invocation finished (they survive a
  compaction, which drops earlier events); else its events: the jobs whose last event in
  it is ``completed`` or ``failed``, and ``billed_usd`` summed over its events that moved
  a job into an end state (:func:`runner.report.timeline.transitions`).

Events written before run ids (schema version < 4) have no ``run_id``: they are one line,
``run_id`` None, ordered first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints.money import trim_usd
from runner.ledger import JobState
from runner.ledger.meta import invocations as meta_invocations
from runner.report.timeline import JobOrder, transitions

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Invocation:
    run_id: str | None  # None: events an older runner wrote, before run ids
    started_at: datetime | None
    ended_at: datetime | None  # None: did not finish (or unknown, for run_id None)
    exit_code: int | None
    message: str | None
    finished: bool  # run.json recorded how it ended
    completed: int
    failed: int
    spent_usd: Decimal
    events: int  # ledger events it wrote (fewer after a compaction)
    counts_from: str  # "run.json" or "ledger"
    last_event_at: datetime | None = None  # its latest event: where one that died stopped
    skipped: int = 0  # completed before it, left alone (run.json only)
    shard: int | None = None  # a sharded run directory: the shard it ran (run.json only)
    command: str = "run"  # "cancel": a `runner cancel` that cancelled some (run.json only)

    @property
    def status(self) -> str:
        """``exit 0``, ``exit 3``, ``did not finish``, or ``unknown`` (before run ids)."""
        if self.run_id is None:
            return "unknown (before run ids)"
        if not self.finished:
            return "did not finish"
        if self.exit_code is None:
            return "ended without an exit code"
        return f"exit {self.exit_code}"


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the events of one run id say."""

    first_at: datetime | None = None
    last_at: datetime | None = None
    events: int = 0
    completed: int = 0
    failed: int = 0
    spent_usd: Decimal = _ZERO


def invocation_lines(
    events: pa.Table | None, run_meta: Mapping[str, Any] | None
) -> tuple[Invocation, ...]:
    """Every invocation, in the order they started (run.json's order, then by first event)."""
    return invocations_of(run_counts(events), run_meta)


def merge_run_counts(parts: Iterable[Mapping[str | None, _Seen]]) -> dict[str | None, _Seen]:
    """What :func:`run_counts` says of all the events of several disjoint sets of jobs."""
    out: dict[str | None, _Seen] = {}
    for part in parts:
        for run_id, seen in part.items():
            was = out.get(run_id)
            out[run_id] = seen if was is None else _Seen(
                first_at=_least(was.first_at, seen.first_at),
                last_at=_most(was.last_at, seen.last_at),
                events=was.events + seen.events,
                completed=was.completed + seen.completed,
                failed=was.failed + seen.failed,
                spent_usd=trim_usd(was.spent_usd + seen.spent_usd),
            )  # fmt: skip
    return out


def _least(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _most(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def invocations_of(
    counts: Mapping[str | None, _Seen], run_meta: Mapping[str, Any] | None
) -> tuple[Invocation, ...]:
    """Every invocation, from run.json and the events' :func:`run_counts`."""
    seen = dict(counts)
    lines = []
    for entry in meta_invocations(run_meta):
        run_id = entry["run_id"]
        lines.append(_from_meta(entry, seen.pop(run_id, _Seen())))
    for run_id, found in seen.items():
        lines.append(_from_events(run_id, found))
    never = datetime.max.replace(tzinfo=None)

    def order(line: Invocation) -> tuple[int, Any]:
        when = line.started_at.replace(tzinfo=None) if line.started_at else never
        return (0 if line.run_id is None else 1, when)

    return tuple(sorted(lines, key=order))


def run_counts(events: pa.Table | None, order: JobOrder | None = None) -> dict[str | None, _Seen]:
    """Per run id, what its events say: every event of each job the events hold (``order``:
    their :class:`JobOrder`, if already made)."""
    if events is None or events.num_rows == 0:
        return {}
    jobs = order or JobOrder.of(events)
    # A bill counts at the job's move into its end state, not again when re-recorded.
    moved = pa.array(transitions(events, jobs))
    billed = pc.if_else(moved, events["billed_usd"], pa.scalar(None, events["billed_usd"].type))
    table = pa.table({"run_id": events["run_id"], "at": events["at"], "billed_usd": billed})
    stats = table.group_by("run_id", use_threads=False).aggregate(
        [("at", "min"), ("at", "max"), ("at", "count"), ("billed_usd", "sum")]
    )
    ends = _end_states(events, jobs)
    out: dict[str | None, _Seen] = {}
    for row in stats.to_pylist():
        run_id = row["run_id"]
        counts = ends.get(run_id, {})
        out[run_id] = _Seen(
            first_at=row["at_min"],
            last_at=row["at_max"],
            events=int(row["at_count"]),
            completed=counts.get(JobState.COMPLETED.value, 0),
            failed=counts.get(JobState.FAILED.value, 0),
            spent_usd=trim_usd(row["billed_usd_sum"] or _ZERO),
        )
    return out


def _end_states(events: pa.Table, jobs: JobOrder) -> dict[str | None, dict[str, int]]:
    """How many jobs each invocation left in each state: each job's last event in it.

    One writer at a time, so a job's events of one invocation are consecutive in seq."""
    runs = pc.dictionary_encode(pc.fill_null(events["run_id"], "").combine_chunks())
    run_codes = np.asarray(runs.indices)[jobs.order]
    n = len(run_codes)
    last = np.ones(n, dtype=bool)
    last[:-1] = ~(jobs.same_job[1:] & (run_codes[1:] == run_codes[:-1]))
    rows = jobs.order[last]
    ends = (
        pa.table({"run": pa.array(run_codes[last]), "state": events["state"].take(pa.array(rows))})
        .group_by(["run", "state"], use_threads=False)
        .aggregate([("state", "count")])
    )
    names = runs.dictionary.to_pylist()
    out: dict[str | None, dict[str, int]] = {}
    for code, state, count in zip(ends["run"].to_pylist(), ends["state"].to_pylist(),
                                  ends["state_count"].to_pylist(), strict=True):  # fmt: skip
        out.setdefault(names[code] or None, {})[state] = count
    return out


def _from_meta(entry: Mapping[str, Any], seen: _Seen) -> Invocation:
    finished = entry.get("ended_at") is not None
    use_meta = finished and isinstance(entry.get("completed"), int)
    code = entry.get("exit_code")
    return Invocation(
        run_id=entry["run_id"],
        started_at=_time(entry.get("started_at")) or seen.first_at,
        ended_at=_time(entry.get("ended_at")) if finished else None,
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        message=str(entry["message"]) if entry.get("message") is not None else None,
        finished=finished,
        completed=_int(entry.get("completed")) if use_meta else seen.completed,
        failed=_int(entry.get("failed")) if use_meta else seen.failed,
        spent_usd=_usd(entry.get("spent_usd"), seen.spent_usd) if use_meta else seen.spent_usd,
        events=seen.events,
        counts_from="run.json" if use_meta else "ledger",
        last_event_at=seen.last_at,
        skipped=_int(entry.get("skipped")) if use_meta else 0,
        shard=_int(entry["shard"]) if "shard" in entry else None,
        command="cancel" if entry.get("command") == "cancel" else "run",
    )


def _from_events(run_id: str | None, seen: _Seen) -> Invocation:
    return Invocation(
        run_id=run_id, started_at=seen.first_at, ended_at=None, exit_code=None, message=None,
        finished=False, completed=seen.completed, failed=seen.failed, spent_usd=seen.spent_usd,
        events=seen.events, counts_from="ledger", last_event_at=seen.last_at,
    )  # fmt: skip


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usd(value: object, fallback: Decimal) -> Decimal:
    try:
        return trim_usd(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        return fallback
