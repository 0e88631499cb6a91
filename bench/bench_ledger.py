"""Ledger benchmark: 1,000,000 jobs x 4 events (submitting, queued, in_progress,
completed, with the field sizes of a real run) through the public API, then
fold -> LedgerState, a resume plan over every key, and compaction.

    PYTHONPATH=. python bench/bench_ledger.py [--jobs 1000000] [--batch 2000]
    PYTHONPATH=. python bench/bench_ledger.py --jobs 1000000 --only-write /tmp/l1m
    PYTHONPATH=. python bench/bench_ledger.py --jobs 1000000 --state /tmp/l1m

``--state`` measures what a resumed run does first, in this (fresh) process:
``Ledger.state()`` and ``plan_resume`` over every job's key (plus 1,000 new
ones); run it once per measurement so the peak RSS is its own.

Prints seconds per phase and the peak RSS after each phase.

``--reads DIR`` measures what reads a finished ledger, each command in its own child process
(peak RSS from ``os.wait4``, the child's own rusage): ``runner status``, ``runner report``,
``runner export`` to Parquet, CSV and JSONL, and a resume's planning (``load_resume_state``,
as ``runner run`` reads it, and ``plan_resume`` over every job's key, in a child running this
script; ``resume`` with downloads, whose outputs the generated ledger never downloaded,
``resume-nodl`` without).
``--generate N`` first writes an N-job ledger there straight as Parquet parts
(:mod:`ledger_gen`: intent, acknowledgement, end with outputs)::

    PYTHONPATH=. python bench/bench_ledger.py --generate 1000000 --reads /tmp/l1m
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
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


def job_key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()[:32]  # like jobs.job_key


def job_events(i: int, now: datetime, downloaded: bool = False) -> tuple[LedgerEvent, ...]:
    key = job_key(i)
    endpoint = ENDPOINTS[i % len(ENDPOINTS)]
    request = (
        f'{{"image_size":"square_hd","prompt":"Studio photo of product {i} in matte black, '
        f'white background","seed":{i}}}'
    )
    metadata = {"sku": f"SKU-{i:07d}", "title": "ceramic coffee mug", "color": "matte black"}
    submitting = LedgerEvent(
        key, JobState.SUBMITTING, now, row_id=f"row-{i}", line=i + 2, source="bench.csv",
        variant=0, endpoint=endpoint, request=request, metadata=metadata,
        estimated_usd=PRICE, attempt=1,
    )  # fmt: skip
    request_id = f"{key[:8]}-{key[8:12]}-{key[12:16]}-{key[16:20]}-{key[20:32]}"
    queued = LedgerEvent(
        key, JobState.QUEUED, now, attempt=1, request_id=request_id, submitted_at=now
    )
    started = now + timedelta(seconds=1)
    running = LedgerEvent(key, JobState.IN_PROGRESS, started, attempt=1, started_at=started)
    later = now + timedelta(seconds=3)
    url = f"https://v3.fal.media/files/out/{hashlib.md5(key.encode()).hexdigest()}.jpg"
    output = OutputImage(url, 1024, 1024, "image/jpeg")
    if downloaded:
        digest = hashlib.sha256(url.encode()).hexdigest()
        output = OutputImage(url, 1024, 1024, "image/jpeg", f"row-{i}/{key}-0.jpg", digest)
    completed = LedgerEvent(
        key, JobState.COMPLETED, later, attempt=1, completed_at=later, queue_s=1.0,
        inference_s=2.0, outputs=(output,), seed=i, nsfw=(False,), megapixels=1,
        billed_usd=PRICE,
    )  # fmt: skip
    return submitting, queued, running, completed


async def write(run_dir: Path, jobs: int, batch: int, downloaded: bool = False) -> None:
    now = datetime.now(UTC)
    async with Ledger.open(run_dir) as ledger:
        for start in range(0, jobs, batch):
            stop = min(start + batch, jobs)
            events = [job_events(i, now, downloaded) for i in range(start, stop)]
            for step in range(4):
                for job in events:
                    ledger.append(job[step])
                await ledger.commit()


def measure_state(run_dir: Path, jobs: int, downloads: bool) -> None:
    """Ledger.state() and plan_resume over every key, as a resumed run starts."""
    base = current_rss_mb()
    t0 = time.perf_counter()
    with Ledger.open(run_dir) as ledger:
        state = ledger.state(downloads=downloads)
        fold_s = time.perf_counter() - t0
        held = current_rss_mb()
        report(f"Ledger.state() ({len(state):,} jobs)", fold_s)
        t1 = time.perf_counter()
        summary = ResumeSummary()
        keys = (job_key(i) for i in range(jobs + 1000))
        for _item, _decision in plan_resume(keys, state, summary=summary):
            pass
        report("plan_resume over every key", time.perf_counter() - t1)
        print(f"  {dict(summary.actions)}", flush=True)
        per_100k = (held - base) * 100_000 / max(len(state), 1)
        print(
            f"  held after the fold: {held - base:.0f} MiB over the {base:.0f} MiB base "
            f"({per_100k:.1f} MiB per 100k jobs); peak {peak_rss_mb():.0f} MiB",
            flush=True,
        )


READS = ("status", "report", "export-parquet", "export-csv", "export-jsonl", "resume",
         "resume-nodl")  # fmt: skip


def read_one(command: str, run_dir: Path) -> None:
    """One read of a finished ledger, as the CLI does it (run in a child process)."""
    if command == "status":
        status = status_summary(run_dir)
        print(f"  {status.jobs:,} jobs, billed {status.billed_usd}", flush=True)
    elif command == "report":
        from runner.ledger import read_run_meta
        from runner.report.data import load_report
        from runner.report.text import render_text, report_json

        made = load_report(run_dir, read_run_meta(run_dir))
        render_text(made)
        report_json(made)
        print(f"  {made.jobs:,} jobs, {made.failed_jobs:,} failed", flush=True)
    elif command.startswith("export-"):
        from runner.ledger import export

        fmt = command.removeprefix("export-")
        with tempfile.TemporaryDirectory(dir=run_dir.parent) as tmp:
            out = Path(tmp) / f"jobs.{fmt}"
            rows = export(run_dir, out, fmt)  # type: ignore[arg-type]
            print(f"  {rows:,} rows, {out.stat().st_size / 2**20:.0f} MiB", flush=True)
    elif command in ("resume", "resume-nodl"):
        import ledger_gen
        import numpy as np

        from runner.ledger.resumescan import load_resume_state
        from runner.media.pending import ChunkedPending

        with Ledger.open(run_dir):  # as the engine: lock, recover, then read what a resume needs
            state = load_resume_state(run_dir, downloads=command == "resume")
            pending = ChunkedPending(state)
            print(f"  {len(pending):,} jobs with downloads pending", flush=True)
            summary = ResumeSummary()
            jobs = len(state)
            for start in range(0, jobs, 100_000):
                numbers = np.arange(start, min(start + 100_000, jobs), dtype=np.int64)
                keys = ledger_gen.job_keys(numbers).to_pylist()
                for _item, _decision in plan_resume(keys, state, summary=summary):
                    pass
            print(f"  {dict(summary.actions)}", flush=True)
    else:
        raise SystemExit(f"unknown read {command!r}")


def measure_reads(run_dir: Path, commands: tuple[str, ...]) -> None:
    """Each read in a fresh child: wall seconds, CPU seconds and the child's peak RSS."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    print("| read | wall s | CPU s | peak RSS MiB |\n| --- | --- | --- | --- |", flush=True)
    scratch = Path(tempfile.mkdtemp(dir=run_dir.parent))
    for command in commands:
        argv = [sys.executable, __file__, "--read-one", command, str(run_dir)]
        if command in ("status", "report"):
            argv = [sys.executable, "-m", "runner", command, str(run_dir)]
        elif command.startswith("export-"):
            fmt = command.removeprefix("export-")
            argv = [sys.executable, "-m", "runner", "export", str(run_dir), "--format", fmt,
                    "--out", str(scratch / f"jobs.{fmt}")]  # fmt: skip
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, env=env, cwd=here.parent, stdout=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"{command} failed ({status})")
        cpu = usage.ru_utime + usage.ru_stime
        print(f"| {command} | {wall:.2f} | {cpu:.2f} | {usage.ru_maxrss / 1024:.0f} |",
              flush=True)  # fmt: skip
    shutil.rmtree(scratch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generate", type=int, help="--reads: first write this many jobs")
    parser.add_argument("--reads", type=Path, help="measure status/report/export/resume here")
    parser.add_argument("--only", nargs="*", choices=READS, help="--reads: just these")
    parser.add_argument("--read-one", nargs=2, metavar=("READ", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--only-write", type=Path, help="write the ledger here and stop")
    parser.add_argument("--from-dir", type=Path, help="read a copy of a ledger --only-write made")
    parser.add_argument("--state", type=Path, help="measure Ledger.state() + plan_resume here")
    parser.add_argument(
        "--downloaded", action="store_true", help="--only-write: outputs have a local copy"
    )
    parser.add_argument(
        "--no-download", action="store_true", help="--state: Ledger.state(downloads=False)"
    )
    args = parser.parse_args()
    if args.read_one:
        from runner.cli.imports import without_unused

        with without_unused():  # as the command line runs it
            read_one(args.read_one[0], Path(args.read_one[1]))
        return
    if args.reads:
        if args.generate:
            import ledger_gen

            t0 = time.perf_counter()
            events = ledger_gen.generate(args.reads, args.generate)
            print(f"generated {args.generate:,} jobs, {events:,} events in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        measure_reads(args.reads, tuple(args.only or READS))
        return
    if args.only_write:
        t0 = time.perf_counter()
        anyio.run(write, args.only_write, args.jobs, args.batch, args.downloaded)
        report("write + commit + checkpoints", time.perf_counter() - t0)
        return
    if args.state:
        measure_state(args.state, args.jobs, not args.no_download)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        if args.from_dir:
            shutil.copytree(args.from_dir, run_dir)
        else:
            print(f"{args.jobs:,} jobs x 4 events, commit per {args.batch:,} events", flush=True)
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
        keys = (job_key(i) for i in range(args.jobs + 1000))
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
