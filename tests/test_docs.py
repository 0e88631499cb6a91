"""The README documents every command and every `runner run` flag (a missing one fails)."""

import argparse
from pathlib import Path

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
