"""Scenario tests: the whole runner against the in-process emulator."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from pydantic import SecretStr

from runner.ledger.state import LedgerState
from runner.ledger.views import status_summary
from tests.scenario import emulator, manifest, run, run_config

pytestmark = pytest.mark.anyio


async def test_poll_mode_completes_every_job_once(tmp_path: Path) -> None:
    path = manifest(tmp_path, 12)
    async with emulator() as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
        stats = emu.snapshot()
    assert report.exit_code == 0, report.message
    assert report.tally.completed == 12
    assert stats["submits"]["accepted"] == 12
    assert stats["submits"]["duplicates"] == 0
    summary = status_summary(tmp_path / "run")
    assert summary.by_state == {"completed": 12}
    assert summary.billed_usd == Decimal("0.42")  # 12 x 512x512 -> 1 MP x $0.035


async def test_rerun_skips_completed_jobs_and_submits_nothing(tmp_path: Path) -> None:
    path = manifest(tmp_path, 5)
    async with emulator() as emu:
        await run(emu, run_config(path, tmp_path / "run"))
        again = await run(emu, run_config(path, tmp_path / "run"))
        stats = emu.snapshot()
    assert again.exit_code == 0
    assert again.tally.skipped == 5 and again.tally.completed == 0
    assert stats["submits"]["accepted"] == 5


async def test_ledger_records_request_ids_outputs_and_cost(tmp_path: Path) -> None:
    path = manifest(tmp_path, 3)
    async with emulator() as emu:
        await run(emu, run_config(path, tmp_path / "run"))
    rows = ds.dataset(tmp_path / "run" / "ledger", format="parquet").to_table().to_pylist()
    completed = [r for r in rows if r["state"] == "completed"]
    assert len({r["job_key"] for r in completed}) == 3
    for r in completed:
        assert r["outputs"][0]["width"] == 512
        assert r["outputs"][0]["url"].startswith("http://emulator/cdn/")
        assert r["billed_usd"] == Decimal("0.035")
        assert r["seed"] in (0, 1, 2)
    assert all(r["request_id"] for r in rows if r["state"] == "queued")
    folded = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert all(r["request_id"] and r["state"] == "completed" for r in folded)


async def test_the_counting_thread_stops_when_the_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bar's count reads the whole manifest in a thread; a run that ends first (done,
    # interrupted, out of budget) must not wait at exit for it to read ten million rows.
    from runner.execution import jobsource
    from runner.manifest.batches import JobBatch

    closed = threading.Event()
    drawn = [0]

    def endless(*_args: object, materialize: bool) -> Iterator[JobBatch]:
        assert not materialize  # the count's own reading (admission makes every job)
        try:
            while True:
                drawn[0] += 1
                yield JobBatch(counted=1)
        finally:
            closed.set()

    monkeypatch.setattr(jobsource, "iter_job_batches", endless)
    path = manifest(tmp_path, 3)
    async with emulator() as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    assert report.exit_code == 0 and report.tally.completed == 3
    assert closed.wait(10), f"the count was still reading after the run ({drawn[0]:,} rows)"


async def test_a_run_over_tls_loads_the_ca_bundle_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue's lean transport and the pool for the rest share one TLS context: each
    built its own before, loading the CA bundle twice (~0.04 CPU s each, against fal)."""
    import io

    import httpx

    from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, serve
    from runner.execution.engine import Hooks, execute

    built: list[object] = []
    create = httpx.create_ssl_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return create(*args, **kwargs)

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    path = manifest(tmp_path, 3)
    async with serve(Emulator(EmulatorConfig(time_scale=0.001)), tls=True) as served:
        assert served.cert_file is not None and served.base_url.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(served.cert_file))
        monkeypatch.setattr(httpx, "create_ssl_context", counted)
        config = run_config(
            path, tmp_path / "run", queue_url=served.base_url, rest_url=served.base_url + "/rest",
            cdn_url=served.base_url + "/cdn", api_url=served.base_url + "/api",
            key=SecretStr(DEFAULT_KEY),
        )  # fmt: skip
        hooks = Hooks(stream=io.StringIO(), handle_signals=False)
        report = await execute(config, hooks=hooks)
    assert report.exit_code == 0, report.message
    assert report.tally.completed == 3
    assert len(built) == 1
