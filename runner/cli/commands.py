"""The commands of the command line: each parses nothing, calls the library and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from runner.cli.imports import resume_collection
from runner.endpoints.money import format_usd
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, RowError, RunnerError, UsageError

# A command imports what it uses when it runs: `runner --help` and the commands that never
# touch a manifest, Parquet or the network do not pay for pydantic models, pyarrow, httpx or
# Pillow (see tests/test_startup.py).
if TYPE_CHECKING:
    from runner.config import RunConfig
    from runner.manifest.batches import JobBatch
    from runner.manifest.jobs import ExpandOptions, Job
    from runner.media.inputs import InputSizer


class Notice(str):
    """A start-up message that is information, not a warning: printed as ``note:``."""

    __slots__ = ()


def labelled(message: str) -> str:
    return f"{'note' if isinstance(message, Notice) else 'warning'}: {message}"


def stream_jobs(config: RunConfig) -> tuple[list[str], Iterator[Job | RowError]]:
    """Warnings about the file's columns, and the lazy stream of jobs and bad rows."""
    from runner.manifest.batches import iter_manifest_jobs
    from runner.manifest.columns import column_warnings
    from runner.manifest.identity import identity_notice
    from runner.manifest.reader import detect_format, read_rows
    from runner.options import expand_options

    options = expand_options(config)
    rows = read_rows(config.manifest, fmt=config.fmt)
    first = next(rows, None)
    if first is None:
        return [], iter(())
    tabular = detect_format(config.manifest, config.fmt) != "jsonl"  # a header names every column
    if tabular and options.id_column is not None and options.id_column not in first.cells:
        # One usage error, not one invalid row per line and a run directory of them.
        raise UsageError(f"--id-column {options.id_column}: {config.manifest} has no such column "
                         f"(its columns: {', '.join(first.cells)})")  # fmt: skip
    columns = [*first.cells, *(k for k in options.defaults if k not in first.cells)]
    warnings = column_warnings(columns, _endpoints_hint(options, first.cells))
    warnings.append(Notice(identity_notice(first.cells, options.id_column)))

    return warnings, iter_manifest_jobs(config.manifest, config.fmt, options)


def stream_batches(config: RunConfig, *, materialize: bool) -> tuple[list[str], Iterator[JobBatch]]:
    """:func:`stream_jobs` in batches (runner.manifest.batches): the fast reader."""
    from runner.manifest.batches import iter_job_batches
    from runner.options import expand_options

    warnings, _ = stream_jobs(config)  # reads the first row only
    options = expand_options(config)
    return warnings, iter_job_batches(config.manifest, config.fmt, options,
                                      materialize=materialize)  # fmt: skip


def _endpoints_hint(options: ExpandOptions, cells: dict[str, object]) -> list[str]:
    """Endpoints whose parameters a column may be a near miss of."""
    from runner.endpoints.catalog import CATALOG

    if "endpoint" in cells:
        return list(CATALOG)  # rows may name any endpoint
    return [options.default_endpoint] if options.default_endpoint else []


def cmd_validate(args: argparse.Namespace) -> int:
    from runner.media.inputs import InputChecker
    from runner.options import manifest_config

    warnings, batches = stream_batches(manifest_config(args), materialize=False)
    for w in warnings:
        print(labelled(w), file=sys.stderr)
    good = bad = 0
    # Local input files too (exists, type, dimensions, mask size), as a run checks them.
    checker = InputChecker(args.manifest.resolve().parent)
    for batch in batches:
        good += batch.counted  # jobs that name no local file
        for item in batch.items:
            problems = item.problems if isinstance(item, RowError) else checker.check(item)[1]
            if problems:
                bad += 1
                for problem in problems:
                    print(problem)
            else:
                good += 1
    name = args.manifest.name
    print(f"{name}: {jobs_phrase(good)} ok, {bad_rows_phrase(bad)}", file=sys.stderr)
    return EXIT_JOBS_FAILED if bad else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    import anyio

    from runner.config import key_from_env
    from runner.execution.prices import plan_prices
    from runner.manifest.plan import build_plan_batches, render_text
    from runner.media.inputs import InputSizer
    from runner.options import manifest_config

    def say(message: str) -> None:
        print(f"note: {message}", file=sys.stderr)

    config = manifest_config(args)
    key = key_from_env(os.environ)
    prices = anyio.run(plan_prices, config.api_url, key, config.prices, say)
    sizer = InputSizer(args.manifest.resolve().parent)
    if args.ledger is not None:
        return _preview(args, config, stream_jobs(config)[1], prices, sizer)
    warnings, batches = stream_batches(config, materialize=False)
    plan = build_plan_batches(batches, prices, input_sizes=sizer, lora_bytes=sizer.lora_bytes)
    if args.json:
        doc = plan.as_json()
        doc["warnings"] = warnings
        print(json.dumps(doc, indent=2))
    else:
        for w in warnings:
            print(labelled(w), file=sys.stderr)
        print(render_text(plan))
    return EXIT_OK if plan.ok else EXIT_JOBS_FAILED


