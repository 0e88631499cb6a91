"""Review of the export's read-ahead and write-behind threads (runner.ledger.ahead): how
``runner export`` ends when it is stopped part way. Each case runs the command line in a
process of its own, stopped at a known point of the export (the process signals itself), so
the outcome does not depend on timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.errors import EXIT_INTERRUPTED
from tests.report_support import sample_run

ROOT = Path(__file__).resolve().parents[1]


def _export(run_dir: Path, out: Path, fmt: str, prelude: str) -> subprocess.CompletedProcess[str]:
    """``runner export`` in a process of its own, ``prelude`` run before its command line."""
    script = textwrap.dedent(prelude) + textwrap.dedent(
        f"""
        from runner.cli import main
        raise SystemExit(main([
            "export", {str(run_dir)!r}, "--format", {fmt!r}, "--out", {str(out)!r}
        ]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_sigterm_while_writing_is_an_interrupt_and_leaves_no_temp_file(
    tmp_path: Path, fmt: str
) -> None:
    """SIGTERM (a service manager stopping the command, ``timeout``) ends an export as Ctrl-C
    does, as it ends a run: exit 130, one line, and no ``.NAME.tmp`` left beside the output.
    Before, the default action killed the process mid-write and left the temp file."""
    run_dir = sample_run(tmp_path / "run")
    out = tmp_path / "out" / f"jobs.{fmt}"
    out.parent.mkdir()
    prelude = """
        import os, signal
        from runner.ledger import exportfile
        real = exportfile.write_batches
        def write_batches(batches, schema, handle, fmt):
            os.kill(os.getpid(), signal.SIGTERM)  # the temp file is open and being written
            real(batches, schema, handle, fmt)
        exportfile.write_batches = write_batches
    """
    done = _export(run_dir, out, fmt, prelude)
    assert done.returncode == EXIT_INTERRUPTED, (done.returncode, done.stderr)
    assert done.stderr == "runner: interrupted\n"
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_sigterm_handling_is_the_commands_own_and_given_back() -> None:
    from runner.cli.export import terminated_as_interrupted

    # The default action, as in a command's own process (an earlier test in this one, ray's
    # init, may have set a handler: put back at the end).
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with terminated_as_interrupted():
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def host(signum: int, frame: object) -> None:  # a host's own handler: left alone
            raise AssertionError("not called")

        signal.signal(signal.SIGTERM, host)
        with terminated_as_interrupted():
            assert signal.getsignal(signal.SIGTERM) is host
        assert signal.getsignal(signal.SIGTERM) is host
    finally:
        signal.signal(signal.SIGTERM, previous)


_TRIES = """
    import atexit, sys
    class Count:
        tries = 0
        def find_spec(self, name, path, target=None):
            Count.tries += name.startswith("dateutil")
    sys.meta_path.insert(0, Count())
    atexit.register(lambda: print("tries", Count.tries, file=sys.stderr))
"""


def test_an_export_tries_no_import_of_dateutil(tmp_path: Path) -> None:
    """pyarrow looks for dateutil at every conversion of Python values and clears any error
    of that import: a Ctrl-C whose handler ran inside it was lost, and the export went on
    to exit 0 (1 in 18 SIGINTs at 1M jobs; 169 tries in a 21-job JSONL export). While a
    command runs the probe finds a stand-in: no import is tried, whether or not dateutil
    is installed."""
    run_dir = sample_run(tmp_path / "run")
    for fmt in ("csv", "jsonl", "parquet"):
        done = _export(run_dir, tmp_path / f"jobs.{fmt}", fmt, _TRIES)
        assert done.returncode == 0, done.stderr
        assert done.stderr.endswith("tries 0\n"), done.stderr


def test_two_exports_to_one_path_at_once_both_end_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each export writes a temp file of its own: one that was still writing when the other
    renamed the shared temp name into place lost its file (``cannot write the export``) and
    the file at the path was, for a while, being written by the other."""
    import threading

    from runner.ledger import exportfile
    from runner.ledger.views import export

    run_dir = sample_run(tmp_path / "run")
    out = tmp_path / "jobs.csv"
    export(run_dir, tmp_path / "alone.csv", "csv")
    real = exportfile.write_batches
    first_paused, second_done = threading.Event(), threading.Event()

    def write_batches(*args: object) -> None:
        if not first_paused.is_set():  # the first export waits, its temp file open ...
            first_paused.set()
            assert second_done.wait(timeout=60)  # ... while the second writes and renames
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(exportfile, "write_batches", write_batches)
    counts: list[int] = []
    first = threading.Thread(target=lambda: counts.append(export(run_dir, out, "csv")))
    first.start()
    assert first_paused.wait(timeout=60)
    counts.append(export(run_dir, out, "csv"))
    second_done.set()
    first.join(timeout=60)
    assert counts == [10, 10]
    assert out.read_bytes() == (tmp_path / "alone.csv").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
