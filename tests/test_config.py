"""RunConfig: flags over TOML over defaults; the key never shows."""

from pathlib import Path

import pytest

from runner.cli import build_parser
from runner.config import RunConfig, key_from_env
from runner.errors import UsageError
from runner.options import run_config

SECRET = "abc123:very-secret"


def parse(argv: list[str]) -> RunConfig:
    args = build_parser().parse_args(["run", *argv])
    return run_config(args, {"FAL_KEY": SECRET})


def test_defaults_and_derived_values(tmp_path: Path) -> None:
    config = parse([str(tmp_path / "m.csv")])
    assert config.run_dir == tmp_path / "m.runner"
    assert config.in_flight_limit == 3 * config.concurrency  # polling: three times the slots
    streaming = parse([str(tmp_path / "m.csv"), "--completion", "stream"])
    assert streaming.in_flight_limit == 2 * streaming.concurrency
    assert config.completion == "poll" and config.on_unknown == "resubmit"


def test_flags_win_over_the_toml_file(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[runner]\nconcurrency = 8\nmax-cost = "12.5"\ncompletion = "stream"\nrate = 3\n'
        'endpoint-limit = {"fal-ai/flux-lora" = 2}\n'
    )
    config = parse([str(tmp_path / "m.csv"), "--config", str(toml), "--concurrency", "4"])
    assert config.concurrency == 4  # the flag
    assert str(config.max_cost_usd) == "12.5" and config.completion == "stream"  # the file
    assert config.rate_per_s == 3.0
    assert dict(config.endpoint_limits) == {"fal-ai/flux-lora": 2}


def test_bad_toml_and_bad_values_are_usage_errors(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("concurrency = = 3")
    with pytest.raises(UsageError, match=r"run\.toml"):
        parse([str(tmp_path / "m.csv"), "--config", str(toml)])
    with pytest.raises(UsageError, match="concurrency"):
        parse([str(tmp_path / "m.csv"), "--concurrency", "0"])
    with pytest.raises(UsageError, match="webhook-url"):
        parse([str(tmp_path / "m.csv"), "--completion", "webhook"])


def test_key_is_never_in_repr_or_run_metadata(tmp_path: Path) -> None:
    config = parse([str(tmp_path / "m.csv")])
    assert config.key is not None and config.key.get_secret_value() == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert SECRET not in str(config.public_dict())
    assert config.public_dict()["key_set"] is True


def test_key_from_env_ignores_blank_values() -> None:
    assert key_from_env({"FAL_KEY": "  "}) is None
    assert key_from_env({}) is None
