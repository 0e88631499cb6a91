"""The download stage: every output image copied, verified and recorded as its job completes.

    DownloadStage.put(item)        a completed job's outputs (from a worker, or from the
                                   ledger of an earlier run: :func:`pending_downloads`)
      consumers (bounded)          Downloader.download per output lacking local_path
        stream to a temp file      bounded memory; sha256 on the way; size cap
        verify                     Content-Type, magic bytes, Pillow verify + full decode,
                                   dimensions as the result reported
        publish                    atomic rename in a local --out, or pyarrow.fs for a URL
      ledger                       a new ``completed`` event with the outputs' local_path and
                                   sha256; on failure ``error_type="download_failed"``: the
                                   job is "completed, not downloaded" and a rerun fetches
                                   only the outputs still missing

Files land at ``{safe row id}/{job_key}-{i}.{ext}`` under ``--out``. A corrupt or truncated
transfer raises :class:`DownloadError`, a :class:`~runner.errors.TransportError`, so the
one retry policy retries it like any read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image

from runner.endpoints.imageinfo import sniff_format
from runner.errors import HTTPStatusError, TransportError, UsageError
from runner.fal.protocol import NOT_SENT_ERRORS
from runner.fal.retry import RetryPolicy, call_with_retry
from runner.ledger.schema import JobState, LedgerEvent, OutputImage, utcnow
from runner.ledger.state import LedgerState
from runner.ledger.store import Ledger

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}
MAX_SEGMENT = 80


class DownloadError(TransportError):
    """The bytes arrived but are not the image the result promised (truncated, wrong type,
    undecodable, wrong size). A transport failure as far as retrying is concerned."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=True)


# -- paths ---------------------------------------------------------------------------------------


def safe_segment(row_id: str) -> str:
    """A readable, portable directory name for a row id; a short hash of the original is
    appended whenever sanitising changed it, so two ids never share a directory."""
    text = unicodedata.normalize("NFKC", row_id)
    cleaned = _UNSAFE.sub("_", text).strip("._ ")[:MAX_SEGMENT]
    if cleaned.split(".")[0].lower() in _RESERVED:
        cleaned = "_" + cleaned
    if cleaned == row_id and cleaned:
        return cleaned
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned or 'row'}-{digest}"


def output_name(row_id: str, job_key: str, index: int, fmt: str) -> str:
    """``{safe row id}/{job_key}-{i}.{ext}``, relative to --out."""
    key = _UNSAFE.sub("_", job_key)
    return f"{safe_segment(row_id)}/{key}-{index}.{EXTENSIONS.get(fmt, 'bin')}"


# -- where files go ------------------------------------------------------------------------------


class OutputSink:
    """A local directory (atomic rename) or a filesystem URL written through pyarrow.fs."""

    def __init__(self, target: str, run_dir: Path) -> None:
        self.target = target
        self._fs: pafs.FileSystem | None = None
        self._base = ""
        if "://" in target:
            try:
                self._fs, self._base = pafs.FileSystem.from_uri(target)
            except (pa.ArrowInvalid, OSError) as exc:
                raise UsageError(f"--out {target}: {exc}") from exc
            self.scratch = run_dir / "downloads.tmp"
        else:
            self.scratch = Path(target)

    def temp_path(self, relative: str) -> Path:
        """A fixed temp name per output: one writer holds the run directory, and a resume
        after a kill mid-download overwrites and renames the same file, leaving no debris."""
        final = self.scratch / relative
        return final.with_name(f".{final.name}.part")

    def publish(self, temp: Path, relative: str) -> str:
        """Move a verified temp file into place; returns what the ledger records."""
        if self._fs is None:
            final = Path(self.target) / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            return str(final.resolve())
        dest = f"{self._base.rstrip('/')}/{relative}"
        self._fs.create_dir(dest.rpartition("/")[0], recursive=True)
        with temp.open("rb") as src, self._fs.open_output_stream(dest + ".part") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        self._fs.move(dest + ".part", dest)
        temp.unlink()
        return f"{self.target.rstrip('/')}/{relative}"


