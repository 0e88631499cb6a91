"""--flagged keep|reroll|fail against the emulator's ``flagged`` fault: what is kept, paid,
re-rolled and recorded, and the re-roll cost in the summary and the report."""

from __future__ import annotations

import io
import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
from PIL import Image

from runner.emulator import parse_faults
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK
from runner.execution.flagged import reroll_seed
from runner.execution.scheduler import prior_spend
from runner.execution.summary import print_summary
from runner.ledger import Ledger, status_summary
from runner.ledger.fold import read_events, read_folded
from runner.report.data import build_report
from runner.report.dataset_writers import export_dataset
from runner.report.datasets import DatasetOptions
from runner.report.text import render_text
from tests.scenario import emulator, manifest, run, run_config

pytestmark = pytest.mark.anyio

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
# flagged=0.2 under this fault seed flags 6 images of the demo's first rolls and re-rolls,
# and no job runs out of re-rolls (the draws are a function of each image: deterministic).
DEMO_FAULTS = "flagged=0.2,seed=8"
PRICE = Decimal("0.035")  # fal-ai/flux-lora, per output megapixel


def demo(tmp_path: Path) -> Path:
    shutil.copy(MANIFESTS / "demo.csv", tmp_path / "demo.csv")
    shutil.copytree(MANIFESTS / "images", tmp_path / "images")
    return tmp_path / "demo.csv"


def jobs(run_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = read_folded(run_dir).jobs.to_pylist()
    return rows


def is_black(path: str) -> bool:
    with Image.open(path) as image:
        return image.convert("L").getextrema() == (0, 0)


def test_reroll_seeds_are_a_pure_function_of_job_key_and_number() -> None:
    assert reroll_seed("k1", 1) == reroll_seed("k1", 1)
    seeds = {reroll_seed(key, n) for key in ("k1", "k2") for n in (1, 2, 3)}
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)


