"""Benchmark: a 1,000,000-row manifest through the readers and ``runner validate`` / ``plan``.

Writes CSV, JSONL and Parquet manifests of the same rows to a temp dir. Then, each in a
fresh child process (so ``ru_maxrss`` is that child's own peak):

- ``--commands`` (the issue-18 table): ``runner validate`` and ``runner plan`` of the CSV
  as the CLI runs them, beside pyarrow's streaming CSV reader and a ``csv.DictReader``
  loop over the same file: wall s, CPU s (user + system), rows/s and peak RSS each;
- by default also each format through ``read_rows`` alone and through ``iter_jobs`` (the
  per-row path), with RSS at 100k rows and every 100k after, to show memory stays flat.

    PYTHONPATH=. python bench/bench_manifest.py [--rows 1000000] [--keep DIR] [--commands]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENDPOINT = "fal-ai/flux-lora"
# Like manifests/demo.csv: an id (every 10th row left empty, so identified by content),
# metadata columns filling a prompt template on half the rows, a written prompt (with a
# comma, sometimes a line break) on the other half, presets and WxH sizes, a LoRA on 1%.
COLUMNS = ["id", "endpoint", "title", "color", "prompt_template", "prompt", "image_size",
           "num_images", "seed", "guidance_scale", "loras", "sku"]  # fmt: skip
CHECKPOINT = 100_000
PARQUET_CHUNK = 50_000
_TITLES = ["ceramic coffee mug", "brass desk lamp", "wool area rug", "oak dining chair"]
_COLORS = ["matte black", "sage green", "polished brass", "terracotta", "indigo", "walnut"]
_SIZES = ["square_hd", "landscape_4_3", "portrait_4_3", "1024x768", "square"]


def make_row(i: int) -> dict[str, Any]:
    templated = i % 2 == 0
    return {
        "id": "" if i % 10 == 9 else f"row-{i:07d}",
        "endpoint": ENDPOINT,
        "title": _TITLES[i % 4],
        "color": _COLORS[i % 6],
        "prompt_template": "Studio photo of {title} in {color}, white background"
        if templated
        else "",
        "prompt": ""
        if templated
        else f"A studio photo of product {i}, white background"
        + ("\nsoft light" if i % 7 == 0 else ""),
        "image_size": _SIZES[i % 5],
        "num_images": "" if i % 3 else 1 + i % 4,
        "seed": i,
        "guidance_scale": "" if i % 4 else 3.5,
        "loras": f"https://host:8080/loras/l{i % 7}.safetensors:0.8" if i % 100 == 0 else "",
        "sku": f"SKU-{i}",
    }


def rows(count: int) -> Iterator[dict[str, Any]]:
    return (make_row(i) for i in range(count))


def write_csv(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows(count))


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """The row as JSONL and Parquet give it: empty cells absent, LoRAs as a list."""
    typed = {k: (None if v == "" else v) for k, v in row.items()}
    typed["loras"] = _lora_list(row["loras"])
    return typed


def write_jsonl(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows(count):
            fh.write(json.dumps({k: v for k, v in _typed(r).items() if v is not None}) + "\n")


def _lora_list(cell: str) -> list[dict[str, Any]] | None:
    if not cell:
        return None
    path, scale = cell.rsplit(":", 1)
    return [{"path": path, "scale": float(scale)}]


def write_parquet(path: Path, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lora = pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())]))
    special = {"num_images": pa.int64(), "seed": pa.int64(), "guidance_scale": pa.float64(),
               "loras": lora}  # fmt: skip
    schema = pa.schema([(c, special.get(c, pa.string())) for c in COLUMNS])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, count, PARQUET_CHUNK):
            chunk = [_typed(make_row(i)) for i in range(start, min(count, start + PARQUET_CHUNK))]
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


MANIFESTS = {"m.csv": write_csv, "m.jsonl": write_jsonl, "m.parquet": write_parquet}


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mb() -> float:
    """Peak resident set size so far (ru_maxrss is in KiB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def read_one(path: Path, with_jobs: bool) -> None:
    """Child process: stream one manifest and print one result line."""
    from runner.errors import RowError
    from runner.manifest.jobs import ExpandOptions, iter_jobs
    from runner.manifest.reader import read_rows

    start_rss = rss_mb()
    began = time.perf_counter()
    stream: Iterator[Any] = read_rows(path)
    if with_jobs:
        stream = iter_jobs(stream, ExpandOptions(manifest_dir=path.parent))
    items = errors = 0
    at_checkpoint = at_last = ""
    for item in stream:
        items += 1
        if isinstance(item, RowError):
            errors += 1
            if errors <= 3:
                print(f"    row error: {item}", file=sys.stderr)
        if items == CHECKPOINT:
            at_checkpoint = f"rss@100k={rss_mb():.0f}MB peak@100k={peak_mb():.0f}MB"
        if items % CHECKPOINT == 0:
            # Still inside the stream: what iter_jobs holds (the id check) is alive here
            # and freed once the generator ends, so rss@end alone would hide it.
            at_last = f"rss@{items // 1000}k={rss_mb():.0f}MB"
    elapsed = time.perf_counter() - began
    what = "read_rows+iter_jobs" if with_jobs else "read_rows        "
    print(
        f"  {path.suffix:8} {what} {items:>9,} items {elapsed:6.1f}s "
        f"{items / elapsed:>9,.0f}/s  rss@start={start_rss:.0f}MB {at_checkpoint} {at_last} "
        f"rss@end={rss_mb():.0f}MB peak={peak_mb():.0f}MB errors={errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the manifests here and keep them")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--read", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", choices=["pyarrow", "dictreader"], help=argparse.SUPPRESS)
    parser.add_argument("--commands", action="store_true", help="only the validate/plan table")
    args = parser.parse_args()
    if args.raw is not None:
        raw_read(args.read, args.raw)
        return
    if args.read is not None:
        read_one(args.read, args.jobs)
        return
    if args.write is not None:
        write_all(args.write, args.rows)
        return
    # The parent imports nothing heavy and only runs children: on Linux a child
    # inherits its parent's ru_maxrss across exec, so a small parent keeps each
    # child's peak its own.
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        child = [sys.executable, __file__, "--rows", str(args.rows)]
        if not (folder / "m.csv").exists():
            subprocess.run([*child, "--write", str(folder)], check=True)
        print(f"parent rss={rss_mb():.0f}MB peak={peak_mb():.0f}MB")
        commands_table(folder / "m.csv", args.rows, child)
        if args.commands:
            return
        for name in MANIFESTS:
            for with_jobs in (False, True):
                command = [*child, "--read", str(folder / name)]
                subprocess.run(command + (["--jobs"] if with_jobs else []), check=True)


