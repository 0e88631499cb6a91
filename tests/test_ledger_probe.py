"""The write probe: a run directory or output folder that cannot take a file is refused up front
with one line (exit 4), and the probe file never stays behind, whichever step fails."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.errors import EXIT_LEDGER, LedgerError
from runner.ledger.probe import PROBE_PREFIX, probe_writable


def test_a_writable_directory_passes_and_keeps_nothing_but_what_was_there(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    probe_writable(tmp_path, what="run directory")
    probe_writable(tmp_path, what="run directory")
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_a_missing_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    probe_writable(target, what="output folder")
    assert target.is_dir() and list(target.iterdir()) == []


def test_a_path_under_a_regular_file_is_refused_in_one_line(tmp_path: Path) -> None:
    # ENOTDIR: refused for root too, unlike a chmod.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "out"
    with pytest.raises(LedgerError) as caught:
        probe_writable(target, what="output folder")
    assert caught.value.exit_code == EXIT_LEDGER == 4
    assert (
        str(caught.value)
        == f"cannot write to the output folder {target}: [Errno 20] Not a directory"
    )
    assert blocker.read_text() == "not a directory"


def test_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("")
    with pytest.raises(
        LedgerError, match=r"^cannot write to the run directory .*/run: \[Errno 17\]"
    ):
        probe_writable(blocker, what="run directory")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        try:  # root (as in CI) writes through any mode bits: then this case proves nothing
            (target / "canary").touch()
        except PermissionError:
            yield target
            return
        (target / "canary").unlink()
        pytest.skip("running as a user whom file modes do not stop (root)")
    finally:
        target.chmod(stat.S_IRWXU)


def test_a_read_only_directory_is_refused(read_only_dir: Path) -> None:
    with pytest.raises(LedgerError) as caught:
        probe_writable(read_only_dir, what="output folder")
    assert str(caught.value) == (
        f"cannot write to the output folder {read_only_dir}: [Errno 13] Permission denied"
    )
    assert list(read_only_dir.iterdir()) == []


def _fails_with(code: int) -> object:
    def fail(*_args: object) -> int:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("call", "code"), [("write", errno.ENOSPC), ("fsync", errno.ENOSPC), ("fsync", errno.EIO)]
)
def test_a_failed_write_or_fsync_is_refused_and_leaves_no_probe_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    # The OS's own failure after the file exists: a full disk, a dying one.
    monkeypatch.setattr(os, call, _fails_with(code))
    with pytest.raises(LedgerError) as caught:
        probe_writable(tmp_path, what="run directory")
    monkeypatch.undo()
    assert str(caught.value) == (
        f"cannot write to the run directory {tmp_path}: [Errno {code}] {os.strerror(code)}"
    )
    assert isinstance(caught.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_mid_probe_still_removes_the_probe_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probe_writable(tmp_path, what="run directory")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_an_unprintable_path_keeps_the_message_on_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LedgerError) as caught:
        probe_writable(blocker / "a\nb", what="output folder")
    assert "\n" not in str(caught.value) and "a\\nb" in str(caught.value)


def test_the_probe_never_touches_an_existing_file_that_looks_like_one(tmp_path: Path) -> None:
    lookalike = tmp_path / f"{PROBE_PREFIX}{os.getpid()}-000000000000"
    lookalike.write_text("someone else's")
    probe_writable(tmp_path, what="run directory")
    assert [p.name for p in tmp_path.iterdir()] == [lookalike.name]
    assert lookalike.read_text() == "someone else's"
