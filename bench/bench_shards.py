"""Sharding on one machine: the same run unsharded and in N shards, wall time and makespan.

    python bench/bench_shards.py [--jobs 20000] [--shards 16] [--concurrency 16]
                                 [--time-scale 0.02]

Both runs go through the same emulator (its own process) and the same key, one after the
other: the unsharded one with ``execute``, the sharded one with
``runner.scale.shards.execute_sharded`` (every shard in this process, all behind one account
gate). Jobs take 2-8 emulated seconds (as in bench_slots). Goal: sharded wall time within
1.05x of unsharded: shards share the key's slots, so they cannot go faster, and must not go
slower.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio
from common import (
    ClientRun,
    EmulatorProcess,
    Phase,
    cpu_self_s,
    load_avg,
    measure,
    realistic_rows,
    run_runner,
    runner_config,
    table,
    write_jsonl,
)

from runner.config import RunConfig
from runner.execution.engine import Hooks
from runner.execution.summary import RunReport
from runner.scale.shards import execute_sharded


def run_sharded(name: str, config: RunConfig, jobs: int) -> ClientRun:
    hooks = Hooks(stream=io.StringIO(), handle_signals=False)

    async def go() -> RunReport:
        return await execute_sharded(config, hooks=hooks)

    cpu0, t0 = cpu_self_s(), time.perf_counter()
    report = anyio.run(go)
    wall, cpu = time.perf_counter() - t0, cpu_self_s() - cpu0
    return ClientRun(name, jobs, report.tally.completed, wall, cpu, report)


def main(argv: list[str] | None = None) -> list[Phase]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=0.02)
    args = p.parse_args(argv)
    c, scale, n = args.concurrency, args.time_scale, args.jobs
    print(f"## shards on one machine: {n:,} jobs of 2-8 emulated s, concurrency {c}, "
          f"time scale {scale:g}, {args.shards} shards")  # fmt: skip
    results: list[Phase] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp,
        EmulatorProcess(concurrency=c, time_scale=scale) as emu,
    ):
        manifest = Path(tmp) / "jobs.jsonl"
        write_jsonl(manifest, realistic_rows(n, seed=29))
        rate = 10.0 / scale
        plain = runner_config(manifest, Path(tmp) / "plain", emu, concurrency=c, rate_per_s=rate)
        results.append(measure(emu, partial(run_runner, "unsharded", plain, n)))
        sharded = runner_config(
            manifest, Path(tmp) / "sharded", emu, concurrency=c, rate_per_s=rate,
            shards=args.shards,
        )  # fmt: skip
        name = f"--shards {args.shards}"
        results.append(measure(emu, partial(run_sharded, name, sharded, n)))
    base = results[0].run.wall_s
    rows = [
        [r.run.name, f"{r.run.completed:,}/{n:,}", r.run.wall_s, r.run.wall_s / base,
         r.makespan_s / max(r.bound_s(c), 1e-9), r.run.cpu_per_1000_s, r.per_job()]
        for r in results
    ]  # fmt: skip
    print(table(["run", "completed", "wall s", "wall / unsharded", "makespan/bound",
                 "client CPU s per 1,000 jobs", "calls per job"], rows))  # fmt: skip
    for r in results:
        calls = ", ".join(f"{k} {r.per_job(k):.3f}" for k in sorted(r.calls) if k != "emulator")
        print(f"{r.run.name}: calls per job by route: {calls}")
    print(f"goal: sharded wall <= 1.05x unsharded; load average after: {load_avg()}")
    return results


if __name__ == "__main__":
    main()
