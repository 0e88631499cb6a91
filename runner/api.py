"""The Python API: what the CLI does, as functions, safe to call from any thread.

    run(manifest, **options) -> RunReport         synchronous; its own event loop
    await arun(manifest, **options) -> RunReport  inside a running event loop
    plan(manifest, **options) -> Plan             jobs, images and dollars, nothing sent
    preview(manifest, ledger, **options) -> Preview   what a rerun over that run directory
                                                  would skip, re-attach, settle and send
    status(run_dir) -> StatusSummary              counts and spend of a run directory
    load_ledger(run_dir) -> pyarrow.Table         one row per job, its latest state
    (both take ``all_versions=True`` to count superseded jobs: older content of a row)

Options are the CLI's long names with underscores (the table
:data:`runner.options.table.OPTIONS`: ``max_cost="10"``, ``concurrency=8``,
``completion="stream"``, ``emulator=True``, ``ledger=Path("night.runner")``, ``set={"seed": 1}``,
``allow_endpoint=["owner/app"]``) and go through the very parser the CLI uses, so they mean
exactly what the flags mean and fail with the same messages (as :class:`UsageError`). The key
is ``key=`` or ``FAL_KEY`` in the environment.

Signal handlers are installed only on the main thread: called from a worker thread (Airflow,
Dagster, Prefect tasks), a run never touches the process's signals, and Ctrl-C is the host's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa

from runner.cli import build_parser, stream_jobs
from runner.config import key_from_env
from runner.endpoints.cost import PriceTable
from runner.errors import UsageError
from runner.execution.engine import Hooks, embedded_emulator, execute
from runner.execution.preview import Preview
from runner.execution.preview import preview as run_preview
from runner.execution.prices import plan_prices
from runner.execution.summary import RunReport
from runner.ledger.fold import read_folded
from runner.ledger.resume import ResumePolicy
from runner.ledger.state import LedgerState
from runner.ledger.versions import split_versions
from runner.ledger.views import StatusSummary, status_summary
from runner.manifest.plan import Plan, build_plan
from runner.media.inputs import InputSizer
from runner.options import manifest_config, run_config
from runner.options.table import BY_NAME


def _argv(command: str, manifest: Path | str, options: Mapping[str, Any]) -> list[str]:
    argv = [command, str(manifest)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        option = BY_NAME.get(flag[2:])
        if value is None:
            continue
        if option is not None and option.kind == "bool" and isinstance(value, bool):
            argv.append(option.flag_for(value))  # False is --no-X: it overrides a TOML true
        elif value is False:
            continue
        elif value is True:
            argv.append(flag)
        elif isinstance(value, Mapping):
            argv += [part for k, v in value.items() for part in (flag, f"{k}={v}")]
        elif isinstance(value, list | tuple | set | frozenset):
            argv += [part for v in value for part in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def _parse(command: str, manifest: Path | str, options: Mapping[str, Any]) -> argparse.Namespace:
    """The CLI's own parser over the options; its complaints become a UsageError."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(_argv(command, manifest, options))
    except SystemExit:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else "bad options"
        raise UsageError(reason) from None


def _environ(key: str | None) -> Mapping[str, str]:
    return {**os.environ, "FAL_KEY": key} if key is not None else os.environ


async def arun(manifest: Path | str, *, key: str | None = None, **options: Any) -> RunReport:
    """Run a manifest to the end (or the budget), in the running event loop."""
    args = _parse("run", manifest, options)
    config = run_config(args, _environ(key))
    on_main = threading.current_thread() is threading.main_thread()
    hooks = Hooks(handle_signals=on_main)
    if config.emulator:
        async with embedded_emulator(config) as local:
            return await execute(local, hooks=hooks)
    return await execute(config, hooks=hooks)


def run(manifest: Path | str, *, key: str | None = None, **options: Any) -> RunReport:
    """Run a manifest to the end, synchronously; safe from any thread."""

    async def go() -> RunReport:
        return await arun(manifest, key=key, **options)

    return anyio.run(go)


def plan(manifest: Path | str, *, key: str | None = None, **options: Any) -> Plan:
    """What a run would cost and send, per endpoint; nothing is sent.

    With a run directory (``ledger=``) the question is another one, what a rerun would do:
    that is :func:`preview`, and ``plan`` refuses it rather than answer the first question.
    """
    if options.get("ledger") is not None:
        raise UsageError("plan(ledger=...) is preview(manifest, ledger): what a rerun would do")
    config = manifest_config(_parse("plan", manifest, options))
    table = _prices(config.api_url, config.prices, key)
    _warnings, items = stream_jobs(config)
    sizer = InputSizer(Path(manifest).resolve().parent)
    return build_plan(items, table, input_sizes=sizer, lora_bytes=sizer.lora_bytes)


def preview(
    manifest: Path | str, ledger: Path | str, *, key: str | None = None, **options: Any
) -> Preview:
    """What a rerun over ``ledger`` (a run directory) would do, job by job; nothing is sent.

    The same decisions and dollars as ``runner plan MANIFEST --ledger DIR``: new, changed,
    done, retry, re-attach, reconcile, resubmit, left, invalid (``Preview.as_json()``).
    """
    args = _parse("plan", manifest, {**options, "ledger": Path(ledger)})
    config = manifest_config(args)
    table = _prices(config.api_url, config.prices, key)
    _warnings, items = stream_jobs(config)
    sizer = InputSizer(Path(manifest).resolve().parent)
    run_dir = Path(ledger)
    state = LedgerState.load(run_dir) if run_dir.exists() else LedgerState.empty()
    policy = ResumePolicy(on_unknown=config.on_unknown, retry_failed=config.retry_failed)
    return run_preview(items, state, table, policy, input_sizes=sizer, lora_bytes=sizer.lora_bytes)


def _prices(api_url: str, prices: Any, key: str | None) -> PriceTable:
    async def fetch() -> PriceTable:
        found = key_from_env(_environ(key))
        return await plan_prices(api_url, found, prices, lambda _message: None)

    return anyio.run(fetch)


def status(run_dir: Path | str, *, all_versions: bool = False) -> StatusSummary:
    """Counts by state and endpoint, and the spend so far; works while a run writes.

    Superseded jobs (older content of a row recorded again) are counted apart
    (``superseded``, ``superseded_billed_usd``) unless ``all_versions``.
    """
    return status_summary(run_dir, all_versions=all_versions)


def load_ledger(run_dir: Path | str, *, all_versions: bool = False) -> pa.Table:
    """One row per job: its latest state, every column of the ledger, and ``superseded``.

    Superseded jobs are left out unless ``all_versions`` (then ``superseded`` marks them).
    """
    return split_versions(read_folded(Path(run_dir)).jobs, all_versions=all_versions).shown
