"""Overhead: many jobs with (near) zero service time, runner against the official client.

    python bench/bench_overhead.py [--jobs 20000] [--concurrency 16]

The emulator (its own process) runs every job in ``time_scale`` x ~0.5 s (1e-6: half a
microsecond) with 64x64 outputs, so what is left is each client's own cost per job.
The runner runs in this process with ``download=False`` and an unlimited submit rate (the
baseline has no rate limit either); the baseline is ``fal_client.AsyncClient`` with
``submit`` + ``handle.get()`` under a semaphore of the same size. Prints jobs per second
and this process's CPU seconds per 1,000 jobs for each, and the emulator's CPU beside them.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from common import (
    ClientRun,
    EmulatorProcess,
    load_avg,
    request_of,
    run_baseline,
    run_runner,
    runner_config,
    table,
    tiny_rows,
    write_jsonl,
)


def main(argv: list[str] | None = None) -> list[ClientRun]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=1e-6)
    p.add_argument("--httpcore", action="store_true",
                   help="also the runner with its queue calls on httpcore's pool")  # fmt: skip
    args = p.parse_args(argv)
    c = args.concurrency
    print(
        f"## overhead: {args.jobs:,} jobs, 64x64, time scale {args.time_scale:g}, concurrency "
        f"{c} (emulator slots = runner --concurrency = baseline semaphore)"
    )
    rows = []
    runs: list[ClientRun] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp,
        EmulatorProcess(concurrency=c, time_scale=args.time_scale) as emu,
    ):
        manifest = Path(tmp) / "tiny.jsonl"
        write_jsonl(manifest, tiny_rows(args.jobs))
        requests = [request_of(r) for r in tiny_rows(args.jobs)]
        config = runner_config(manifest, Path(tmp) / "run", emu, concurrency=c, rate_per_s=1e9)
        phases: list[Callable[[], ClientRun]] = [
            partial(run_runner, "runner (poll)", config, args.jobs),
            partial(run_baseline, "fal_client baseline", emu, requests, concurrency=c),
        ]
        if args.httpcore:
            config2 = config.model_copy(update={"run_dir": Path(tmp) / "run-httpcore"})
            phases.append(partial(run_runner, "runner (poll), httpcore calls", config2,
                                  args.jobs, httpcore_calls=True))  # fmt: skip
        for phase in phases:
            emu.reset()
            emu_cpu0 = emu.cpu_s()
            run = phase()
            emu_cpu = emu.cpu_s() - emu_cpu0
            calls = emu.stats()["calls"]
            runs.append(run)
            rows.append([
                run.name, f"{run.completed:,}/{run.jobs:,}", run.wall_s, run.jobs_per_s,
                run.cpu_s, run.cpu_per_1000_s, 1000 * emu_cpu / max(run.completed, 1),
                sum(n for k, n in calls.items() if k != "emulator") / max(run.completed, 1),
            ])  # fmt: skip
    print(table(
        ["client", "completed", "wall s", "jobs/s", "client CPU s", "client CPU s / 1k jobs",
         "emulator CPU s / 1k jobs", "HTTP calls / job"], rows))  # fmt: skip
    runner_run, base_run = runs[:2]
    ratio = runner_run.cpu_per_1000_s / max(base_run.cpu_per_1000_s, 1e-9)
    print(f"runner CPU per job = {ratio:.2f} x baseline; load average after: {load_avg()}")
    return runs


if __name__ == "__main__":
    main()
