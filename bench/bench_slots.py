"""Slot utilisation: makespan against its lower bound, runner beside the baseline.

    python bench/bench_slots.py [--jobs 2000] [--concurrency 10] [--time-scale 0.05]
    python bench/bench_slots.py --matrix [--quick] [--jobs 2000] [--real-service-s 0.3]

``--matrix``: every job the same service time (the emulator's ``--service-s``) of 0.3, 3
and 10 emulated seconds at concurrency 4, 16 and 40, the runner with **default flags**
(no ``--rate``: the submit rate follows the account) beside fal-client as written. The
time scale makes each job ``max(--real-service-s, slots / --real-rate)`` real seconds
(0.3 s at 4 slots, 0.4 s at 16, 1 s at 40 by default): the runner only sees real time,
and the submits a second the slots need (slots / real service time) stay within what one
shared core gives (``--real-rate``, 40/s); bench_overhead measures the ceiling itself.
``--rates default 10`` adds runs with ``--rate`` given. ``--quick``: 320 jobs a cell.
Each run also reports the client's CPU seconds and the seconds the client and the emulator
spent runnable but waiting for a CPU (``/proc/PID/task/*/schedstat``): on a shared machine
a makespan over the bound with long waits is the load's, not the pacing's.

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
import os
import tempfile
from collections.abc import Callable
from functools import partial
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
    tiny_rows,
    write_jsonl,
)

MATRIX_SLOTS = (4, 16, 40)


def runq_wait_s(pid: int | str = "self") -> float:
    """Seconds the threads of a process spent runnable but waiting for a CPU so far
    (``/proc/PID/task/*/schedstat``, second field): on a shared machine, how much of a
    run's wall time was the load's rather than the client's."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


MATRIX_SERVICE_S = (0.3, 3.0, 10.0)


def matrix(args: argparse.Namespace) -> list[Phase]:
    """Default-flag runner and the baseline over slots x fixed service times."""
    # 320 and 2000 are whole rounds of 4, 16 and 40 slots, so the bound is reachable.
    n = args.jobs if args.jobs is not None else (320 if args.quick else 2000)
    slots = args.slots or MATRIX_SLOTS
    services = args.service or MATRIX_SERVICE_S
    print(f"## default pacing: {n:,} jobs a cell, fixed service times, each at least "
          f"{args.real_service_s:g} s of real time and slots / {args.real_rate:g} s")  # fmt: skip
    results: list[Phase] = []
    rows = []
    for c in slots:
        for service_s in services:
            # Real seconds a job: at least --real-service-s, and long enough that the
            # slots need at most --real-rate submits a second of this (shared) machine.
            real_s = max(args.real_service_s, c / args.real_rate)
            scale = real_s / service_s
            with (
                tempfile.TemporaryDirectory(prefix="bench-slots-") as tmp,
                EmulatorProcess(concurrency=c, time_scale=scale, service_s=service_s) as emu,
            ):
                manifest = Path(tmp) / "jobs.jsonl"
                write_jsonl(manifest, tiny_rows(n))
                requests = [request_of(r) for r in tiny_rows(n)]
                starts: list[tuple[str, Callable[[], ClientRun]]] = []
                for rate in args.rates if "runner" in args.clients else ():
                    extra = {} if rate is None else {"rate_per_s": rate}
                    config = runner_config(
                        manifest, Path(tmp) / f"run-{len(starts)}", emu, concurrency=c, **extra
                    )
                    name = "runner (default flags)" if rate is None else f"runner --rate {rate:g}"
                    starts.append((name, partial(run_runner, name, config, n)))
                if "baseline" in args.clients:
                    starts.append(("fal_client (interval 0.1 s real)", partial(
                        run_baseline, "fal_client", emu, requests, concurrency=c)))  # fmt: skip
                for name, start in starts:
                    waits = runq_wait_s(), runq_wait_s(emu.proc.pid)
                    phase = measure(emu, start)
                    waited = runq_wait_s() - waits[0], runq_wait_s(emu.proc.pid) - waits[1]
                    results.append(phase)
                    ratio = phase.makespan_s / max(phase.bound_s(c), 1e-9)
                    rows.append([
                        name, c, service_s, scale, f"{phase.run.completed:,}/{n:,}",
                        phase.bound_s(c), phase.makespan_s, ratio, phase.per_job(),
                        phase.per_job("status"), phase.per_job("result"),
                        phase.run.cpu_s, waited[0], waited[1], "yes" if ratio <= 1.03 else "no",
                    ])  # fmt: skip
                    print(f"  c={c} service={service_s:g}s {name}: makespan/bound {ratio:.3f}, "
                          f"{phase.per_job():.2f} calls/job ({phase.per_job('status'):.2f} status, "
                          f"{phase.per_job('result'):.2f} result); client CPU "
                          f"{phase.run.cpu_s:.1f} s, waiting for a CPU: client {waited[0]:.1f} s, "
                          f"emulator {waited[1]:.1f} s; load {load_avg()}", flush=True)  # fmt: skip
    print(table(
        ["client", "slots", "service (emulated s)", "time scale", "completed",
         "bound (real s)", "makespan (real s)", "makespan/bound", "calls/job", "status/job",
         "result/job", "client CPU s", "client runq s", "emulator runq s", "<= 1.03"],
        rows))  # fmt: skip
    print(f"goal: makespan/bound <= 1.03 with default flags; load average after: {load_avg()}")
    return results


def _rate(text: str) -> float | None:
    return None if text == "default" else float(text)


def main(argv: list[str] | None = None) -> list[Phase]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=None, help="default 2000 (matrix --quick: 300)")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--time-scale", type=float, default=0.05)
    p.add_argument("--clients", nargs="+", default=["runner", "baseline"])
    p.add_argument("--matrix", action="store_true", help="default pacing over slots x service")
    p.add_argument("--quick", action="store_true", help="with --matrix: 300 jobs a cell")
    p.add_argument("--slots", type=int, nargs="+", help="with --matrix: instead of 4 16 40")
    p.add_argument("--service", type=float, nargs="+", help="with --matrix: emulated seconds")
    p.add_argument("--real-service-s", type=float, default=0.3)
    p.add_argument("--real-rate", type=float, default=40.0, help="jobs/s the slots may need")
    p.add_argument("--rates", type=_rate, nargs="+", default=[None],
                   help="with --matrix: runner --rate values, 'default' for none")  # fmt: skip
    args = p.parse_args(argv)
    if args.matrix:
        return matrix(args)
    c, scale, n = args.concurrency, args.time_scale, args.jobs or 2000
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
