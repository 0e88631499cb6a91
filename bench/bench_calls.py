"""Calls per job: HTTP calls per completed job for each completion mode and the baseline.

    python bench/bench_calls.py [--jobs 200] [--concurrency 10] [--time-scale 0.05]

Jobs take 2-8 emulated seconds (sizes and steps per row, see ``common.REALISTIC_SHAPES``);
the emulator runs at ``--time-scale`` so a 5 s job takes 0.25 s of real time. The runner's
pacing learns service times from what the queue reports, so its call counts do not depend
on the time scale; its submit rate is the default 10/s scaled the same way (10 / scale).

fal-client polls every 0.1 s of *real* time whatever the scale, so it is run twice:
as written (0.1 s real = 2 emulated seconds at 0.05: far fewer polls than against fal) and
with the interval scaled to 0.1 emulated seconds (``0.1 * scale``), which is what the same
code does against fal's real queue.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

from common import (
    ClientRun,
    EmulatorProcess,
    Phase,
    load_avg,
    measure,
    realistic_rows,
    request_of,
    run_baseline,
    run_runner,
    runner_config,
    table,
    write_jsonl,
)


def phases(
    tmp: Path, emu: EmulatorProcess, jobs: int, c: int, scale: float
) -> list[tuple[str, Callable[[], ClientRun]]]:
    manifest = tmp / "jobs.jsonl"
    write_jsonl(manifest, realistic_rows(jobs))
    requests = [request_of(r) for r in realistic_rows(jobs)]

    def runner(mode: str) -> Callable[[], ClientRun]:
        config = runner_config(
            manifest, tmp / f"run-{mode}", emu, concurrency=c, completion=mode,
            rate_per_s=10.0 / scale,
        )  # fmt: skip
        return lambda: run_runner(f"runner --completion {mode}", config, jobs)

    def baseline(interval_s: float, label: str) -> Callable[[], ClientRun]:
        return lambda: run_baseline(
            f"fal_client, get(interval={label})", emu, requests, concurrency=c,
            interval_s=interval_s,
        )  # fmt: skip

    return [
        ("poll", runner("poll")),
        ("stream", runner("stream")),
        ("webhook", runner("webhook")),
        ("baseline", baseline(0.1, "0.1 s real")),
        ("baseline-scaled", baseline(0.1 * scale, "0.1 s emulated")),
    ]


def row(p: Phase, c: int) -> list[object]:
    return [
        p.run.name, f"{p.run.completed}/{p.run.jobs}", p.per_job("submit"), p.per_job("status"),
        p.per_job("stream"), p.per_job("result"),
        p.per_job() - sum(p.per_job(k) for k in ("submit", "status", "stream", "result")),
        p.per_job(), p.webhooks.get("delivered", 0), p.run.cpu_per_1000_s,
        p.makespan_s / max(p.bound_s(c), 1e-9),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[Phase]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--time-scale", type=float, default=0.05)
    args = p.parse_args(argv)
    c, scale = args.concurrency, args.time_scale
    print(f"## calls per job: {args.jobs} jobs of 2-8 emulated s, concurrency {c}, "
          f"time scale {scale:g}")  # fmt: skip
    results: list[Phase] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp,
        EmulatorProcess(concurrency=c, time_scale=scale) as emu,
    ):
        for _name, start in phases(Path(tmp), emu, args.jobs, c, scale):
            results.append(measure(emu, start))
    print(table(
        ["client", "completed", "submit", "status", "stream", "result", "other", "calls/job",
         "webhooks", "client CPU s / 1k jobs", "makespan/bound"],
        [row(r, c) for r in results],
    ))  # fmt: skip
    poll = results[0].per_job()
    print(f"poll mode: {poll:.2f} calls/job (goal <= 3); load average after: {load_avg()}")
    return results


if __name__ == "__main__":
    main()
