"""Start-up stays cheap: ``runner --help`` imports none of the heavy parts, and a command runs
with pandas and trio unimportable (pyarrow and httpcore only probe for them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli.imports import UNUSED, without_unused

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("pyarrow", "numpy", "pandas", "pydantic", "httpx", "PIL", "runner.emulator",
         "runner.report", "runner.execution", "runner.ledger", "runner.config")  # fmt: skip
_PROBE = """
import runpy, sys
sys.argv = ["runner", *sys.argv[1:]]
try:
    runpy.run_module("runner", run_name="__main__")
except SystemExit:
    pass
print("\\n".join(sorted(sys.modules)), file=sys.stderr)
"""


def _modules_after(*argv: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert "usage: runner" in done.stdout
    return set(done.stderr.split())


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["run", "--help"]])
def test_help_imports_none_of_the_heavy_parts(argv: list[str]) -> None:
    loaded = _modules_after(*argv)
    assert "runner.cli" in loaded
    assert not {m for m in loaded for h in HEAVY if m == h or m.startswith(h + ".")}


def test_a_command_cannot_import_pandas_or_trio_and_afterwards_can() -> None:
    pytest.importorskip("pandas")
    code = """
import sys
from runner.cli.imports import without_unused
with without_unused():
    for name in ("pandas", "trio", "pandas.core"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            print("refused", name)
    import pyarrow as pa
    pa.array([1, 2])  # pyarrow's probe for pandas finds none
    print("pandas" in sys.modules)
import pandas
print("later", pandas.__name__)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.split("\n")[:5] == [
        "refused pandas", "refused trio", "refused pandas.core", "False", "later pandas",
    ]  # fmt: skip


def test_what_is_imported_already_is_left_alone() -> None:
    pytest.importorskip("trio")
    assert "trio" in UNUSED
    with without_unused():
        import trio  # noqa: F401  # imported by this test session: still there
    assert "trio" in sys.modules
