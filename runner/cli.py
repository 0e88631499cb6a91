"""The command line: a thin shell over the library.

Parses flags into typed options, calls the library, prints, and maps the error tree to
exit codes. Only this module crosses from sync to async (``anyio.run``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anyio

from runner import __version__
from runner.catalog import CATALOG
from runner.config import FAL_QUEUE_URL, RunConfig, build_config, key_from_env, load_toml
from runner.cost import PriceTable
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, RowError, RunnerError, UsageError
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


def _endpoint_limit(text: str) -> tuple[str, int]:
    key, value = _key_value(text)
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ENDPOINT=N, got {text!r}") from None


def add_run_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--ledger", type=Path, metavar="DIR", help="run directory (default: beside the manifest)")
    a("--config", type=Path, metavar="TOML", help="options from a TOML file; flags win")
    a("--emulator", action="store_true", help="run against the embedded local emulator")
    a("--queue-url", help="fal queue base URL (default https://queue.fal.run)")
    a("--concurrency", type=int, help="the account's concurrency slots (default 2)")
    a("--max-in-flight", type=int, help="jobs submitted but unfinished (default 2x slots)")
    a("--rate", type=float, help="submits per second (default 10); halves on 429s")
    a("--endpoint-limit", action="append", type=_endpoint_limit, metavar="ID=N",
      help="at most N jobs of this endpoint in flight")  # fmt: skip
    a("--max-cost", type=Decimal, metavar="USD", help="hard cap on committed spend")
    a("--max-attempts", type=int, help="attempts per job for retryable failures (default 3)")
    a("--on-unknown", choices=["resubmit", "skip", "fail"],
      help="what a rerun does with submits of unknown outcome (default resubmit)")  # fmt: skip
    a("--retry-failed", action="store_true", help="run failed jobs again, even non-retryable")
    a("--completion", choices=["poll", "stream", "webhook"], help="default poll")
    a("--webhook-listen", metavar="HOST:PORT", help="where the webhook receiver listens")
    a("--webhook-url", help="the public URL fal calls (e.g. a tunnel to --webhook-listen)")
    a("--webhook-jwks-url", help="JWKS for webhook signatures (default fal's)")
    a("--job-timeout", type=float, metavar="S", help="cancel and fail a job after S seconds")
    a("--start-timeout", type=float, metavar="S", help="sent as X-Fal-Request-Timeout")
    a("--priority", choices=["normal", "low"])
    a("--strict", action="store_true", help="refuse the manifest if any row is bad")
    a("--quiet", action="store_true", help="log lines instead of a progress bar")
    a("--prices", type=Path, help="JSON price overrides")
    a("--out", metavar="DIR|URL",
      help="where outputs are downloaded (default RUN_DIR/outputs; or s3://...)")  # fmt: skip
    a("--no-download", action="store_true", help="keep only the output URLs in the ledger")
    a("--download-concurrency", type=int, metavar="N", help="parallel downloads (default 8)")
    a("--inline-inputs", action="store_true",
      help="send small local images as data: URIs instead of uploading them")  # fmt: skip
    a("--inline-max-bytes", type=int, metavar="B", help="largest inlined image (default 2 MiB)")
    a("--probe-inputs", action="store_true",
      help="read remote input image sizes (Range request) so estimates are exact")  # fmt: skip


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
    columns = [*first.cells, *(k for k in options.defaults if k not in first.cells)]
    warnings = column_warnings(columns, _endpoints_hint(options, first.cells))

    def chained() -> Iterator[Job | RowError]:
        yield from iter_jobs(_prepend(first, rows), options)

    return warnings, chained()


def _endpoints_hint(options: ExpandOptions, cells: dict[str, object]) -> list[str]:
    """Endpoints whose parameters a column may be a near miss of."""
    if "endpoint" in cells:
        return list(CATALOG)  # rows may name any endpoint
    return [options.default_endpoint] if options.default_endpoint else []


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


RUN_FLAGS = (
    "ledger", "emulator", "concurrency", "max_in_flight", "rate", "endpoint_limit", "max_cost",
    "max_attempts", "on_unknown", "retry_failed", "completion", "webhook_listen", "webhook_url",
    "webhook_jwks_url", "job_timeout", "start_timeout", "priority", "strict", "quiet", "prices",
    "queue_url", "out", "download_concurrency", "inline_inputs", "inline_max_bytes",
    "probe_inputs",
)  # fmt: skip
# Flag name -> RunConfig field, where they differ.
RENAMED = {
    "ledger": "run_dir", "rate": "rate_per_s", "endpoint_limit": "endpoint_limits",
    "max_cost": "max_cost_usd", "job_timeout": "job_timeout_s", "start_timeout": "start_timeout_s",
    "out": "out_dir",
}  # fmt: skip


def default_run_dir(manifest: Path) -> Path:
    """Beside the manifest: ``demo.csv`` -> ``demo.runner/``."""
    return manifest.with_name(manifest.stem + ".runner")


def run_config(args: argparse.Namespace, environ: Mapping[str, str]) -> RunConfig:
    """Flags win over the TOML file, which wins over the defaults."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    values = {RENAMED.get(k, k): v for k, v in values.items()}
    for flag in RUN_FLAGS:
        given = getattr(args, flag, None)
        if given is not None and given is not False:
            values[RENAMED.get(flag, flag)] = given
    if getattr(args, "no_download", False):
        values["download"] = False
    if isinstance(values.get("endpoint_limits"), list):
        values["endpoint_limits"] = dict(values["endpoint_limits"])
    values.update(
        manifest=args.manifest,
        fmt=args.format,
        default_endpoint=args.endpoint,
        allowed_endpoints=frozenset(args.allow_endpoint),
        defaults=dict(args.defaults),
        prompt_template=args.prompt_template,
        key=key_from_env(environ),
    )
    values.setdefault("run_dir", default_run_dir(args.manifest))
    return build_config(values)


