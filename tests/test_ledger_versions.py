"""Superseded jobs: an older content of a row recorded again is left out of status, export and
report unless ``--all-versions``, and what it was billed stays on the record."""

from __future__ import annotations

import functools
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from runner.cli import main
from runner.errors import EXIT_OK
from runner.ledger.fold import read_folded
from runner.ledger.versions import split_versions, superseded_mask
from runner.ledger.views import export, status_summary
from tests.scenario import emulator, run, run_config

ROWS = [
    {"sku": "a1", "prompt": "red mug", "image_size": "square", "seed": 1, "shelf": "A"},
    {"sku": "b2", "prompt": "blue mug", "image_size": {"width": 512, "height": 768}, "seed": 2,
     "shelf": "B"},
    {"sku": "c3", "endpoint": "fal-ai/flux-2/lora", "prompt": "green mug", "seed": 3,
     "guidance_scale": 2.5},
]  # fmt: skip


def _table(rows: list[tuple[str | None, int | None, int]]) -> pa.Table:
    return pa.table(
        {
            "row_id": pa.array([r[0] for r in rows], pa.string()),
            "variant": pa.array([r[1] for r in rows], pa.int32()),
            "seq": pa.array([r[2] for r in rows], pa.int64()),
        }
    )


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], []),
        # One identity, two contents: the one recorded last is current.
        ([("a", 0, 1), ("a", 0, 5)], [True, False]),
        # Variants are identities of their own; other rows are untouched.
        ([("a", 0, 1), ("a", 1, 3), ("b", 0, 2)], [False, False, False]),
        # A row edited into a bad one (an invalid record, no variant), then fixed.
        ([("c", 0, 7), ("c", None, 8), ("c", 1, 9)], [True, True, False]),
        # Rows named by their number are positions, not identities; no row id is none.
        ([("#3", None, 4), ("#3", None, 6), (None, 0, 1), (None, 0, 2)], [False] * 4),
    ],
)
def test_superseded_is_an_older_version_of_the_same_identity(
    rows: list[tuple[str | None, int | None, int]], expected: list[bool]
) -> None:
    assert superseded_mask(_table(rows)).tolist() == expected


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"endpoint": "fal-ai/flux-lora", **r}) + "\n" for r in rows))
    return path


async def two_runs(tmp_path: Path, *, id_column: str | None) -> Path:
    """Run ROWS, then again with b2's prompt edited; returns the run directory."""
    run_dir = tmp_path / "run"
    edited = [dict(r, prompt="navy mug") if r["sku"] == "b2" else r for r in ROWS]
    async with emulator() as emu:
        for rows in (ROWS, edited):
            path = write_manifest(tmp_path / "m.jsonl", rows)
            report = await run(emu, run_config(path, run_dir, id_column=id_column))
            assert report.exit_code == EXIT_OK, report.message
    return run_dir


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ledger for the module's read-only tests (two emulator runs cost ~2 s)."""
    tmp_path = tmp_path_factory.mktemp("edited")
    return anyio.run(functools.partial(two_runs, tmp_path, id_column="sku"))


def billed(table: pa.Table) -> Decimal:
    return Decimal(pc.sum(table["billed_usd"]).as_py() or 0)


def test_status_leaves_superseded_out_and_keeps_their_spend(edited_run: Path) -> None:
    every = read_folded(edited_run).jobs
    assert every.num_rows == 4
    summary = status_summary(edited_run)
    assert (summary.jobs, summary.superseded) == (3, 1)
    assert summary.superseded_billed_usd > 0
    # Nothing billed goes missing: the current jobs plus the superseded ones is everything.
    assert summary.billed_usd + summary.superseded_billed_usd == billed(every)
    assert summary.spent_usd == billed(every)
    both = status_summary(edited_run, all_versions=True)
    assert (both.jobs, both.billed_usd, both.spent_usd) == (4, billed(every), billed(every))


