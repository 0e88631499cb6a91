"""The README documents every command and every `runner run` flag (a missing one fails)."""

import argparse
from pathlib import Path
from typing import Any

import pytest

from runner.cli import build_parser

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"`runner {command}" in README


def test_every_run_flag_is_in_the_readme() -> None:
    run = subcommands()["run"]
    flags = [s for a in run._actions for s in a.option_strings if s.startswith("--")]
    missing = [f for f in flags if f not in README and f != "--help"]
    assert not missing, f"undocumented flags: {missing}"


def test_every_export_flag_is_in_the_readme() -> None:
    export = subcommands()["export"]
    flags = [s for a in export._actions for s in a.option_strings if s.startswith("--")]
    missing = [f for f in flags if f not in README and f != "--help"]
    assert not missing, f"undocumented flags: {missing}"


def test_quick_start_has_exactly_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("## ", 1)[0]
    first_two = [block.split("```")[0].strip() for block in quick.split("```sh")[1:3]]
    assert "runner run manifests/demo.csv --emulator" in first_two[0]
    assert "python -m pytest" in first_two[1]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert first_two[1] in ci.splitlines()


def test_every_run_flag_says_what_it_does() -> None:
    run = subcommands()["run"]
    terse = [
        a.option_strings[0]
        for a in run._actions
        if a.option_strings and a.option_strings[0] != "-h" and len(a.help or "") < 20
    ]
    assert not terse, f"flags without a sentence of help: {terse}"


def duckdb_queries() -> list[str]:
    """The SQL blocks of the README's "Querying with DuckDB", in order."""
    section = README.split("### Querying with DuckDB", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```sql\n")[1:]]


@pytest.mark.anyio
async def test_the_readmes_duckdb_queries_count_what_status_counts(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    from runner.cli import main
    from runner.ledger.views import status_summary
    from tests.scenario import emulator, run, run_config

    run_dir = tmp_path / "nightly.runner"
    async with emulator() as emu:
        for edited in ("first", "second"):  # the second run edits row r1: one superseded job
            rows = [
                f"r{i},fal-ai/flux-lora,mug {i} {edited if i == 1 else ''},square" for i in range(4)
            ]
            path = tmp_path / "m.csv"
            path.write_text("id,endpoint,prompt,image_size\n" + "\n".join(rows) + "\n")
            report = await run(emu, run_config(path, run_dir))
            assert report.exit_code == 0, report.message
    assert main(["export", str(run_dir), "--format", "parquet"]) == 0
    export_sql, raw_sql = duckdb_queries()
    here = str(tmp_path).replace("'", "''")

    def query(sql: str) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = duckdb.sql(
            sql.replace("nightly.runner", f"{here}/nightly.runner")
        ).fetchall()
        return rows

    current, every = status_summary(run_dir), status_summary(run_dir, all_versions=True)
    assert (current.jobs, every.jobs, current.superseded) == (4, 5, 1)
    exported = query(export_sql)
    assert {state: jobs for state, jobs, _usd in exported} == dict(current.by_state)
    assert sum(usd for *_, usd in exported) == current.billed_usd
    assert dict(query(raw_sql)) == dict(every.by_state)
    # What the query is for: the raw glob's rows are events, several per job.
    events = query("SELECT count(*) FROM 'nightly.runner/ledger/*.parquet'")[0][0]
    assert isinstance(events, int) and events > every.jobs
