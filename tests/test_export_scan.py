"""``runner export`` reads a bucket of jobs at a time (runner.ledger.ordered) and writes the
bytes one fold of the whole ledger wrote: same rows, order, columns, types and row groups,
with superseded versions left out (or marked, with --all-versions), re-rolls, flagged
outputs, unknown outcomes, failures and retries."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.ledger import exports, read_folded, views
from runner.ledger import scan as scan_module
from runner.ledger.exports import export_batches, export_schema
from runner.ledger.versions import split_versions
from runner.ledger.views import export
from tests import versioned_support
from tests.report_support import sample_run

# The shared fixtures (tests/versioned_support.py).
versioned = versioned_support.versioned


@pytest.fixture(params=["one bucket", "many buckets, small batches"])
def buckets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param != "one bucket":
        monkeypatch.setattr(scan_module, "PASS_BYTES", 2_000)
        monkeypatch.setattr(exports, "BATCH_ROWS", 16)
        monkeypatch.setattr(views, "EXPORT_ROWS", 16)
    return str(request.param)


def _folded_export(run_dir: Path, out: Path, fmt: str, all_versions: bool) -> bytes:
    """What export wrote when it folded the whole ledger at once."""
    jobs = split_versions(read_folded(run_dir).jobs, all_versions=all_versions).shown
    schema = export_schema(jobs)
    with open(out, "wb") as handle:
        views._write(export_batches(jobs, schema), schema, handle, fmt)
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("all_versions", [False, True])
def test_export_writes_the_bytes_of_one_fold(
    versioned: Path, tmp_path: Path, buckets: str, fmt: str, all_versions: bool
) -> None:
    expected = _folded_export(versioned, tmp_path / f"folded.{fmt}", fmt, all_versions)
    rows = export(versioned, tmp_path / f"read.{fmt}", fmt, all_versions=all_versions)  # type: ignore[arg-type]
    assert (tmp_path / f"read.{fmt}").read_bytes() == expected
    every = read_folded(versioned).jobs.num_rows
    assert (rows == every) if all_versions else (0 < rows < every)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_of_a_sample_night_writes_the_bytes_of_one_fold(
    tmp_path: Path, buckets: str, fmt: str
) -> None:
    run_dir = sample_run(tmp_path / "run")
    expected = _folded_export(run_dir, tmp_path / f"folded.{fmt}", fmt, False)
    export(run_dir, tmp_path / f"read.{fmt}", fmt)  # type: ignore[arg-type]
    assert (tmp_path / f"read.{fmt}").read_bytes() == expected


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_formats_made_a_few_rows_at_a_time_write_the_same_bytes(
    versioned: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    export(versioned, tmp_path / f"whole.{fmt}", fmt)  # type: ignore[arg-type]
    monkeypatch.setattr(views, "TEXT_ROWS", 3)
    export(versioned, tmp_path / f"pieces.{fmt}", fmt)  # type: ignore[arg-type]
    whole = (tmp_path / f"whole.{fmt}").read_bytes()
    assert (tmp_path / f"pieces.{fmt}").read_bytes() == whole
    assert whole.count(b"\n") > 3 * 10
