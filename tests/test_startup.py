"""Start-up stays cheap: ``runner --help`` imports none of the heavy parts, ``runner run``
against a queue URL imports none of the parts it does not use, and a command runs with
pandas and trio unimportable (pyarrow and httpcore only probe for them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
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


# What `runner run` against a queue URL (fal, or an emulator in another process) must not
# import: the emulator and the report, the webhook receiver's server stack (webhook mode
# only), sharding and its cross-process gate files (--shards, --gate-dir), Ray, the other
# commands' modules (cancel, plan's preview, the Python API), the ledger's readers (views,
# exports, totals, scans), Pillow (until an image is checked), tqdm (a terminal only),
# pandas and dateutil (pyarrow's probes), httpx's own command line (click, rich, pygments),
# tomllib (a config file only), difflib (a near-miss hint only) and the cross-run cache
# (--cache only), numpy.ma (pyarrow looks for it in any pa.array(ndarray): the reader's
# masks are built from their bits).
RUN_UNUSED = ("runner.emulator", "runner.report", "runner.fal.receiver", "runner.fal.webhook",
              "runner.fal.jwks", "runner.scale.shards", "runner.scale.feed",
              "runner.scale.spending", "runner.scale.ray_driver", "runner.scale.ray_gate",
              "runner.execution.lease", "runner.execution.sharedrate",
              "runner.execution.spendfile", "runner.execution.cancel",
              "runner.execution.preview", "runner.api", "runner.ledger.views",
              "runner.ledger.exports", "runner.ledger.totals", "runner.ledger.scan", "uvicorn",
              "starlette", "cryptography", "PIL", "tqdm", "pandas", "httpx._main", "click",
              "rich", "pygments", "ray", "dateutil", "six", "tomllib", "difflib",
              "runner.media.cache", "runner.execution.reuse", "numpy.ma")  # fmt: skip
_RUN_PROBE = """
import runpy, sys
out, sys.argv = sys.argv[1], ["runner", *sys.argv[2:]]
try:
    runpy.run_module("runner", run_name="__main__")
except SystemExit as exc:
    code = exc.code
