"""Row identity: an id column (``--id-column``, else ``id``), else the row's content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.cli import build_parser, main
from runner.errors import RowError
from runner.execution.jobsource import job_stream
from runner.manifest.identity import (
    Occurrences,
    content_id,
    identity_notice,
    is_content_id,
    reserved_form,
)
from runner.manifest.jobs import ExpandOptions, Job, iter_jobs
from runner.manifest.reader import read_rows
from runner.options import run_config

FLUX = "fal-ai/flux-lora"
PRODUCTS = [("mug-01", "a blue mug"), ("cup-02", "a red cup"), ("vase-03", "a tall vase")]


def catalog_csv(path: Path, products: list[tuple[str, str]], header: str = "sku") -> Path:
    lines = [f"{header},prompt,category"] + [f"{sku},{prompt},kitchen" for sku, prompt in products]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prompts_csv(path: Path, prompts: list[str]) -> Path:
    path.write_text("prompt,note\n" + "".join(f"{p},n\n" for p in prompts), encoding="utf-8")
    return path


def items(path: Path, **options: Any) -> list[Job | RowError]:
    opts = ExpandOptions(path.parent, default_endpoint=FLUX, **options)
    return list(iter_jobs(read_rows(path), opts))


def jobs(path: Path, **options: Any) -> list[Job]:
    out = items(path, **options)
    assert not [str(i) for i in out if isinstance(i, RowError)]
    return [i for i in out if isinstance(i, Job)]


def keys_by_row(path: Path, **options: Any) -> dict[str, str]:
    return {j.row_id: j.job_key for j in jobs(path, **options)}


def errors(path: Path, **options: Any) -> list[str]:
    found = [str(i) for i in items(path, **options) if isinstance(i, RowError)]
    return [text.removeprefix(f"{path.parent}/") for text in found]


# --- an id column ---------------------------------------------------------------------------


def test_inserting_a_product_at_the_top_adds_one_key_and_keeps_every_other(
    tmp_path: Path,
) -> None:
    before = keys_by_row(catalog_csv(tmp_path / "m.csv", PRODUCTS), id_column="sku")
    grown = [("new-00", "a new lamp"), *PRODUCTS]
    after = keys_by_row(catalog_csv(tmp_path / "m.csv", grown), id_column="sku")
    assert set(after) == {"new-00", *before}
    assert {k: after[k] for k in before} == before
    assert after["new-00"] not in before.values()


def test_the_id_column_is_neither_sent_nor_metadata(tmp_path: Path) -> None:
    [job, *_] = jobs(catalog_csv(tmp_path / "m.csv", PRODUCTS), id_column="sku")
    assert job.row_id == "mug-01" and "sku" not in job.payload and "sku" not in job.metadata


@pytest.mark.parametrize("cell", ["", "   "])
def test_a_blank_id_column_value_is_a_row_error_naming_line_and_column(
    tmp_path: Path, cell: str
) -> None:
    path = catalog_csv(tmp_path / "m.csv", [PRODUCTS[0], (cell, "no sku"), PRODUCTS[1]])
    found = items(path, id_column="sku")
    bad = [i for i in found if isinstance(i, RowError)]
    assert [j.row_id for j in found if isinstance(j, Job)] == ["mug-01", "cup-02"]
    [error] = bad
    [problem] = error.problems
    assert (problem.line, problem.column) == (3, "sku")
    assert str(error) == f"{path}:3: sku is empty: --id-column sku needs a value on every row"


def test_a_missing_id_column_makes_every_row_an_error(tmp_path: Path) -> None:
    path = catalog_csv(tmp_path / "m.csv", PRODUCTS, header="code")
    assert errors(path, id_column="sku") == [
        f"m.csv:{line}: sku is missing: --id-column sku needs a value on every row"
        for line in (2, 3, 4)
    ]


def test_a_duplicate_id_column_value_is_a_row_error(tmp_path: Path) -> None:
    path = catalog_csv(tmp_path / "m.csv", [*PRODUCTS, ("cup-02", "another cup")])
    assert errors(path, id_column="sku") == ["m.csv:5: sku 'cup-02' is already used on line 3"]


@pytest.mark.parametrize("given", ["~00ff", "~0123456789abcdef.2", "#7"])
def test_an_id_of_a_derived_form_is_refused(tmp_path: Path, given: str) -> None:
    path = catalog_csv(tmp_path / "m.csv", [(given, "x")])
    [error] = errors(path, id_column="sku")
    assert f"sku {given!r} has the form kept for rows without an id" in error


def test_an_id_column_named_id_still_works_without_the_flag(tmp_path: Path) -> None:
    path = catalog_csv(tmp_path / "m.csv", PRODUCTS, header="id")
    assert list(keys_by_row(path)) == ["mug-01", "cup-02", "vase-03"]


def test_with_an_id_column_a_column_named_id_is_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("sku,id,prompt\nS1,legacy-1,a mug\n", encoding="utf-8")
    [job] = jobs(path, id_column="sku")
    assert job.row_id == "S1" and job.metadata == {"id": "legacy-1"}


# --- content identity -------------------------------------------------------------------------


def test_without_an_id_column_inserting_a_row_at_the_top_keeps_every_other_key(
    tmp_path: Path,
) -> None:
    prompts = ["a blue mug", "a red cup", "a tall vase"]
    before = [j.job_key for j in jobs(prompts_csv(tmp_path / "m.csv", prompts))]
    after = [j.job_key for j in jobs(prompts_csv(tmp_path / "m.csv", ["a lamp", *prompts]))]
    assert after[1:] == before
    assert after[0] not in before


def test_without_an_id_column_deleting_or_reordering_rows_keeps_every_key(
    tmp_path: Path,
) -> None:
    prompts = ["a", "b", "c", "d"]
    before = {j.job_key for j in jobs(prompts_csv(tmp_path / "m.csv", prompts))}
    reordered = {j.job_key for j in jobs(prompts_csv(tmp_path / "m.csv", prompts[::-1]))}
    deleted = {j.job_key for j in jobs(prompts_csv(tmp_path / "m.csv", ["a", "c", "d"]))}
    assert reordered == before
    assert deleted < before and len(deleted) == 3


def test_identical_rows_get_different_keys_stable_across_reordering_other_rows(
    tmp_path: Path,
) -> None:
    first = jobs(prompts_csv(tmp_path / "m.csv", ["same", "x", "same", "y"]))
    twins = [j for j in first if j.payload["prompt"] == "same"]
    assert len({j.job_key for j in twins}) == 2
    assert twins[1].row_id == twins[0].row_id + ".2"
    moved = jobs(prompts_csv(tmp_path / "m.csv", ["y", "same", "same", "x"]))
    assert {j.job_key for j in moved} == {j.job_key for j in first}


def test_content_identity_covers_request_metadata_and_expansion(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "prompt,note,variants,empty\na,,,\na,n,,\na,,2,\na,,2,\n",
        encoding="utf-8",
    )
    ids = [j.row_id for j in jobs(path)]
    plain, noted, two, _, again, _ = ids
    assert len({plain, noted, two}) == 3
    assert again == two + ".2"
    # An added empty column costs no row.
    path.write_text("prompt\na\n", encoding="utf-8")
    assert [j.row_id for j in jobs(path)] == [plain]


def test_content_ids_are_the_same_from_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("prompt,num_images\nx,2\n", encoding="utf-8")
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text('{"prompt": "x", "num_images": 2}\n', encoding="utf-8")
    assert [j.job_key for j in jobs(csv_path)] == [j.job_key for j in jobs(jsonl_path)]


def test_a_bad_row_without_an_id_is_named_by_its_row_number(tmp_path: Path) -> None:
    path = prompts_csv(tmp_path / "m.csv", ["ok", ""])
    [bad] = [i for i in items(path) if isinstance(i, RowError)]
    assert bad.problems[0].row_id == "#2"


def test_content_ids_are_a_form_no_explicit_id_may_take() -> None:
    assert content_id(-1, 1) == "~ffffffffffffffff"
    assert content_id(255, 3) == "~00000000000000ff.3"
    assert is_content_id("~00ff") and is_content_id("~AB.12")
    assert not any(is_content_id(s) for s in ("~", "~g1", "~1.", "a~1", "~1.2.3", "~١"))
    assert reserved_form("#3") and reserved_form("~ab") and reserved_form("sku-1") is None


def test_occurrences_count_each_key_across_growth() -> None:
    counts = Occurrences(capacity=2)
    keys = [0, 1, -1, 2**63 - 1, -(2**63), 1024, 2048, 3]
    assert [counts.next(k) for k in keys] == [1] * len(keys)
    assert [counts.next(k) for k in keys] == [2] * len(keys)
    assert len(counts) == len(keys)


# --- the notice -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "id_column", "notice"),
    [
        (["sku", "prompt"], "sku", "rows are identified by the column sku"),
        (["id", "prompt"], None, "rows are identified by the column id"),
        (
            ["prompt"],
            None,
            "no id column: rows are identified by their content (--id-column NAME to use one)",
        ),
    ],
)
def test_the_notice_says_which_identity_is_in_use(
    columns: list[str], id_column: str | None, notice: str
) -> None:
    assert identity_notice(columns, id_column).startswith(notice)


# --- through the CLI and the TOML file ----------------------------------------------------------


def test_validate_takes_id_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = catalog_csv(tmp_path / "m.csv", [*PRODUCTS, ("", "no sku"), ("mug-01", "again")])
    assert main(["validate", str(path), "--endpoint", FLUX, "--id-column", "sku"]) == 1
    out = capsys.readouterr().out
    assert "m.csv:5: sku is empty" in out
    assert "m.csv:6: sku 'mug-01' is already used on line 2" in out


def test_plan_takes_id_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = catalog_csv(tmp_path / "m.csv", [*PRODUCTS, ("cup-02", "again")])
    assert main(["plan", str(path), "--endpoint", FLUX, "--json"]) == 0
    capsys.readouterr()
    assert main(["plan", str(path), "--endpoint", FLUX, "--id-column", "sku", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert "already used on line 3" in json.dumps(doc)


def test_the_id_column_toml_key_reaches_the_run(tmp_path: Path) -> None:
    path = catalog_csv(tmp_path / "m.csv", PRODUCTS)
    toml = tmp_path / "run.toml"
    toml.write_text('[runner]\nid-column = "sku"\n', encoding="utf-8")
    args = build_parser().parse_args(["run", str(path), "--endpoint", FLUX, "--config", str(toml)])
    config = run_config(args, {})
    assert config.id_column == "sku"
    assert [j.row_id for j in job_stream(config) if isinstance(j, Job)] == [
        "mug-01",
        "cup-02",
        "vase-03",
    ]
    flagged = build_parser().parse_args(
        ["run", str(path), "--config", str(toml), "--id-column", "category"]
    )
    assert run_config(flagged, {}).id_column == "category"  # the flag wins
