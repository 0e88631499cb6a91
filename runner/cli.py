"""The command line: a thin shell over the library.

Parses flags into typed options, calls the library, prints, and maps the error tree to
exit codes. Only this module crosses from sync to async (``anyio.run``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from runner import __version__
from runner.cost import PriceTable
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, RowError, RunnerError
from runner.inputs import InputSizer
from runner.jobs import ExpandOptions, Job, column_warnings, iter_jobs
from runner.manifest import read_rows
from runner.plan import build_plan, render_text

FORMATS = ("csv", "tsv", "jsonl", "parquet")
T = TypeVar("T")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="CSV, TSV, JSONL or Parquet manifest")
    p.add_argument("--format", choices=FORMATS, help="override the format from the suffix")
    p.add_argument("--endpoint", help="endpoint for rows without an `endpoint` column")
    p.add_argument(
        "--allow-endpoint",
        action="append",
        default=[],
        metavar="ID",
        help="send rows for this unknown endpoint id untyped (cost unknown)",
    )
    p.add_argument(
        "--set",
        dest="defaults",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="a default for every row; a row's own value wins",
    )
    p.add_argument("--prompt-template", help="fill `{column}` placeholders into `prompt`")


def expand_options(args: argparse.Namespace) -> ExpandOptions:
    manifest: Path = args.manifest
    return ExpandOptions(
        manifest_dir=manifest.resolve().parent,
        default_endpoint=args.endpoint,
        allowed_endpoints=frozenset(args.allow_endpoint),
        defaults=dict(args.defaults),
        prompt_template=args.prompt_template,
    )


def stream_jobs(args: argparse.Namespace) -> tuple[list[str], Iterator[Job | RowError]]:
    """Warnings about the file's columns, and the lazy stream of jobs and bad rows."""
    options = expand_options(args)
    rows = read_rows(args.manifest, fmt=args.format)
    first = next(rows, None)
    if first is None:
        return [], iter(())
    warnings = column_warnings(list(first.cells), _endpoints_hint(options, first.cells))

    def chained() -> Iterator[Job | RowError]:
        yield from iter_jobs(_prepend(first, rows), options)

    return warnings, chained()


def _endpoints_hint(options: ExpandOptions, cells: dict[str, object]) -> list[str]:
    endpoint = cells.get("endpoint") or options.default_endpoint
    return [str(endpoint)] if endpoint else []


def _prepend(first: T, rest: Iterator[T]) -> Iterator[T]:
    yield first
    yield from rest


def cmd_validate(args: argparse.Namespace) -> int:
    warnings, items = stream_jobs(args)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    good = bad = 0
    for item in items:
        if isinstance(item, RowError):
            bad += 1
            for problem in item.problems:
                print(problem)
        else:
            good += 1
    name = args.manifest.name
    print(f"{name}: {good} jobs ok, {bad} bad rows", file=sys.stderr)
    return EXIT_JOBS_FAILED if bad else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    prices = PriceTable.from_file(args.prices) if args.prices else PriceTable.default()
    warnings, items = stream_jobs(args)
    sizer = InputSizer(args.manifest.resolve().parent)
    plan = build_plan(items, prices, input_sizes=sizer, lora_bytes=sizer.lora_bytes)
    if args.json:
        doc = plan.as_json()
        doc["warnings"] = warnings
        print(json.dumps(doc, indent=2))
    else:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(render_text(plan))
    return EXIT_OK if plan.ok else EXIT_JOBS_FAILED


def cmd_emulator(args: argparse.Namespace) -> int:
    from runner.emulator.server import serve_main

    return serve_main(list(args.rest))


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
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("emulator", help="the local fal queue emulator")
    p.add_argument("action", choices=["serve"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for `serve` (see --help)")
    p.set_defaults(func=cmd_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except RunnerError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return 130
    return code
