"""A run: from the manifest to the ledger, with one task group owning every task.

    execute(config)
      lock the run directory, recover and fold its ledger, write run.json
      open one httpx.AsyncClient and a QueueClient over it (fal, or the embedded emulator)
      task group:
        signals   first Ctrl-C / SIGTERM stops admitting; the second cancels everything
        counter   counts jobs and estimated dollars in a thread, for the bar's total
        webhooks  (webhook mode) the receiver's verified events -> WebhookWaiter
        downloads bounded consumers fetching, verifying and recording completed outputs
        admit     stream jobs -> resume decision -> budget -> in-flight window -> worker

Inputs: each worker resolves its job's local files (checked, uploaded once per content
hash, cached in ``uploads.jsonl``) just before recording its intent. With
``--probe-inputs`` admission first reads remote input sizes, so estimates are exact.
Outputs: a job's images are queued for download as soon as it completes; a completed job
from an earlier run whose outputs lack ``local_path`` is queued instead of skipped (unless
``--no-download``), so a rerun downloads only what is missing.

Admission is the only place that decides what is sent: at most ``in_flight_limit`` jobs
are submitted but unfinished, the submit rate follows a token bucket that halves on 429s,
and ``--max-cost`` is checked before every new submit.
"""

from __future__ import annotations

import hashlib
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx
import pyarrow.compute as pc
from pydantic import SecretStr

from runner import __version__
from runner.budget import Budget
from runner.client import QueueClient
from runner.completion import Pacing, Poller, Reader, Strategy, Streamer, WebhookWaiter
from runner.config import RunConfig
from runner.cost import Estimate, PriceTable
from runner.downloads import Downloader, DownloadStage, OutputSink, pending_downloads
from runner.errors import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    ManifestError,
    RowError,
    RunnerError,
    UsageError,
)
from runner.inputs import InputChecker, InputProber, InputSizer
from runner.jobs import ExpandOptions, Job, iter_jobs
from runner.jwks import JwksCache
from runner.ledger.fold import LedgerState
from runner.ledger.resume import Action, ResumePolicy, decide
from runner.ledger.schema import JobState, LedgerEvent
from runner.ledger.store import Ledger, write_run_meta
from runner.manifest import read_rows
from runner.plan import job_estimate
from runner.progress import Progress, Tally
from runner.ratelimit import AdaptiveRate
from runner.receiver import WebhookReceiver, webhook_server
from runner.retry import RetryPolicy
from runner.uploads import InputResolver, StorageClient, UploadCache, Uploader, UploadSettings
from runner.worker import Shared, Ticket, run_job, utcnow

BATCH = 256


@dataclass(slots=True)
class RunReport:
    """What a finished (or stopped) run says about itself."""

    tally: Tally
    exit_code: int
    message: str
    run_dir: Path
    duplicates_possible: int = 0
    lines: list[str] = field(default_factory=list)


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
    download_policy: RetryPolicy | None = None
    # The one retry policy per kind of call; tests shrink the waits, never the rules.
    submit_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=8))
    read_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(timeout_s=300.0))


def manifest_fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    stat = path.stat()
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": stat.st_size}


def write_run_metadata(config: RunConfig) -> None:
    write_run_meta(
        config.run_dir,
        {
            "runner_version": __version__,
            "manifest": manifest_fingerprint(config.manifest),
            "config": config.public_dict(),
        },
    )


def expand_options(config: RunConfig) -> ExpandOptions:
    return ExpandOptions(
        manifest_dir=config.manifest.resolve().parent,
        default_endpoint=config.default_endpoint,
        allowed_endpoints=frozenset(config.allowed_endpoints),
        defaults=dict(config.defaults),
        prompt_template=config.prompt_template,
    )


def job_stream(config: RunConfig) -> Iterator[Job | RowError]:
    return iter_jobs(read_rows(config.manifest, fmt=config.fmt), expand_options(config))


def strict_check(config: RunConfig) -> None:
    """``--strict``: refuse the whole manifest if any row is bad, before sending anything."""
    bad: list[str] = []
    count = 0
    for item in job_stream(config):
        if isinstance(item, RowError):
            count += 1
            if len(bad) < 5:
                bad.extend(str(p) for p in item.problems[:1])
    if count:
        more = f" (and {count - len(bad)} more)" if count > len(bad) else ""
        raise ManifestError(
            f"--strict: {count} bad rows, nothing was submitted: " + "; ".join(bad) + more
        )


def invalid_event(error: RowError, now: Any) -> LedgerEvent:
    first = error.problems[0]
    identity = f"{first.file}\0{first.row_id or first.line}"
    key = "invalid-" + hashlib.sha256(identity.encode()).hexdigest()[:24]
    return LedgerEvent(
        job_key=key,
        state=JobState.INVALID,
        at=now,
        row_id=first.row_id,
        line=first.line,
        source=first.file,
        error_type="invalid_row",
        error_message="; ".join(p.message for p in error.problems)[:2000],
        retryable=False,
    )


def prior_spend(state: LedgerState) -> Decimal:
    if len(state) == 0:
        return Decimal(0)
    total = pc.sum(state.jobs["billed_usd"]).as_py()
    return Decimal(0) if total is None else Decimal(total)


class Run:
    """One execution of a manifest against a queue; see the module docstring."""

    def __init__(self, config: RunConfig, hooks: Hooks, ledger: Ledger, state: LedgerState):
        self.config = config
        self.hooks = hooks
        self.ledger = ledger
        self.state = state
        self.prices = PriceTable.from_file(config.prices) if config.prices else PriceTable.default()
        self.sizer = InputSizer(config.manifest.resolve().parent)
        self.tally = Tally()
        self.budget = Budget(config.max_cost_usd)
        self.budget.add_prior(prior_spend(state))
        self.policy = ResumePolicy(
            on_unknown=config.on_unknown,
            retry_failed=config.retry_failed,
            max_attempts=config.max_attempts,
        )
        self.stop_admitting = anyio.Event()
        self.interrupted = False
        self.window = anyio.Semaphore(config.in_flight_limit)
        self.progress = Progress(self.tally, stream=hooks.stream, quiet=config.quiet)
        self.possible_duplicates = 0
        self.checker = InputChecker(config.manifest.resolve().parent)
        self.prober: InputProber | None = None
        self.uploader: Uploader | None = None
        self.downloads: DownloadStage | None = None
        # Completed earlier but not (fully) downloaded: fetched again instead of skipped.
        self.pending = pending_downloads(state.jobs) if config.download else {}

    def estimate(self, job: Job) -> Estimate:
        return job_estimate(job, self.prices, self.sizer, self.sizer.lora_bytes)

    async def count(self) -> None:
        """The manifest's job count and estimated dollars, for the bar (in a thread)."""

        def tally_all() -> tuple[int, Decimal]:
            jobs, usd = 0, Decimal(0)
            sizer = InputSizer(self.config.manifest.resolve().parent)
            for item in job_stream(self.config):
                if isinstance(item, Job):
                    jobs += 1
                    est = job_estimate(item, self.prices, sizer, sizer.lora_bytes)
                    usd += est.usd or Decimal(0)
                else:
                    jobs += 1
            return jobs, usd

        total, usd = await anyio.to_thread.run_sync(tally_all, abandon_on_cancel=True)
        self.tally.total, self.tally.estimate_usd = total, usd
        self.progress.refresh()

    async def admit(self, tg: anyio.abc.TaskGroup, shared: Shared) -> None:
        """Stream the manifest and start a worker for every job that should run now."""
        stream = job_stream(self.config)
        while not self.stop_admitting.is_set():
            batch = await anyio.to_thread.run_sync(lambda: list(islice(stream, BATCH)))
            if not batch:
                return
            for item in batch:
                if self.stop_admitting.is_set():
                    return
                if not await self._admit_one(item, tg, shared):
                    return

    async def _admit_one(self, item: Job | RowError, tg: anyio.abc.TaskGroup, s: Shared) -> bool:
        if isinstance(item, RowError):
            self.ledger.append(invalid_event(item, utcnow()))
            self.tally.invalid += 1
            return True
        decision = decide(self.state.brief(item.job_key), self.policy)
        if decision.action is Action.SKIP:
            self.tally.skipped += 1
            missing = self.pending.pop(item.job_key, None)
            if missing is not None and self.downloads is not None:
                await self.downloads.put(missing)
            return True
        if decision.action is Action.FAIL:
            self.ledger.append(
                LedgerEvent(
                    job_key=item.job_key, state=JobState.FAILED, at=utcnow(),
                    error_type="unknown_outcome", retryable=False,
                    error_message="earlier submit outcome unknown; --on-unknown fail",
                )
            )  # fmt: skip
            self.tally.failed += 1
            return True
        if self.prober is not None:
            await self.prober.probe(item)
        est = self.estimate(item)
        reattach = None
        if decision.action is Action.REATTACH:
            assert decision.request_id is not None
            reattach = s.client.urls_for(item.endpoint, decision.request_id)
            self.budget.reserve_committed(est.usd)
        elif not self.budget.admit(est.usd):
            self.progress.say(f"budget reached: {self.budget.reason}; finishing jobs in flight")
            self.stop_admitting.set()
            return False
        if decision.possible_duplicate:
            self.possible_duplicates += 1
        ticket = Ticket(item, est, attempt=max(decision.attempt, 1), reattach=reattach)
        await self.window.acquire()
        self.tally.in_flight += 1
        tg.start_soon(self._work, ticket, s)
        return True

    async def _work(self, ticket: Ticket, s: Shared) -> None:
        try:
            await run_job(ticket, s)
        finally:
            self.tally.in_flight -= 1
            self.window.release()
            self.progress.refresh()

    async def watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if not self.stop_admitting.is_set() or not self.interrupted:
                    self.interrupted = True
                    self.stop_admitting.set()
                    self.progress.say(
                        f"interrupted: no new jobs; waiting for {self.tally.in_flight} in flight "
                        "(press Ctrl-C again to exit now; they will be re-attached next run)"
                    )
                    continue
                self.progress.say("exiting now; in-flight jobs stay recorded with request ids")
                scope.cancel()
                return

    async def tick(self) -> None:
        while True:
            await anyio.sleep(0.5)
            self.progress.refresh()

    def report(self) -> RunReport:
        t = self.tally
        if self.interrupted:
            code, message = EXIT_INTERRUPTED, "interrupted; rerun the same command to resume"
        elif self.budget.exhausted:
            code, message = EXIT_BUDGET, f"stopped at the budget: {self.budget.reason}"
        elif t.failed or t.invalid or t.unknown or t.detached:
            code, message = EXIT_JOBS_FAILED, "some jobs did not complete"
        elif self.downloads is not None and self.downloads.counts.jobs_failed:
            code = EXIT_JOBS_FAILED
            message = "some outputs were not downloaded; rerun to fetch only those"
        else:
            code, message = EXIT_OK, "all jobs completed"
        return RunReport(
            t, code, message, self.config.run_dir, self.possible_duplicates, self.lines()
        )

    def lines(self) -> list[str]:
        """Upload and download figures for the summary."""
        parts = [self.uploader.summary() if self.uploader else None]
        parts.append(self.downloads.summary() if self.downloads else None)
        return [p for p in parts if p]


