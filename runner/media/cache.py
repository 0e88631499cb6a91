"""The cross-run output cache (``--cache DIR``): finished outputs any run directory may reuse.

An entry is the outputs of one completed, downloaded, not-flagged job, filed under the hash of
its endpoint and canonical request (:func:`cache_key`). Local input files enter the request by
the sha256 of their bytes, not by their path or the URL an upload gave them
(:func:`keyed_payload`), so a run directory that uploads the same file again finds the entry,
and a file changed in place does not. Only a request with a fixed seed, on an endpoint assumed
deterministic, is ever looked up or stored (the caller decides: runner.execution.reuse).

Layout::

    DIR/v1/ab/abcdef.../entry.json    what the entry holds: endpoint, seed, files, source
                                      (or ``"flagged": true`` and no files: see below)
    DIR/v1/ab/abcdef.../0.png ...     the output files, as downloaded and verified
    DIR/tmp/                          entries being written

Safe under concurrent runs, without a lock: an entry is written whole in a fresh folder under
``tmp/`` (``mkdtemp``: a name no other writer has; files created ``O_EXCL``), flushed, and
renamed into place in one ``rename``. A reader sees a whole entry or none. When two processes
fill the same entry, the second rename fails (the folder is there and not empty) and the
second writer drops its copy: the first one stands, and both were the same bytes anyway.
Files are checked against their sha256 as they are copied out, so an entry damaged on disk
is a miss, never a wrong output.

A flagged output is never filed, but the fact that a request was flagged is: a job re-rolled
under ``--flagged reroll`` leaves a *flag mark* (an entry with ``"flagged": true`` and no
files) under the key of the roll that was flagged. Under the determinism assumption the same
request is flagged again, so a later run re-rolling from the cache steps over the mark to the
next roll's key instead of paying for a black picture (runner.execution.reuse).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from runner.ledger.schema import OutputImage, encode_request
from runner.media.inputs import input_refs
from runner.media.sink import OutputSink, output_name
from runner.media.uploads import file_sha256, substitute

VERSION = "v1"
ENTRY = "entry.json"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CacheSlot:
    """Where a job's outputs may be stored once downloaded, and the request that made them."""

    key: str
    endpoint: str
    request_id: str | None


@dataclass(frozen=True, slots=True)
class CachedFile:
    name: str  # within the entry's folder
    sha256: str
    url: str
    width: int | None
    height: int | None
    content_type: str | None


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: str
    folder: Path
    endpoint: str
    seed: int | None
    files: tuple[CachedFile, ...]
    source_run: str  # the run directory whose download filled the entry
    source_request: str | None  # fal's request id there
    flagged: bool = False  # a flag mark: this request's output was flagged; no files

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple((f.width or 0, f.height or 0) for f in self.files)


def cache_key(endpoint: str, payload: Mapping[str, Any]) -> str:
    """sha256 of the endpoint and the canonical JSON of the (keyed) request."""
    return hashlib.sha256(f"{endpoint}\n{encode_request(payload)}".encode()).hexdigest()


def keyed_payload(payload: Mapping[str, Any], manifest_dir: Path) -> dict[str, Any]:
    """``payload`` with each local file it names replaced by ``sha256:<hex>`` of its bytes.

    Reads the files (call it in a thread); raises OSError when one cannot be read.
    """
    refs = input_refs(payload, manifest_dir)
    if not refs:
        return dict(payload)
    return substitute(payload, {r.column: f"sha256:{file_sha256(r.path)}" for r in refs})


