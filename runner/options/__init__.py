"""The command line's options and how they become typed configuration.

:data:`runner.options.table.OPTIONS` is the one table: :func:`add_options` declares its flags
in their help groups, :func:`file_values` reads a TOML file's keys by it, and
:func:`run_config` merges both (flags win over the file, the file over the defaults) into
the frozen :class:`runner.config.RunConfig`. ``validate`` and ``plan`` read their options
the same way (:func:`manifest_config`), so one TOML file means the same to every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import UsageError

# Declaring the flags needs none of these: `runner --help` stays clear of pydantic's models
# (tests/test_startup.py); the functions that build a RunConfig import them when called.
if TYPE_CHECKING:
    from pydantic import SecretStr

    from runner.config import RunConfig
    from runner.manifest.jobs import ExpandOptions

from runner.options.table import (
    BY_NAME,
    FLAG_OF_FIELD,
    FORMATS,
    GROUPS,
    MANIFEST,
    OPTIONS,
    Option,
)

__all__ = [
    "FORMATS",
    "OPTIONS",
    "Given",
    "Option",
    "add_options",
    "default_run_dir",
    "expand_options",
    "file_values",
    "flag_values",
    "manifest_config",
    "run_config",
]


def add_options(p: argparse.ArgumentParser, command: str) -> None:
    """The manifest argument, ``--config`` and the table's flags of ``command``, in groups."""
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    groups[MANIFEST].add_argument(
        "manifest", type=Path, help="the CSV, TSV, JSONL or Parquet file of requests"
    )
    groups[MANIFEST].add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="read options from a TOML file whose keys are the long flag names, in a "
        "[runner] table or at the top level; flags given here win (default none)",
    )
    for option in OPTIONS:
        if command in option.commands:
            groups[option.group].add_argument(option.flag, **_argparse_kwargs(option))
    for group in groups.values():
        if not group._group_actions:  # an empty group would print a bare heading
            p._action_groups.remove(group)


def _argparse_kwargs(option: Option) -> dict[str, Any]:
    # Every default is None: "not given", so the TOML file and RunConfig decide.
    kw: dict[str, Any] = {"dest": option.dest, "default": None, "help": option.help}
    if option.kind == "bool":
        return kw | {"action": argparse.BooleanOptionalAction}
    if option.kind in ("list", "map"):
        kw["action"] = "append"
    if option.parse is not None:
        kw["type"] = option.parse
    if option.choices is not None:
        kw["choices"] = option.choices
    if option.metavar is not None:
        kw["metavar"] = option.metavar
    return kw


@dataclass
class Given:
    """Options given one way (flags, or a file): RunConfig values and the names used."""

    values: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # field -> "--max-cost" / "max-cost"
    problems: list[str] = field(default_factory=list)


def _field_value(option: Option, value: Any) -> Any:
    if option.kind == "bool" and option.invert and isinstance(value, bool):
        return not value
    if option.kind == "map" and isinstance(value, list):
        return dict(value)
    return value


def flag_values(args: argparse.Namespace) -> Given:
    """The table's options given as flags (those the command has and the user gave)."""
    given = Given()
    for option in OPTIONS:
        value = getattr(args, option.dest, None)
        if value is not None:
            given.values[option.field] = _field_value(option, value)
            given.names[option.field] = option.flag_for(value)
    return given


def file_values(path: Path) -> Given:
    """A TOML file's options. Keys are the long flag names, with dashes or underscores; a
    boolean ``X`` may be given as ``no-X``. Unknown keys are problems naming key and file."""
    given = Given()
    seen: dict[str, str] = {}  # field -> the key that gave it
    from runner.config import load_toml

    for key, raw in load_toml(path).items():
        name = key.replace("_", "-")
        option, negated = BY_NAME.get(name), False
        if option is None and name.startswith("no-"):
            option = BY_NAME.get(name.removeprefix("no-"))
            negated = option is not None and option.kind == "bool"
            option = option if negated else None
        if option is None:
            given.problems.append(f"unknown option {key} in {path}{_hint(name)}")
            continue
        if option.field in seen:
            given.problems.append(f"{seen[option.field]} and {key} in {path} set the same option")
            continue
        value = option.from_toml(raw) if option.from_toml else raw
        if negated and isinstance(value, bool):
            value = not value
        seen[option.field] = key
        given.values[option.field] = _field_value(option, value)
        given.names[option.field] = key
    return given


def _hint(name: str) -> str:
    import difflib  # here: only a mistyped key needs it (~1 ms of CPU to import)

    known = [o.name for o in OPTIONS] + [f"no-{o.name}" for o in OPTIONS if o.kind == "bool"]
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def default_run_dir(manifest: Path) -> Path:
    """Beside the manifest: ``demo.csv`` -> ``demo.runner/``."""
    return manifest.with_name(manifest.stem + ".runner")


KeyOf = Callable[[Mapping[str, Any]], "SecretStr | None"]


def _merged(args: argparse.Namespace, *, key: KeyOf) -> RunConfig:
    """Flags over the ``--config`` file over the defaults, validated.

    A bad value is reported under the name it was given by: ``--max-cost`` for a flag,
    ``max-cost in run.toml`` for a key of the file; unknown keys are reported with them.
    """
    from runner.config import build_config

    config_path: Path | None = getattr(args, "config", None)
    from_file = file_values(config_path) if config_path is not None else Given()
    from_flags = flag_values(args)
    values = {**from_file.values, **from_flags.values}
    names = {**FLAG_OF_FIELD, **from_file.names, **from_flags.names}
    origins = {f: str(config_path) for f in from_file.values if f not in from_flags.values}
    values.update(manifest=args.manifest, key=key(values))
    values.setdefault("run_dir", default_run_dir(args.manifest))
    try:
        config = build_config(values, names=names, origins=origins)
    except UsageError as exc:
        if not from_file.problems:
            raise
        raise UsageError("; ".join([*from_file.problems, str(exc)])) from None
    if from_file.problems:
        raise UsageError("; ".join(from_file.problems))
    return config


def run_config(args: argparse.Namespace, environ: Mapping[str, str]) -> RunConfig:
    """``run``'s configuration: the table's options, the manifest and ``FAL_KEY``."""

    from runner.config import key_from_env

    def key(values: Mapping[str, Any]) -> SecretStr | None:
        # The embedded emulator brings its own key: FAL_KEY is neither read nor checked.
        return None if values.get("emulator") is True else key_from_env(environ)

    return _merged(args, key=key)


def manifest_config(args: argparse.Namespace) -> RunConfig:
    """``validate``'s and ``plan``'s options, from flags and ``--config`` as a run reads
    them (no key: these commands send nothing that needs one)."""
    return _merged(args, key=lambda _values: None)


def expand_options(config: RunConfig) -> ExpandOptions:
    """How the configuration's manifest rows become jobs."""
    from runner.execution.jobsource import expand_options as from_config

    return from_config(config)
