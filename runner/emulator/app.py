"""The emulator itself: queue state, job outcomes, webhooks, and its ASGI app.

:class:`Emulator` owns one :class:`~runner.emulator.queue.QueueModel` advanced
from an injected clock (unix seconds; ``time.time`` by default) on every HTTP
request, the media stores, the fault injector and the accounting. Its ``app``
attribute is the ASGI application (routes in :mod:`runner.emulator.routes`).

``async with emulator.running():`` runs the one background task that wakes at
the next scheduled event (so jobs finish and webhooks fire without polling)
and the webhook dispatcher. Without it the app still answers every request
correctly, since state is advanced on demand; webhooks are then only queued,
and sent once ``running()`` is entered.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from runner.emulator import results, webhooks
from runner.emulator.faults import FaultInjector
from runner.emulator.filestore import FileStore
from runner.emulator.history import RequestHistory
from runner.emulator.images import ImageStore, InputImageError
from runner.emulator.platform_api import account_table
from runner.emulator.queue import Ending, Job, Phase, QueueModel, StoredResult
from runner.emulator.rendering import MAX_SIDE, render_body, render_salt
from runner.emulator.routes import build_app
from runner.emulator.settings import EmulatorConfig
from runner.emulator.stats import Stats
from runner.endpoints import catalog, cost

Clock = Callable[[], float]
"""Unix seconds: ``time.time`` in production, a fake that tests move forward."""

INPUT_FAILURE_S = 0.2  # emulated seconds a job with an unreadable input runs before failing
FAILURE_FRACTION = 0.5  # share of its service time a job planned to fail runs first
INPUT_FETCH_TIMEOUT_S = 20.0  # fal fetches inputs within 20 s (seed 000); real seconds
MASK_FIELDS = frozenset({"mask_url"})  # inputs that are not billed as input images


class Emulator:
    """A local fal queue. Single event loop; not thread-safe."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Clock = time.time,
        http_client: httpx.AsyncClient | None = None,
        prices: cost.PriceTable | None = None,
    ) -> None:
        self.config = config or EmulatorConfig()
        self.clock = clock
        self.scheduler = QueueModel(
            concurrency=self.config.concurrency,
            now=clock(),
            retention_s=self.config.scaled(self.config.retention_s),
        )
        self.faults = FaultInjector(self.config.faults)
        # What the account pays: its custom prices win over the table, in billing and in
        # the Platform API's pricing answer alike.
        self.prices = account_table(prices or cost.PriceTable.default(), self.config.account_prices)
        self.stats = Stats(self.prices)
        self.history = RequestHistory(
            retention_s=self.config.scaled(self.config.history_retention_s),
            max_items=self.config.history_max_items,
        )
        self.files = FileStore(clock=clock)
        self.images = ImageStore(self.files, clock=clock)
        self.signer = webhooks.WebhookSigner(user_id=self.config.user_id)
        self._rng = random.Random(f"{self.config.seed}/jobs")
        self._http = http_client
        self._own_http: httpx.AsyncClient | None = None
        self._dispatcher: webhooks.WebhookDispatcher | None = None
        self._pending_webhooks: list[tuple[str, str, bytes]] = []
        self._change: anyio.Event | None = None
        self._seen_version = -1
        self.app = build_app(self)

    def __repr__(self) -> str:
        return f"Emulator(concurrency={self.config.concurrency}, jobs={len(self.scheduler.jobs)})"

    # -- state --------------------------------------------------------------------------------

    def advance(self) -> None:
        """Bring the queue to the clock's "now": start, finish and expire jobs."""
        for job in self.scheduler.advance(self.clock()):
            self._finish(job)
        self._notify_if_changed()

    def lookup(self, app_path: str, request_id: str) -> Job | None:
        """The job with this id under this owner/app, unless unknown or expired.

        An expired job and one already forgotten (see :class:`QueueModel`) look the same:
        None, which every route answers as an unknown id.
        """
        job = self.scheduler.find(request_id, self.clock())
        return job if job is not None and job.app_path == app_path else None

    def position(self, job: Job) -> int:
        return self.scheduler.position(job) if job.phase is Phase.QUEUED else 0

    def cancel(self, job: Job) -> None:
        for ended in self.scheduler.cancel(job):
            self._finish(ended)
        self._notify_if_changed()

    async def wait_change(self, timeout_s: float, event: anyio.Event | None = None) -> None:
        """Wait (real time) until the queue changes or ``timeout_s`` passes."""
        with anyio.move_on_after(max(0.0, timeout_s)):
            await (event or self.change_event()).wait()

    def change_event(self) -> anyio.Event:
        """An event set at the next state change; take it *before* reading state."""
        if self._change is None:
            self._change = anyio.Event()
        return self._change

    def _notify_if_changed(self) -> None:
        if self.scheduler.version != self._seen_version:
            self._seen_version = self.scheduler.version
            if self._change is not None:
                self._change.set()
                self._change = None

    # -- submit -------------------------------------------------------------------------------

    async def plan(
        self,
        request: catalog.BaseRequest,
        body: dict[str, Any],
        *,
        origin: str,
        webhook_url: str | None,
        output_retention_s: float | None = None,
    ) -> results.JobPlan:
        """Decide a job's seed, output size and inputs (reading input image sizes).

        ``output_retention_s`` (emulated) is the CDN lifetime the client asked for with
        ``X-Fal-Object-Lifecycle-Preference``; None keeps outputs for the emulator's life.
        """
        sizes, error = await self._read_inputs(request)
        out = catalog.output_size(request, sizes[0][1] if sizes else None)
        kind = "file_download_error"
        if error is None and out is not None and max(out) > MAX_SIDE:
            # The emulator renders at most MAX_SIDE a side: larger is a 422, not a crash.
            error = ("image_size", f"Output size {out[0]}x{out[1]} is above {MAX_SIDE} a side")
            kind, out = "value_error", None
        seed = request.seed if request.seed is not None else self._rng.randrange(2**31)
        spec = catalog.CATALOG[request.endpoint_id]
        return results.JobPlan(
            body=body,
            seed=seed,
            steps=int(getattr(request, "num_inference_steps", 28)),
            num_images=int(getattr(request, "num_images", 1)),
            output_format=str(getattr(request, "output_format", spec.default_output_format)),
            output_size=out,
            input_sizes=tuple(size for name, size in sizes if name not in MASK_FIELDS),
            input_error=error,
            input_error_type=kind,
            webhook_url=webhook_url,
            sync_mode=request.sync_mode,
            origin=origin,
            output_retention_s=output_retention_s,
            render_body=render_body(body, spec.input_image_fields, self.images.content_id),
        )

    async def _read_inputs(
        self, request: catalog.BaseRequest
    ) -> tuple[list[tuple[str, tuple[int, int]]], tuple[str, str] | None]:
        sizes: list[tuple[str, tuple[int, int]]] = []
        for name in catalog.CATALOG[request.endpoint_id].input_image_fields:
            value = getattr(request, name, None)
            for url in value if isinstance(value, list | tuple) else [value] if value else []:
                try:
                    with anyio.fail_after(INPUT_FETCH_TIMEOUT_S):
                        sizes.append((name, await self.images.read_input_size(url, self._client())))
                except (InputImageError, TimeoutError) as exc:
                    return sizes, (name, f"Failed to download the file: {exc}")
        return sizes, None

    def _client(self) -> httpx.AsyncClient:
        if self._http is not None:
            return self._http
        if self._own_http is None:
            self._own_http = httpx.AsyncClient(timeout=INPUT_FETCH_TIMEOUT_S)
        return self._own_http

    def accept(
        self,
        endpoint: str,
        app_path: str,
        plan: results.JobPlan,
        *,
        low_priority: bool = False,
        start_timeout_s: float | None = None,
        store_io: bool = True,
    ) -> Job:
        """Queue one job now (the submit was accepted: from here on it is billed).

        It enters the request history too, with its payloads unless ``store_io`` is False
        (``X-Fal-Store-IO: 0``).
        """
        self.advance()
        now = self.clock()
        failure = self.faults.failure()  # drawn for every job, so the sequence is stable
        emulated_s = self.config.service.seconds(
            megapixels=_megapixels(plan.output_size),
            steps=plan.steps,
            num_images=plan.num_images,
            u=self._rng.random(),
        )
        if plan.input_error is not None:
            failure, emulated_s = "input", min(emulated_s, INPUT_FAILURE_S)
        elif failure is not None:
            emulated_s *= FAILURE_FRACTION
            self.stats.fault(f"fail_{failure}")
        job = Job(
            request_id=str(uuid.uuid4()),
            endpoint=endpoint,
            app_path=app_path,
            submitted_at=now,
            service_s=self.config.scaled(emulated_s),
            low_priority=low_priority,
            deadline_at=None
            if start_timeout_s is None
            else now + self.config.scaled(start_timeout_s),
            failure=failure,
            context=plan,
        )
        self.stats.accepted(endpoint, plan.body, now)
        self.scheduler.submit(job)
        self.history.prune(now)
        self.history.record(job.request_id, endpoint, now, plan.body, store_io=store_io)
        self._notify_if_changed()
        return job

    # -- outcomes -----------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        plan = results.plan_of(job)
        assert job.ending is not None and job.finished_at is not None
        if job.ending is Ending.SUCCEEDED:
            job.result = self._success(job, plan)
        elif job.ending is Ending.FAILED and plan.input_error is not None:
            job.result = results.input_failure(*plan.input_error, plan.input_error_type)
        elif job.ending is Ending.FAILED:
            assert job.failure is not None
            job.result = results.infra_failure(job.failure)
        elif job.ending is Ending.CANCELLED:
            job.result = results.cancelled()
        else:
            job.result = results.infra_failure("request_timeout", user_timeout=True)
        self.stats.ended(job.ending.value, job.finished_at)
        self.history.ended(
            job.request_id, started_at=job.started_at, ended_at=job.finished_at, result=job.result
        )
        if plan.webhook_url:
            self._queue_webhook(plan.webhook_url, job.request_id, job.result)

    def _success(self, job: Job, plan: results.JobPlan) -> StoredResult:
        width, height = plan.output_size or (1024, 768)
        images, flags = [], []
        checked = plan.body.get("enable_safety_checker", True) is not False
        for index in range(plan.num_images):
            # The picture is a function of the request and its seed, never of the request id.
            salt = render_salt(job.endpoint, plan.render_body or plan.body, index)
            black = checked and self.faults.flagged(f"{salt}/{plan.seed}")
            if black:
                self.stats.fault("flagged")
            flags.append(black)
            look: dict[str, Any] = {"width": width, "height": height, "fmt": plan.output_format,
                    "seed": plan.seed, "salt": salt, "black": black}  # fmt: skip
            if plan.sync_mode:
                url = self.images.data_uri(**look)
                content_type = url[5 : url.index(";")]
                images.append(
                    {"url": url, "width": width, "height": height, "content_type": content_type}
                )
            else:
                retention = plan.output_retention_s
                images.append(
                    self.images.add_output(
                        **look, base_url=plan.origin,
                        retention_s=None if retention is None else self.config.scaled(retention),
                    )
                )  # fmt: skip
        self.stats.bill(
            job.endpoint, [(width, height)] * plan.num_images, input_sizes=plan.input_sizes
        )
        return results.success(job, images, flags, time_scale=self.config.time_scale)

    def _queue_webhook(self, url: str, request_id: str, result: StoredResult) -> None:
        ok = result.status_code < 300
        error = None if ok else f"Invalid status code: {result.status_code}"
        body = webhooks.webhook_body(request_id, request_id, ok, result.body, error)
        if self._dispatcher is not None:
            self._dispatcher.submit(url, request_id, body)
        else:
            self._pending_webhooks.append((url, request_id, body))

    # -- background ---------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Emulator]:
        """Run the event waker and the webhook dispatcher until the block exits."""
        client = self._http if self._http is not None else httpx.AsyncClient()
        faults = self.config.faults
        dispatcher = webhooks.WebhookDispatcher(
            client,
            self.signer,
            clock=self.clock,
            rng=random.Random(f"{faults.seed}/webhooks"),
            backoff_base_s=self.config.scaled(7.0),
            backoff_max_s=self.config.scaled(1800.0),
            lose_rate=faults.webhook_lost,
            duplicate_rate=faults.webhook_duplicate,
            delay_s=self.config.scaled(faults.webhook_delay_s),
            reorder_window_s=self.config.scaled(faults.webhook_reorder_s),
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.run)
                self._dispatcher = dispatcher
                pending, self._pending_webhooks = self._pending_webhooks, []
                for item in pending:
                    dispatcher.submit(*item)
                tg.start_soon(self._wake_loop)
                try:
                    yield self
                finally:
                    self._dispatcher = None
                    dispatcher.close()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if client is not self._http:
                    await client.aclose()
                await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client the emulator made for fetching inputs, if any.

        ``running()`` does this on exit; call it when using only ``.app`` in-process with
        inputs on other hosts.
        """
        if self._own_http is not None:
            await self._own_http.aclose()
            self._own_http = None

    async def _wake_loop(self) -> None:
        while True:
            event = self.change_event()
            self.advance()
            due = self.scheduler.next_event_at()
            wait_s = 1.0 if due is None else min(1.0, due - self.clock())
            await self.wait_change(wait_s, event)

    def snapshot(self) -> dict[str, Any]:
        """Everything ``GET /_emulator/stats`` answers."""
        self.advance()
        scheduler = self.scheduler
        phases = {
            Phase.QUEUED.value: scheduler.queued_count,
            Phase.RUNNING.value: len(scheduler.running),
            Phase.DONE.value: scheduler.ended_count,  # forgotten ones included
        }
        out = self.stats.snapshot(
            busy_s=self.scheduler.busy_s(),
            concurrency=self.config.concurrency,
            time_scale=self.config.time_scale,
            queue=phases,
        )
        out["storage"] = self.files.stats()
        out["images"] = self.images.stats()
        out["webhooks"] = self._dispatcher.stats() if self._dispatcher else {}
        out["webhooks_pending"] = len(self._pending_webhooks)
        out["history"] = {"entries": len(self.history), "dropped": self.history.dropped}
        return out

    def reset_stats(self) -> None:
        """Forget the accounting (not the queue), e.g. between benchmark phases."""
        self.stats = Stats(self.stats.prices)


def _megapixels(size: tuple[int, int] | None) -> float:
    width, height = size or (1024, 1024)
    return width * height / 1_048_576


def header_map(result: StoredResult, request_id: str) -> Mapping[str, str]:
    return {**result.headers, "x-fal-request-id": request_id}