class OutputCache:
    """One cache directory, as used by the run directory ``run_dir``."""

    def __init__(self, root: Path, run_dir: Path) -> None:
        self.root = root
        self.run_dir = str(run_dir.resolve())
        self.hits = 0
        self.stored = 0

    def _folder(self, key: str) -> Path:
        return self.root / VERSION / key[:2] / key

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry filed under ``key``, or None (absent, or unreadable: a miss)."""
        folder = self._folder(key)
        try:
            data = json.loads((folder / ENTRY).read_text(encoding="utf-8"))
            files = tuple(CachedFile(**f) for f in data["files"])
            return CacheEntry(
                key=key, folder=folder, endpoint=str(data["endpoint"]), seed=data.get("seed"),
                files=files, source_run=str(data["source_run"]),
                source_request=data.get("source_request"), flagged=data.get("flagged") is True,
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def mark_flagged(
        self, key: str, *, endpoint: str, seed: int | None, request_id: str | None
    ) -> bool:
        """File a flag mark under ``key``: that request's output was flagged. True when this
        call filled it (False: an entry is there already). Blocking: call it in a thread."""
        head = {"endpoint": endpoint, "seed": seed, "source_request": request_id}
        return self._file(key, head, [], flagged=True)

    def store(
        self,
        key: str,
        *,
        endpoint: str,
        seed: int | None,
        outputs: Sequence[OutputImage],
        request_id: str | None,
    ) -> bool:
        """File the downloaded ``outputs`` under ``key``; True when this call filled it.

        False when the entry is there already (another run filled it first) or an output has
        no local file to copy (a filesystem-URL ``--out``). Blocking: call it in a thread.
        """
        paths = [Path(o.local_path) if o.local_path else None for o in outputs]
        if not outputs or any(p is None or not p.is_file() for p in paths):
            return False
        head = {"endpoint": endpoint, "seed": seed, "source_request": request_id}
        files = [(path, o) for path, o in zip(paths, outputs, strict=True) if path is not None]
        if not self._file(key, head, files):
            return False
        self.stored += 1
        return True

    def _file(
        self,
        key: str,
        head: Mapping[str, object],
        files: Sequence[tuple[Path, OutputImage]],
        *,
        flagged: bool = False,
    ) -> bool:
        """Write an entry whole in a fresh folder under tmp/ and rename it into place."""
        final = self._folder(key)
        if (final / ENTRY).is_file():
            return False
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{key[:16]}.", dir=tmp_root))
        try:
            put = [self._put(work, i, path, output) for i, (path, output) in enumerate(files)]
            entry: dict[str, object] = {**head, "source_run": self.run_dir,
                                        "files": [asdict(f) for f in put]}  # fmt: skip
            if flagged:
                entry["flagged"] = True
            _write_new(work / ENTRY, json.dumps(entry, sort_keys=True).encode())
            return publish(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _put(work: Path, index: int, source: Path, output: OutputImage) -> CachedFile:
        name = f"{index}{source.suffix}"
        digest = hashlib.sha256()
        fd = os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            for block in iter(lambda: src.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        if output.sha256 is not None and sha != output.sha256:
            raise OSError(errno.EIO, "output changed since it was downloaded", str(source))
        return CachedFile(name, sha, output.url, output.width, output.height, output.content_type)

    async def fulfil(
        self, entry: CacheEntry, sink: OutputSink, *, row_id: str, job_key: str
    ) -> tuple[OutputImage, ...] | None:
        """Copy an entry's files where this run's downloads go, each checked against its
        sha256 on the way; the outputs as the ledger records them, or None when the entry
        turns out damaged (a miss: the job is submitted as usual)."""
        outputs = []
        for index, cached in enumerate(entry.files):
            fmt = _format(cached.content_type, cached.name)
            relative = output_name(row_id, job_key, index, fmt)
            temp = sink.temp_path(relative)
            try:
                async with await sink.open_temp(temp) as out:
                    sha = await _copy(entry.folder / cached.name, out)
                if sha != cached.sha256:
                    return None
                where = await anyio.to_thread.run_sync(sink.publish, temp, relative)
            except FileNotFoundError:
                return None
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(sink.discard, temp)
            outputs.append(
                OutputImage(url=cached.url, width=cached.width, height=cached.height,
                            content_type=cached.content_type, local_path=where, sha256=sha)
            )  # fmt: skip
        self.hits += 1
        return tuple(outputs)


def publish(work: Path, final: Path) -> bool:
    """Rename a whole entry written in ``work`` into place; False when ``final`` is there
    already (another writer filled it first: theirs stands, ``work`` is left to remove)."""
    _fsync_dir(work)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(work, final)  # a folder renames only onto an absent or empty one
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    _fsync_dir(final.parent)
    return True


async def _copy(source: Path, out: anyio.AsyncFile[bytes]) -> str:
    digest = hashlib.sha256()
    async with await anyio.open_file(source, "rb") as src:
        while block := await src.read(_CHUNK):
            digest.update(block)
            await out.write(block)
    return digest.hexdigest()


def _format(content_type: str | None, name: str) -> str:
    sub = (content_type or "").partition("/")[2].split(";")[0].strip().lower()
    if sub in ("jpeg", "jpg") or name.endswith(".jpg"):
        return "jpeg"
    return sub or name.rpartition(".")[2]


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
