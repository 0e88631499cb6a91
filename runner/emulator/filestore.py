"""fal's storage side, in memory: the uploaded files and the uploads in flight.

:class:`FileStore` owns uploaded bytes (keyed by the path under ``/cdn/files/``), bounded by a
total size, plus the state of multipart and initiate-style uploads in flight. It refuses what
it cannot take with :class:`StorageError`, which carries the HTTP status to answer.

The wire protocol over this store (token, simple, multipart and initiate uploads) is
:mod:`runner.emulator.storage_api`; serving ``GET /cdn/files/...`` lives in
:mod:`runner.emulator.images`, which reads this store.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]
"""Wall-clock time in unix seconds (``time.time`` in production, a fake in tests)."""

MAX_PARTS = 10_000
_COUNTERS = [
    "tokens_issued",
    "uploads_simple",
    "uploads_multipart",
    "uploads_initiate",
    "uploaded_bytes",
    "multipart_started",
    "multipart_parts",
    "initiated",
    "evicted",
    "expired",
    "rejected_too_large",
    "auth_rejected",
]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class StorageError(Exception):
    """An upload the store refuses; ``status_code`` is the HTTP answer to give."""

    def __init__(self, message: str, *, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One uploaded file: its bytes and how to serve them."""

    key: str
    data: bytes
    content_type: str
    created_at: float
    expires_at: float | None = None

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.data, usedforsecurity=False).hexdigest() + '"'


@dataclass(slots=True)
class _Multipart:
    key: str
    content_type: str
    expires_in_s: float | None
    parts: dict[int, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts.values())


@dataclass(frozen=True, slots=True)
class _Reservation:
    key: str
    content_type: str
    expires_in_s: float | None


def safe_file_name(name: str | None, default: str = "upload.bin") -> str:
    """A file name that is safe as one URL path segment."""
    cleaned = _SAFE_NAME.sub("_", (name or "").rsplit("/", 1)[-1]).strip("._")
    return cleaned[:120] or default


