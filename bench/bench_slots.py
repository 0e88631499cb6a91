"""Slot utilisation: makespan against its lower bound, runner beside the baseline.

    python bench/bench_slots.py [--jobs 2000] [--concurrency 10] [--time-scale 0.05]

Jobs take 2-8 emulated seconds (as in bench_calls). The lower bound of the makespan is
the total service time divided by the slots: the emulator reports the slot-seconds its
jobs ran (``slots.busy_s``) and the makespan from the first accepted submit to the last
finish. The runner keeps twice the slots in flight (by default), so a freed slot starts
the next queued job at once; the baseline's semaphore holds one job per slot, so each slot idles
while the client notices the end, fetches the result and submits the next. fal-client
runs as written (poll every 0.1 s real) and with the poll interval scaled to 0.1 s
emulated, which is how it behaves against fal (see bench_calls). The runner runs in poll
mode, stream mode, and poll mode with ``--max-in-flight`` three times the slots.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

from common import (
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


def main(argv: list[str] | None = None) -> list[Phase]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--time-scale", type=float, default=0.05)
    p.add_argument("--clients", nargs="+", default=["runner", "baseline"])
    args = p.parse_args(argv)
    c, scale, n = args.concurrency, args.time_scale, args.jobs
    print(f"## slot utilisation: {n:,} jobs of 2-8 emulated s, concurrency {c}, "
          f"time scale {scale:g}")  # fmt: skip
    results: list[Phase] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-slots-") as tmp,
        EmulatorProcess(concurrency=c, time_scale=scale) as emu,
    ):
        manifest = Path(tmp) / "jobs.jsonl"
        write_jsonl(manifest, realistic_rows(n, seed=23))
        requests = [request_of(r) for r in realistic_rows(n, seed=23)]
        runners = [("poll", "result"), ("stream", "result"), ("poll", "status")]
        for mode, first in runners if "runner" in args.clients else []:
            config = runner_config(
                manifest, Path(tmp) / f"run-{mode}-{first}", emu, concurrency=c,
                completion=mode, rate_per_s=10.0 / scale, first_look=first,
            )  # fmt: skip
            name = f"runner --completion {mode}" + (
                " --first-look status" if first == "status" else ""
            )
            results.append(measure(emu, partial(run_runner, name, config, n)))
        baselines = ((0.1, "0.1 s real"), (0.1 * scale, "0.1 s emulated"))
        for interval, label in baselines if "baseline" in args.clients else ():
            start = partial(
                run_baseline, f"fal_client, get(interval={label})", emu, requests,
                concurrency=c, interval_s=interval,
            )  # fmt: skip
            results.append(measure(emu, start))
    rows = [
        [r.run.name, f"{r.run.completed:,}/{n:,}", r.bound_s(c) / scale, r.makespan_s / scale,
         r.makespan_s / max(r.bound_s(c), 1e-9), r.run.wall_s, r.per_job()]
        for r in results
    ]  # fmt: skip
    print(table(
        ["client", "completed", "bound (emulated s)", "makespan (emulated s)", "makespan/bound",
         "client wall s (real)", "calls/job"], rows))  # fmt: skip
    print(f"goal: makespan/bound <= 1.03; load average after: {load_avg()}")
    return results


if __name__ == "__main__":
    main()