def cmd_run(args: argparse.Namespace) -> int:
    from runner.engine import embedded_emulator, execute, print_summary

    config = run_config(args, os.environ)
    warnings, _ = stream_jobs(args)  # reads the first row only
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    async def go() -> Any:
        if config.emulator:
            async with embedded_emulator(config) as local:
                print(f"runner: using the local emulator at {local.queue_url}", file=sys.stderr)
                return await execute(local)
        return await execute(config)

    report = anyio.run(go)
    print_summary(report)
    return int(report.exit_code)


def cmd_status(args: argparse.Namespace) -> int:
    from runner.ledger.views import status_summary

    summary = status_summary(args.run_dir)
    if args.json:
        print(json.dumps(summary_json(summary), indent=2))
        return EXIT_OK
    print(f"{summary.run_dir}: {summary.jobs} jobs, {summary.events} events")
    for state, count in sorted(summary.by_state.items()):
        print(f"  {state:<12} {count}")
    for ep in summary.by_endpoint:
        states = ", ".join(f"{k}={v}" for k, v in sorted(ep.by_state.items()))
        print(f"  {ep.endpoint}: {ep.jobs} jobs ({states}), billed ${ep.billed_usd}")
    print(f"spent so far ${summary.billed_usd} (estimated ${summary.estimated_usd})")
    if summary.possible_duplicates:
        print(f"{summary.possible_duplicates} jobs have an unknown submit outcome")
    return EXIT_OK


def summary_json(summary: Any) -> dict[str, Any]:
    return {
        "run_dir": str(summary.run_dir),
        "jobs": summary.jobs,
        "events": summary.events,
        "by_state": {str(k): v for k, v in summary.by_state.items()},
        "by_endpoint": [
            {
                "endpoint": ep.endpoint,
                "jobs": ep.jobs,
                "by_state": {str(k): v for k, v in ep.by_state.items()},
                "estimated_usd": str(ep.estimated_usd),
                "billed_usd": str(ep.billed_usd),
            }
            for ep in summary.by_endpoint
        ],
        "estimated_usd": str(summary.estimated_usd),
        "billed_usd": str(summary.billed_usd),
        "possible_duplicates": summary.possible_duplicates,
    }


def cmd_export(args: argparse.Namespace) -> int:
    from runner.ledger.views import export

    out = args.out or args.run_dir / f"export.{args.format}"
    count = export(args.run_dir, out, args.format)
    print(f"wrote {count} jobs to {out}", file=sys.stderr)
    return EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    from runner.ledger.store import compact

    removed = compact(args.run_dir)
    print(f"folded {removed} parts into one (latest state per job)", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from runner.cancel import cancel_in_flight

    key = key_from_env(os.environ)
    if key is None:
        raise UsageError("FAL_KEY is not set")
    outcome = anyio.run(lambda: cancel_in_flight(args.run_dir, queue_url=args.queue_url, key=key))
    for line in outcome.lines():
        print(line)
    return EXIT_OK


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
    p.add_argument("--out", type=Path, help="output file (default: RUN_DIR/export.FORMAT)")
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


def cmd_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from runner.gallery import gallery
    from runner.ledger import JobState, read_run_meta
    from runner.report import build_report, load_jobs
    from runner.report_html import write_html
    from runner.report_text import render_text, report_json

    if args.gallery_limit < 0:
        raise UsageError(f"--gallery-limit must be 0 or more, not {args.gallery_limit}")
    known = [s.value for s in JobState]
    if bad := [s for s in args.gallery_state if s not in known]:
        raise UsageError(f"--gallery-state {bad[0]}: not one of {', '.join(known)}")
    jobs = load_jobs(args.run_dir)
    report = build_report(jobs, read_run_meta(args.run_dir), run_dir=args.run_dir)
    print(json.dumps(report_json(report), indent=2) if args.json else render_text(report))
    if args.html:
        cards = gallery(jobs, limit=args.gallery_limit, states=args.gallery_state)
        made = datetime.now(UTC)
        page = write_html(args.html, report, cards, run_dir=args.run_dir,
                          link_images=args.link_images, generated_at=made)  # fmt: skip
        print(f"runner: wrote {args.html}: {page.cards} jobs in the gallery "
              f"({page.omitted} left out), {page.thumbnails_made} thumbnails made, "
              f"{page.thumbnails_cached} from cache, {page.placeholders} placeholders",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK


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