def _part_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class FileStore:
    """In-memory uploaded files, bounded by ``max_total_bytes`` (oldest evicted first).

    Bytes of multipart uploads still in flight count against the bound too; they are never
    evicted, so an upload that cannot fit is refused with 413 instead.
    """

    def __init__(self, *, max_total_bytes: int = 512 * 1024 * 1024, clock: Clock) -> None:
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._multiparts: dict[str, _Multipart] = {}
        self._reserved: OrderedDict[str, _Reservation] = OrderedDict()
        self._stored_bytes = 0
        self._pending_bytes = 0
        self._counts: Counter[str] = Counter()

    # -- files -------------------------------------------------------------------------------

    def new_key(self, file_name: str | None) -> str:
        return f"up/{secrets.token_hex(12)}/{safe_file_name(file_name)}"

    def put(
        self,
        data: bytes,
        *,
        content_type: str,
        file_name: str | None = None,
        key: str | None = None,
        expires_in_s: float | None = None,
        via: str = "simple",
    ) -> StoredFile:
        """Store ``data``; raises :class:`StorageError` (413) when it can never fit."""
        self._make_room(len(data))
        now = self._clock()
        stored = StoredFile(
            key=key or self.new_key(file_name),
            data=data,
            content_type=content_type or "application/octet-stream",
            created_at=now,
            expires_at=None if expires_in_s is None else now + expires_in_s,
        )
        old = self._files.pop(stored.key, None)
        if old is not None:
            self._stored_bytes -= len(old.data)
        self._files[stored.key] = stored
        self._stored_bytes += len(data)
        self._counts[f"uploads_{via}"] += 1
        self._counts["uploaded_bytes"] += len(data)
        return stored

    def get(self, key: str) -> StoredFile | None:
        """The file at ``key``, or None when unknown, evicted or expired."""
        stored = self._files.get(key)
        if stored is None:
            return None
        if stored.expires_at is not None and self._clock() >= stored.expires_at:
            self._files.pop(key)
            self._stored_bytes -= len(stored.data)
            self._counts["expired"] += 1
            return None
        return stored

    def _make_room(self, size: int) -> None:
        if size + self._pending_bytes > self.max_total_bytes:
            self._counts["rejected_too_large"] += 1
            raise StorageError("upload exceeds the storage limit", status_code=413)
        while self._files and self._stored_bytes + self._pending_bytes + size > (
            self.max_total_bytes
        ):
            _, evicted = self._files.popitem(last=False)
            self._stored_bytes -= len(evicted.data)
            self._counts["evicted"] += 1

    # -- multipart ---------------------------------------------------------------------------

    def begin_multipart(
        self, *, content_type: str, file_name: str | None, expires_in_s: float | None = None
    ) -> tuple[str, str]:
        """Start a multipart upload; returns ``(key, upload_id)``."""
        upload_id = secrets.token_hex(16)
        self._multiparts[upload_id] = _Multipart(
            self.new_key(file_name), content_type, expires_in_s
        )
        self._counts["multipart_started"] += 1
        return self._multiparts[upload_id].key, upload_id

    def put_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        """Store one part (1-based); returns its quoted md5 ETag."""
        upload = self._multipart(key, upload_id)
        if not 1 <= part_number <= MAX_PARTS:
            raise StorageError(f"part number must be 1..{MAX_PARTS}", status_code=400)
        previous = upload.parts.pop(part_number, b"")
        self._pending_bytes -= len(previous)
        if len(data) + self._pending_bytes > self.max_total_bytes:
            self._counts["rejected_too_large"] += 1
            raise StorageError("upload exceeds the storage limit", status_code=413)
        upload.parts[part_number] = data
        self._pending_bytes += len(data)
        self._counts["multipart_parts"] += 1
        return _part_etag(data)

    def complete_multipart(self, key: str, upload_id: str, parts: Any) -> StoredFile:
        """Assemble the listed parts in part-number order after checking each ETag.

        The official client lists parts in the order its concurrent PUTs finished, so the
        list is sorted here rather than required to be ascending; duplicates, unknown parts
        and ETag mismatches are refused with 400.
        """
        upload = self._multipart(key, upload_id)
        numbers = _parse_parts(parts, upload)
        data = b"".join(upload.parts[n] for n in numbers)
        del self._multiparts[upload_id]
        self._pending_bytes -= upload.size
        return self.put(
            data,
            content_type=upload.content_type,
            key=key,
            expires_in_s=upload.expires_in_s,
            via="multipart",
        )

    def _multipart(self, key: str, upload_id: str) -> _Multipart:
        upload = self._multiparts.get(upload_id)
        if upload is None or upload.key != key:
            raise StorageError("unknown multipart upload", status_code=404)
        return upload

    # -- initiate (signed URL) ---------------------------------------------------------------

    def reserve(
        self, *, content_type: str, file_name: str | None, expires_in_s: float | None = None
    ) -> tuple[str, str]:
        """Reserve a key for a later PUT; returns ``(key, upload_token)``."""
        token = secrets.token_urlsafe(24)
        self._reserved[token] = _Reservation(self.new_key(file_name), content_type, expires_in_s)
        while len(self._reserved) > 10_000:
            self._reserved.popitem(last=False)
        self._counts["initiated"] += 1
        return self._reserved[token].key, token

    def fulfil(self, token: str, data: bytes, content_type: str | None) -> StoredFile:
        """Store the bytes PUT to a reserved upload URL."""
        reservation = self._reserved.pop(token, None)
        if reservation is None:
            raise StorageError("unknown or used upload URL", status_code=403)
        return self.put(
            data,
            content_type=content_type or reservation.content_type,
            key=reservation.key,
            expires_in_s=reservation.expires_in_s,
            via="initiate",
        )

    def count(self, name: str) -> None:
        self._counts[name] += 1

    def stats(self) -> dict[str, int]:
        """Counters for the emulator's stats endpoint."""
        out = {name: self._counts[name] for name in _COUNTERS}
        out["files"] = len(self._files)
        out["stored_bytes"] = self._stored_bytes
        out["pending_bytes"] = self._pending_bytes
        return out


def _parse_parts(parts: Any, upload: _Multipart) -> list[int]:
    if not isinstance(parts, list) or not parts:
        raise StorageError("parts must be a non-empty list", status_code=400)
    seen: set[int] = set()
    for item in parts:
        number = item.get("partNumber") if isinstance(item, dict) else None
        etag = item.get("etag") if isinstance(item, dict) else None
        if not isinstance(number, int) or not isinstance(etag, str):
            raise StorageError("each part needs partNumber and etag", status_code=400)
        if number in seen:
            raise StorageError(f"part {number} listed twice", status_code=400)
        seen.add(number)
        data = upload.parts.get(number)
        if data is None:
            raise StorageError(f"part {number} was not uploaded", status_code=400)
        if etag.strip('"') != _part_etag(data).strip('"'):
            raise StorageError(f"etag mismatch for part {number}", status_code=400)
    return sorted(seen)
