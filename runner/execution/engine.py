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
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import httpx
from pydantic import SecretStr

from runner import __version__
from runner.config import RunConfig
from runner.errors import LedgerError, RunnerError, UsageError
from runner.execution.budget import Spend
from runner.execution.completion import Pacing, Poller, Reader, ResultFirst, Strategy
from runner.execution.gate import AccountGate
from runner.execution.interrupts import Interrupts
from runner.execution.jobsource import JobSource, strict_check
from runner.execution.prices import price_table
from runner.execution.progress import Progress, Tally
from runner.execution.push import ChannelHealth, Streamer, WebhookWaiter
from runner.execution.ratelimit import submit_rate
from runner.execution.reconcile import Reconciler
from runner.execution.recorder import Recorder
from runner.execution.reuse import open_reuse
from runner.execution.runmeta import invocation_facts, refuse_another_key, write_run_metadata
from runner.execution.scheduler import Scheduler, prior_spend
from runner.execution.shared import Shared
from runner.execution.spend import local_spend
from runner.execution.summary import RunReport
from runner.fal.client import QueueClient
from runner.fal.history import HistoryClient
from runner.fal.retry import RetryPolicies
from runner.fal.storage import StorageClient, UploadSettings
from runner.fal.transport import open_call_transport, open_transport
from runner.ledger.commits import CommitGroup
from runner.ledger.meta import end_invocation, new_run_id
from runner.ledger.probe import probe_writable
from runner.ledger.records import read_requests_seen
from runner.ledger.resumescan import load_resume_state
from runner.ledger.resumestate import ResumeState
from runner.ledger.schema import JobRecord, JobState, utcnow
from runner.ledger.store import Ledger
from runner.media.downloads import Downloader, DownloadStage
from runner.media.inputs import InputChecker, InputProber, InputSizer
from runner.media.sink import OutputSink
from runner.media.uploads import InputResolver, UploadCache, Uploader

if TYPE_CHECKING:  # webhook mode only: its server stack (uvicorn, starlette) loads then
    from runner.fal.receiver import WebhookReceiver

# Queue calls (submit, status, result, cancel) in flight at once. 16 measured best: CPU per
# 1,000 jobs 12.1 s -> 5.4 s at 32 jobs in flight (bench/README.md, "Bottlenecks").
MAX_REQUESTS = 16
USER_AGENT = f"runner/{__version__}"


@dataclass(slots=True)
class Hooks:
    """The edges a test injects: transport, clocks, sleep, randomness, output stream."""

    transport: httpx.AsyncBaseTransport | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    rng: random.Random = field(default_factory=random.Random)
    stream: TextIO | None = None
    handle_signals: bool = True
    upload_settings: UploadSettings | None = None  # e.g. a small multipart threshold
    sink: OutputSink | None = None  # where outputs are written (a full disk, in tests)
    # The one table of retry policies; tests shrink the waits, never the rules.
    policies: RetryPolicies = field(default_factory=RetryPolicies)
    # The account gate this run admits through (shared with other shards on the key);
    # None: the run's own slots, rate, budget and pacing.
    gate: AccountGate | None = None
    # Called with the run's tally once it exists (a sharded run's one progress view).
    on_tally: Callable[[Tally], None] | None = None
    # Ctrl-C presses shared with other runs (a process's shards): watched even when
    # handle_signals is False, for the same two-step stop.
    interrupts: Interrupts | None = None
    # Shared by a process's shards (None: the run's own): one reading of the manifest,
    # one TLS context (~0.1-0.3 CPU s each to build), commit rounds over their ledgers.
    jobs: JobSource | None = None
    ssl_context: ssl.SSLContext | None = None
    commits: CommitGroup | None = None