# -- one file ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DownloadItem:
    """A completed job whose outputs (some or all) are still to be downloaded.

    ``completed`` is the job's ``completed`` event (or folded record): the event recording
    the downloads repeats it with new outputs, so every completed event stands alone.
    """

    job_key: str
    row_id: str
    outputs: tuple[OutputImage, ...]
    completed: LedgerEvent | None = None


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
        self.policy = policy or RetryPolicy(attempts=3, timeout_s=300.0)
        self.clock = clock
        self.sleep = sleep
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.attempts = 0  # GETs (or data: decodes) tried
        self.files = 0  # verified and published
        self.bytes = 0

    async def download(self, item: DownloadItem, index: int, output: OutputImage) -> OutputImage:
        """The output with local_path and sha256 set; raises FalError when it cannot be had."""
        fmt = _format_of(output.content_type) or "png"
        relative = output_name(item.row_id, item.job_key, index, fmt)
        temp = self.sink.temp_path(relative)
        await anyio.Path(temp.parent).mkdir(parents=True, exist_ok=True)
        try:
            sha = await call_with_retry(
                lambda: self._attempt(output, temp), policy=self.policy, kind="read",
                clock=self.clock, sleep=self.sleep,
            )  # fmt: skip
            size = (await anyio.Path(temp).stat()).st_size
            where = await anyio.to_thread.run_sync(self.sink.publish, temp, relative)
            self.files += 1
            self.bytes += size
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.Path(temp).unlink(missing_ok=True)
        return replace(output, local_path=where, sha256=sha)

    async def _attempt(self, output: OutputImage, temp: Path) -> str:
        self.attempts += 1
        if output.url.startswith("data:"):
            content_type, sha = await anyio.to_thread.run_sync(_write_data_uri, output.url, temp)
        else:
            content_type, sha = await self._fetch(output.url, temp)
        await anyio.to_thread.run_sync(_verify, temp, content_type, output)
        return sha

    async def _fetch(self, url: str, temp: Path) -> tuple[str, str]:
        digest = hashlib.sha256()
        got = 0
        try:
            async with self.http.stream("GET", url, timeout=self.timeout_s) as response:
                code = response.status_code
                if code != 200:
                    gone = " (gone: fal keeps outputs a while only)" if code in (404, 410) else ""
                    raise HTTPStatusError(f"GET {_short(url)}: HTTP {code}{gone}", status_code=code)
                declared = response.headers.get("content-length", "")
                async with await anyio.open_file(temp, "wb") as out:
                    async for chunk in response.aiter_bytes(1 << 16):
                        got += len(chunk)
                        if got > self.max_bytes:
                            raise DownloadError(f"{_short(url)} is larger than {self.max_bytes} B")
                        digest.update(chunk)
                        await out.write(chunk)
        except httpx.TransportError as exc:
            sent = not isinstance(exc, NOT_SENT_ERRORS)
            raise TransportError(f"GET {_short(url)}: {type(exc).__name__}", sent=sent) from exc
        if declared.isdigit() and int(declared) != got:
            raise DownloadError(f"{_short(url)} is truncated: {got} of {declared} bytes")
        return response.headers.get("content-type", ""), digest.hexdigest()


