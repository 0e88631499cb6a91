"""The download stage: every output image copied, verified and recorded as its job completes.

    DownloadStage.put(item)        a completed job's outputs (from a worker, or from the
                                   ledger of an earlier run: :func:`pending_downloads`)
      consumers (bounded)          Downloader.download per output lacking local_path
        stream to a temp file      bounded memory; sha256 on the way; size cap
        verify                     Content-Type, magic bytes, Pillow verify + full decode,
                                   dimensions as the result reported
        publish                    atomic rename in a local --out, or pyarrow.fs for a URL;
                                   no symbolic link below --out is followed (a planted one
                                   fails that output, naming it, and is left alone)
      ledger                       a new ``completed`` event with the outputs' local_path and
                                   sha256; on failure ``error_type="download_failed"``: the
                                   job is "completed, not downloaded" and a rerun fetches
                                   only the outputs still missing

Names, the sink and storage errors live in :mod:`runner.media.sink`; what is left to fetch
in :mod:`runner.media.pending`. Both are re-exported here.

A corrupt or truncated transfer raises :class:`DownloadError`, a
:class:`~runner.errors.TransportError`, so the one retry policy retries it like any read.
A write the storage refuses (disk full, over quota, read-only, permission:
:func:`~runner.media.sink.storage_failure`) is not retried and stops the stage: it sets
:attr:`DownloadStage.storage_problem` and :attr:`DownloadStage.storage_failed`, records the
job as not downloaded, and records every later job the same way without fetching, so
admission can stop paying for outputs the run cannot keep and a rerun fetches them all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
import httpx

from runner.endpoints.imageinfo import sniff_format
from runner.errors import HTTPStatusError, TransportError
from runner.fal.protocol import NOT_SENT_ERRORS
from runner.fal.retry import RetryPolicies, RetryPolicy, call_with_retry
from runner.ledger.schema import JobState, LedgerEvent, OutputImage, utcnow
from runner.ledger.store import Ledger
from runner.media.pending import DownloadItem, PendingDownloads, pending_downloads
from runner.media.sink import (
    OutputSink,
    local_output_dir,
    output_name,
    safe_segment,
    storage_failure,
    with_path,
)

if TYPE_CHECKING:  # --cache only: the cache's modules load when a run uses one
    from runner.media.cache import OutputCache

__all__ = [
    "DownloadCounts",
    "DownloadError",
    "DownloadItem",
    "DownloadStage",
    "Downloader",
    "OutputSink",
    "PendingDownloads",
    "local_output_dir",
    "output_name",
    "pending_downloads",
    "safe_segment",
    "storage_failure",
]


class DownloadError(TransportError):
    """The bytes arrived but are not the image the result promised (truncated, wrong type,
    undecodable, wrong size). A transport failure as far as retrying is concerned."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=True)


# -- one file ------------------------------------------------------------------------------------


