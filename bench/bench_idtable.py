"""Benchmark: memory and CPU of the duplicate-id check as a manifest grows (issue 18).

Each mode runs in this process and prints RSS (MiB, from /proc) every million keys or every
250,000 rows, and CPU seconds (user + system) for the whole:

- ``--table N``: N random (key, check) pairs into ``KeyLines.claim_many`` in blocks of 7,000,
  as the batch reader claims a block's ids;
- ``--one-by-one N``: N ids through ``KeyLines.claim`` (the per-row path: JSONL, Parquet,
  rows the vector path sends row by row);
- ``--duplicates N``: N random ids claimed in blocks of 7,000, then all N again (CPU of the
  second pass: every id a duplicate, most of them on disk);
- ``--contents N``: N distinct contents through ``Occurrences.next`` (rows without an id);
- ``--reader CSV``: the batch reader over a manifest (``iter_job_batches``, duplicate-id
  check on, jobs counted, not made); ``--write-csv CSV --rows N`` writes one of
  ``bench_manifest.py``'s rows (an id on 9 rows in 10).

    PYTHONPATH=. python bench/bench_idtable.py --table 10000000
    PYTHONPATH=. python bench/bench_idtable.py --write-csv /tmp/m.csv --rows 10000000
    PYTHONPATH=. python bench/bench_idtable.py --reader /tmp/m.csv
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
from pathlib import Path

import numpy as np

BLOCK = 7_000


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def table(count: int) -> None:
    from runner.manifest.idtable import KeyLines

    held, rng = KeyLines(), np.random.default_rng(1)
    start, began, marks = rss_mb(), cpu_s(), []
    for first in range(1, count + 1, BLOCK):
        size = min(BLOCK, count + 1 - first)
        keys = rng.integers(-(2**63), 2**63 - 1, size, dtype=np.int64)
        checks = rng.integers(0, 2**32, size, dtype=np.uint32)
        held.claim_many(keys, checks, np.arange(first, first + size, dtype=np.int64))
        if (first + size - 1) // 10**6 != (first - 1) // 10**6:
            marks.append(f"{(first + size - 1) // 10**6}M:+{rss_mb() - start:.0f}")
    disk = getattr(held, "spilled_bytes", 0) / 1e6  # 0 before the table spilled
    done = f"{held.nbytes / len(held):.1f} B a key in memory, {disk:.0f} MB on disk"
    print(f"table: {count:,} keys; RSS MiB over start {' '.join(marks)}; {done}")
    print(f"  CPU {cpu_s() - began:.1f} s")


def duplicates(count: int) -> None:
    from runner.manifest.idtable import KeyLines

    held, rng = KeyLines(), np.random.default_rng(1)
    keys = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    checks = rng.integers(0, 2**32, count, dtype=np.uint32)
    for again in (0, count):
        began, wrong = cpu_s(), 0
        for first in range(0, count, BLOCK):
            lines = np.arange(first, min(first + BLOCK, count), dtype=np.int64) + 2
            block = slice(first, first + BLOCK)
            found = held.claim_many(keys[block], checks[block], lines + again)
            wrong += int((found != lines).sum())
    print(f"duplicates: {count:,} ids claimed again; CPU {cpu_s() - began:.1f} s, wrong {wrong}")


def one_by_one(count: int, contents: bool) -> None:
    from runner.manifest.identity import Occurrences
    from runner.manifest.idtable import KeyLines

    ids, counts, draw = KeyLines(), Occurrences(), random.Random(1)
    start, began, marks = rss_mb(), cpu_s(), []
    for line in range(1, count + 1):
        key = draw.getrandbits(64) - 2**63
        if contents:
            counts.next(key)
        else:
            ids.claim(key, line, draw.getrandbits(32))
        if line % 10**6 == 0:
            marks.append(f"{line // 10**6}M:+{rss_mb() - start:.0f}")
    what = "Occurrences.next" if contents else "KeyLines.claim"
    print(f"{what}: {count:,} keys; RSS MiB over start {' '.join(marks)}")
    print(f"  CPU {cpu_s() - began:.1f} s")


def reader(path: Path) -> None:
    from runner.manifest.batches import iter_job_batches
    from runner.manifest.jobs import ExpandOptions

    rows, mark, marks, began = 0, 250_000, [], cpu_s()
    options = ExpandOptions(manifest_dir=path.parent)
    for batch in iter_job_batches(path, None, options, materialize=False):
        rows += batch.counted + len(batch.items)
        if rows >= mark:
            marks.append(f"{mark // 1000}k:{rss_mb():.0f}")
            mark += 250_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"reader: {rows:,} jobs; RSS MiB {' '.join(marks)}; peak {peak:.0f}")
    print(f"  CPU {cpu_s() - began:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--table", type=int)
    parser.add_argument("--one-by-one", type=int)
    parser.add_argument("--duplicates", type=int)
    parser.add_argument("--contents", type=int)
    parser.add_argument("--reader", type=Path)
    parser.add_argument("--write-csv", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.write_csv is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_manifest import write_csv

        write_csv(args.write_csv, args.rows)
    if args.table:
        table(args.table)
    if args.one_by_one:
        one_by_one(args.one_by_one, contents=False)
    if args.duplicates:
        duplicates(args.duplicates)
    if args.contents:
        one_by_one(args.contents, contents=True)
    if args.reader is not None:
        reader(args.reader)


if __name__ == "__main__":
    main()
