"""Where downloaded outputs go: their names, the local disk or filesystem URL they land on,
and which OS errors mean that storage itself refuses to keep them.

    output_name(row_id, job_key, i, fmt)   ``{safe row id}/{job_key}-{i}.{ext}`` under --out
    OutputSink.open_temp(temp)             every local write of a download goes through here
    OutputSink.publish(temp, relative)     atomic rename in a local --out, or pyarrow.fs
    OutputSink.discard(temp)               remove a temp file this sink made, nothing else
    storage_failure(exc)                   "disk full / read-only / not allowed", or None

A storage failure is not the download's fault and retrying will not cure it: the download
stage stops fetching (and the run stops paying for) outputs it cannot keep.

No symbolic link below the local output directory is ever followed: each folder is opened
relative to its parent's descriptor with ``O_NOFOLLOW``, and the temp file, the check of the
final name and the rename are all relative to the row folder's descriptor. A link planted
where a row folder, a temp file or an output goes (perhaps pointing outside --out) is left
exactly as it is, and that output fails with ``ELOOP`` naming the link: a per-job failure,
not a storage failure. The output directory itself may be a link; the user chose it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import unicodedata
from collections.abc import Iterator
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
        after a kill mid-download replaces and renames the same file, leaving no debris."""
        final = self.scratch / relative
        return final.with_name(f".{final.name}.part")

    async def open_temp(self, temp: Path) -> anyio.AsyncFile[bytes]:
        """``temp`` created afresh and open for writing, its folders made first; raises
        OSError (ELOOP, naming it) when a folder or the temp name is a symbolic link."""
        fd = await anyio.to_thread.run_sync(self._create_temp, temp)
        return anyio.AsyncFile(os.fdopen(fd, "wb"))

    def discard(self, temp: Path) -> None:
        """Remove ``temp`` when it is a regular file; a link planted in its place stays."""
        with contextlib.suppress(OSError), self._folder(temp.parent, create=False) as folder:
            if stat.S_ISREG(os.stat(temp.name, dir_fd=folder, follow_symlinks=False).st_mode):
                os.unlink(temp.name, dir_fd=folder)

    def publish(self, temp: Path, relative: str) -> str:
        """Move a verified temp file into place; returns what the ledger records.
        ``temp`` is :meth:`temp_path` of ``relative``: the same folder, a rename within it."""
        if self._fs is None:
            final = self.scratch / relative
            with self._folder(final.parent, create=True) as folder:
                _refuse_link(folder, final)
                with _naming(final):
                    os.replace(temp.name, final.name, src_dir_fd=folder, dst_dir_fd=folder)
            return str(self.scratch.resolve() / relative)
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
        self.discard(temp)
        return shown

    def _create_temp(self, temp: Path) -> int:
        with self._folder(temp.parent, create=True) as folder:
            try:
                with _naming(temp):
                    return os.open(temp.name, _NEW_FILE, 0o644, dir_fd=folder)
            except FileExistsError:
                pass
            # Debris of a run killed mid-download: replaced, never written through (a hard
            # link's other names keep their bytes); a link in its place stays as it is.
            _refuse_link(folder, temp)
            with _naming(temp):
                os.unlink(temp.name, dir_fd=folder)
                return os.open(temp.name, _NEW_FILE, 0o644, dir_fd=folder)

    @contextlib.contextmanager
    def _folder(self, folder: Path, *, create: bool) -> Iterator[int]:
        """A descriptor of ``folder``, a folder below the local output directory, reached
        one name at a time without following a link; made on the way when ``create``."""
        names = folder.relative_to(self.scratch).parts
        with _naming(self.scratch):
            if create:
                self.scratch.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.scratch, _DIRECTORY)
        try:
            where = self.scratch
            for name in names:
                where = where / name
                try:
                    with _naming(where):
                        if create:
                            with contextlib.suppress(FileExistsError):
                                os.mkdir(name, 0o755, dir_fd=fd)
                        child = os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:
                    _refuse_link(fd, where)  # the clearer reason, when it is a link
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC
# O_EXCL never follows a link at the name; O_NOFOLLOW says so twice.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC


def _refuse_link(folder: int, path: Path) -> None:
    """Raise ELOOP naming ``path`` when its name in ``folder`` is a symbolic link."""
    try:
        mode = os.stat(path.name, dir_fd=folder, follow_symlinks=False).st_mode
    except OSError:
        return  # nothing there, or nothing to tell: the caller's own error stands
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "a symbolic link, not followed and left as it is", str(path))


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """OSErrors inside name ``path`` in full: a call relative to a descriptor names only
    the last component. The errno, and with it the subclass, is kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


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
