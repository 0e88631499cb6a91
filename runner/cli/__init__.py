"""The command line: a thin shell over the library.

Parses flags into typed options, calls the library, prints, and maps the error tree to
exit codes. Only this package crosses from sync to async (``anyio.run``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from runner import __version__
from runner.cli.commands import (
    Notice,
    cmd_cancel,
    cmd_compact,
    cmd_emulator,
    cmd_plan,
    cmd_ray,
    cmd_report,
    cmd_run,
    cmd_status,
    cmd_validate,
    labelled,
    stream_jobs,
    summary_json,
)
from runner.cli.export import cmd_export
from runner.cli.imports import collection_paused, resume_collection, without_unused
from runner.errors import (
    EXIT_INTERRUPTED,
    EXIT_LEDGER,
    EXIT_USAGE,
    RunnerError,
    UsageError,
)
from runner.libc import limit_arenas
from runner.options import add_options
from runner.options.export import add_dataset_args

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
    add_options(p, "validate")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="jobs, images, megapixels and dollars per endpoint")
    add_options(p, "plan")
    p.add_argument(
        "--ledger",
        type=Path,
        metavar="DIR",
        help="preview what a rerun with this run directory would do, and its cost "
        "(default: plan from scratch)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (default text)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "run",
        help="run a manifest through the queue, resumably",
        description="Run a manifest through fal's queue (or --emulator), resumably: run the "
        "same command again to resume. Options may come from a TOML file (--config); flags win.",
    )
    add_options(p, "run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ray", help="run a sharded manifest on Ray (extra runner[ray])")
    add_options(p, "run")  # every run option: each shard runs as `runner run` would
    p.add_argument("--address", help="the Ray cluster to join (e.g. auto); default: start one")
    p.add_argument("--workers", type=int, metavar="N", help="shards running at once (default all)")
    p.set_defaults(func=cmd_ray)

    p = sub.add_parser("status", help="counts by state and endpoint, spend so far")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true")
    _add_all_versions(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="one row per job, or a dataset of the images")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", default="csv",
                   choices=["csv", "jsonl", "parquet", "imagefolder", "webdataset"])  # fmt: skip
    p.add_argument(
        "--out", type=Path, help="output file, or - for stdout (default: RUN_DIR/export.FORMAT)"
    )
    add_dataset_args(p)
    _add_all_versions(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compact", help="fold the ledger's parts into one (drops history)")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("cancel", help="cancel the remote requests still in flight")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--keys-file", type=Path, metavar="FILE",
                   help="keys to find the one that submitted among (a sharded run: each "
                        "shard cancels with its own)")  # fmt: skip
    p.add_argument("--queue-url", default=None,
                   help="the queue to ask (default: the one the run used)")  # fmt: skip
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
    _add_all_versions(p)
    p.set_defaults(func=cmd_report)
    return parser


def _add_all_versions(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--all-versions",
        action="store_true",
        help="include superseded jobs (older content of a row recorded again); "
        "default: current versions only",
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Run as the program (no argv given): malloc's arenas capped before any thread starts
    # (runner.libc), and no garbage collection while it imports (runner.cli.imports); a
    # test calling main(argv) keeps its own process as it is.
    if argv is None:
        limit_arenas()
    with contextlib.nullcontext() if argv is not None else collection_paused():
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    json_log = _asks_for_json_log(argv)
    parser = build_parser()
    try:
        args = _parse(parser, argv, json_log=json_log)
    except _Rejected as exc:
        return _fatal(json_log, exc.code, str(exc))
    try:
        try:
            with without_unused(), _guarded_stdout():
                _check_run_dir(args)
                if args.func is not cmd_run:
                    resume_collection()  # cmd_run resumes once it has imported the run's
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
        return _fatal(json_log, exc.exit_code, f"error: {exc}")
    except KeyboardInterrupt:
        return _fatal(json_log, EXIT_INTERRUPTED, "interrupted")
    except _OutputFailed as exc:
        # A full disk or a dead device behind stdout (`runner status RUN > /dev/full`).
        _silence_stdout()
        return _fatal(json_log, EXIT_LEDGER, f"error: cannot write the output: {exc.error}")
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a file of ours: a bug, and its traceback says where
        return _fatal(json_log, EXIT_LEDGER, f"error: {_os_error_line(exc)}")
    return code


class _OutputFailed(Exception):
    """Standard output refused a write (not a closed pipe: that ends quietly)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _GuardedStream:
    """Standard output (text, or its ``buffer``) whose failed writes are :class:`_OutputFailed`:
    an OSError without a file name is otherwise a bug's, and the command line shows its
    traceback. Everything else is the stream's own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> Any:
        return self._guarded(self._stream.write, data)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    @property
    def buffer(self) -> _GuardedStream:
        return _GuardedStream(self._stream.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @staticmethod
    def _guarded(call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _OutputFailed(exc) from exc


@contextlib.contextmanager
def _guarded_stdout() -> Iterator[None]:
    stream = sys.stdout
    sys.stdout = _GuardedStream(stream)
    try:
        yield
    finally:
        if isinstance(sys.stdout, _GuardedStream):
            sys.stdout = stream


def _check_run_dir(args: argparse.Namespace) -> None:
    """A mistyped run directory is a usage error, before anything creates or reads it.
    Only the commands that take one import the ledger's views (and pyarrow)."""
    run_dir = getattr(args, "run_dir", None)
    if not isinstance(run_dir, Path):
        return
    from runner.ledger.views import is_run_dir, not_a_run_dir

    if not is_run_dir(run_dir):
        raise UsageError(not_a_run_dir(run_dir))


