"""A ledger with every kind of job the reads must tell apart, over many parts and the journal:
rows recorded again with new content (superseded versions), variants, a row edited into an
invalid one and back, rows named by their number, re-rolled and flagged outputs, cache hits,
failures (retried, retryable, not), unknown outcomes, possible duplicates, jobs still queued,
requests with fields of mixed types per endpoint and metadata."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from runner.ledger import JobState, Ledger, LedgerEvent, OutputImage, encode_request
from runner.ledger import scan as scan_module
from runner.ledger.meta import write_run_meta
from tests.report_support import FLUX2, LORA, T0

ROWS = 90


def _request(i: int, version: int) -> dict[str, object]:
    body: dict[str, object] = {"prompt": f"mug {i} v{version}", "seed": i}
    if i % 3 == 0:
        body["image_size"] = {"width": 512 + i, "height": 768}
    elif i % 3 == 1:
        body["image_size"] = "square_hd"
    if i % 4 == 0:
        body["guidance_scale"] = 3 if i % 8 == 0 else 3.5
    if i % 9 == 0:
        body["loras"] = [{"path": f"owner/lora-{i}", "scale": 0.5}]
    return body


def _job(i: int, version: int, variant: int, t: float) -> list[LedgerEvent]:
    key = f"k{i:03d}-v{version}-{variant}"
    row_id = f"#{i + 2}" if i % 29 == 0 else f"row-{i}"
    at = T0 + timedelta(seconds=t)
    endpoint = (LORA, FLUX2)[i % 2]
    estimate = Decimal("0.035") if endpoint == LORA else Decimal("0.012")
    events = [
        LedgerEvent(key, JobState.SUBMITTING, at, row_id=row_id, line=i + 2,
                    source="big.csv" if i % 7 else "other.csv", variant=variant,
                    endpoint=endpoint, request=encode_request(_request(i, version)),
                    metadata={"sku": f"SKU-{i}", "shelf": "AB"[i % 2]},
                    estimated_usd=estimate, attempt=1,
                    possible_duplicate=True if i % 17 == 0 else None),
    ]  # fmt: skip
    if i % 19 == 0:
        events.append(LedgerEvent(key, JobState.UNKNOWN, at + timedelta(seconds=1)))
        return events
    events.append(LedgerEvent(key, JobState.QUEUED, at + timedelta(seconds=1),
                              request_id=f"q-{key}", submitted_at=at))  # fmt: skip
    done = at + timedelta(seconds=5 + i % 7)
    if i % 23 == 0:
        return events  # still queued
    if i % 5 == 0:
        message = f"timed out after {300 + i} s at https://queue.fal.run/x/requests/{key}"
        events.append(LedgerEvent(key, JobState.FAILED, done, error_type="timeout",
                                  error_message=message, retryable=i % 10 == 0,
                                  billed_usd=Decimal(0)))  # fmt: skip
        if i % 10 == 0:  # retried, and this time it worked
            events.append(LedgerEvent(key, JobState.SUBMITTING, done, attempt=2))
            events += _completed(key, i, done + timedelta(seconds=3), estimate)
        return events
    if i % 13 == 0:
        events.append(LedgerEvent(key, JobState.FAILED, done, error_type="file_download_error",
                                  error_message=f"cannot read images/{i}.png",
                                  retryable=False))  # fmt: skip
        return events
    return events + _completed(key, i, done, estimate)


def _completed(key: str, i: int, done: object, estimate: Decimal) -> list[LedgerEvent]:
    assert not isinstance(done, str)
    outputs = tuple(
        OutputImage(f"https://cdn.example/{key}-{n}.png", 64, 64, "image/png")
        for n in range(1 + i % 3)
    )
    flagged = i % 11 == 0
    return [
        LedgerEvent(key, JobState.COMPLETED, done, completed_at=done, queue_s=0.5 + i % 4,  # type: ignore[arg-type]
                    inference_s=1.0 + i % 3, outputs=outputs, megapixels=len(outputs),
                    nsfw=tuple(n == 0 and flagged for n in range(len(outputs))),
                    flagged=flagged or None, seed=1000 + i,
                    billed_usd=estimate * len(outputs),
                    rerolls=1 if i % 14 == 0 else None,
                    reroll_usd=estimate if i % 14 == 0 else None,
                    cached_from="/runs/old" if i % 31 == 0 else None,
                    reconciled="adopted" if i % 37 == 0 else None,
                    duplicate_request_ids=("dup-1",) if i % 41 == 0 else None),
    ]  # fmt: skip


def write_versioned(run_dir: Path) -> Ledger:
    """Returns the ledger still open (close it when done): its last events are only in the
    journal. A first run of ROWS rows (some with two variants), a second that records a third of
    them again with new content, makes one row invalid and fixes another, and a few events
    left in the journal."""
    with Ledger.open(run_dir, checkpoint_events=50) as ledger:
        for i in range(ROWS):
            for variant in range(1 + (i % 6 == 0)):
                for event in _job(i, 1, variant, i):
                    ledger.append(event)
            ledger.commit_sync()
        # The second run: edited rows (new job keys, same identities), in another order.
        for i in reversed(range(0, ROWS, 3)):
            for event in _job(i, 2, 0, 1000 + i):
                ledger.append(event)
            ledger.commit_sync()
        # Row 4 edited into a bad row (an invalid record: the whole row), row 8 back again.
        for i in (4, 8):
            ledger.append(LedgerEvent(f"invalid-{i}", JobState.INVALID, T0 + timedelta(hours=1),
                                      row_id=f"row-{i}", line=i + 2, source="big.csv",
                                      error_type="invalid_row",
                                      error_message=f"seed={i} is not allowed",
                                      retryable=False))  # fmt: skip
        ledger.commit_sync()
        for event in _job(8, 3, 0, 5000):
            ledger.append(event)
        ledger.commit_sync()
    ledger = Ledger.open(run_dir, checkpoint_events=100_000)
    for event in _job(1, 4, 0, 6000):  # only in the journal
        ledger.append(event)
    ledger.commit_sync()
    write_run_meta(
        run_dir,
        {
            "manifest": {"path": "big.csv", "sha256": "ab" * 32},
            "runner_version": "0.1.0",
            "config": {"on_unknown": "resubmit"},
        },
    )
    return ledger


# The fixtures of the tests that compare a read a bucket at a time with one fold of the whole
# ledger (import them into the test module: ``from tests.versioned_support import ...``).


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run directory :func:`write_versioned` makes, once per module."""
    run_dir = tmp_path_factory.mktemp("versioned") / "run"
    ledger = write_versioned(run_dir)
    try:
        yield run_dir
    finally:
        ledger.close()


@pytest.fixture(params=["one bucket", "many buckets"])
def buckets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Scans in one bucket, or in many (a few jobs each)."""
    if request.param == "many buckets":
        monkeypatch.setattr(scan_module, "PASS_BYTES", 2_000)
    return str(request.param)