class Downloader:
    """Fetches one output into a temp file, verifies it, publishes it. Never sends a key."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        sink: OutputSink,
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        max_bytes: int = 256 * 1024 * 1024,
        timeout_s: float = 120.0,
    ) -> None:
        self.http = http
        self.sink = sink
        self.policy = policy or RetryPolicies().download
        self.clock = clock
        self.sleep = sleep
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.attempts = 0  # GETs (or data: decodes) tried
        self.files = 0  # verified and published
        self.bytes = 0

    async def download(self, item: DownloadItem, index: int, output: OutputImage) -> OutputImage:
        """The output with local_path and sha256 set; raises FalError when it cannot be had,
        OSError (naming a path) when it cannot be written."""
        fmt = _format_of(output.content_type) or "png"
        relative = output_name(item.row_id, item.job_key, index, fmt)
        temp = self.sink.temp_path(relative)
        try:
            # An OSError is not retried (the classifier gives up on it): a full disk stays full.
            sha = await call_with_retry(
                lambda: self._attempt(output, temp), policy=self.policy, kind="read",
                clock=self.clock, sleep=self.sleep,
            )  # fmt: skip
            size = (await anyio.Path(temp).stat()).st_size
            where = await anyio.to_thread.run_sync(self.sink.publish, temp, relative)
            self.files += 1
            self.bytes += size
        except OSError as exc:
            located = with_path(exc, temp)
            if located is exc:
                raise
            raise located from exc
        finally:
            with anyio.CancelScope(shield=True):  # a link planted at the temp name stays
                await anyio.to_thread.run_sync(self.sink.discard, temp)
        return replace(output, local_path=where, sha256=sha)

    async def _attempt(self, output: OutputImage, temp: Path) -> str:
        self.attempts += 1
        if output.url.startswith("data:"):
            content_type, data, sha = await anyio.to_thread.run_sync(_decode_data_uri, output.url)
            async with await self.sink.open_temp(temp) as out:
                await out.write(data)
        else:
            content_type, sha = await self._fetch(output.url, temp)
        await anyio.to_thread.run_sync(_verify, temp, content_type, output)
        return sha

    async def _fetch(self, url: str, temp: Path) -> tuple[str, str]:
        try:
            async with self.http.stream("GET", url, timeout=self.timeout_s) as response:
                code = response.status_code
                if code != 200:
                    gone = " (gone: fal keeps outputs a while only)" if code in (404, 410) else ""
                    raise HTTPStatusError(f"GET {_short(url)}: HTTP {code}{gone}", status_code=code)
                declared = response.headers.get("content-length", "")
                got, sha = await self._save_body(response, url, temp)
        except httpx.TransportError as exc:
            sent = not isinstance(exc, NOT_SENT_ERRORS)
            raise TransportError(f"GET {_short(url)}: {type(exc).__name__}", sent=sent) from exc
        if declared.isdigit() and int(declared) != got:
            raise DownloadError(f"{_short(url)} is truncated: {got} of {declared} bytes")
        return response.headers.get("content-type", ""), sha

    async def _save_body(self, response: httpx.Response, url: str, temp: Path) -> tuple[int, str]:
        """Stream the body into ``temp``: bounded memory, sha256 on the way, a size cap.
        Returns the byte count and the sha256."""
        digest = hashlib.sha256()
        got = 0
        # aiter_bytes is an async generator. Closed here when left early (the size cap, a
        # refused write), not by the garbage collector, which trio reports as a leak.
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes(1 << 16))
        async with await self.sink.open_temp(temp) as out, aclosing(chunks):
            async for chunk in chunks:
                got += len(chunk)
                if got > self.max_bytes:
                    raise DownloadError(f"{_short(url)} is larger than {self.max_bytes} B")
                digest.update(chunk)
                await out.write(chunk)
        return got, digest.hexdigest()


def _format_of(content_type: str | None) -> str | None:
    kind = (content_type or "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        return None
    sub = kind[len("image/") :]
    return "jpeg" if sub in ("jpeg", "jpg", "pjpeg") else sub


def _decode_data_uri(uri: str) -> tuple[str, bytes, str]:
    """A data: URI output's content type, bytes and sha256."""
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise DownloadError("a data: URI output is not base64")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DownloadError("a data: URI output is not valid base64") from exc
    return header[len("data:") : -len(";base64")], data, hashlib.sha256(data).hexdigest()


def _verify(path: Path, content_type: str, output: OutputImage) -> None:
    """Raise DownloadError unless the file is the image the result described."""
    with path.open("rb") as fh:
        sniffed = sniff_format(fh.read(12))
    served = _format_of(content_type)
    if served is None:
        raise DownloadError(f"served as {content_type or 'no content type'!r}, not an image")
    if sniffed is None:
        raise DownloadError(f"served as {content_type} but the bytes are not PNG, JPEG or WebP")
    promised = _format_of(output.content_type) or served
    if sniffed != served or sniffed != promised:
        raise DownloadError(f"bytes are {sniffed}, served as {served}, result said {promised}")
    from PIL import Image  # when the first image is checked, not at start-up

    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()  # verify() skips pixel data: a truncated JPEG only fails a decode
            size = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DownloadError(f"{sniffed} does not decode: {exc}") from exc
    wanted = (output.width, output.height)
    if None not in wanted and size != wanted:
        raise DownloadError(
            f"image is {size[0]}x{size[1]}, the result said {wanted[0]}x{wanted[1]}"
        )


def _short(url: str) -> str:
    base = url.partition("?")[0]
    return base if len(base) <= 100 else base[:97] + "..."


# -- the stage -----------------------------------------------------------------------------------


@dataclass(slots=True)
class DownloadCounts:
    jobs_done: int = 0
    jobs_failed: int = 0
    outputs_skipped: int = 0  # not attempted: the storage had already refused a write
    seconds: float = 0.0


