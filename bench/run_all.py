"""Run every engine benchmark, one after another, each in its own process.

    python bench/run_all.py [--quick] [--scale-rows N] [--only NAME ...] [--out FILE]

``--quick`` shrinks each benchmark to a smoke run (about two minutes in all); the full
run uses each script's defaults (20,000 jobs for overhead, 200 for calls, 2,000 for
slots, 1,000,000 rows for scale: hours on a small machine, so ``--scale-rows`` sets it).
Every script prints Markdown tables; ``--out`` also writes them to a file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL: dict[str, list[str]] = {
    "overhead": [],
    "calls": [],
    "slots": [],
    "scale": [],
}
QUICK: dict[str, list[str]] = {
    "overhead": ["--jobs", "2000"],
    "calls": ["--jobs", "60"],
    "slots": ["--jobs", "300"],
    "scale": ["--rows", "10000"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke runs of each benchmark")
    p.add_argument("--scale-rows", type=int, help="rows for the scale benchmark")
    p.add_argument("--only", nargs="+", choices=sorted(FULL), help="run only these")
    p.add_argument("--out", type=Path, help="also write the output here")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    names = args.only or list(FULL)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = args.out.open("w") if args.out else None
    failed = []
    try:
        for name in names:
            extra = list(plan[name])
            if name == "scale" and args.scale_rows:
                extra = ["--rows", str(args.scale_rows)]
            argv_ = [sys.executable, str(HERE / f"bench_{name}.py"), *extra]
            t0 = time.perf_counter()
            done = subprocess.run(argv_, env=env, capture_output=True, text=True, check=False)
            text = done.stdout + (done.stderr if done.returncode else "")
            text += f"({name}: exit {done.returncode}, {time.perf_counter() - t0:.0f} s)\n\n"
            print(text, end="", flush=True)
            if out is not None:
                out.write(text)
                out.flush()
            if done.returncode:
                failed.append(name)
    finally:
        if out is not None:
            out.close()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
