"""The bounded-memory reads (runner.ledger.scan) give what one fold of the whole ledger gives:
status, the report and every export, over a ledger of several parts, retried attempts, jobs
seen again in later parts, and events still only in the journal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from runner.ledger import (
    JobState,
    Ledger,
    LedgerEvent,
    OutputImage,
    read_folded,
    status_summary,
)
from runner.ledger import scan as scan_module
from runner.ledger.scan import scan_folded
from runner.ledger.totals import COLUMNS, merge_totals, totals
from tests.report_support import FLUX2, LORA, T0, sample_events, write_run

JOBS = 120


def _generated(i: int, attempt: int = 1, at_s: float = 0.0) -> list[LedgerEvent]:
    key = f"job-{i:04d}"
    at = T0 + timedelta(seconds=at_s + i)
    endpoint = (LORA, FLUX2)[i % 2]
    events = [
        LedgerEvent(key, JobState.SUBMITTING, at, row_id=f"r{i}", line=i + 20, source="big.csv",
                    endpoint=endpoint, estimated_usd=Decimal("0.035"), attempt=attempt,
                    possible_duplicate=True if i % 17 == 0 else None,
                    reconciled="adopted" if i % 13 == 0 else None),
        LedgerEvent(key, JobState.QUEUED, at, attempt=attempt, request_id=f"q{i}-{attempt}",
                    submitted_at=at),
    ]  # fmt: skip
    done = at + timedelta(seconds=5 + i % 7)
    if (i % 5 == 0 and attempt == 1) or i % 10 == 0:  # every tenth job fails twice
        message = f"timed out after {i} s"
        events.append(LedgerEvent(key, JobState.FAILED, done, error_type="timeout",
                                  error_message=message, retryable=True))  # fmt: skip
    elif i % 11 == 0:
        events.append(LedgerEvent(key, JobState.IN_PROGRESS, done, started_at=done))
    else:
        outputs = tuple(OutputImage(f"https://cdn.example/{key}-{n}.png", 64, 64, "image/png")
                        for n in range(1 + i % 3))  # fmt: skip
        events.append(LedgerEvent(
            key, JobState.COMPLETED, done, completed_at=done, queue_s=0.5 + i % 4,
            inference_s=1.0 + i % 3, outputs=outputs, megapixels=len(outputs),
            billed_usd=Decimal("0.035") * len(outputs),
            duplicate_request_ids=("dup-1",) if i % 23 == 0 else None,
        ))  # fmt: skip
    return events


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    run_dir = write_run(tmp_path / "run", sample_events(tmp_path / "run"))
    with Ledger.open(run_dir, checkpoint_events=64) as ledger:
        for i in range(JOBS):
            for event in _generated(i):
                ledger.append(event)
            ledger.commit_sync()
    # A later run: the failed jobs' second attempts, in later parts and in the journal only.
    ledger = Ledger.open(run_dir, checkpoint_events=10_000)
    for i in range(0, JOBS, 5):
        for event in _generated(i, attempt=2, at_s=1000):
            ledger.append(event)
    ledger.commit_sync()
    assert any((run_dir / "journal").iterdir())
    assert len(list((run_dir / "ledger").glob("*.parquet"))) > 3
    try:
        yield run_dir
    finally:
        ledger.close()


@pytest.fixture
def many_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_module, "PASS_BYTES", 500)


def test_a_small_budget_reads_in_many_passes_each_job_once(
    run_dir: Path, many_passes: None
) -> None:
    seen, info = scan_folded(run_dir, ["state"], lambda slices: [t["job_key"] for t in slices])
    keys = pa.chunked_array([c for s in seen for c in s.chunks]).to_pylist()
    assert info.passes > 5
    assert len(seen) > 5
    assert (
        sorted(keys)
        == sorted(set(keys))
        == sorted(read_folded(run_dir).jobs["job_key"].to_pylist())
    )


def test_status_matches_one_fold_of_everything(run_dir: Path, many_passes: None) -> None:
    full = read_folded(run_dir)
    expected = totals(full.jobs)
    status = status_summary(run_dir)
    assert status.jobs == full.jobs.num_rows == JOBS + 10
    assert status.events == full.events
    assert dict(status.by_state) == dict(expected.by_state)
    assert list(status.by_state) == list(expected.by_state)
    assert status.by_endpoint == expected.endpoints
    assert (status.estimated_usd, status.billed_usd) == (
        expected.estimated_usd,
        expected.billed_usd,
    )
    assert (status.possible_duplicates, status.possible_duplicate_usd) == (
        expected.possible_duplicates, expected.possible_duplicate_usd)  # fmt: skip
    assert status.possible_duplicates > 0
    assert dict(status.reconciled) == dict(expected.reconciled) != {}
    assert (status.duplicates_found, status.duplicates_found_usd) == (
        expected.duplicates_found, expected.duplicates_found_usd)  # fmt: skip
    assert status.duplicates_found > 0
    assert status.unknown_outcomes == expected.unknown_outcomes == 1
    assert status.last_event_at == pc.max(full.jobs["at"]).as_py()


def test_merged_totals_of_slices_equal_the_totals_of_the_whole(run_dir: Path) -> None:
    jobs = read_folded(run_dir).jobs.select(list(COLUMNS))
    thirds = [jobs.slice(0, 40), jobs.slice(40, 50), jobs.slice(90)]
    assert merge_totals(totals(t) for t in thirds) == totals(jobs)


def _rows(path: Path, fmt: str) -> list[dict[str, object]]:
    if fmt == "parquet":
        rows = pq.read_table(path).to_pylist()
    elif fmt == "csv":
        rows = pacsv.read_csv(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: str(r["job_key"]))