@dataclass(slots=True)
class DownloadStage:
    """Bounded consumers downloading completed jobs' outputs and recording them.

    ``storage_problem`` is None until the storage refuses a write; then it holds a one-line
    reason naming the path, ``storage_failed`` is set, and no more outputs are fetched.
    Admission reads either to stop paying for outputs the run cannot keep.
    """

    downloader: Downloader
    ledger: Ledger
    concurrency: int = 8
    now: Callable[[], datetime] = utcnow
    say: Callable[[str], None] = lambda _message: None
    counts: DownloadCounts = field(default_factory=DownloadCounts)
    storage_problem: str | None = None
    storage_failed: anyio.Event = field(default_factory=anyio.Event)
    cache: OutputCache | None = None  # --cache: completed downloads are filed there too
    _send: Any = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DownloadStage]:
        """Consumers run inside; leaving waits until everything put was downloaded."""
        send, receive = anyio.create_memory_object_stream[DownloadItem](self.concurrency)
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(self._consume, receive.clone())
            receive.close()
            self._send = send
            try:
                yield self
            finally:
                send.close()
        self.counts.seconds += time.monotonic() - started

    def summary(self) -> str:
        d = self.downloader
        text = (
            f"outputs: {d.files} downloaded ({d.bytes} B) to {d.sink.target}; "
            f"{self.counts.jobs_failed} jobs not downloaded"
        )
        return text + (
            f"; downloads stopped: {self.storage_problem}" if self.storage_problem else ""
        )

    async def put(self, item: DownloadItem) -> None:
        """Queue a job's outputs; waits while the consumers are all busy (bounded memory)."""
        await self._send.send(item)

    async def _consume(self, receive: anyio.abc.ObjectReceiveStream[DownloadItem]) -> None:
        async with receive:
            async for item in receive:
                await self.download_job(item)

    async def download_job(self, item: DownloadItem) -> bool:
        """Download what is missing of one job, record it; True when nothing is missing."""
        outputs, errors, tried = await self._fetch_missing(item)
        failed = bool(errors)
        base = item.completed or LedgerEvent(item.job_key, JobState.COMPLETED, self.now())
        fields = {f.name: getattr(base, f.name) for f in dataclass_fields(LedgerEvent)}
        fields.update(
            state=JobState.COMPLETED, at=self.now(), outputs=tuple(outputs),
            error_type="download_failed" if failed else None,
            error_message=("; ".join(errors))[:2000] if failed else None,
            retryable=True if failed else None,
        )  # fmt: skip
        self.ledger.append(LedgerEvent(**fields))
        await self.ledger.commit()
        if failed:
            self.counts.jobs_failed += 1
            if tried:  # after a storage failure, one line said it for all the jobs left
                self.say(f"{item.row_id}: completed, not downloaded: {errors[0]}")
        else:
            self.counts.jobs_done += 1
            await self._file(item, outputs)
        return not failed

    async def _file(self, item: DownloadItem, outputs: list[OutputImage]) -> None:
        """File a downloaded job's outputs in the cross-run cache, when it may be reused."""
        slot, cache = item.cache, self.cache
        if slot is None or cache is None:
            return
        seed = item.completed.seed if item.completed is not None else None
        try:
            await anyio.to_thread.run_sync(
                lambda: cache.store(slot.key, endpoint=slot.endpoint, seed=seed,
                                    outputs=outputs, request_id=slot.request_id)
            )  # fmt: skip
        except OSError as exc:
            # The outputs are safe in --out; only their reuse by later runs is lost.
            self.say(f"{item.row_id}: not stored in the cache: {exc}")

    async def _fetch_missing(self, item: DownloadItem) -> tuple[list[OutputImage], list[str], bool]:
        """The job's outputs with those fetched now filled in, the errors, and whether any
        fetch was tried (none is once the storage has refused a write)."""
        outputs = list(item.outputs)
        errors: list[str] = []
        tried = False
        for i, output in enumerate(outputs):
            if output.local_path is not None:
                continue
            if self.storage_problem is not None:
                self.counts.outputs_skipped += 1
                errors.append(f"output {i}: not attempted: {self.storage_problem}")
                continue
            tried = True
            try:
                outputs[i] = await self.downloader.download(item, i, output)
            except (TransportError, HTTPStatusError, OSError) as exc:
                reason = storage_failure(exc)
                if reason is not None:
                    self._storage_refused(reason)
                errors.append(f"output {i}: {reason or exc}")
        return outputs, errors, tried

    def _storage_refused(self, reason: str) -> None:
        if self.storage_problem is not None:
            return  # concurrent consumers hit the same wall; the first reason stands
        self.storage_problem = reason
        self.storage_failed.set()
        self.say(
            f"downloads stopped: {reason}; outputs not downloaded stay recorded "
            "and a rerun fetches them"
        )