def _preview(
    args: argparse.Namespace, config: RunConfig, items: Any, prices: Any, sizer: InputSizer
) -> int:
    """``plan --ledger DIR``: what a rerun would do with that run directory."""
    from runner.execution.preview import preview, render_preview
    from runner.ledger.resume import ResumePolicy
    from runner.ledger.state import LedgerState

    state = LedgerState.load(args.ledger) if args.ledger.exists() else LedgerState.empty()
    policy = ResumePolicy(on_unknown=config.on_unknown, retry_failed=config.retry_failed)
    result = preview(items, state, prices, policy, input_sizes=sizer, lora_bytes=sizer.lora_bytes)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(render_preview(result))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from runner.execution.engine import embedded_emulator, execute
    from runner.execution.summary import print_summary, print_summary_json
    from runner.options import run_config

    config = run_config(args, os.environ)
    json_lines = config.log_format == "json"
    warnings, _ = stream_jobs(config)  # reads the first row only
    for w in warnings:
        _tell(json_lines, labelled(w))

    from runner.scale.layout import refuse_mismatch

    if config.keys_file is not None and config.shards is None:
        raise UsageError("--keys-file needs --shards N (each shard is pinned to one key)")
    if config.keys_file is not None and config.emulator:
        raise UsageError("--keys-file is not for --emulator, which has one key of its own")
    run: Any = execute
    if config.shards is None:
        refuse_mismatch(config.run_dir, None)
    else:
        from runner.scale.shards import execute_sharded

        run = execute_sharded

    async def go() -> Any:
        if config.emulator:
            async with embedded_emulator(config) as local:
                _tell(json_lines, f"runner: using the local emulator at {local.queue_url}")
                return await run(local)
        return await run(config)

    if config.emulator:
        import runner.emulator.server  # noqa: F401  (imported with the rest, before resuming)
    resume_collection()  # start-up's imports are done (runner.cli.imports)
    try:
        report = anyio.run(go)
    except RunnerError as exc:
        if not json_lines:
            raise  # main prints it
        # A fatal error (refused key, unusable run directory) still ends with an exit line.
        from runner.execution.events import now_iso, write_event

        write_event(sys.stderr, "exit", at=now_iso(), code=exc.exit_code, message=f"error: {exc}",
                    run_dir=str(config.run_dir))  # fmt: skip
        return exc.exit_code
    # The stream of now, not of import time.
    (print_summary_json if json_lines else print_summary)(report, sys.stderr)
    return int(report.exit_code)


def cmd_ray(args: argparse.Namespace) -> int:
    """``runner ray``: the shards as Ray actors (runner.scale.ray_driver)."""
    from runner.execution.summary import print_summary

    try:
        from runner.scale.ray_driver import run_ray
    except ImportError:
        raise UsageError("runner ray needs Ray: pip install 'runner[ray]'") from None
    from runner.options import run_config

    config = run_config(args, os.environ)
    if config.emulator:
        raise UsageError("runner ray needs --queue-url (runner emulator serve gives a local one)")
    report = run_ray(config, address=args.address, workers=args.workers)
    print_summary(report, sys.stderr)
    return int(report.exit_code)


def _tell(json_lines: bool, line: str) -> None:
    """A line of ``run`` on stderr, or its ``message`` event with ``--log-format json``."""
    if not json_lines:
        print(line, file=sys.stderr)
        return
    from runner.execution.events import now_iso, write_event

    write_event(sys.stderr, "message", at=now_iso(), text=line.removeprefix("runner: "))


def cmd_status(args: argparse.Namespace) -> int:
    from runner.ledger.totals import spend_notes, superseded_note
    from runner.ledger.views import status_summary

    summary = status_summary(args.run_dir, all_versions=args.all_versions)
    if args.json:
        print(json.dumps(summary_json(summary), indent=2))
        return EXIT_OK
    print(f"{summary.run_dir}: {jobs_phrase(summary.jobs)}, {summary.events} events")
    for state, count in sorted(summary.by_state.items()):
        print(f"  {state:<12} {count}")
    for ep in summary.by_endpoint:
        states = ", ".join(f"{k}={v}" for k, v in sorted(ep.by_state.items()))
        name = ep.endpoint or "(no endpoint)"  # invalid rows, as the report names them
        print(f"  {name}: {jobs_phrase(ep.jobs)} ({states}), billed {format_usd(ep.billed_usd)}")
    spent, estimated = format_usd(summary.billed_usd), format_usd(summary.estimated_usd)
    print(f"spent so far {spent} (estimated {estimated})")
    if summary.reroll_usd:
        print(f"re-rolls of flagged outputs: {format_usd(summary.reroll_usd)} on top "
              f"(spent in all {format_usd(summary.spent_usd)})")  # fmt: skip
    if summary.superseded:
        print(superseded_note(summary))
    for line in spend_notes(summary):
        print(line)
    return EXIT_OK