class _Rejected(Exception):
    """argparse refused the command line (with ``--log-format json``): its message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _parse(parser: argparse.ArgumentParser, argv: list[str], *, json_log: bool) -> Any:
    """argparse's own usage errors, or with a JSON log its message as an ``exit`` line:
    a program watching stderr gets JSON from the first line, whatever goes wrong."""
    if not json_log:
        return parser.parse_args(argv)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if code == 0:
            raise
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        # "runner run: error: argument --max-cost: ..." as the other exit lines say it
        last = lines[-1] if lines else "error: bad command line"
        raise _Rejected(code, "error: " + last.split(": error: ", 1)[-1]) from None


def _fatal(json_log: bool, code: int, message: str) -> int:
    """The one line that ends a command that could not go on, as text or as JSON."""
    if json_log:
        from runner.execution.events import now_iso, write_event

        write_event(sys.stderr, "exit", at=now_iso(), code=code, message=message)
    else:
        print(f"runner: {message}", file=sys.stderr)
    return code


def _asks_for_json_log(argv: Sequence[str]) -> bool:
    """``run ... --log-format json`` (or ``log-format = "json"`` in its ``--config`` file):
    read before parsing, so even a command line argparse refuses is answered in JSON."""
    if not argv or argv[0] != "run":
        return False
    given = _flag_value(argv, "--log-format")
    if given is not None:
        return given == "json"
    path = _flag_value(argv, "--config")
    if path is None:
        return False
    try:
        from runner.config import load_toml

        section = load_toml(Path(path))
    except RunnerError:
        return False  # an unreadable file is reported when it is read
    value = section.get("log-format", section.get("log_format"))
    return value == "json"


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag V`` or ``--flag=V``), else None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


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
    _silence_stdout(sys.stdout, sys.stderr)
    return EXIT_BROKEN_PIPE


def _silence_stdout(*streams: Any) -> None:
    """Point ``streams`` (default: stdout) at /dev/null, so the flush at exit writes what
    they still hold there, not into the error again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in streams or (sys.stdout,):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, OSError, ValueError):
                continue  # not a real file (captured in tests): nothing is flushed at exit
    finally:
        os.close(devnull)
