"""The parts of a run that the engine wires around admission, each built from the config
and the hooks: the completion strategy, the download stage, the input resolver, the
webhook receiver, and what earlier runs left in flight.

    build_strategy   poll, stream or webhook (:mod:`runner.execution.completion`, ``push``)
    download_stage   bounded consumers fetching, verifying and recording outputs
    input_resolver   local inputs checked, uploaded once per content hash
    webhooks         the receiver in webhook mode (its server stack loads only then)
    left_in_flight   whole records of the jobs an earlier run left in flight
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from runner.config import RunConfig
from runner.execution.completion import Pacing, Poller, Reader, ResultFirst, Strategy
from runner.execution.hooks import Hooks
from runner.execution.progress import Progress
from runner.execution.push import ChannelHealth, Streamer, WebhookWaiter
from runner.execution.scheduler import Scheduler
from runner.fal.storage import StorageClient, UploadSettings
from runner.ledger.records import read_requests_seen
from runner.ledger.resumestate import ResumeState
from runner.ledger.schema import JobRecord, JobState
from runner.ledger.store import Ledger
from runner.media.downloads import Downloader, DownloadStage
from runner.media.inputs import InputChecker
from runner.media.sink import OutputSink
from runner.media.uploads import InputResolver, UploadCache, Uploader

if TYPE_CHECKING:  # webhook mode only: its server stack (uvicorn, starlette) loads then
    from runner.fal.receiver import WebhookReceiver


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


_LEFT_IN_FLIGHT = frozenset(
    {JobState.SUBMITTING, JobState.UNKNOWN, JobState.QUEUED, JobState.IN_PROGRESS}
)


def left_in_flight(
    run_dir: Path, state: ResumeState
) -> tuple[dict[str, JobRecord], dict[str, frozenset[str]]]:
    """Whole records of the jobs an earlier run left in flight (few): URLs and intents; and
    the requests each of those, and each failed job a retry may send again, already
    followed: fal's history lists them under the same payload, and they are not a new
    submit's outcome."""
    keys = state.keys_in(_LEFT_IN_FLIGHT | {JobState.FAILED})
    return dict(state.records), read_requests_seen(run_dir, keys)


def download_stage(
    config: RunConfig, ledger: Ledger, progress: Progress, hooks: Hooks, http: httpx.AsyncClient
) -> DownloadStage:
    return DownloadStage(
        Downloader(http, hooks.sink or OutputSink(config.output_target, config.run_dir),
                   policy=hooks.policies.download, clock=hooks.clock, sleep=hooks.sleep),
        ledger, concurrency=config.download_concurrency, say=progress.say,
    )  # fmt: skip


def input_resolver(
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
async def webhooks(
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


async def pump(receiver: WebhookReceiver, waiter: WebhookWaiter) -> None:
    async with receiver.events:
        async for event in receiver.events:
            waiter.deliver(event.request_id, ok=event.status == "OK", payload=event.payload)