with open(out, "w") as fh:
    fh.write(str(code) + "\\n" + "\\n".join(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    """``runner emulator serve`` in its own process, answering at once."""
    argv = [sys.executable, "-m", "runner", "emulator", "serve", "--host", "127.0.0.1", "--port",
            "0", "--time-scale", "1e-6", "--faults", "result_retention_s=3.6e9"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        found = re.search(r"http://\S+", proc.stdout.readline())
        assert found, "the emulator did not start"
        yield found.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_run_against_a_queue_url_imports_only_what_it_uses(
    tmp_path: Path, emulator_url: str, kind: str
) -> None:
    manifest = tmp_path / f"three.{kind}"
    if kind == "csv":  # the batch reader's vector path (masks, presets, sizes)
        lines = ["prompt,image_size", *(f"a test image {i},64x64" for i in range(3))]
        manifest.write_text("\n".join(lines) + "\n")
    else:
        rows = [{"prompt": f"a test image {i}", "image_size": {"width": 64, "height": 64}}
                for i in range(3)]  # fmt: skip
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "modules.txt"
    argv = ["run", str(manifest), "--queue-url", emulator_url, "--endpoint", "fal-ai/flux-lora",
            "--no-download", "--quiet", "--ledger", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAL_KEY": "emulator:local-key"}
    subprocess.run([sys.executable, "-c", _RUN_PROBE, str(out), *argv], cwd=tmp_path, env=env,
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    code, *loaded = out.read_text().split("\n")
    assert code == "0"  # every job completed
    assert "runner.execution.engine" in loaded and "runner.ledger.store" in loaded
    assert not {m for m in loaded for u in RUN_UNUSED if m == u or m.startswith(u + ".")}


# What `runner cancel` must not import: it reads the ledger and calls the queue, and needs
# none of a run's wiring (the engine, admission, workers), the manifest or the emulator.
CANCEL_UNUSED = ("runner.execution.engine", "runner.execution.scheduler",
                 "runner.execution.worker", "runner.execution.stages", "runner.manifest",
                 "runner.emulator", "runner.report", "runner.media", "uvicorn", "PIL",
                 "pandas")  # fmt: skip


def test_cancel_imports_none_of_a_runs_wiring(tmp_path: Path) -> None:
    from runner.ledger.store import Ledger

    Ledger.open(tmp_path / "run").close()  # a run directory with nothing in flight
    out = tmp_path / "modules.txt"
    # Nothing to cancel: no call reaches the (closed) port.
    argv = ["cancel", str(tmp_path / "run"), "--queue-url", "http://127.0.0.1:9"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAL_KEY": "emulator:local-key"}
    subprocess.run([sys.executable, "-c", _RUN_PROBE, str(out), *argv], cwd=tmp_path, env=env,
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    code, *loaded = out.read_text().split("\n")
    assert code == "0"
    assert "runner.execution.cancel" in loaded
    assert not {m for m in loaded for u in CANCEL_UNUSED if m == u or m.startswith(u + ".")}


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


def test_pyarrows_probe_for_dateutil_finds_the_stand_in_and_afterwards_the_real_one() -> None:
    """While a command runs pyarrow's probe finds the stand-in in sys.modules: no import is
    tried (where dateutil is absent pyarrow tries one at every conversion, and clears any
    error in it, a Ctrl-C included). Afterwards the real module converts as usual."""
    pytest.importorskip("dateutil")
    code = """
import sys
class Count:
    tries = 0
    def find_spec(self, name, path, target=None):
        Count.tries += name.startswith("dateutil")
sys.meta_path.insert(0, Count())
from runner.cli.imports import without_unused
with without_unused():
    import pyarrow as pa
    for _ in range(100):
        pa.scalar("x")
    print(pa.array(["a", "b"]).type, Count.tries, hasattr(sys.modules["dateutil"], "__file__"))
print("dateutil" in sys.modules)
from dateutil.relativedelta import relativedelta
print(pa.array([relativedelta(months=1)]).type)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.split("\n")[:3] == ["string 0 False", "False", "month_day_nano_interval"]


def test_history_validators_are_built_on_first_use() -> None:
    """A run reads fal's request history only to reconcile a submit of unknown outcome:
    importing the engine builds no validator for its pages, the first page read does."""
    code = """
import runner.execution.engine
from runner.fal import history
print(history.HistoryItem.__pydantic_complete__, history._HistoryPage.__pydantic_complete__)
page = history._HistoryPage.model_validate(
    {"items": [{"request_id": "r1", "sent_at": "2026-01-01T00:00:00"}], "has_more": False})
print(page.items[0].request_id, page.items[0].sent_at.isoformat())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.split("\n")[:2] == ["False False", "r1 2026-01-01T00:00:00+00:00"]


def test_what_is_imported_already_is_left_alone() -> None:
    pytest.importorskip("trio")
    assert "trio" in UNUSED
    with without_unused():
        import trio  # noqa: F401  # imported by this test session: still there
    assert "trio" in sys.modules


def test_endpoint_models_are_built_on_first_use_once_across_threads() -> None:
    """A run builds only its endpoints' validators; the first parse from many threads at once
    gets the endpoint's own (pydantic's rebuild is not thread-safe: a racing thread could
    validate with the parent model's, refusing every field as an unknown parameter)."""
    code = """
import sys, threading
sys.setswitchinterval(1e-6)  # switch threads often: without the lock, 1 run in 10 fails
from runner.endpoints import catalog
models = [spec.model for spec in catalog.CATALOG.values()]
print(sum(m.__pydantic_complete__ for m in models))
barrier, failed = threading.Barrier(16), []
def parse():
    barrier.wait()
    try:
        catalog.parse_request("fal-ai/flux-2/lora", {"prompt": "x", "image_size": "square",
                              "num_images": 2, "loras": [{"path": "https://x/a.safetensors"}]})
    except Exception as exc:
        failed.append(repr(exc))
threads = [threading.Thread(target=parse) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(sum(m.__pydantic_complete__ for m in models), failed)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.split("\n")[:2] == ["0", "1 []"]


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 64, 1_001])
def test_masks_built_from_bits_are_what_pa_array_makes(size: int) -> None:
    import numpy as np
    import pyarrow as pa

    from runner.manifest.masks import to_arrow, to_numpy

    bools = np.random.default_rng(size).random(size) < 0.5
    built = to_arrow(bools)
    assert built.equals(pa.array(bools)) and built.null_count == 0
    assert to_numpy(built).tolist() == bools.tolist()
    # a slice of it (an offset into the bits) reads as the same slice
    assert to_arrow(bools[3:]).equals(pa.array(bools[3:]))
