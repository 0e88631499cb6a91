"""Admission: the one place that decides what is sent, when, and under which limits.

    admit()   stream jobs -> resume decision (ledger) -> budget -> in-flight window -> worker

At most ``in_flight_limit`` jobs are submitted but unfinished; ``--max-cost`` is checked
before every new submit; bad rows become ``invalid`` records; completed jobs whose outputs
were not downloaded are queued for download instead of skipped. The first Ctrl-C stops
admitting; the second cancels everything (in-flight jobs stay recorded with request ids).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal

import anyio
import anyio.abc
import pyarrow.compute as pc

from runner.config import RunConfig
from runner.endpoints.cost import Estimate, PriceTable
from runner.errors import RowError
from runner.execution.budget import Spend
from runner.execution.gate import LostSlots, Slots
from runner.execution.interrupts import FIRST, SECOND, Interrupts, two_steps
from runner.execution.jobsource import JobSource, ManifestSource, Pricer
from runner.execution.outcome import Lost, Reach
from runner.execution.progress import Progress, Tally
from runner.execution.reconcile import Intent
from runner.execution.recorder import Ticket, invalid_event
from runner.execution.shared import Shared, Unsent
from runner.execution.summary import Ending, RunReport, verdict
from runner.execution.worker import run_job
from runner.fal.client import RequestRef
from runner.fal.protocol import RequestUrls
from runner.ledger.resume import Action, ResumePolicy, decide
from runner.ledger.resumestate import ResumeState
from runner.ledger.schema import JobRecord, JobState, LedgerEvent, utcnow
from runner.ledger.state import LedgerState
from runner.ledger.store import Ledger
from runner.manifest.jobs import Job
from runner.manifest.plan import job_estimate
from runner.media.downloads import DownloadItem, DownloadStage
from runner.media.inputs import InputProber, InputSizer
from runner.media.pending import pending_for
from runner.media.uploads import Uploader


def prior_spend(state: LedgerState | ResumeState) -> Decimal:
    """What earlier runs spent: each job's latest billed attempt plus its paid re-rolls."""
    if isinstance(state, ResumeState):
        return state.spent
    if len(state) == 0:
        return Decimal(0)
    total = Decimal(pc.sum(state.jobs["billed_usd"]).as_py() or 0)
    if "reroll_usd" in state.jobs.column_names:
        total += Decimal(pc.sum(state.jobs["reroll_usd"]).as_py() or 0)
    return total


