"""Where downloaded outputs go: their names, the local disk or filesystem URL they land on,
and which OS errors mean that storage itself refuses to keep them.

    output_name(row_id, job_key, i, fmt)   ``{safe row id}/{job_key}-{i}.{ext}`` under --out
    OutputSink.open_temp(temp)             every local write of a download goes through here
    OutputSink.publish(temp, relative)     atomic rename in a local --out, or pyarrow.fs
    storage_failure(exc)                   "disk full / read-only / not allowed", or None

A storage failure is not the download's fault and retrying will not cure it: the download
stage stops fetching (and the run stops paying for) outputs it cannot keep.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import unicodedata
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.fs as pafs

from runner.errors import UsageError

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}
MAX_SEGMENT = 80

# errno values that say the local storage will not take the file (full, over quota,
# read-only, permission), as opposed to a flaky transfer. Data, so adding one is one line.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


# -- names ---------------------------------------------------------------------------------------


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


def local_output_dir(target: str, run_dir: Path) -> Path:
    """The local directory downloads are written in: --out itself, or for a filesystem URL
    the scratch folder in the run directory that files pass through on their way there."""
    return run_dir / "downloads.tmp" if "://" in target else Path(target)


# -- the sink ------------------------------------------------------------------------------------


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
        self.scratch = local_output_dir(target, run_dir)

    def temp_path(self, relative: str) -> Path:
        """A fixed temp name per output: one writer holds the run directory, and a resume
        after a kill mid-download overwrites and renames the same file, leaving no debris."""
        final = self.scratch / relative
        return final.with_name(f".{final.name}.part")

    async def open_temp(self, temp: Path) -> anyio.AsyncFile[bytes]:
        """``temp`` truncated and open for writing, its directory made first."""
        await anyio.Path(temp.parent).mkdir(parents=True, exist_ok=True)
        return await anyio.open_file(temp, "wb")

    def publish(self, temp: Path, relative: str) -> str:
        """Move a verified temp file into place; returns what the ledger records."""
        if self._fs is None:
            final = Path(self.target) / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            return str(final.resolve())
        dest = f"{self._base.rstrip('/')}/{relative}"
        shown = f"{self.target.rstrip('/')}/{relative}"
        try:
            self._fs.create_dir(dest.rpartition("/")[0], recursive=True)
            with temp.open("rb") as src, self._fs.open_output_stream(dest + ".part") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            self._fs.move(dest + ".part", dest)
        except OSError as exc:
            located = with_path(exc, shown)  # pyarrow names no file: name the destination
            if located is exc:
                raise
            raise located from exc
        temp.unlink()
        return shown


# -- storage failures ----------------------------------------------------------------------------


def storage_failure(exc: BaseException) -> str | None:
    """A one-line reason naming the path when ``exc`` says the storage refuses writes
    (ENOSPC, EDQUOT, EROFS, EACCES, EPERM), else None (a transfer or content failure)."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "the output folder"
    shown = str(where) if str(where).isprintable() else repr(str(where))
    return f"storage refused a write to {shown}: [Errno {exc.errno}] {exc.strerror}"


def with_path(exc: OSError, path: Path | str) -> OSError:
    """``exc`` naming ``path`` when the OS did not name a file (a failed write() or close()).
    The errno is kept, and with it the subclass: OSError(EACCES, ...) is a PermissionError."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
