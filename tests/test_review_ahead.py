"""Review of the export's read-ahead and write-behind threads (runner.ledger.ahead): how
``runner export`` ends when it is stopped part way. Each case runs the command line in a
process of its own, stopped at a known point of the export (the process signals itself), so
the outcome does not depend on timing."""

from __future__ import annotations

import importlib.util
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


_PROBES = """
    import atexit, sys
    import runner.cli.imports as imports
    real = imports._Refuse.find_spec
    probes = []
    def find_spec(self, name, path, target=None):
        if name.startswith("dateutil"):
            probes.append(name)
            if len(probes) == 1 and {interrupt}:
                raise KeyboardInterrupt  # as the SIGINT handler does when it runs here
        return real(self, name, path, target)
    imports._Refuse.find_spec = find_spec
    atexit.register(lambda: print("probes", len(probes), file=sys.stderr))
"""


@pytest.mark.skipif(importlib.util.find_spec("dateutil") is None, reason="needs dateutil")
def test_an_interrupt_that_lands_in_pyarrows_probe_import_is_not_lost(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "run")
    out = tmp_path / "out" / "jobs.jsonl"
    out.parent.mkdir()
    """pyarrow clears any error of its probe import of dateutil, and an export converts
    Python values at every kernel call (169 probes in a 21-job JSONL export while the command
    refused dateutil): a Ctrl-C whose handler ran inside a probe was lost, and the export
    went on to exit 0 (1 in 18 SIGINTs at 1M jobs). The export admits dateutil first: the
    one import that can see the interrupt is the command's own."""
    prelude = _PROBES.format(interrupt=True)
    done = _export(run_dir, out, "jsonl", prelude)
    assert done.returncode == EXIT_INTERRUPTED, (done.returncode, done.stderr)
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("dateutil") is None, reason="needs dateutil")
def test_an_export_probes_for_dateutil_only_while_it_imports_it(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "run")
    for fmt in ("csv", "jsonl", "parquet"):
        done = _export(run_dir, tmp_path / f"jobs.{fmt}", fmt, _PROBES.format(interrupt=False))
        assert done.returncode == 0, done.stderr
        probes = int(done.stderr.rsplit("probes ", 1)[1])
        assert 1 <= probes <= 5  # the import of dateutil and its modules, none per kernel call


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
