"""A run: from the manifest to the ledger, with one task group owning every task.

    execute(config)
      lock the run directory, recover and fold its ledger, write run.json
      open one httpx.AsyncClient and a QueueClient over it (fal, or the embedded emulator)
      task group:
        signals   first Ctrl-C / SIGTERM stops admitting; the second cancels everything
        counter   counts jobs and estimated dollars in a thread, for the bar's total
        webhooks  (webhook mode) the receiver's verified events -> WebhookWaiter
        downloads bounded consumers fetching, verifying and recording completed outputs
        admit     runner.execution.scheduler: jobs -> resume decision -> budget -> window -> worker

Inputs: each worker resolves its job's local files (checked, uploaded once per content
hash, cached in ``uploads.jsonl``) just before recording its intent. With
``--probe-inputs`` admission first reads remote input sizes, so estimates are exact.
Outputs: a job's images are queued for download as soon as it completes; a completed job
from an earlier run whose outputs lack ``local_path`` is queued instead of skipped (unless
``--no-download``), so a rerun downloads only what is missing.

Admission (:mod:`runner.execution.scheduler`) is the only place that decides what is sent; this
module wires the edges (HTTP, ledger, strategy, uploads, downloads, webhooks) around it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from pydantic import SecretStr

from runner.config import RunConfig
from runner.errors import LedgerError, RunnerError, UsageError
from runner.execution.budget import Spend
from runner.execution.completion import Pacing, Reader
from runner.execution.gate import AccountGate
from runner.execution.hooks import MAX_REQUESTS, USER_AGENT, Hooks
from runner.execution.jobsource import strict_check
from runner.execution.prices import price_table
from runner.execution.progress import Progress, Tally
from runner.execution.push import WebhookWaiter
from runner.execution.ratelimit import submit_rate
from runner.execution.reconcile import Reconciler
from runner.execution.recorder import Recorder
from runner.execution.runmeta import invocation_facts, refuse_another_key, write_run_metadata
from runner.execution.scheduler import Scheduler, prior_spend
from runner.execution.shared import Shared
from runner.execution.spend import local_spend
from runner.execution.stages import (
    build_strategy,
    download_stage,
    input_resolver,
    left_in_flight,
    pump,
    webhooks,
)
from runner.execution.summary import RunReport
from runner.fal.client import QueueClient
from runner.fal.history import HistoryClient
from runner.fal.transport import open_call_transport, open_transport
from runner.ledger.meta import end_invocation, new_run_id
from runner.ledger.probe import probe_writable
from runner.ledger.resumescan import load_resume_state
from runner.ledger.resumestate import ResumeState
from runner.ledger.schema import utcnow
from runner.ledger.store import Ledger
from runner.media.inputs import InputProber, InputSizer

if TYPE_CHECKING:  # --cache only: the cache's modules load when a run uses one
    from runner.execution.reuse import Reuse
    from runner.media.sink import OutputSink

__all__ = ["Hooks", "embedded_emulator", "execute"]


@asynccontextmanager
async def embedded_emulator(config: RunConfig) -> AsyncIterator[RunConfig]:
    """Start the local emulator on loopback and point the config at it."""
    from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, parse_faults, serve

    settings: dict[str, Any] = {
        "key": SecretStr(DEFAULT_KEY),
        "time_scale": config.emulator_time_scale,
        "faults": parse_faults(config.emulator_faults),
    }
    if config.emulator_concurrency is not None:
        settings["concurrency"] = config.emulator_concurrency
    emulator = Emulator(EmulatorConfig(**settings))
    async with serve(emulator) as served:
        yield config.model_copy(
            update={
                "queue_url": served.base_url,
                "rest_url": served.base_url + "/rest",
                "cdn_url": served.base_url + "/cdn",
                "api_url": served.base_url + "/api",
                "key": SecretStr(DEFAULT_KEY),
                "webhook_jwks_url": served.base_url + "/rest/.well-known/jwks.json",
                "concurrency": emulator.config.concurrency,
            }
        )


async def execute(config: RunConfig, *, hooks: Hooks | None = None) -> RunReport:
    """Run the manifest to the end (or to the budget, or an interrupt)."""
    hooks = hooks or Hooks()
    if config.key is None:
        raise UsageError("FAL_KEY is not set (or use --emulator to run on the local emulator)")
    if config.strict:
        await anyio.to_thread.run_sync(strict_check, config)
    # Before anything is sent: a run that cannot keep its record or its outputs pays nothing.
    await anyio.to_thread.run_sync(partial(probe_writable, config.run_dir, what="run directory"))
    if config.download and "://" not in config.output_target:
        target = Path(config.output_target)  # object stores are probed by their first write
        await anyio.to_thread.run_sync(partial(probe_writable, target, what="output folder"))
    redact = config.redactor()  # every text the run writes or prints passes it
    started = utcnow()
    run_id = new_run_id(started, hooks.rng.getrandbits(16))
    opened = partial(Ledger.open, config.run_dir, redact=redact, run_id=run_id)
    ledger = await anyio.to_thread.run_sync(opened)
    ledger.commits = hooks.commits
    async with ledger:
        await anyio.to_thread.run_sync(refuse_another_key, config)
        write_run_metadata(config, run_id=run_id, started_at=started, redact=redact)
        # Only what a resume reads of each job, a range of keys at a time; without
        # downloads, a completed job's outputs are never read again: fold less.
        fold = partial(load_resume_state, config.run_dir, downloads=config.download)
        state = await anyio.to_thread.run_sync(fold)
        tally = Tally(redact=redact)
        if hooks.on_tally is not None:
            hooks.on_tally(tally)
        progress = Progress(
            tally, stream=hooks.stream, quiet=config.quiet, redact=redact,
            log_format=config.log_format,
        )  # fmt: skip
        ending: tuple[int | None, str] = (None, "stopped by an unexpected error")
        try:
            report = await _drive(config, ledger, state, tally, progress, hooks)
            ending = (report.exit_code, report.message)
            return report
        except BaseExceptionGroup as group:
            # A fatal error (a refused key) from one worker: raise it, not the group.
            fatal = _first_fatal(group)
            if fatal is None:
                raise
            ending = (fatal.exit_code, f"error: {fatal}")
            raise fatal from None
        except RunnerError as exc:
            ending = (exc.exit_code, f"error: {exc}")
            raise
        finally:
            progress.close()
            with anyio.CancelScope(shield=True):
                await ledger.commit()
            # The run's outcome is in the ledger already: a run.json that cannot be written
            # now loses only this line of the report, never the run's exit.
            with contextlib.suppress(OSError, LedgerError):
                end_invocation(
                    config.run_dir, run_id, invocation_facts(tally, *ending), ended_at=utcnow(),
                    redact=redact,
                )  # fmt: skip


def _reuse(config: RunConfig, sink: OutputSink | None) -> Reuse | None:
    """The run's cross-run cache (``--cache``); without one, its modules are not imported."""
    if config.cache_dir is None:
        return None
    from runner.execution.reuse import open_reuse

    return open_reuse(config, sink)


