"""runner.ledger.scratch: a read whose scratch folder refuses writes ends in one line naming
that folder and TMPDIR (exit 4), not a traceback, and leaves no scratch behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.errors import LedgerError
from runner.ledger.scratch import scratch_errors, scratch_folder
from tests.report_support import completed_run


def test_a_failed_write_names_the_folder_and_tmpdir(tmp_path: Path) -> None:
    folder = tmp_path / "runner-scan-x"
    with pytest.raises(LedgerError) as caught, scratch_errors(folder):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] ...")
    assert str(caught.value) == (
        f"cannot write scratch files in {tmp_path}: [Errno 28] No space left on device "
        "(a read of a big ledger needs room there); set TMPDIR to a folder with room"
    )


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError(errno.ENOENT, "a part gone"), OSError("no errno"), ValueError("not I/O")],
)
def test_what_is_not_a_failed_write_passes_through(tmp_path: Path, error: Exception) -> None:
    with pytest.raises(type(error)) as caught, scratch_errors(tmp_path):
        raise error
    assert caught.value is error  # a vanished part still makes the read start over


def test_the_folder_goes_with_the_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    with scratch_folder("runner-x-") as folder:
        assert folder.parent == tmp_path and folder.is_dir()
        (folder / "a").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    from runner.ledger import scan
    scan.PASS_BYTES = 1024  # a small ledger spilled to scratch buckets, as a big one is
    from runner.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ (Linux)")
@pytest.mark.parametrize("command", [["status"], ["report"], ["export", "--format", "jsonl"]])
def test_a_read_whose_scratch_refuses_writes_is_one_line_and_exit_4(
    tmp_path: Path, command: list[str]
) -> None:
    run_dir = completed_run(tmp_path / "run", 300, checkpoint=True)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    argv = [command[0], str(run_dir), *command[1:]]
    if command[0] == "export":
        argv += ["--out", str(out / "jobs.jsonl")]
    elif command[0] == "report":
        argv += ["--html", str(out / "report.html")]
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, *argv],
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"runner: error: cannot write scratch files in {scratch}: [Errno 27] File too large; "
        "set TMPDIR to a folder with room"
    ]
    assert list(scratch.iterdir()) == []  # the scratch folder went with the read
    assert list(out.iterdir()) == []  # no export, no temp file