def test_status_cli_says_superseded_and_all_versions_counts_them(
    edited_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", str(edited_run)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{edited_run}: 3 jobs,")
    assert "superseded: 1 job (older content of rows recorded again), billed $" in text
    assert "spent in all $" in text
    assert main(["status", str(edited_run), "--json", "--all-versions"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["jobs"], doc["superseded"], doc["all_versions"]) == (4, 1, True)
    assert doc["billed_usd"] == doc["spent_usd"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_export_leaves_superseded_out_unless_all_versions(
    edited_run: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def rows(*flags: str) -> list[dict[str, Any]]:
        out = edited_run / f"x.{fmt}"
        assert main(["export", str(edited_run), "--format", fmt, "--out", str(out), *flags]) == 0
        return read_export(out, fmt)

    current = rows()
    assert sorted(r["row_id"] for r in current) == ["a1", "b2", "c3"]
    assert {str(r["superseded"]).lower() for r in current} == {"false"}
    assert {r["req_prompt"] for r in current if r["row_id"] == "b2"} == {"navy mug"}
    every = rows("--all-versions")
    old = [r for r in every if str(r["superseded"]).lower() == "true"]
    assert len(every) == 4 and [(r["row_id"], r["req_prompt"]) for r in old] == [("b2", "blue mug")]
    assert "wrote 4 jobs" in capsys.readouterr().err


def test_dataset_export_leaves_superseded_out_unless_all_versions(edited_run: Path) -> None:
    def prompts(*flags: str) -> list[tuple[str, str]]:
        out = edited_run / f"images{len(flags)}.parquet"
        argv = ["export", str(edited_run), "--format", "parquet", "--per-image", "--out", str(out)]
        assert main([*argv, *flags]) == 0
        return sorted({(r["row_id"], r["prompt"]) for r in pq.read_table(out).to_pylist()})

    current = prompts()
    assert [row for row, _ in current] == ["a1", "b2", "c3"]
    assert ("b2", "navy mug") in current and ("b2", "blue mug") not in current
    assert ("b2", "blue mug") in prompts("--all-versions")


def read_export(out: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "parquet":
        rows: list[dict[str, Any]] = pq.read_table(out).to_pylist()
        return rows
    if fmt == "csv":
        import csv

        with open(out, newline="") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_report_leaves_superseded_out_unless_all_versions(
    edited_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(edited_run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["jobs"], doc["timing"]["completed"], doc["superseded"]) == (3, 3, 1)
    assert Decimal(doc["spent_usd"]) == Decimal(doc["billed_usd"]) + Decimal(
        doc["superseded_billed_usd"]
    )
    assert main(["report", str(edited_run), "--all-versions"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"run {edited_run}: 4 jobs")
    assert "superseded: 1 job" in text and "counted above (--all-versions)" in text


def test_html_report_says_superseded_and_shows_both_invocations(
    edited_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "r.html"
    assert main(["report", str(edited_run), "--html", str(page), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    text = page.read_text(encoding="utf-8")
    assert "superseded: 1 job (older content of rows recorded again)" in text
    assert "not counted above (--all-versions counts them)" in text
    # Two runs, both finished; the second paid only for the edited row.
    assert [i["status"] for i in doc["invocations"]] == ["exit 0", "exit 0"]
    assert [i["completed"] for i in doc["invocations"]] == [3, 1]
    assert text.count('<tr class="inv') == 2
    # Spend over time reaches everything billed, superseded versions included.
    assert Decimal(doc["timeline"]["spend_usd"][-1]) == Decimal(doc["spent_usd"])


def test_api_load_ledger_marks_versions(edited_run: Path) -> None:
    import runner

    assert runner.load_ledger(edited_run).num_rows == 3
    every = runner.load_ledger(edited_run, all_versions=True)
    assert every["superseded"].to_pylist().count(True) == 1
    assert runner.status(edited_run, all_versions=True).jobs == 4


@pytest.mark.anyio
async def test_with_content_identity_an_edited_row_is_a_new_row_not_a_version(
    tmp_path: Path,
) -> None:
    # No id column: the edited row is a new identity (~hex); the ledger cannot tell it from a
    # deleted row plus a new one, so it claims nothing (documented in runner.ledger.versions).
    run_dir = await two_runs(tmp_path, id_column=None)
    summary = status_summary(run_dir)
    assert (summary.jobs, summary.superseded) == (4, 0)


def test_export_columns_are_typed_and_the_union_of_every_endpoint(edited_run: Path) -> None:
    out = edited_run / "typed.parquet"
    assert export(edited_run, out, "parquet") == 3
    table = pq.read_table(out)
    schema = table.schema
    assert schema.field("billed_usd").type == pa.decimal128(18, 6)
    assert schema.field("estimated_usd").type == pa.decimal128(18, 6)
    assert schema.field("req_prompt").type == pa.string()
    assert schema.field("req_seed").type == pa.int64()
    assert schema.field("req_guidance_scale").type == pa.float64()
    assert schema.field("req_image_size_width").type == pa.int64()
    assert schema.field("meta_shelf").type == pa.string()
    assert {"request", "metadata"} <= set(schema.names)  # the JSON stays beside them
    by_row = {r["row_id"]: r for r in table.to_pylist()}
    # A preset size is req_image_size; a custom one its fields; absent fields are null.
    assert (by_row["a1"]["req_image_size"], by_row["a1"]["req_image_size_width"]) == (
        "square",
        None,
    )
    assert (by_row["b2"]["req_image_size"], by_row["b2"]["req_image_size_height"]) == (None, 768)
    assert by_row["c3"]["req_guidance_scale"] == 2.5 and by_row["a1"]["meta_shelf"] == "A"
    assert by_row["c3"]["meta_shelf"] is None
    # Money at the micro-dollar, equal to the ledger's exact amount rounded.
    exact = split_versions(read_folded(edited_run).jobs).shown
    amounts = {r["row_id"]: r["billed_usd"] for r in exact.to_pylist()}
    for row_id, row in by_row.items():
        assert row["billed_usd"] == amounts[row_id].quantize(Decimal("0.000001"))
        assert row["billed_usd"].as_tuple().exponent == -6
