"""``runner export``: one row per job (csv, jsonl, parquet), or a dataset of the images
(imagefolder, webdataset, parquet --per-image)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from runner.cli.commands import jobs_phrase
from runner.errors import EXIT_OK, UsageError


def cmd_export(args: argparse.Namespace) -> int:
    from runner.options.export import dataset_export

    if dataset_export(args):
        return _export_dataset(args)
    with terminated_as_interrupted():
        return _export_rows(args)


def _export_rows(args: argparse.Namespace) -> int:
    from runner.ledger.views import export

    if args.out is not None and str(args.out) == "-":
        # To stdout: the file appears whole in a scratch folder first, then is copied out.
        with tempfile.TemporaryDirectory() as scratch:
            staged = Path(scratch) / f"export.{args.format}"
            count = export(args.run_dir, staged, args.format, all_versions=args.all_versions,
                           read_back=True)  # fmt: skip
            with staged.open("rb") as handle:
                shutil.copyfileobj(handle, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        print(f"wrote {jobs_phrase(count)} to stdout", file=sys.stderr)
        return EXIT_OK
    out = args.out or args.run_dir / f"export.{args.format}"
    count = export(args.run_dir, out, args.format, all_versions=args.all_versions)
    print(f"wrote {jobs_phrase(count)} to {out}", file=sys.stderr)
    return EXIT_OK


@contextmanager
def terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM is Ctrl-C inside the block (as for a run: exit 130), so the export removes its
    temp file rather than the process dying mid-write and leaving it. Only where SIGTERM has
    its default action, on the main thread (a signal's handler can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous != signal.SIG_DFL:
        yield  # the host's own handler
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _export_dataset(args: argparse.Namespace) -> int:
    from runner.report.dataset_writers import DEFAULT_SHARD_BYTES, export_dataset
    from runner.report.datasets import DatasetOptions, parse_size

    if args.out is not None and str(args.out) == "-":
        raise UsageError(f"--format {args.format}: a dataset is files, not a stream; use --out")
    name = f"export-{args.format}"
    if args.format == "parquet" and args.split_column is None:
        name = "export-images.parquet"  # one file; with splits, a folder of SPLIT.parquet
    out = args.out or args.run_dir / name
    options = DatasetOptions(args.include_failed, args.include_flagged, args.split_column,
                             args.all_versions)  # fmt: skip
    shard = DEFAULT_SHARD_BYTES if args.shard_size is None else parse_size(args.shard_size)
    chosen, written = export_dataset(args.run_dir, out, args.format, options,
                                     shard_bytes=shard, with_bytes=args.with_bytes)  # fmt: skip
    linked = f" ({written.linked} hard-linked to the run's outputs)" if written.linked else ""
    print(f"wrote {_count(written.images, 'image')} of {jobs_phrase(chosen.jobs)} to {out}{linked}",
          file=sys.stderr)  # fmt: skip
    left = [_count(chosen.failed_jobs_left_out, "failed job")] * bool(chosen.failed_jobs_left_out)
    if chosen.flagged_left_out:
        left.append(_count(chosen.flagged_left_out, "flagged image"))
    if left:
        print(f"left out {' and '.join(left)} (--include-failed, --include-flagged to keep them)",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _count(n: int, noun: str) -> str:
    return f"1 {noun}" if n == 1 else f"{n} {noun}s"
