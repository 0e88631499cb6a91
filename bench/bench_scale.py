"""Scale: a long manifest through ``runner run`` (a child process), then the resume planning.

    python bench/bench_scale.py [--rows 1000000] [--concurrency 16] [--workdir DIR]

1. writes a JSONL manifest of ``--rows`` flux-lora rows with 64x64 outputs;
2. runs ``runner run --no-download --quiet`` against the emulator (its own process, time
   scale 1e-6) and samples the runner's RSS every second, pairing each sample with the
   progress line the runner logs every 10 s: memory should stay flat as rows go by;
3. runs the same command again over the finished ledger (every job skipped): the time a
   resume takes to plan before it would send anything;
4. opens the ledger in this process and times folding it (``Ledger.state()``) and
   ``plan_resume`` over every job key, then over every job of the manifest (``--plan-only``
   does just this over an existing ``--workdir``, e.g. of a run cut short).

Prints wall time, peak RSS (``wait4``) and CPU for each run, and the RSS series.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    KEY,
    REPO,
    EmulatorProcess,
    load_avg,
    proc_rss_mb,
    table,
    tiny_rows,
    write_jsonl,
)

from runner.ledger import Ledger, ResumeSummary, plan_resume
from runner.manifest.jobs import ExpandOptions, Job, iter_jobs
from runner.manifest.reader import read_rows

PROGRESS = re.compile(r"runner: (\d+)/(\S+) done")


@dataclass
class ChildRun:
    """A ``runner run`` child: wall time, rusage, and (seconds, rss MiB, jobs done) samples."""

    exit_code: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    last_line: str = ""
    stopped_at: float | None = None  # when --stop-after interrupted it (s)


def run_child(
    manifest: Path,
    run_dir: Path,
    emu: EmulatorProcess,
    concurrency: int,
    stop_after: float | None = None,
) -> ChildRun:
    argv = [
        sys.executable, "-m", "runner", "run", str(manifest), "--ledger", str(run_dir),
        "--queue-url", emu.base_url, "--concurrency", str(concurrency), "--rate", "1e9",
        "--no-download", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAL_KEY": KEY}
    log = run_dir.with_suffix(".log")
    out = ChildRun()
    with log.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss, _ = proc_rss_mb(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                rss = 0.0
            out.samples.append((time.perf_counter() - t0, rss, _done(log)))
            if stop_after is not None and time.perf_counter() - t0 > stop_after:
                proc.send_signal(signal.SIGINT)  # stop admitting, finish what is in flight
                out.stopped_at, stop_after = time.perf_counter() - t0, None
            if len(out.samples) % 60 == 0:  # a line a minute, so a cut-short run still tells
                t, rss, done = out.samples[-1]
                emu_rss = emu.rss_mb()[0]
                print(f"  {t:6.0f} s  {done:>9,} jobs done  RSS {rss:6.0f} MiB  "
                      f"(emulator {emu_rss:4.0f} MiB)", flush=True)  # fmt: skip
            time.sleep(1.0)
    out.wall_s = time.perf_counter() - t0
    out.exit_code = os.waitstatus_to_exitcode(status)
    out.cpu_s = usage.ru_utime + usage.ru_stime
    out.peak_rss_mb = usage.ru_maxrss / 1024
    lines = log.read_text().splitlines()
    out.last_line = next((ln for ln in reversed(lines) if "done (" in ln), "")
    proc.returncode = out.exit_code  # reaped by wait4 already
    return out


def _done(log: Path) -> int:
    found = PROGRESS.findall(log.read_text()[-4000:])
    return int(found[-1][0]) if found else 0


def series(run: ChildRun, points: int = 8) -> str:
    """A few (jobs done, RSS) samples spread over the run."""
    samples = [s for s in run.samples if s[1] > 0]
    if not samples:
        return "(no samples)"
    step = max(len(samples) // points, 1)
    picked = [*samples[::step][:points], samples[-1]]
    return ", ".join(f"{t:.0f}s:{done:,} jobs:{rss:.0f} MiB" for t, rss, done in picked)


def plan_in_process(run_dir: Path, manifest: Path) -> str:
    """Fold the ledger here, then plan a resume over its keys and over the manifest's jobs."""
    t0 = time.perf_counter()
    ledger = Ledger.open(run_dir)
    try:
        state = ledger.state(downloads=False)  # what `runner run --no-download` folds
        fold_s, fold_rss = time.perf_counter() - t0, proc_rss_mb()
        keys = state.jobs["job_key"].to_pylist()
        t1 = time.perf_counter()
        by_key = ResumeSummary()
        for _ in plan_resume(keys, state, summary=by_key):
            pass
        keys_s = time.perf_counter() - t1
        del keys
        t2 = time.perf_counter()
        options = ExpandOptions(manifest_dir=manifest.resolve().parent)
        jobs = (j for j in iter_jobs(read_rows(manifest), options) if isinstance(j, Job))
        by_job = ResumeSummary()
        for _ in plan_resume(jobs, state, summary=by_job):
            pass
        manifest_s = time.perf_counter() - t2
    finally:
        ledger.close()
    return (
        f"resume planning in process: fold {len(state):,} jobs {fold_s:.2f} s (RSS "
        f"{fold_rss[0]:.0f} MiB, peak {fold_rss[1]:.0f}); plan_resume over the keys "
        f"{keys_s:.2f} s; over the manifest's {by_job.total:,} jobs (expanding every row) "
        f"{manifest_s:.1f} s: {_actions(by_job)}; peak RSS {proc_rss_mb()[1]:.0f} MiB"
    )