def _format_of(content_type: str | None) -> str | None:
    kind = (content_type or "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        return None
    sub = kind[len("image/") :]
    return "jpeg" if sub in ("jpeg", "jpg", "pjpeg") else sub


def _write_data_uri(uri: str, temp: Path) -> tuple[str, str]:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise DownloadError("a data: URI output is not base64")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DownloadError("a data: URI output is not valid base64") from exc
    temp.write_bytes(data)
    return header[len("data:") : -len(";base64")], hashlib.sha256(data).hexdigest()


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
    seconds: float = 0.0


@dataclass(slots=True)
class DownloadStage:
    """Bounded consumers downloading completed jobs' outputs and recording them."""

    downloader: Downloader
    ledger: Ledger
    concurrency: int = 8
    now: Callable[[], datetime] = utcnow
    say: Callable[[str], None] = lambda _message: None
    counts: DownloadCounts = field(default_factory=DownloadCounts)
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
        return (
            f"outputs: {d.files} downloaded ({d.bytes} B) to {d.sink.target}; "
            f"{self.counts.jobs_failed} jobs not downloaded"
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
        outputs = list(item.outputs)
        errors = []
        for i, output in enumerate(outputs):
            if output.local_path is not None:
                continue
            try:
                outputs[i] = await self.downloader.download(item, i, output)
            except (TransportError, HTTPStatusError, OSError) as exc:
                errors.append(f"output {i}: {exc}")
                continue
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
            self.say(f"{item.row_id}: completed, not downloaded: {errors[0]}")
        else:
            self.counts.jobs_done += 1
        return not failed


class PendingDownloads(Mapping[str, DownloadItem]):
    """Completed jobs of a folded ledger with an output lacking local_path, by job_key.

    Holds a flag per row of the state (a byte a job) and builds each
    :class:`DownloadItem` from its row when asked for: a ledger written with
    ``--no-download`` and resumed with downloads has every completed job pending,
    and a million records held as Python objects would be gigabytes. :meth:`pop`
    hands a job out once (the scheduler reaches a job once per manifest row).
    """

    def __init__(self, state: LedgerState) -> None:
        self._state = state
        self._flags = _unfetched_rows(state.jobs)
        self._count = int(np.count_nonzero(self._flags))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        keys = self._state.jobs["job_key"]
        for start in range(0, len(self._flags), _KEY_BATCH):
            rows = np.flatnonzero(self._flags[start : start + _KEY_BATCH]) + start
            if len(rows):
                yield from keys.take(pa.array(rows)).to_pylist()

    def __getitem__(self, job_key: str) -> DownloadItem:
        row = self._row(job_key)
        if row is None:
            raise KeyError(job_key)
        record = self._state.record(row)
        return DownloadItem(record.job_key, record.row_id or "", record.outputs or (), record)

    def __contains__(self, job_key: object) -> bool:
        return isinstance(job_key, str) and self._row(job_key) is not None

    def pop(self, job_key: str) -> DownloadItem | None:
        """The job's item, or None when it has nothing (left) to download; then never again."""
        row = self._row(job_key)
        if row is None:
            return None
        item = self[job_key]
        self._flags[row] = False
        self._count -= 1
        return item

    def _row(self, job_key: str) -> int | None:
        row = self._state.row(job_key)
        return row if row is not None and self._flags[row] else None


_KEY_BATCH = 65_536


def pending_downloads(state: LedgerState | pa.Table) -> PendingDownloads:
    """The jobs of a folded ledger (a state, or its table) with downloads pending."""
    return PendingDownloads(state if isinstance(state, LedgerState) else LedgerState(state))


def _unfetched_rows(jobs: pa.Table) -> np.ndarray:
    """Per row: a completed job with an output lacking local_path. Vectorised, chunk by chunk."""
    flags = np.zeros(jobs.num_rows, dtype=bool)
    if jobs.num_rows == 0:
        return flags
    start = 0
    for chunk in jobs["outputs"].chunks:
        flat = pc.list_flatten(chunk)
        if len(flat):
            missing = pc.is_null(pc.struct_field(flat, "local_path"))
            parents = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)
            flags[start + parents[missing.to_numpy(zero_copy_only=False)]] = True
        start += len(chunk)
    done = pc.equal(jobs["state"], JobState.COMPLETED.value).combine_chunks()
    flags &= done.to_numpy(zero_copy_only=False)
    return flags
