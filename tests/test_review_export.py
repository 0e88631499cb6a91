"""Review of the export rewrite (folded as read, last seqs from the key column): ledgers on
which ``runner export`` must write what one fold of the whole ledger writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.ledger import JobState, Ledger, LedgerEvent, read_folded, views
from runner.ledger.exports import export_batches, export_schema
from runner.ledger.versions import split_versions
from runner.ledger.views import export
from tests.report_support import T0


def _folded_export(run_dir: Path, out: Path, fmt: str, all_versions: bool) -> bytes:
    """What export wrote when it folded the whole ledger at once (the old export)."""
    jobs = split_versions(read_folded(run_dir).jobs, all_versions=all_versions).shown
    schema = export_schema(jobs)
    with open(out, "wb") as handle:
        views._write(export_batches(jobs, schema), schema, handle, fmt)
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_job_keys_differing_only_in_case_are_two_jobs(tmp_path: Path, fmt: str) -> None:
    # Two 32-hex-digit keys that spell the same 16 bytes in other cases are two jobs to a
    # fold (keys compare as text); as bytes they were one job whose earlier last event
    # never finished it, and the export failed ("ledger changed between two passes").
    upper, lower = "AB" * 16, "ab" * 16
    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent(upper, JobState.SUBMITTING, T0, row_id="r1", variant=0))
        ledger.append(LedgerEvent(upper, JobState.FAILED, T0, error_type="internal_error"))
        ledger.append(LedgerEvent(lower, JobState.SUBMITTING, T0, row_id="r2", variant=0))
        ledger.append(LedgerEvent(lower, JobState.QUEUED, T0, request_id="q2"))
        ledger.commit_sync()
    expected = _folded_export(run_dir, tmp_path / f"folded.{fmt}", fmt, False)
    assert export(run_dir, tmp_path / f"read.{fmt}", fmt) == 2  # type: ignore[arg-type]
    assert (tmp_path / f"read.{fmt}").read_bytes() == expected
