"""Ledger benchmark: 1,000,000 jobs x 3 events through the public API, then
fold -> LedgerState, a resume plan over every key, and compaction.

    PYTHONPATH=. python bench/bench_ledger.py [--jobs 1000000] [--batch 2000]

Prints seconds per phase and the peak RSS after each phase.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anyio

from runner.ledger import (
    JobState,
    Ledger,
    LedgerEvent,
    LedgerState,
    OutputImage,
    ResumeSummary,
    compact,
    plan_resume,
    status_summary,
)

ENDPOINTS = ("fal-ai/flux/dev", "fal-ai/flux/schnell", "fal-ai/flux-pro/v1.1")
PRICE = Decimal("0.025")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def report(phase: str, seconds: float) -> None:
    print(
        f"{phase:<34} {seconds:8.2f} s   rss {current_rss_mb():7.0f} MB   "
        f"peak {peak_rss_mb():7.0f} MB",
        flush=True,
    )


def job_events(i: int, now: datetime) -> tuple[LedgerEvent, LedgerEvent, LedgerEvent]:
    key = f"{i:016x}"
    endpoint = ENDPOINTS[i % len(ENDPOINTS)]
    request = f'{{"prompt":"a photo of item {i}","seed":{i},"image_size":"square_hd"}}'
    submitting = LedgerEvent(
        key, JobState.SUBMITTING, now, row_id=f"row-{i}", line=i + 2, source="bench.csv",
        variant=0, endpoint=endpoint, request=request, metadata={"batch": str(i // 1000)},
        estimated_usd=PRICE, attempt=1,
    )  # fmt: skip
    queued = LedgerEvent(key, JobState.QUEUED, now, request_id=f"req-{i:012d}", submitted_at=now)
    later = now + timedelta(seconds=3)
    output = OutputImage(f"https://cdn.example/{key}.png", 1024, 1024, "image/png")
    completed = LedgerEvent(
        key, JobState.COMPLETED, later, started_at=now, completed_at=later, queue_s=0.5,
        inference_s=2.5, outputs=(output,), seed=i, nsfw=(False,), megapixels=1,
        billed_usd=PRICE,
    )  # fmt: skip
    return submitting, queued, completed


async def write(run_dir: Path, jobs: int, batch: int) -> None:
    now = datetime.now(UTC)
    async with Ledger.open(run_dir, checkpoint_events=100_000) as ledger:
        for start in range(0, jobs, batch):
            events = [job_events(i, now) for i in range(start, min(start + batch, jobs))]
            for step in range(3):
                for triple in events:
                    ledger.append(triple[step])
                await ledger.commit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--only-write", type=Path, help="write the ledger here and stop")
    parser.add_argument("--from-dir", type=Path, help="read a copy of a ledger --only-write made")
    args = parser.parse_args()
    if args.only_write:
        anyio.run(write, args.only_write, args.jobs, args.batch)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        if args.from_dir:
            shutil.copytree(args.from_dir, run_dir)
        else:
            print(f"{args.jobs:,} jobs x 3 events, commit per {args.batch:,} events", flush=True)
            t0 = time.perf_counter()
            anyio.run(write, run_dir, args.jobs, args.batch)
            report("write + commit + checkpoints", time.perf_counter() - t0)
        parts = sorted((run_dir / "ledger").glob("*.parquet"))
        size_mb = sum(p.stat().st_size for p in parts) / 2**20
        print(f"  {len(parts)} parts, {size_mb:.0f} MB on disk", flush=True)

        t0 = time.perf_counter()
        state = LedgerState.load(run_dir)
        report(f"fold -> LedgerState ({len(state):,} jobs)", time.perf_counter() - t0)
        print(f"  folded table {state.jobs.nbytes / 2**20:.0f} MB in Arrow", flush=True)

        t0 = time.perf_counter()
        summary = ResumeSummary()
        keys = (f"{i:016x}" for i in range(args.jobs + 1000))
        for _item, _decision in plan_resume(keys, state, summary=summary):
            pass
        report("resume plan over all keys", time.perf_counter() - t0)
        print(f"  {dict(summary.actions)}", flush=True)
        del state

        t0 = time.perf_counter()
        removed = compact(run_dir)
        report(f"compact ({removed} parts -> 1)", time.perf_counter() - t0)

        t0 = time.perf_counter()
        state = LedgerState.load(run_dir)
        report(f"fold after compaction ({len(state):,} jobs)", time.perf_counter() - t0)
        del state

        t0 = time.perf_counter()
        status = status_summary(run_dir)
        report("status_summary", time.perf_counter() - t0)
        print(f"  billed {status.billed_usd} USD, by state {dict(status.by_state)}")


if __name__ == "__main__":
    main()
