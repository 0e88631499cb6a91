"""The command line: a thin shell over the library.

Parses flags into typed options, calls the library, prints, and maps the error tree to
exit codes. Only this package crosses from sync to async (``anyio.run``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from runner import __version__
from runner.cli.commands import (
    Notice,
    cmd_cancel,
    cmd_compact,
    cmd_emulator,
    cmd_export,
    cmd_plan,
    cmd_report,
    cmd_run,
    cmd_status,
    cmd_validate,
    labelled,
    stream_jobs,
    summary_json,
)
from runner.cli.imports import without_unused
from runner.errors import (
    EXIT_INTERRUPTED,
    EXIT_LEDGER,
    RunnerError,
)
from runner.fal.urls import FAL_API_URL, FAL_QUEUE_URL
from runner.options import add_manifest_args, add_run_args

__all__ = [
    "EXIT_BROKEN_PIPE",
    "Notice",
    "build_parser",
    "labelled",
    "main",
    "stream_jobs",
    "summary_json",
]

# 128 + SIGPIPE: what a program killed by writing to a closed pipe exits with.
EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner", description="Run manifests of FLUX requests through fal's queue."
    )
    parser.add_argument("--version", action="version", version=f"runner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="report every bad row of a manifest")
    add_manifest_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="jobs, images, megapixels and dollars per endpoint")
    add_manifest_args(p)
    p.add_argument("--prices", type=Path, help="JSON price overrides (see README)")
    p.add_argument(
        "--api-url",
        default=FAL_API_URL,
        help="fal Platform API, for the account's own prices when FAL_KEY is set",
    )
    p.add_argument(
        "--ledger",
        type=Path,
        metavar="DIR",
        help="preview what a rerun with this run directory would do, and its cost",
    )
    p.add_argument(
        "--on-unknown",
        choices=["reconcile", "resubmit", "skip", "fail"],
        default="reconcile",
        help="as for run, with --ledger (default reconcile)",
    )
    p.add_argument("--retry-failed", action="store_true", help="as for run, with --ledger")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a manifest through the queue, resumably")
    add_manifest_args(p)
    add_run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="counts by state and endpoint, spend so far")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="one row per job, latest state")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    p.add_argument(
        "--out", type=Path, help="output file, or - for stdout (default: RUN_DIR/export.FORMAT)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compact", help="fold the ledger's parts into one (drops history)")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("cancel", help="cancel the remote requests still in flight")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--queue-url", default=FAL_QUEUE_URL)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("emulator", help="the local fal queue emulator")
    p.add_argument("action", choices=["serve"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for `serve` (see --help)")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("report", help="cost, timing and failure report; --html for a gallery")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write a self-contained page")
    p.add_argument("--gallery-limit", type=int, default=500, metavar="N",
                   help="at most N jobs in the page's gallery (default 500)")  # fmt: skip
    p.add_argument("--gallery-state", action="append", default=[], metavar="STATE",
                   help="only jobs in this state in the gallery (repeatable)")  # fmt: skip
    p.add_argument("--link-images", action="store_true",
                   help="link downloaded images by relative path, no thumbnails")  # fmt: skip
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            with without_unused():
                code: int = args.func(args)
        except BaseExceptionGroup as group:
            # Raised inside a task group (the embedded emulator's): the error that matters,
            # reported as it is when no task group is in the way.
            leaf = _what_matters(group)
            if leaf is None:
                raise
            raise leaf from group
    except BrokenPipeError:
        return _closed_stdout()
    except RunnerError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a file of ours: a bug, and its traceback says where
        print(f"runner: error: {_os_error_line(exc)}", file=sys.stderr)
        return EXIT_LEDGER
    return code


def _what_matters(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first RunnerError in a (nested) exception group, else the first interrupt or
    OSError; None when it holds none of them (a bug, whose traceback is the report)."""
    leaves = list(_leaves(group))
    for kind in (RunnerError, KeyboardInterrupt, OSError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _os_error_line(exc: OSError) -> str:
    """``cannot use PATH: [Errno 20] Not a directory``: one line, whatever the path holds."""
    where = " -> ".join(_shown(name) for name in (exc.filename, exc.filename2) if name)
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)
    return f"cannot use {where}: {reason}"


def _shown(name: object) -> str:
    text = os.fsdecode(name) if isinstance(name, str | bytes) else str(name)
    return text if text.isprintable() else repr(text)


def _closed_stdout() -> int:
    """The reader went away (``runner status RUN | head``): end quietly. Both streams point
    at /dev/null from here on, so the flush at exit raises nothing more to print."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, OSError, ValueError):
                continue  # not a real file (captured in tests): nothing is flushed at exit
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE
