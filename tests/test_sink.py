"""Where outputs go: which OS errors mean the storage refuses writes (a table), the path such an
error names, and the local directory a target writes to."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import httpx
import pytest

from runner.errors import HTTPStatusError, TransportError
from runner.media.sink import (
    STORAGE_ERRNOS,
    OutputSink,
    local_output_dir,
    storage_failure,
    with_path,
)


def os_error(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), filename)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (os_error(errno.ENOSPC, "/out/r/.k-0.png.part"),
         "storage refused a write to /out/r/.k-0.png.part: [Errno 28] No space left on device"),
        (os_error(errno.EDQUOT, "/out/x"), f"[Errno {errno.EDQUOT}] {os.strerror(errno.EDQUOT)}"),
        (os_error(errno.EROFS, "/out/x"), "/out/x: [Errno 30] Read-only file system"),
        (os_error(errno.EACCES, "/out/x"), "/out/x: [Errno 13] Permission denied"),
        (os_error(errno.EPERM, "/out/x"), "/out/x: [Errno 1] Operation not permitted"),
        (os_error(errno.ENOSPC), "a write to the output folder: [Errno 28]"),
        (os_error(errno.ENOSPC, "/out/a\nb"), "a write to '/out/a\\nb': [Errno 28]"),
        (os_error(errno.ENOENT, "/out/x"), None),
        (os_error(errno.EIO, "/out/x"), None),
        (os_error(errno.ECONNRESET), None),
        (OSError("no errno"), None),
        (TransportError("GET https://cdn.test/a.png: ConnectError", sent=False), None),
        (HTTPStatusError("GET https://cdn.test/a.png: HTTP 404", status_code=404), None),
        (httpx.ConnectError("refused"), None),
        (ValueError("not an OSError"), None),
    ],
)  # fmt: skip
def test_only_full_read_only_or_forbidden_storage_is_a_storage_failure(
    exc: BaseException, reason: str | None
) -> None:
    got = storage_failure(exc)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got and "\n" not in got


def test_the_storage_errnos_are_the_documented_five() -> None:
    assert {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM} == STORAGE_ERRNOS


def test_an_error_without_a_file_gets_the_path_and_keeps_its_errno_and_kind() -> None:
    bare = os_error(errno.EACCES)
    named = with_path(bare, Path("/out/r/.k-0.png.part"))
    assert isinstance(named, PermissionError) and named.errno == errno.EACCES
    assert named.filename == "/out/r/.k-0.png.part"
    already = os_error(errno.ENOSPC, "/elsewhere")
    assert with_path(already, Path("/out/x")) is already
    no_errno = OSError("pyarrow said something")
    assert with_path(no_errno, Path("/out/x")) is no_errno


def test_the_local_output_dir_is_out_itself_or_the_scratch_for_a_url(tmp_path: Path) -> None:
    assert local_output_dir(str(tmp_path / "out"), tmp_path / "run") == tmp_path / "out"
    url = (tmp_path / "bucket").as_uri()
    assert local_output_dir(url, tmp_path / "run") == tmp_path / "run" / "downloads.tmp"
    assert OutputSink(url, tmp_path / "run").scratch == local_output_dir(url, tmp_path / "run")