async def test_demo_with_flagged_rerolls_ends_with_no_flagged_output_and_reports_the_cost(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    async with emulator(faults=parse_faults(DEMO_FAULTS)) as emu:
        report = await run(emu, run_config(demo(tmp_path), run_dir, flagged="reroll"))
        stats = emu.snapshot()
    t = report.tally
    assert report.exit_code == EXIT_OK
    assert stats["faults"]["flagged"] == t.rerolls > 0  # every flag was re-rolled
    assert stats["submits"]["accepted"] == 13 + t.rerolls
    rows = jobs(run_dir)
    assert [r["state"] for r in rows] == ["completed"] * 13
    assert not any(r["flagged"] for r in rows)
    assert not any(any(r["nsfw"]) for r in rows)
    files = [o["local_path"] for r in rows for o in r["outputs"]]
    assert len(files) == 14 and not any(is_black(f) for f in files)
    assert sum(1 for f in (tmp_path / "run" / "outputs").rglob("*") if f.is_file()) == 14
    # Each re-roll is an attempt of its own, recorded paid and discarded.
    events = read_events(run_dir).table
    rerolled = events.filter(pc.equal(events["error_type"], "flagged")).to_pylist()
    assert len(rerolled) == t.rerolls
    assert all(e["flagged"] and e["billed_usd"] > 0 and e["retryable"] for e in rerolled)
    reroll_usd = sum((r["reroll_usd"] or Decimal(0) for r in rows), Decimal(0))
    assert reroll_usd == t.reroll_usd == sum(e["billed_usd"] for e in rerolled)
    assert max(r["attempt"] for r in rows if r["rerolls"]) >= 2
    # The budget saw every paid attempt.
    assert t.spent_usd == Decimal(stats["billed_usd"])
    text = render_text(build_report(read_folded(run_dir).jobs, None, run_dir=run_dir))
    assert f"re-rolls of flagged outputs: {t.rerolls}, ${reroll_usd.normalize()}" in text
    out = io.StringIO()
    print_summary(report, out)
    line = next(x for x in out.getvalue().splitlines() if "re-rolls of flagged" in x)
    assert line.endswith(f"  {t.rerolls} (${reroll_usd.normalize()} of the spend)")
    # Status, the report and a later run's budget count the re-rolls as spent: everything
    # the account was billed.
    billed = Decimal(stats["billed_usd"])
    assert status_summary(run_dir).spent_usd == billed
    assert build_report(read_folded(run_dir).jobs, None, run_dir=run_dir).spent_usd == billed
    with Ledger.open(run_dir) as ledger:
        assert prior_spend(ledger.state(downloads=False)) == billed
    # The ImageFolder export (everything, flagged included if there were any) has no
    # flagged and no black image.
    everything = DatasetOptions(include_failed=True, include_flagged=True)
    _chosen, written = export_dataset(run_dir, tmp_path / "ds", "imagefolder", everything)
    lines = [json.loads(x) for x in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert written.images == len(lines) == 14 and not any(x["flagged"] for x in lines)
    assert not any(is_black(str(tmp_path / "ds" / x["file_name"])) for x in lines)


async def test_keep_is_the_default_and_counts_flagged_images(tmp_path: Path) -> None:
    async with emulator(faults=parse_faults("flagged=@1")) as emu:
        report = await run(emu, run_config(manifest(tmp_path, 3), tmp_path / "run"))
        assert emu.snapshot()["submits"]["accepted"] == 3
    assert report.exit_code == EXIT_OK and report.tally.flagged_images == 1
    rows = jobs(tmp_path / "run")
    flagged = [r for r in rows if r["flagged"]]
    assert len(flagged) == 1 and flagged[0]["nsfw"] == [True]
    assert is_black(flagged[0]["outputs"][0]["local_path"])
    out = io.StringIO()
    print_summary(report, out)
    line = next(x for x in out.getvalue().splitlines() if "flagged images" in x)
    assert line.split()[-1] == "1"


async def test_fail_records_the_job_failed_for_flagged_and_paid(tmp_path: Path) -> None:
    async with emulator(faults=parse_faults("flagged=1")) as emu:
        config = run_config(manifest(tmp_path, 2), tmp_path / "run", flagged="fail")
        report = await run(emu, config)
        assert emu.snapshot()["submits"]["accepted"] == 2
    assert report.exit_code == EXIT_JOBS_FAILED
    assert report.tally.reasons == {"flagged": 2} and report.tally.spent_usd == 2 * PRICE
    for row in jobs(tmp_path / "run"):
        assert (row["state"], row["error_type"], row["flagged"]) == ("failed", "flagged", True)
        assert row["billed_usd"] == PRICE and row["retryable"] is False


async def test_when_rerolls_run_out_the_last_output_is_kept_flagged_and_counted(
    tmp_path: Path,
) -> None:
    async with emulator(faults=parse_faults("flagged=1")) as emu:
        config = run_config(manifest(tmp_path, 2), tmp_path / "run", flagged="reroll")
        report = await run(emu, config)
        submitted = emu.snapshot()["submits"]
    assert submitted["accepted"] == 2 * 3 and submitted["duplicates"] == 0  # new seeds
    t = report.tally
    assert (t.rerolls, t.reroll_usd, t.flagged_images) == (4, 4 * PRICE, 2)
    assert t.spent_usd == 6 * PRICE and report.exit_code == EXIT_OK
    for row in jobs(tmp_path / "run"):
        assert (row["state"], row["flagged"], row["rerolls"], row["attempt"]) == (
            "completed", True, 2, 3,
        )  # fmt: skip
        assert row["reroll_usd"] == 2 * PRICE
        assert row["seed"] == reroll_seed(row["job_key"], 2)
    # What was paid, re-rolls included, is what status, the report and the next run's
    # --max-total-cost see (they once counted only the kept attempts: 2 of the 6 paid).
    run_dir = tmp_path / "run"
    assert status_summary(run_dir).spent_usd == 6 * PRICE
    assert build_report(read_folded(run_dir).jobs, None).spent_usd == 6 * PRICE
    for downloads in (True, False):
        with Ledger.open(run_dir) as ledger:
            assert prior_spend(ledger.state(downloads=downloads)) == 6 * PRICE


async def test_a_reroll_the_budget_cannot_pay_keeps_the_flagged_output(tmp_path: Path) -> None:
    async with emulator(faults=parse_faults("flagged=1")) as emu:
        config = run_config(
            manifest(tmp_path, 1), tmp_path / "run", flagged="reroll", max_cost_usd=PRICE * 2
        )
        report = await run(emu, config)
        assert emu.snapshot()["submits"]["accepted"] == 2
    assert report.tally.rerolls == 1 and report.tally.spent_usd == 2 * PRICE
    (row,) = jobs(tmp_path / "run")
    assert (row["state"], row["flagged"], row["rerolls"]) == ("completed", True, 1)