def build_strategy(
    config: RunConfig, reader: Reader, pacing: Pacing, say: Callable[[str], None] | None = None
) -> Strategy:
    first = ResultFirst(enabled=config.first_look == "result", say=say)
    poller = Poller(reader, pacing, first)
    if config.completion == "stream":
        return Streamer(reader, poller, ChannelHealth("status stream", say=say))
    if config.completion == "webhook":
        return WebhookWaiter(poller)
    return poller


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
        records, followed = await anyio.to_thread.run_sync(_left_in_flight, config.run_dir, state)
        sizer = InputSizer(config.manifest.resolve().parent)
        budget = _budget(config, state, gate)
        stage = _download_stage(config, ledger, progress, hooks, http) if config.download else None
        reuse = open_reuse(config, stage.downloader.sink if stage is not None else None)
        if stage is not None and reuse is not None:
            stage.cache = reuse.cache
        uploader, resolver = _resolver(config, hooks, http)
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
        async with _webhooks(run, strategy, http) as receiver:
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
                    tg.start_soon(_pump, receiver, strategy)
                async with AsyncExitStack() as running:
                    if stage is not None:
                        await running.enter_async_context(stage.running())
                    async with anyio.create_task_group() as workers:
                        await run.admit(workers, shared)
                tg.cancel_scope.cancel()
        return run.report()


_LEFT_IN_FLIGHT = frozenset(
    {JobState.SUBMITTING, JobState.UNKNOWN, JobState.QUEUED, JobState.IN_PROGRESS}
)


def _left_in_flight(
    run_dir: Path, state: ResumeState
) -> tuple[dict[str, JobRecord], dict[str, frozenset[str]]]:
    """Whole records of the jobs an earlier run left in flight (few): URLs and intents; and
    the requests each of those, and each failed job a retry may send again, already
    followed: fal's history lists them under the same payload, and they are not a new
    submit's outcome."""
    keys = state.keys_in(_LEFT_IN_FLIGHT | {JobState.FAILED})
    return dict(state.records), read_requests_seen(run_dir, keys)


def _download_stage(
    config: RunConfig, ledger: Ledger, progress: Progress, hooks: Hooks, http: httpx.AsyncClient
) -> DownloadStage:
    return DownloadStage(
        Downloader(http, hooks.sink or OutputSink(config.output_target, config.run_dir),
                   policy=hooks.policies.download, clock=hooks.clock, sleep=hooks.sleep),
        ledger, concurrency=config.download_concurrency, say=progress.say,
    )  # fmt: skip


def _resolver(
    config: RunConfig, hooks: Hooks, http: httpx.AsyncClient
) -> tuple[Uploader, InputResolver]:
    assert config.key is not None
    settings = hooks.upload_settings or UploadSettings(
        ttl_s=config.upload_ttl_s, policy=hooks.policies.upload
    )
    storage = StorageClient(
        http, rest_url=config.rest_url, cdn_url=config.cdn_url, key=config.key,
        settings=settings, clock=hooks.clock, sleep=hooks.sleep,
    )  # fmt: skip
    uploader = Uploader(
        storage, UploadCache(config.run_dir / "uploads.jsonl"),
        inline_max_bytes=config.inline_max_bytes if config.inline_inputs else None,
    )  # fmt: skip
    checker = InputChecker(config.manifest.resolve().parent)
    return uploader, InputResolver(checker, uploader)


@asynccontextmanager
async def _webhooks(
    run: Scheduler, strategy: Strategy, http: httpx.AsyncClient
) -> AsyncIterator[WebhookReceiver | None]:
    """The webhook receiver in webhook mode (its own server task group), else None."""
    if not isinstance(strategy, WebhookWaiter):
        yield None
        return
    from runner.fal.jwks import JwksCache
    from runner.fal.receiver import webhook_server

    host, _, port = run.config.webhook_listen.rpartition(":")
    keys = JwksCache(http, run.config.webhook_jwks_url)
    async with webhook_server(host or "127.0.0.1", int(port or 0), keys=keys) as receiver:
        run.progress.say(f"webhook receiver listening on {receiver.local_url}")
        yield receiver


async def _pump(receiver: WebhookReceiver, waiter: WebhookWaiter) -> None:
    async with receiver.events:
        async for event in receiver.events:
            waiter.deliver(event.request_id, ok=event.status == "OK", payload=event.payload)