def summary_json(summary: Any) -> dict[str, Any]:
    """``status --json``, as :data:`runner.report.schemas.STATUS_SCHEMA` describes it."""
    from runner.report.schemas import STATUS

    return {
        "schema": STATUS,
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
        "possible_duplicate_usd": str(summary.possible_duplicate_usd),
        "unknown_outcomes": summary.unknown_outcomes,
        "reconciled": dict(summary.reconciled),
        "duplicates_found": summary.duplicates_found,
        "duplicates_found_usd": str(summary.duplicates_found_usd),
        "superseded": summary.superseded,
        "superseded_billed_usd": str(summary.superseded_billed_usd),
        "superseded_estimated_usd": str(summary.superseded_estimated_usd),
        "all_versions": summary.all_versions,
        "spent_usd": str(summary.spent_usd),
        "reroll_usd": str(summary.reroll_usd),
    }


def jobs_phrase(n: int) -> str:
    return "1 job" if n == 1 else f"{n} jobs"


def bad_rows_phrase(n: int) -> str:
    return "1 bad row" if n == 1 else f"{n} bad rows"


def cmd_compact(args: argparse.Namespace) -> int:
    from runner.ledger.fold import shard_dirs
    from runner.ledger.store import compact

    # A sharded run directory: each shard's ledger (the top holds none).
    removed = sum(compact(d) for d in shard_dirs(args.run_dir) or [args.run_dir])
    print(f"folded {removed} parts into one (latest state per job)", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    import anyio

    from runner.config import key_from_env
    from runner.scale.cancel import cancel_run, cancel_sharded
    from runner.scale.keys import KeySpec, load_keys
    from runner.scale.layout import recorded_shards

    # Both are checked now, before anything is sent; used only if something is in flight.
    key = key_from_env(os.environ)
    env = [KeySpec.of(key)] if key else []
    listed = load_keys(args.keys_file) if args.keys_file else []
    if recorded_shards(args.run_dir) is not None:
        # Each shard with the key that submitted it: from --keys-file, else FAL_KEY.
        keys = listed or env
        outcome = anyio.run(
            lambda: cancel_sharded(args.run_dir, queue_url=args.queue_url, keys=keys)
        )
    else:
        keys = env + listed
        outcome = anyio.run(lambda: cancel_run(args.run_dir, queue_url=args.queue_url, keys=keys))
    for line in outcome.lines():
        print(line)
    return outcome.exit_code


def cmd_emulator(args: argparse.Namespace) -> int:
    from runner.emulator.server import serve_main

    return serve_main(list(args.rest))


def _rerun_policy(meta: Any) -> Any:
    """The resume policy the same command would use again: the last run's, else run's defaults."""
    from runner.config import RunConfig
    from runner.ledger import ResumePolicy

    found = meta.get("config") if isinstance(meta, dict) else None
    config = found if isinstance(found, dict) else {}
    fields = RunConfig.model_fields
    on_unknown = config.get("on_unknown", fields["on_unknown"].default)
    if on_unknown not in ("reconcile", "resubmit", "skip", "fail"):
        on_unknown = fields["on_unknown"].default
    attempts = config.get("max_attempts")
    return ResumePolicy(
        on_unknown=on_unknown,
        retry_failed=config.get("retry_failed") is True,
        max_attempts=attempts if isinstance(attempts, int) else fields["max_attempts"].default,
    )


def cmd_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from runner.ledger import JobState
    from runner.ledger.meta import read_whole_run_meta
    from runner.report.reader import read_gallery, read_report
    from runner.report.text import render_text, report_json

    if args.gallery_limit < 0:
        raise UsageError(f"--gallery-limit must be 0 or more, not {args.gallery_limit}")
    known = [s.value for s in JobState]
    if bad := [s for s in args.gallery_state if s not in known]:
        raise UsageError(f"--gallery-state {bad[0]}: not one of {', '.join(known)}")
    meta = read_whole_run_meta(args.run_dir)  # a sharded run's: every shard's invocations
    # Read a bucket of jobs at a time; superseded versions are told apart (and their spend
    # reported on its own) unless --all-versions.
    report = read_report(args.run_dir, meta, policy=_rerun_policy(meta),
                         all_versions=args.all_versions)  # fmt: skip
    print(json.dumps(report_json(report), indent=2) if args.json else render_text(report))
    if args.html:
        from runner.report.html import write_html

        cards = read_gallery(args.run_dir, limit=args.gallery_limit, states=args.gallery_state,
                             all_versions=args.all_versions)  # fmt: skip
        made = datetime.now(UTC)
        page = write_html(args.html, report, cards, run_dir=args.run_dir,
                          link_images=args.link_images, generated_at=made)  # fmt: skip
        print(f"runner: wrote {args.html}: {page.cards} jobs in the gallery "
              f"({page.omitted} left out), {page.thumbnails_made} thumbnails made, "
              f"{page.thumbnails_cached} from cache, {page.placeholders} placeholders",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK
