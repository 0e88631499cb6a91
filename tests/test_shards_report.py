"""`runner report` on a sharded run directory: how each shard's run ended comes from the
shard's own run.json (runner.ledger.meta.read_whole_run_meta)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scenario import manifest


def test_report_of_a_sharded_run_says_how_each_shards_invocation_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every shard of a run that exited 0 ended: none is reported as 'did not finish'
    (each was, when the report read only the top run.json, which has no invocations)."""
    from runner.cli import main

    path = manifest(tmp_path, 20)
    run_dir = tmp_path / "run"
    run = ["run", str(path), "--ledger", str(run_dir), "--emulator", "--quiet",
           "--emulator-time-scale", "0.002", "--no-download", "--rate", "1000"]  # fmt: skip
    assert main([*run, "--shards", "3"]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "did not finish" not in text, text
    assert text.count("exit 0") == 3, text
    assert main(["report", str(run_dir), "--json"]) == 0
    lines = json.loads(capsys.readouterr().out)["invocations"]
    assert sorted(line["shard"] for line in lines) == [0, 1, 2], lines
    assert sum(line["completed"] for line in lines) == 20