def _first_fatal(group: BaseExceptionGroup[BaseException]) -> RunnerError | None:
    for exc in group.exceptions:
        if isinstance(exc, RunnerError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_fatal(exc)
            if found is not None:
                return found
    return None


def _budget(config: RunConfig, state: ResumeState, gate: AccountGate | None) -> Spend:
    # A gate's budget is shared: each shard joins it with its own ledger's earlier spend.
    budget = (
        local_spend(config.max_cost_usd, config.max_total_cost_usd) if gate is None else gate.budget
    )
    budget.add_prior(prior_spend(state))
    return budget


async def _drive(
    config: RunConfig,
    ledger: Ledger,
    state: ResumeState,
    tally: Tally,
    progress: Progress,
    hooks: Hooks,
) -> RunReport:
    # Short calls share MAX_REQUESTS connections; each open status stream holds its own,
    # and downloads and uploads theirs.
    streams = config.in_flight_limit if config.completion == "stream" else 0
    downloads = config.download_concurrency if config.download else 0
    pool = MAX_REQUESTS + streams + downloads + 2
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    tls = hooks.ssl_context
    if tls is None and hooks.transport is None:
        # One TLS context for both transports: each built its own before, and each loads
        # the CA bundle (~0.04 CPU s; against fal both did).
        tls = await anyio.to_thread.run_sync(httpx.create_ssl_context)
    transport = hooks.transport or open_transport(config.queue_url, limits=limits, ssl_context=tls)
    policies = hooks.policies
    async with AsyncExitStack() as stack:
        # One pool for the queue's calls (straight to the transport) and the rest.
        http = await stack.enter_async_context(httpx.AsyncClient(transport=transport, timeout=30.0))
        assert config.key is not None
        # The queue's one-shot calls on the lean keep-alive transport (unless a test injects
        # one transport for everything, or a proxy is set); streams and the rest on httpx.
        calls = None if hooks.transport else open_call_transport(config.queue_url, max_idle=pool,
                                                                 ssl_context=tls)  # fmt: skip
        if calls is not None:
            stack.push_async_callback(calls.aclose)
        client = QueueClient(
            transport,
            queue_url=config.queue_url,
            key=config.key,
            max_requests=MAX_REQUESTS,
            user_agent=USER_AGENT,
            calls=calls,
        )
        reader = Reader(client, policies.read, hooks.clock, hooks.sleep)
        gate = hooks.gate
        pacing = Pacing(slots=config.concurrency) if gate is None else gate.pacing
        strategy = build_strategy(config, reader, pacing, progress.say)
        rate = gate.rate if gate is not None else submit_rate(
            config.rate_per_s, slots=config.concurrency, mean_service_s=pacing.model.job_mean_s,
            clock=hooks.clock, sleep=hooks.sleep,
        )  # fmt: skip
        history = HistoryClient(
            transport, api_url=config.api_url, key=config.key, policy=policies.history,
            clock=hooks.clock, sleep=hooks.sleep, user_agent=USER_AGENT,
        )  # fmt: skip
        fetch = partial(price_table, history, config.prices, progress.say)
        prices = await (fetch() if gate is None else gate.prices.get(fetch))
        reconciler = Reconciler(
            history, settle_s=config.reconcile_after_s, now=utcnow, sleep=hooks.sleep,
            say=progress.say,
        )  # fmt: skip
        records, followed = await anyio.to_thread.run_sync(left_in_flight, config.run_dir, state)
        sizer = InputSizer(config.manifest.resolve().parent)
        budget = _budget(config, state, gate)
        stage = download_stage(config, ledger, progress, hooks, http) if config.download else None
        reuse = _reuse(config, stage.downloader.sink if stage is not None else None)
        if stage is not None and reuse is not None:
            stage.cache = reuse.cache
        uploader, resolver = input_resolver(config, hooks, http)
        recorder = Recorder(
            ledger, budget, tally, now=utcnow, on_change=progress.refresh, say=progress.say,
            downloads=stage.put if stage is not None else None,
        )  # fmt: skip
        run = Scheduler(
            config, ledger, state, tally=tally, progress=progress, budget=budget,
            prices=prices, sizer=sizer, uploader=uploader, downloads=stage,
            prober=InputProber(http, sizer) if config.probe_inputs else None,
            records=records, followed=followed, submit_window_s=policies.submit.timeout_s,
            window=gate.slots if gate is not None else None, source=hooks.jobs,
            lost=gate.lost if gate is not None else None,
            reach=gate.reach if gate is not None else None,
        )  # fmt: skip
        shared = Shared(
            config=config, client=client, recorder=recorder, strategy=strategy, pacing=pacing,
            prices=prices, rate=rate, tally=tally, input_sizes=sizer,
            lora_bytes=sizer.lora_bytes, policies=policies,
            webhook_url=config.webhook_url, clock=hooks.clock, sleep=hooks.sleep,
            endpoint_limits={
                ep: anyio.CapacityLimiter(n) for ep, n in config.endpoint_limits.items()
            },
            on_change=progress.refresh, resolve=resolver.resolve,
            reconciler=reconciler if config.on_unknown == "reconcile" else None, now=utcnow,
            reuse=reuse,
        )  # fmt: skip
        async with webhooks(run, strategy, http) as receiver:
            if receiver is not None:
                shared.webhook_url = config.webhook_url or receiver.local_url
            async with anyio.create_task_group() as tg:
                if hooks.handle_signals or hooks.interrupts is not None:
                    tg.start_soon(run.watch_signals, tg.cancel_scope, hooks.interrupts)
                tg.start_soon(run.count)
                tg.start_soon(run.tick)
                tg.start_soon(run.watch_storage)
                if receiver is not None:
                    assert isinstance(strategy, WebhookWaiter)
                    tg.start_soon(pump, receiver, strategy)
                async with AsyncExitStack() as running:
                    if stage is not None:
                        await running.enter_async_context(stage.running())
                    async with anyio.create_task_group() as workers:
                        await run.admit(workers, shared)
                tg.cancel_scope.cancel()
        return run.report()
