"""The Python API: the CLI's options as keywords, safe from a worker thread."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import runner
from runner.emulator import DEFAULT_KEY
from tests.scenario import manifest


def test_the_public_names_are_declared_and_lazy() -> None:
    assert set(runner.__all__) >= {"run", "arun", "plan", "status", "load_ledger", "RunReport"}
    for name in runner.__all__:
        assert getattr(runner, name) is not None
    with pytest.raises(AttributeError):
        runner.nothing_here  # noqa: B018


def test_run_from_a_worker_thread_as_an_orchestrator_would(tmp_path: Path) -> None:
    """Airflow, Dagster and Prefect call tasks on worker threads: no signal handlers."""
    path = manifest(tmp_path, 4)
    found: dict[str, Any] = {}

    def task() -> None:
        try:
            found["report"] = runner.run(
                path, emulator=True, ledger=tmp_path / "run", no_download=True, quiet=True
            )
        except BaseException as exc:  # surfaced below, in the test's own thread
            found["error"] = exc

    worker = threading.Thread(target=task)
    worker.start()
    worker.join(timeout=120)
    assert "error" not in found, found.get("error")
    report = found["report"]
    assert report.exit_code == 0 and report.tally.completed == 4
    summary = runner.status(tmp_path / "run")
    assert summary.jobs == 4 and summary.billed_usd == Decimal("0.14")
    table = runner.load_ledger(tmp_path / "run")
    assert table.num_rows == 4 and set(table["state"].to_pylist()) == {"completed"}


def test_plan_counts_without_sending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    result = runner.plan(manifest(tmp_path, 3))
    assert result.total.jobs == 3 and result.total.usd == Decimal("0.105")


def test_preview_says_what_a_rerun_would_do_and_plan_refuses_a_ledger(tmp_path: Path) -> None:
    path = manifest(tmp_path, 3)
    run_dir = tmp_path / "run"
    report = runner.run(
        path, emulator=True, ledger=run_dir, no_download=True, quiet=True,
        emulator_time_scale=0.01,
    )  # fmt: skip
    assert report.exit_code == 0
    more = manifest(tmp_path, 5)  # the same three rows and two new ones
    assert more == path
    seen = runner.preview(more, run_dir)
    assert dict(seen.jobs) == {"done": 3, "new": 2}
    assert seen.would_send_usd == Decimal("0.07")
    assert dict(runner.preview(more, tmp_path / "never").jobs) == {"new": 5}
    with pytest.raises(runner.UsageError, match="preview"):
        runner.plan(more, ledger=run_dir)


def test_a_bad_option_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    path = manifest(tmp_path, 1)
    with pytest.raises(runner.UsageError, match="--completion"):
        runner.run(path, completion="sometimes", key=DEFAULT_KEY)
    with pytest.raises(runner.UsageError, match="--max-cost must be at least 0"):
        runner.run(path, max_cost="-5", key=DEFAULT_KEY, ledger=tmp_path / "r")


def test_the_embedded_emulator_takes_time_scale_concurrency_and_faults(tmp_path: Path) -> None:
    report = runner.run(
        manifest(tmp_path, 3), emulator=True, ledger=tmp_path / "run", no_download=True,
        quiet=True, max_attempts=1, emulator_time_scale=0.01, emulator_concurrency=3,
        emulator_faults="fail_runner_disconnected=@1",
    )  # fmt: skip
    assert report.exit_code == 1 and report.tally.failed == 1 and report.tally.completed == 2
    assert report.tally.reasons == {"runner_disconnected": 1}