class Scheduler:
    """Admission for one run: what to send, when, and under which limits.

    Built with its collaborators (the engine assembles them); it owns the in-flight
    window. A job holds its slot until it reaches an end state; a job we lost contact
    with holds it until the run ends, so lost contact never widens the window. When
    every slot is held by lost jobs, admission stops and says why.
    """

    def __init__(
        self,
        config: RunConfig,
        ledger: Ledger,
        state: LedgerState | ResumeState,
        *,
        tally: Tally,
        progress: Progress,
        budget: Spend,
        prices: PriceTable,
        sizer: InputSizer,
        prober: InputProber | None = None,
        uploader: Uploader | None = None,
        downloads: DownloadStage | None = None,
        records: Mapping[str, JobRecord] | None = None,
        followed: Mapping[str, frozenset[str]] | None = None,
        submit_window_s: float = 300.0,
        window: Slots | None = None,
        source: JobSource | None = None,
        lost: LostSlots | None = None,
        reach: Reach | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.state = state
        self.tally = tally
        self.progress = progress
        self.budget = budget
        self.prices = prices
        self.sizer = sizer
        self.prober = prober
        self.uploader = uploader
        self.downloads = downloads
        # Whole records of the jobs an earlier run left in flight: their acknowledged URLs
        # (re-attach) and intents (reconcile). ``submit_window_s``: how long before its
        # unknown outcome a submit's retries may have begun.
        self.records = records or {}
        self.followed = followed or {}
        self.submit_window = timedelta(seconds=submit_window_s)
        self.policy = ResumePolicy(
            on_unknown=config.on_unknown,
            retry_failed=config.retry_failed,
            max_attempts=config.max_attempts,
        )
        self.stop_admitting = anyio.Event()
        # After the budget is reached: only the jobs earlier runs left in flight (not seen
        # in the manifest yet) are admitted, each costing nothing new.
        self.settling = False
        self._unsettled = set(self.records)
        self.stopped_reason: str | None = None
        self.interrupted = False
        # The key's in-flight slots: this run's own, or an account gate's shared ones.
        self.window: Slots = window or anyio.Semaphore(config.in_flight_limit)
        # Its jobs: the manifest read here, or a sharded run's one reading of it.
        self.source: JobSource = source or ManifestSource(config)
        self._acquiring: anyio.CancelScope | None = None
        self._unsent: Unsent | None = None  # the workers' jobs that have sent nothing yet
        # The window's slots held by lost jobs: this run's, or every shard's on the key.
        self.lost = lost or LostSlots(config.in_flight_limit)
        # Every slot's job in a row (the key's shards') unable to reach the queue: an outage.
        self.reach = reach or Reach(max(config.in_flight_limit, 4))
        # Completed earlier but not (fully) downloaded: fetched again instead of skipped.
        self.pending = pending_for(state) if config.download else None

    def estimate(self, job: Job) -> Estimate:
        return job_estimate(job, self.prices, self.sizer, self.sizer.lora_bytes)

    def stop(self, reason: str | None = None) -> None:
        """No new jobs from now on; a wait for a slot ends at once."""
        if reason is not None and self.stopped_reason is None:
            self.stopped_reason = reason
        self.stop_admitting.set()
        if self._acquiring is not None:
            self._acquiring.cancel()

    async def count(self) -> None:
        """The manifest's job count and estimated dollars, for the bar."""
        pricer = Pricer(self.prices, InputSizer(self.config.manifest.resolve().parent))
        total, usd = await self.source.count(pricer)
        self.tally.total, self.tally.estimate_usd = total, usd
        self.progress.refresh()

    async def admit(self, tg: anyio.abc.TaskGroup, shared: Shared) -> None:
        """Read the jobs and start a worker for every job that should run now."""
        self._unsent = shared.unsent
        unwatch = self.lost.watch(self.stop)  # lost jobs filling the key's window stop us
        try:
            while not self.stop_admitting.is_set():
                batch = await self.source.next_batch()
                if not batch:
                    return
                for item in batch:
                    if self.stop_admitting.is_set():
                        return
                    if self.settling and not self._unsettled:
                        return
                    if self.settling and not self._left_unsettled(item):
                        continue
                    if not await self._admit_one(item, tg, shared):
                        return
        finally:
            if self.settling:
                self.stop()
            unwatch()
            self.source.close()

    def _left_unsettled(self, item: Job | RowError) -> bool:
        return isinstance(item, Job) and item.job_key in self._unsettled

    def _budget_reached(self) -> bool:
        """No new spend from now on. Admission goes on, spending nothing new, only for the
        jobs earlier runs left in flight: re-attached, or settled from fal's history."""
        if not self.settling:
            self.settling = True
            n = len(self._unsettled)
            left = f" and the {n} left in flight by earlier runs" if n else ""
            self.progress.say(
                f"budget reached: {self.budget.reason}; finishing jobs in flight{left}"
            )
        return True

    def _storage_stop(self) -> bool:
        """Stop paying for outputs the local disk cannot keep."""
        problem = self.downloads.storage_problem if self.downloads is not None else None
        if problem is None:
            return False
        if not self.stop_admitting.is_set():
            self.progress.say(f"stopping admission: outputs cannot be saved: {problem}")
        self.stop(f"outputs cannot be saved ({problem}); nothing more was submitted")
        return True

    async def watch_storage(self) -> None:
        """Stop admission as soon as the download stage finds the disk full or read-only."""
        if self.downloads is None:
            return
        await self.downloads.storage_failed.wait()
        self._storage_stop()

    async def _admit_one(self, item: Job | RowError, tg: anyio.abc.TaskGroup, s: Shared) -> bool:
        if isinstance(item, RowError):
            self.ledger.append(invalid_event(item, utcnow()))
            self.tally.bad_row([str(p) for p in item.problems])
            return True
        self._unsettled.discard(item.job_key)
        decision = decide(self.state.brief(item.job_key), self.policy)
        if decision.action is Action.SKIP:
            self._skipped(item, decision.reason)
            missing = await self._pending_item(item.job_key)
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
            self.tally.fail("unknown_outcome", f"{item.row_id}: --on-unknown fail")
            return True
        if self._storage_stop():
            return False
        if self.prober is not None:
            await self.prober.probe(item)
        est = self.estimate(item)
        reattach, reconcile, settle_only = None, None, False
        if decision.action is Action.REATTACH:
            assert decision.request_id is not None
            reattach = self._where(item, decision.request_id, s)
            self.budget.reserve_committed(est.usd)
        elif decision.action is Action.RECONCILE:
            reconcile = self._intent(item)
            if self.settling or not await self.budget.admit(est.usd):
                # Found in fal's history, it was accepted (and billed) already: followed.
                settle_only = self._budget_reached()
                self.budget.reserve_committed(est.usd)
        elif self.settling or not await self.budget.admit(est.usd):
            return self._budget_reached()
        if decision.possible_duplicate:
            self.tally.possible_duplicates += 1
            self.tally.possible_duplicate_usd += est.usd or Decimal(0)
        ticket = Ticket(
            item, est, attempt=max(decision.attempt, 1), reattach=reattach,
            possible_duplicate=decision.possible_duplicate, reconcile=reconcile,
            followed=self.followed.get(item.job_key, frozenset()), settle_only=settle_only,
        )  # fmt: skip
        if not await self._take_slot() or self._unreachable():
            # Reserved, never sent.
            self.budget.settle(est.usd, Decimal(0), reattached=ticket.earlier)
            return False
        self.tally.in_flight += 1
        tg.start_soon(self._work, ticket, s)
        return True

    def _unreachable(self) -> bool:
        """Another shard on the key found fal's queue unreachable: the slot taken goes back."""
        if (reason := self.reach.tripped) is not None:
            self.window.release()
            self.stop(reason)
        return reason is not None

    async def _pending_item(self, job_key: str) -> DownloadItem | None:
        """What the job still has to download (its chunk read in a thread when not held)."""
        pending = self.pending
        if pending is not None and pending.must_read(job_key):
            return await anyio.to_thread.run_sync(pending.pop, job_key)
        return pending.pop(job_key) if pending is not None else None

    def _where(self, item: Job, request_id: str, s: Shared) -> RequestRef:
        """Where an earlier run's request lives: the URLs its acknowledgement gave, verbatim,
        or (a ledger from before they were kept) the ones fal's protocol builds."""
        record = self.records.get(item.job_key)
        if record is not None and record.status_url and record.response_url:
            return RequestUrls(
                request_id=request_id, status_url=record.status_url,
                response_url=record.response_url,
                cancel_url=record.cancel_url or record.response_url + "/cancel",
            )  # fmt: skip
        return s.client.urls_for(item.endpoint, request_id)

    def _intent(self, item: Job) -> Intent:
        """What fal's history is searched for: the payload's fingerprint, around the time."""
        record = self.records.get(item.job_key)
        last = record.at if record is not None else utcnow()
        sha = record.payload_sha256 if record is not None else None
        followed = self.followed.get(item.job_key, frozenset())
        return Intent(item.endpoint, last - self.submit_window, last, sha or "", followed)

    def _skipped(self, item: Job, reason: str) -> None:
        record = self.state.brief(item.job_key)
        if record is not None and record.state is JobState.COMPLETED:
            self.tally.skipped += 1
            return
        # Left as an earlier run ended it, not retried now: the manifest is not complete.
        self.tally.left += 1
        state = record.state.value if record is not None else "?"
        self.tally.note(f"left_{state}", f"{item.row_id}: {reason}")

    async def _take_slot(self) -> bool:
        with anyio.CancelScope() as scope:
            self._acquiring = scope
            if self.stop_admitting.is_set():
                scope.cancel()
            await self.window.acquire()
        self._acquiring = None
        return not scope.cancelled_caught

    async def _work(self, ticket: Ticket, s: Shared) -> None:
        outcome = None
        try:
            outcome = await run_job(ticket, s)
        finally:
            self.tally.in_flight -= 1
            if (unreachable := self.reach.saw(outcome)) is not None:
                if not self.stop_admitting.is_set():
                    self.progress.say(f"stopping admission: {unreachable}")
                self.stop(unreachable)
            if isinstance(outcome, Lost):
                # Lost contact is not an end state: the slot stays taken until the run ends.
                self.lost.add()
                if self.lost.count >= self.lost.limit:
                    self.stop(self.lost.reason)
            else:
                self.window.release()
            self.progress.refresh()

    async def watch_signals(
        self, scope: anyio.CancelScope, interrupts: Interrupts | None = None
    ) -> None:
        """The first Ctrl-C (or press of ``interrupts``) stops admitting, the second cancels."""
        announce = interrupts is None or interrupts.announce
        say = self.progress.say if announce else lambda _message: None

        def first() -> None:
            self.interrupted = True
            self.stop()
            if self._unsent is not None:
                self._unsent.abandon()  # uploads and rate waits: nothing sent yet
            say(FIRST.format(in_flight=self.tally.in_flight))

        def second() -> None:
            say(SECOND)
            scope.cancel()

        await two_steps(interrupts, first=first, second=second)

    async def tick(self) -> None:
        while True:
            await anyio.sleep(0.5)
            self.progress.refresh()

    def report(self) -> RunReport:
        t = self.tally
        downloads_failed = self.downloads.counts.jobs_failed if self.downloads else 0
        code, message = verdict(
            Ending(
                interrupted=self.interrupted,
                budget_reason=self.budget.reason if self.budget.exhausted else None,
                stopped_reason=self.stopped_reason,
                failed=t.failed, invalid=t.invalid, unknown=t.unknown, lost=t.lost,
                left=t.left, downloads_failed=downloads_failed,
            )
        )  # fmt: skip
        return RunReport(t, code, message, self.config.run_dir, self.lines())

    def lines(self) -> list[str]:
        """Upload and download figures for the summary."""
        parts = [self.uploader.summary() if self.uploader else None]
        parts.append(self.downloads.summary() if self.downloads else None)
        return [p for p in parts if p]
