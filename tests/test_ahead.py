"""runner.ledger.ahead: a thread one item ahead (the ledger's reads) and one write behind
(an export's file), with their errors raised where the caller would have met them."""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from runner.ledger import ahead as ahead_module
from runner.ledger.ahead import BehindWriter, ahead
from tests.report_support import completed_run


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("runner-")}


def test_items_come_in_order_and_the_thread_ends() -> None:
    assert list(ahead(iter(range(1000)))) == list(range(1000))
    assert list(ahead(iter([]))) == []
    assert not _threads()


def _at_least(values: list[int], n: int) -> Callable[[], bool]:
    return lambda: values[-1] >= n


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_thread_begins_an_item_only_once_the_caller_took_the_one_depth_before(
    depth: int,
) -> None:
    begun: list[int] = []
    changed = threading.Condition()

    def source() -> Iterator[int]:
        for i in range(50):
            with changed:
                begun.append(i)
                changed.notify_all()
            yield i

    taken = []
    for item in ahead(source(), depth):
        assert threading.current_thread() is threading.main_thread()
        reach = min(item + depth, 49)
        with changed:  # the thread goes on to `depth` items past this one ...
            assert changed.wait_for(_at_least(begun, reach), timeout=30)
            assert begun[-1] == reach  # ... and no further while this one is held
        taken.append(item)
    assert taken == list(range(50))


def test_an_error_of_the_source_is_raised_at_its_item_and_nothing_after() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise FileNotFoundError("part-0003 went away")  # a compaction racing a read

    got: list[int] = []
    with pytest.raises(FileNotFoundError, match="part-0003"):
        for item in ahead(source()):
            got.append(item)
    assert got == [1, 2]
    assert not _threads()


def test_a_caller_that_stops_early_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    items = ahead(source())
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed.is_set()
    assert not _threads()


def test_an_error_of_the_caller_stops_the_thread() -> None:
    with pytest.raises(ValueError, match="caller"):
        for item in ahead(iter(range(10**9))):
            if item == 5:
                raise ValueError("caller")
    assert not _threads()


class _Handle(io.BytesIO):
    """A binary file that fails its ``fail_at``-th write as a full disk does."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at, self.writes = fail_at, 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_behind_writer_writes_every_buffer_in_order() -> None:
    handle = _Handle()
    chunks = [bytes([i % 251]) * (i * 37 % 5000) for i in range(500)]
    with BehindWriter(handle) as behind:
        for chunk in chunks:
            behind.write(memoryview(chunk))
    assert handle.getvalue() == b"".join(chunks)
    assert not _threads()


def test_behind_writer_raises_a_failed_write_at_the_latest_when_left() -> None:
    handle = _Handle(fail_at=3)
    with pytest.raises(OSError) as caught, BehindWriter(handle) as behind:
        for _ in range(3):
            behind.write(b"x" * 10)
    assert caught.value.errno == errno.ENOSPC
    assert handle.getvalue() == b"x" * 20  # nothing after the failed write
    assert not _threads()


def test_behind_writer_raises_a_failed_write_at_a_later_write() -> None:
    handle = _Handle(fail_at=1)
    with pytest.raises(OSError) as caught, BehindWriter(handle) as behind:
        for _ in range(10_000):
            behind.write(b"y")
    assert caught.value.errno == errno.ENOSPC
    assert handle.writes < 10_000  # raised while writing, not only at the end
    assert not _threads()


def test_an_error_of_the_block_wins_over_the_writers() -> None:
    handle = _Handle(fail_at=1)
    with pytest.raises(KeyError), BehindWriter(handle) as behind:
        behind.write(b"z")
        raise KeyError("the block's own")
    assert not _threads()


def test_written_back_files_hold_exactly_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advised: list[int] = []
    real = getattr(os, "posix_fadvise", None)

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append(length)
        if real is not None:
            real(fd, offset, length, advice)

    monkeypatch.setattr(ahead_module, "WRITTEN_BACK_BYTES", 1000)
    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    chunks = [bytes([65 + i % 26]) * 333 for i in range(100)]
    path = tmp_path / "out"
    with open(path, "wb") as handle, BehindWriter(handle) as behind:
        for chunk in chunks:
            behind.write(chunk)
    assert path.read_bytes() == b"".join(chunks)
    assert advised == [333 * k for k in range(4, 101, 4)]  # every 1,000 bytes, all so far


def test_a_flush_that_fails_is_the_writes_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unflushable(_Handle):
        def flush(self) -> None:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ahead_module, "WRITTEN_BACK_BYTES", 1)
    with pytest.raises(OSError) as caught, BehindWriter(Unflushable()) as behind:
        behind.write(b"abc")
    assert caught.value.errno == errno.EIO


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_export_whose_disk_fills_is_one_line_and_exit_4_and_leaves_no_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    """The writes happen in the writer thread; their error is still the command's one line."""
    from runner.cli import main
    from runner.ledger import exportfile

    run_dir = completed_run(tmp_path / "run", 300)

    class Full(io.FileIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exportfile, "open", lambda path, mode: Full(path, mode), raising=False)
    out = tmp_path / f"jobs.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert err.strip() == (
        f"runner: error: cannot write the export {out}: [Errno 28] No space left on device"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no file, no temp file
    assert not _threads()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_export_staged_to_be_read_back_keeps_its_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: Literal["csv", "jsonl"]
) -> None:
    """``--out -`` stages the file and copies it out at once: its pages are not let go
    (read back from the disk, that took 17-20 s against 16 for a 1M-job JSONL export)."""
    from runner.ledger import views

    run_dir = completed_run(tmp_path / "run", 50)
    advised: list[int] = []
    monkeypatch.setattr(ahead_module, "WRITTEN_BACK_BYTES", 1)
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(a[2]), raising=False)
    kept = views.export(run_dir, tmp_path / f"kept.{fmt}", fmt, read_back=True)
    assert kept == 50 and advised == []
    let_go = views.export(run_dir, tmp_path / f"let-go.{fmt}", fmt)
    assert let_go == 50 and advised  # a file for later: its pages let go as written
    assert (tmp_path / f"kept.{fmt}").read_bytes() == (tmp_path / f"let-go.{fmt}").read_bytes()