def raw_read(path: Path, how: str) -> None:
    """Child process: read every row and nothing else."""
    count = 0
    if how == "pyarrow":
        import pyarrow.csv as pa_csv

        options = pa_csv.ParseOptions(newlines_in_values=True)  # the prompts hold line breaks
        for batch in pa_csv.open_csv(path, parse_options=options):
            count += batch.num_rows
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            for _row in csv.DictReader(fh):
                count += 1
    print(count)


def commands_table(path: Path, rows: int, child: list[str]) -> None:
    """``runner validate`` and ``plan`` of the CSV beside the two raw readers, one child each."""
    # The same header and first two rows: what a command costs before the rows (imports).
    tiny = path.with_name("m-2rows.csv")
    with path.open("rb") as fh:
        tiny.write_bytes(b"".join(fh.readline() for _ in range(3)))
    runner = [sys.executable, "-m", "runner"]
    runs = {
        "pyarrow.csv.open_csv": [*child, "--read", str(path), "--raw", "pyarrow"],
        "csv.DictReader loop": [*child, "--read", str(path), "--raw", "dictreader"],
        "runner validate, 2 rows (start-up)": [*runner, "validate", str(tiny)],
        "runner validate": [*runner, "validate", str(path)],
        "runner plan, 2 rows (start-up)": [*runner, "plan", str(tiny)],
        "runner plan": [*runner, "plan", str(path)],
    }
    print(f"\n{rows:,}-row CSV ({path.stat().st_size / 1e6:.0f} MB), "
          f"load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| reader | wall s | CPU s | rows/s (wall) | rows per CPU s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, command in runs.items():
        began = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - began
        if process.returncode not in (0, 1):
            assert process.stderr is not None
            print(f"{name} failed: {process.stderr.read().decode()[-500:]}", file=sys.stderr)
        cpu = usage.ru_utime + usage.ru_stime
        count = 2 if "2 rows" in name else rows
        figures = [f"{wall:.1f}", f"{cpu:.1f}", f"{count / wall:,.0f}", f"{count / cpu:,.0f}"]
        print(f"| {name} | {' | '.join(figures)} | {usage.ru_maxrss / 1024:.0f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def write_all(folder: Path, count: int) -> None:
    for name in MANIFESTS:
        began = time.perf_counter()
        path = folder / name
        MANIFESTS[name](path, count)
        size = path.stat().st_size / 1e6
        print(f"wrote {name}: {count:,} rows, {size:.0f} MB, {time.perf_counter() - began:.1f}s")


if __name__ == "__main__":
    main()
