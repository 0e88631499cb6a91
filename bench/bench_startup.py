"""Start-up: ``runner --help`` and a 10-job ``runner run --emulator``, each in a fresh process.

    PYTHONPATH=. python bench/bench_startup.py [--repeat 5]

Prints, for each, the best and median wall seconds and CPU seconds (user + system, from
``os.wait4``: the child's own rusage) over ``--repeat`` runs, and which heavy packages
``--help`` imported. The run is 10 jobs of 64x64 on the embedded emulator at a time scale of
1e-6 with ``--no-download``, so nearly all of its CPU is the fixed cost of starting: imports,
the ledger's open, checkpoint and close, the emulator's start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("pyarrow", "numpy", "pandas", "pydantic", "httpx", "PIL", "runner.emulator",
         "runner.report", "runner.execution")  # fmt: skip
_PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['runner', '--help']\n"
    "try:\n    runpy.run_module('runner', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def timed(argv: list[str], cwd: Path, repo: Path = REPO) -> tuple[float, float]:
    """(wall s, CPU s) of one child process; it must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} exited with status {status}")
    return wall, usage.ru_utime + usage.ru_stime


def row(name: str, samples: list[tuple[float, float]]) -> str:
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return (f"| {name} | {min(walls):.3f} | {statistics.median(walls):.3f} | "
            f"{min(cpus):.3f} | {statistics.median(cpus):.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the runner to measure")
    args = parser.parse_args()
    repo = args.repo.resolve()
    print(f"runner from {repo}")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    # The current directory comes first on sys.path: run where the measured runner is.
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=repo,
                           capture_output=True, text=True, check=True)  # fmt: skip
    print(f"`runner --help` imports: {probe.stderr.strip() or 'none of ' + ', '.join(HEAVY)}")
    print("| command | best wall s | median wall s | best CPU s | median CPU s |")
    print("| --- | --- | --- | --- | --- |")
    help_argv = [sys.executable, "-m", "runner", "--help"]
    print(
        row("runner --help", [timed(help_argv, repo, repo) for _ in range(args.repeat)]), flush=True
    )
    bare = [sys.executable, "-c", "pass"]
    print(row("python -c pass", [timed(bare, REPO) for _ in range(args.repeat)]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        manifest = Path(tmp) / "ten.jsonl"
        lines = [{"prompt": f"a small test image {i}", "image_size": {"width": 64, "height": 64},
                  "num_inference_steps": 1} for i in range(10)]  # fmt: skip
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        samples = []
        for i in range(args.repeat):
            run = [sys.executable, "-m", "runner", "run", str(manifest), "--emulator",
                   "--endpoint", "fal-ai/flux-lora", "--no-download", "--quiet",
                   "--emulator-time-scale", "1e-6", "--ledger", f"{tmp}/run{i}"]  # fmt: skip
            samples.append(timed(run, Path(tmp), repo))
        print(row("runner run --emulator (10 jobs)", samples), flush=True)


if __name__ == "__main__":
    main()
