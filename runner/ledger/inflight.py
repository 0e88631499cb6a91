"""How many of a run directory's jobs are in flight: the jobs whose key must answer for
them (re-attached, settled from that account's request history, or cancelled)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.fold import JOURNAL_DIR, LEDGER_DIR
from runner.ledger.schema import JobState

# A request id, or a submit of unknown outcome.
HELD = frozenset({JobState.SUBMITTING, JobState.UNKNOWN, JobState.QUEUED, JobState.IN_PROGRESS})


def has_ledger(run_dir: Path) -> bool:
    return any(
        any((run_dir / d).glob("*")) for d in (LEDGER_DIR, JOURNAL_DIR) if (run_dir / d).is_dir()
    )


def in_flight_count(run_dir: Path) -> int:
    """How many of a (shard's) run directory's jobs are in flight, by their latest state;
    0 when it has no ledger yet. Reads the folded state column only; takes no lock."""
    if not has_ledger(run_dir):
        return 0
    from runner.ledger.scan import scan_folded  # a reader a run otherwise never imports

    def count(slices: Iterator[pa.Table]) -> int:
        held = pa.array(sorted(HELD), pa.string())
        return sum(pc.sum(pc.is_in(jobs["state"], value_set=held)).as_py() or 0 for jobs in slices)

    found, _ = scan_folded(run_dir, ["state"], count)
    return found