def build_strategy(config: RunConfig, reader: Reader, pacing: Pacing) -> Strategy:
    poller = Poller(reader, pacing)
    if config.completion == "stream":
        return Streamer(reader)
    if config.completion == "webhook":
        return WebhookWaiter(poller)
    return poller


@asynccontextmanager
async def embedded_emulator(config: RunConfig) -> AsyncIterator[RunConfig]:
    """Start the local emulator on loopback and point the config at it."""
    from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, serve

    emulator = Emulator(EmulatorConfig(key=SecretStr(DEFAULT_KEY)))
    async with serve(emulator) as served:
        yield config.model_copy(
            update={
                "queue_url": served.base_url,
                "rest_url": served.base_url + "/rest",
                "cdn_url": served.base_url + "/cdn",
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
    config.run_dir.mkdir(parents=True, exist_ok=True)
    ledger = await anyio.to_thread.run_sync(Ledger.open, config.run_dir)
    async with ledger:
        write_run_metadata(config)
        state = await anyio.to_thread.run_sync(ledger.state)
        run = Run(config, hooks, ledger, state)
        try:
            await _drive(run)
        except BaseExceptionGroup as group:
            # A fatal error (a refused key) from one worker: raise it, not the group.
            fatal = _first_fatal(group)
            if fatal is None:
                raise
            raise fatal from None
        finally:
            run.progress.close()
            await ledger.commit()
        return run.report()


def _first_fatal(group: BaseExceptionGroup[BaseException]) -> RunnerError | None:
    for exc in group.exceptions:
        if isinstance(exc, RunnerError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_fatal(exc)
            if found is not None:
                return found
    return None


async def _drive(run: Run) -> None:
    config, hooks = run.config, run.hooks
    limits = httpx.Limits(max_connections=max(64, config.in_flight_limit * 2))
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=hooks.transport, limits=limits, timeout=30.0)
        )
        assert config.key is not None
        client = QueueClient(http, queue_url=config.queue_url, key=config.key)
        reader = Reader(client, hooks.read_policy, hooks.clock, hooks.sleep)
        pacing = Pacing(slots=config.concurrency)
        strategy = build_strategy(config, reader, pacing)
        rate = AdaptiveRate(
            config.rate_per_s,
            burst=max(1.0, config.rate_per_s),
            clock=hooks.clock,
            sleep=hooks.sleep,
        )
        limits_by_endpoint = {
            ep: anyio.CapacityLimiter(n) for ep, n in config.endpoint_limits.items()
        }
        resolver = _resolver(run, http)
        if config.probe_inputs:
            run.prober = InputProber(http, run.sizer)
        if config.download:
            run.downloads = _download_stage(run, http)
        shared = Shared(
            config=config, submit_policy=hooks.submit_policy, read_policy=hooks.read_policy,
            client=client, ledger=run.ledger, strategy=strategy, pacing=pacing,
            prices=run.prices, rate=rate, tally=run.tally, budget=run.budget,
            input_sizes=run.sizer, webhook_url=config.webhook_url, clock=hooks.clock,
            sleep=hooks.sleep, endpoint_limits=limits_by_endpoint,
            on_change=run.progress.refresh, say=run.progress.say, resolve=resolver.resolve,
            downloads=run.downloads.put if run.downloads else None,
        )  # fmt: skip
        async with _webhooks(run, strategy, http) as receiver:
            if receiver is not None:
                shared.webhook_url = config.webhook_url or receiver.local_url
            async with anyio.create_task_group() as tg:
                if hooks.handle_signals:
                    tg.start_soon(run.watch_signals, tg.cancel_scope)
                tg.start_soon(run.count)
                tg.start_soon(run.tick)
                if receiver is not None:
                    assert isinstance(strategy, WebhookWaiter)
                    tg.start_soon(_pump, receiver, strategy)
                async with AsyncExitStack() as stage:
                    if run.downloads is not None:
                        await stage.enter_async_context(run.downloads.running())
                    async with anyio.create_task_group() as workers:
                        await run.admit(workers, shared)
                tg.cancel_scope.cancel()


def _download_stage(run: Run, http: httpx.AsyncClient) -> DownloadStage:
    config, hooks = run.config, run.hooks
    return DownloadStage(
        Downloader(http, OutputSink(config.output_target, config.run_dir),
                   policy=hooks.download_policy, clock=hooks.clock, sleep=hooks.sleep),
        run.ledger, concurrency=config.download_concurrency, say=run.progress.say,
    )  # fmt: skip


def _resolver(run: Run, http: httpx.AsyncClient) -> InputResolver:
    config, hooks = run.config, run.hooks
    assert config.key is not None
    settings = hooks.upload_settings or UploadSettings(ttl_s=config.upload_ttl_s)
    storage = StorageClient(
        http, rest_url=config.rest_url, cdn_url=config.cdn_url, key=config.key,
        settings=settings, clock=hooks.clock, sleep=hooks.sleep,
    )  # fmt: skip
    run.uploader = Uploader(
        storage, UploadCache(config.run_dir / "uploads.jsonl"),
        inline_max_bytes=config.inline_max_bytes if config.inline_inputs else None,
    )  # fmt: skip
    return InputResolver(run.checker, run.uploader)


@asynccontextmanager
async def _webhooks(
    run: Run, strategy: Strategy, http: httpx.AsyncClient
) -> AsyncIterator[WebhookReceiver | None]:
    """The webhook receiver in webhook mode (its own server task group), else None."""
    if not isinstance(strategy, WebhookWaiter):
        yield None
        return
    host, _, port = run.config.webhook_listen.rpartition(":")
    keys = JwksCache(http, run.config.webhook_jwks_url)
    async with webhook_server(host or "127.0.0.1", int(port or 0), keys=keys) as receiver:
        run.progress.say(f"webhook receiver listening on {receiver.local_url}")
        yield receiver


async def _pump(receiver: WebhookReceiver, waiter: WebhookWaiter) -> None:
    async with receiver.events:
        async for event in receiver.events:
            waiter.deliver(event.request_id, ok=event.status == "OK", payload=event.payload)


def print_summary(report: RunReport, out: TextIO = sys.stderr) -> None:
    t = report.tally
    rows = [
        ("completed", t.completed),
        ("skipped (done before)", t.skipped),
        ("failed", t.failed),
        ("invalid rows", t.invalid),
        ("unknown outcome", t.unknown),
        ("lost contact (re-attach next run)", t.detached),
        ("retries", t.retries),
    ]
    width = max(len(name) for name, _ in rows)
    print("", file=out)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}", file=out)
    print(f"  {'spent'.ljust(width)}  ${t.spent_usd:.3f}", file=out)
    if report.duplicates_possible:
        print(
            f"  {'possible duplicate spend'.ljust(width)}  {report.duplicates_possible} jobs "
            "resubmitted after an unknown outcome",
            file=out,
        )
    for line in report.lines:
        print(f"  {line}", file=out)
    print(f"runner: {report.message} (ledger: {report.run_dir})", file=out)
