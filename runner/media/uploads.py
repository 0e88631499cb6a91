"""Local input files to URLs: upload once per content, and resolve a job's payload to send.

    InputResolver.resolve(job)      check the job's local files (InputChecker), then
      -> payload | InputFailure     replace each one by a URL (Uploader) in a copy
    Uploader.url_for(file)          --inline-inputs: a small image becomes a data: URI;
                                    else sha256 -> run_dir/uploads.jsonl cache -> upload
                                    through :class:`runner.fal.storage.StorageClient`

Uploads are deduplicated by content: one upload per sha256 per run directory, shared by
concurrent workers (one lock per hash), and reused by a resume until the URL expires.
The job's identity (``job_key``) is untouched: only the payload *sent* carries the URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from runner.fal.storage import StorageClient
from runner.manifest.jobs import Job
from runner.media.inputs import InputChecker, InputRef, LocalFile

CACHE_FILE = "uploads.jsonl"


# -- the content cache ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedUpload:
    sha256: str
    url: str
    expires_at_s: float | None
    size_bytes: int
    via: str
    storage: str = ""  # the REST origin uploaded through: fal's, or one emulator's


class UploadCache:
    """``run_dir/uploads.jsonl``: append-only, the last line per (storage, sha256) wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[str, str], CachedUpload] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = CachedUpload(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn last line after a crash: that upload is simply redone
            self._entries[entry.storage, entry.sha256] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, sha256: str, *, storage: str, now_s: float, min_remaining_s: float
    ) -> CachedUpload | None:
        """A live URL for this content on this storage, or None (never seen, or expiring)."""
        entry = self._entries.get((storage, sha256))
        if entry is None:
            return None
        if entry.expires_at_s is not None and entry.expires_at_s - now_s < min_remaining_s:
            return None
        return entry

    async def add(self, entry: CachedUpload) -> None:
        self._entries[entry.storage, entry.sha256] = entry
        line = json.dumps(asdict(entry), sort_keys=True) + "\n"
        await anyio.to_thread.run_sync(self._append, line)

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- from a local file to a URL -------------------------------------------------------------------


@dataclass(slots=True)
class UploadCounts:
    uploads: int = 0
    uploaded_bytes: int = 0
    reused: int = 0  # URLs taken from the cache (this run or an earlier one)
    inlined: int = 0
    hashed: int = 0


class Uploader:
    """A URL for each local file: inline, cached, or uploaded once per content hash."""

    def __init__(
        self,
        storage: StorageClient,
        cache: UploadCache,
        *,
        inline_max_bytes: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_concurrent: int = 4,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.inline_max_bytes = inline_max_bytes
        self._wall_clock = wall_clock
        self._limit = anyio.CapacityLimiter(max_concurrent)
        self._locks: dict[object, anyio.Lock] = {}
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._inline: dict[tuple[Path, int, int], str] = {}
        self.counts = UploadCounts()

    def summary(self) -> str | None:
        c = self.counts
        if not (c.uploads or c.reused or c.inlined):
            return None
        return f"inputs: {c.uploads} uploaded ({c.uploaded_bytes} B), {c.reused} reused, " + (
            f"{c.inlined} inlined"
        )

    def _lock(self, key: object) -> anyio.Lock:
        return self._locks.setdefault(key, anyio.Lock())

    async def url_for(self, ref: InputRef, found: LocalFile) -> str:
        identity = (found.path, found.size_bytes, found.mtime_ns)
        inline = self.inline_max_bytes is not None and ref.kind != "lora"
        if inline and found.size_bytes <= (self.inline_max_bytes or 0):
            return await self._data_uri(identity, found)
        sha = await self._sha256(identity)
        async with self._lock(sha):
            settings = self.storage.settings
            now = self._wall_clock()
            cached = self.cache.get(sha, storage=self.storage.origin, now_s=now,
                                    min_remaining_s=settings.min_remaining_s)  # fmt: skip
            if cached is not None:
                self.counts.reused += 1
                return cached.url
            async with self._limit:
                done = await self.storage.upload(
                    found.path, size=found.size_bytes, content_type=found.content_type
                )
            self.counts.uploads += 1
            self.counts.uploaded_bytes += found.size_bytes
            await self.cache.add(CachedUpload(sha, done.url, done.expires_at_s, found.size_bytes,
                                              done.via, self.storage.origin))  # fmt: skip
            return done.url

    async def _sha256(self, identity: tuple[Path, int, int]) -> str:
        async with self._lock(("sha", identity)):
            sha = self._hashes.get(identity)
            if sha is None:
                sha = await anyio.to_thread.run_sync(file_sha256, identity[0])
                self._hashes[identity] = sha
                self.counts.hashed += 1
            return sha

    async def _data_uri(self, identity: tuple[Path, int, int], found: LocalFile) -> str:
        async with self._lock(("inline", identity)):
            uri = self._inline.get(identity)
            if uri is None:
                data = await anyio.Path(found.path).read_bytes()
                uri = f"data:{found.content_type};base64,{base64.b64encode(data).decode('ascii')}"
                self._inline[identity] = uri
            self.counts.inlined += 1
            return uri


# -- a job's payload to send ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputFailure:
    """Why a job cannot be sent: its bad local files, one line each."""

    message: str


class InputResolver:
    """Checks a job's local files and gives the payload to send, with URLs in their place."""

    def __init__(self, checker: InputChecker, uploader: Uploader) -> None:
        self.checker = checker
        self.uploader = uploader

    async def resolve(self, job: Job) -> Mapping[str, Any] | InputFailure:
        """The payload to POST, or an InputFailure. Raises FalError when an upload fails."""
        refs = self.checker.refs(job)
        if not refs:
            return job.payload
        if all(self.checker.is_cached(r) for r in refs):
            files, problems = self.checker.check(job)
        else:
            files, problems = await anyio.to_thread.run_sync(self.checker.check, job)
        if problems:
            return InputFailure("; ".join(p.message for p in problems))
        urls: dict[str, str] = {}
        for ref, found in files:
            try:
                urls[ref.column] = await self.uploader.url_for(ref, found)
            except OSError as exc:  # the file changed or vanished since it was checked
                return InputFailure(f"{ref.column}={ref.value}: cannot read file: {exc.strerror}")
        return substitute(job.payload, urls)


def substitute(payload: Mapping[str, Any], urls: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``payload`` with the values at ``urls``' columns replaced."""
    out = dict(payload)
    for column, url in urls.items():
        name, _, rest = column.partition("[")
        if not rest:
            out[name] = url
        elif name == "loras":
            index = int(rest.partition("]")[0])
            loras = [dict(lora) for lora in out["loras"]]
            loras[index]["path"] = url
            out["loras"] = loras
        else:
            index = int(rest.partition("]")[0])
            values = list(out[name])
            values[index] = url
            out[name] = values
    return out
