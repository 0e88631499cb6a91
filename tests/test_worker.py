"""What a worker records of a job's time: queue time from looks or fal's inference time."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from runner.execution.completion import Watch
from runner.execution.results import queue_time_s
from runner.fal.protocol import RequestUrls
from runner.ledger.state import LedgerState
from runner.report.data import build_report, load_jobs
from tests.scenario import emulator, manifest, run, run_config

REF = RequestUrls(request_id="req", status_url="http://q/s", response_url="http://q/r",
                  cancel_url="http://q/c")  # fmt: skip


def watch(started_s: float | None) -> Watch:
    return Watch(endpoint="fal-ai/flux-lora", ref=REF, units=28.0, submitted_s=100.0,
                 started_s=started_s)  # fmt: skip


@pytest.mark.parametrize(
    ("started_s", "now_s", "fal_inference_s", "expected"),
    [
        (104.0, 110.0, 3.0, 4.0),  # seen running: the look decides, not fal's figure
        (None, 110.0, 3.0, 7.0),  # first seen done: the look less fal's inference time
        (None, 110.0, 12.0, 0.0),  # clocks disagree: never negative
        (None, 110.0, None, None),  # neither known
        (99.0, 110.0, None, 0.0),
    ],
)
def test_queue_time(
    started_s: float | None, now_s: float, fal_inference_s: float | None, expected: float | None
) -> None:
    assert queue_time_s(watch(started_s), now_s, fal_inference_s) == expected


@pytest.mark.anyio
async def test_queue_time_is_known_when_the_result_is_read_first(tmp_path: Path) -> None:
    # --first-look result (the default) never sees IN_PROGRESS: fal's inference time decides.
    path = manifest(tmp_path, 6)
    async with emulator(concurrency=1, time_scale=0.01) as emu:
        report = await run(emu, run_config(path, tmp_path / "run", first_look="result"))
    assert report.exit_code == 0
    assert LedgerState.load(tmp_path / "run").jobs.num_rows == 6
    timing = build_report(load_jobs(tmp_path / "run"), None).timing
    assert timing.queue.known == timing.queue.of == 6
    # One emulator slot, six jobs submitted at once: the last waited behind the others.
    assert timing.queue.max is not None and timing.queue.max > 0
    assert build_report(load_jobs(tmp_path / "run"), None).billed_usd == Decimal("0.21")


@pytest.mark.anyio
async def test_a_job_first_seen_done_records_its_start_on_the_completed_event(
    tmp_path: Path,
) -> None:
    # No in_progress event of its own: the look that read the result is the start seen.
    path = manifest(tmp_path, 3)
    async with emulator(concurrency=1, time_scale=0.01) as emu:
        report = await run(emu, run_config(path, tmp_path / "run", first_look="result"))
    assert report.exit_code == 0
    events = pq.read_table(tmp_path / "run" / "ledger").to_pylist()
    by_job: dict[str, list[dict[str, Any]]] = {}
    for event in sorted(events, key=lambda e: e["seq"]):
        by_job.setdefault(event["job_key"], []).append(event)
    assert len(by_job) == 3
    for history in by_job.values():
        # (a later completed event records the downloaded files)
        assert [e["state"] for e in history][:3] == ["submitting", "queued", "completed"]
        assert "in_progress" not in [e["state"] for e in history]
        done = history[2]
        assert done["started_at"] is not None
        assert history[1]["at"] <= done["started_at"] <= done["completed_at"]