def write_csv(path: Path, rows: Iterator[dict[str, Any]]) -> int:
    """``tiny_rows`` as CSV: the size as ``WxH``."""
    count = 0
    with path.open("w") as fh:
        fh.write("id,endpoint,prompt,image_size,seed\n")
        lines = []
        for row in rows:
            size = row["image_size"]
            lines.append(
                f"{row['id']},{row['endpoint']},{row['prompt']},"
                f"{size['width']}x{size['height']},{row['seed']}\n"
            )
            count += 1
            if len(lines) == 100_000:
                fh.write("".join(lines))
                lines.clear()
        fh.write("".join(lines))
    return count


def stopped_report(run: ChildRun, emu_rss: tuple[float, float]) -> str:
    """A run interrupted by --stop-after: jobs done, CPU per job, RSS over the jobs done."""
    samples = [s for s in run.samples if s[1] > 0 and s[2] > 0]
    done = samples[-1][2] if samples else 0
    lines = [
        f"interrupted run: exit {run.exit_code}, wall {run.wall_s:.0f} s, CPU {run.cpu_s:.1f} s, "
        f"~{done:,} jobs done (last progress line), {run.cpu_s / max(done, 1) * 1000:.2f} CPU ms "
        f"a job, peak RSS {run.peak_rss_mb:.0f} MiB; load average {load_avg()}",
        f"last line: {run.last_line}",
        "| s | jobs done | RSS MiB |",
        "| ---: | ---: | ---: |",
    ]
    step = max(len(samples) // 15, 1)
    for t, rss, jobs in [*samples[::step], *samples[-1:]]:
        lines.append(f"| {t:.0f} | {jobs:,} | {rss:.0f} |")
    running = [x for x in samples if run.stopped_at is None or x[0] <= run.stopped_at]
    if len(running) >= 4:
        half = len(running) // 2
        (_, r1, j1), (_, r2, j2) = running[half], running[-1]
        slope = (r2 - r1) / max(j2 - j1, 1) * 1e6
        lines.append(f"RSS slope over the second half: {slope:+.1f} MiB per million jobs")
    lines.append(f"emulator RSS: {emu_rss[0]:.0f} MiB (peak {emu_rss[1]:.0f})")
    return "\n".join(lines)


def _actions(summary: ResumeSummary) -> str:
    return ", ".join(f"{a.value} {n:,}" for a, n in sorted(summary.actions.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--retention-s", type=float, default=120.0,
        help="real seconds the emulator keeps a result (then forgets the job)",
    )  # fmt: skip
    p.add_argument("--workdir", type=Path, help="keep the manifest and ledger here")
    p.add_argument(
        "--plan-only", action="store_true", help="only the resume planning, over --workdir"
    )
    p.add_argument(
        "--resume", action="store_true",
        help="run over the ledger already in --workdir (e.g. ledger_gen.py --manifest)",
    )  # fmt: skip
    p.add_argument("--csv", action="store_true", help="a CSV manifest (id,endpoint,prompt,...)")
    p.add_argument(
        "--stop-after", type=float,
        help="interrupt the first run after this many seconds (SIGINT) and stop there: "
        "the RSS series of a run too long to finish",
    )  # fmt: skip
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    suffix = "csv" if args.csv else "jsonl"
    manifest, run_dir = work / f"rows{args.rows}.{suffix}", work / f"rows{args.rows}.runner"
    if args.plan_only:
        print(plan_in_process(run_dir, manifest))
        return
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if not manifest.exists():  # a manifest of that size kept in --workdir is reused
        (write_csv if args.csv else write_jsonl)(manifest, tiny_rows(args.rows))
    print(f"## scale: {args.rows:,} rows, concurrency {args.concurrency}, 64x64, no download "
          f"(manifest written in {time.perf_counter() - t0:.1f} s, "
          f"{manifest.stat().st_size / 2**20:.0f} MiB); load average {load_avg()}")  # fmt: skip
    with EmulatorProcess(
        concurrency=args.concurrency, time_scale=1e-6, retention_real_s=args.retention_s
    ) as emu:
        first = run_child(manifest, run_dir, emu, args.concurrency, args.stop_after)
        emu_rss = emu.rss_mb()
        if args.stop_after is not None:
            print(stopped_report(first, emu_rss))
            return
        second = run_child(manifest, run_dir, emu, args.concurrency)
    planning = plan_in_process(run_dir, manifest)
    rows = [
        ["first run", first.exit_code, first.wall_s, args.rows / first.wall_s, first.cpu_s,
         first.peak_rss_mb],
        ["rerun, all skipped", second.exit_code, second.wall_s, args.rows / second.wall_s,
         second.cpu_s, second.peak_rss_mb],
    ]  # fmt: skip
    print(table(["runner run", "exit", "wall s", "rows/s", "CPU s", "peak RSS MiB"], rows))
    print(f"first run:  {first.last_line}")
    print(f"rerun:      {second.last_line}")
    print(f"RSS series (first run): {series(first)}")
    print(f"RSS series (rerun): {series(second)}")
    print(f"emulator RSS after the first run: {emu_rss[0]:.0f} MiB (peak {emu_rss[1]:.0f})")
    print(planning)
    ledger_mb = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
    print(f"ledger on disk: {ledger_mb:.0f} MiB; load average after: {load_avg()}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
