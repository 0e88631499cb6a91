"""Review of the export rewrite (folded as read, last seqs from the key column): ledgers on
which ``runner export`` must write what one fold of the whole ledger writes."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.ledger import (
    JobState,
    Ledger,
    LedgerEvent,
    encode_request,
    ordered,
    views,
)
from runner.ledger import scan as scan_module
from runner.ledger.views import export
from tests.report_support import T0
from tests.test_export_scan import _folded_export


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


def _hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hex-keyed jobs run 12 then 18 at a time (every intent, then every acknowledgement,
    then the ends in reverse), the second run recording every row again with new content
    (request fields of the old or the new versions only), some left queued."""
    run_dir = tmp_path_factory.mktemp("interleaved") / "run"
    with Ledger.open(run_dir, checkpoint_events=7) as ledger:
        for version in (1, 2):
            rows = range(12 if version == 1 else 18)
            for i in rows:
                body: dict[str, object] = {"prompt": f"p{i} v{version}"}
                if version == 1 and i % 2:
                    body["old_only"] = i
                if version == 2 and i % 3 == 0:
                    body["new_only"] = "x"
                ledger.append(
                    LedgerEvent(
                        _hex(f"{i}-{version}"), JobState.SUBMITTING, T0, row_id=f"row-{i}",
                        variant=0, endpoint="fal-ai/flux-lora", request=encode_request(body),
                        metadata={"m": str(i), **({"odd": 'a,"b\n'} if i % 2 else {})},
                        estimated_usd=Decimal("0.01"),
                    )
                )  # fmt: skip
            for i in rows:
                ledger.append(LedgerEvent(_hex(f"{i}-{version}"), JobState.QUEUED, T0,
                                          request_id=f"q{i}-{version}"))  # fmt: skip
            for i in reversed(rows):
                if version == 2 and i % 5 == 0:
                    continue
                state = JobState.COMPLETED if i % 4 else JobState.FAILED
                ledger.append(LedgerEvent(_hex(f"{i}-{version}"), state, T0,
                                          billed_usd=Decimal("0.02")))  # fmt: skip
            ledger.commit_sync()
    return run_dir


@pytest.mark.parametrize("carry", [12, 15, 1000])
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("all_versions", [False, True])
def test_a_stream_given_up_part_way_writes_the_rows_of_one_fold(
    interleaved: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    carry: int,
    fmt: str,
    all_versions: bool,
) -> None:
    # With 12 < carry < 18 the stream writes (selects, visits) the first run's jobs, then
    # gives up for the buckets: what it saw must not leak into the export.
    monkeypatch.setattr(ordered, "STREAM_EVENTS", 5)
    monkeypatch.setattr(ordered, "CARRY_ROWS", carry)
    monkeypatch.setattr(views, "EXPORT_ROWS", 3)
    bucketed = []
    scan_folded = scan_module.scan_folded

    def counted(*args: Any, **kwargs: Any) -> Any:
        bucketed.append(True)
        return scan_folded(*args, **kwargs)

    monkeypatch.setattr(ordered, "scan_folded", counted)
    expected = _folded_export(interleaved, tmp_path / f"folded.{fmt}", fmt, all_versions)
    export(interleaved, tmp_path / f"read.{fmt}", fmt, all_versions=all_versions)  # type: ignore[arg-type]
    assert bool(bucketed) == (carry < 18)
    if fmt != "parquet":
        assert (tmp_path / f"read.{fmt}").read_bytes() == expected
    else:  # row groups of EXPORT_ROWS: the same rows, columns and types in other bytes
        got = pq.read_table(tmp_path / "read.parquet")
        want = pq.read_table(pa.BufferReader(expected))
        assert got.schema == want.schema
        assert got.to_pylist() == want.to_pylist()
