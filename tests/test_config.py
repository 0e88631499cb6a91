"""RunConfig: flags over TOML over defaults; the key never shows."""

from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from runner.cli import build_parser
from runner.config import RunConfig, build_config, key_from_env
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
    assert config.completion == "poll" and config.on_unknown == "reconcile"


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


def test_a_key_with_a_newline_from_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", str(tmp_path / "m.csv")])
    with pytest.raises(UsageError, match=r"^FAL_KEY contains a newline") as caught:
        run_config(args, {"FAL_KEY": "emulator:local-key\nX"})
    assert "local-key" not in str(caught.value)


def test_a_bad_key_given_to_the_config_is_a_usage_error_without_the_key(tmp_path: Path) -> None:
    values = {"manifest": tmp_path / "m.csv", "run_dir": tmp_path / "run"}
    with pytest.raises(UsageError) as caught:
        build_config({**values, "key": SecretStr("emulator:local-key\nX")})
    assert str(caught.value) == "FAL_KEY contains a newline: set it to the key alone, on one line"
    assert caught.value.__cause__ is None  # pydantic's own text would hold the input
    with pytest.raises(UsageError) as raw:
        build_config({**values, "key": "emulator:lócal-key"})
    assert "lócal" not in str(raw.value) and raw.value.__cause__ is None


def test_the_embedded_emulator_neither_reads_nor_checks_fal_key(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", str(tmp_path / "m.csv"), "--emulator"])
    config = run_config(args, {"FAL_KEY": "emulator:local-key\nX"})
    assert config.emulator and config.key is None


def test_the_config_gives_the_redaction_function_of_its_key(tmp_path: Path) -> None:
    config = parse([str(tmp_path / "m.csv")])
    redact = config.redactor()
    assert redact(f"echo {SECRET}") == "echo [redacted]"
    assert redact("secret very-secret") == "secret [redacted]"
    assert redact("id abc123") == "id abc123"  # too short to tell from ordinary text
    unkeyed = build_config({"manifest": tmp_path / "m.csv", "run_dir": tmp_path / "run"})
    assert unkeyed.redactor()("any text") == "any text"


def test_max_total_cost_from_the_flag_and_the_toml_file(tmp_path: Path) -> None:
    manifest = str(tmp_path / "m.csv")
    assert parse([manifest]).max_total_cost_usd is None
    both = parse([manifest, "--max-cost", "2.50", "--max-total-cost", "10"])
    assert (both.max_cost_usd, both.max_total_cost_usd) == (Decimal("2.50"), Decimal(10))
    toml = tmp_path / "run.toml"
    toml.write_text('[runner]\nmax-total-cost = "12.5"\nmax_cost = "0.5"\n')
    from_file = parse([manifest, "--config", str(toml)])
    assert from_file.max_total_cost_usd == Decimal("12.5")
    assert from_file.max_cost_usd == Decimal("0.5")
    flag_wins = parse([manifest, "--config", str(toml), "--max-total-cost", "3"])
    assert flag_wins.max_total_cost_usd == Decimal(3)
    assert flag_wins.public_dict()["max_total_cost_usd"] == "3"


# (argv after the manifest, the whole message)
BAD_VALUES = [
    (["--max-cost", "-5"], "--max-cost must be at least 0, not -5"),
    (["--max-total-cost", "-0.01"], "--max-total-cost must be at least 0, not -0.01"),
    (["--max-cost", "nan"], "--max-cost must be a finite number, not NaN"),
    (["--concurrency", "0"], "--concurrency must be at least 1, not 0"),
    (["--rate", "0"], "--rate must be more than 0, not 0"),
    (["--max-cost", "-1", "--max-total-cost", "-2"],
     "--max-cost must be at least 0, not -1; --max-total-cost must be at least 0, not -2"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES)
def test_bad_values_are_reported_by_flag_not_by_field(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    with pytest.raises(UsageError) as info:
        parse([str(tmp_path / "m.csv"), *argv])
    assert str(info.value) == message
    assert "_usd" not in str(info.value) and "Decimal(" not in str(info.value)


def test_bad_toml_values_name_the_key_and_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[runner]\nmax-total-cost = -3\nendpoint-limit = {"fal-ai/flux-lora" = "x"}\nbogus = 1\n'
    )
    with pytest.raises(UsageError) as info:
        parse([str(tmp_path / "m.csv"), "--config", str(toml)])
    parts = str(info.value).split("; ")
    assert f"max-total-cost in {toml} must be at least 0, not -3" in parts
    assert f"endpoint-limit fal-ai/flux-lora in {toml} must be a valid integer, not 'x'" in parts
    assert f"unknown option bogus in {toml}" in parts
    # a flag given over a bad file value is what gets named
    with pytest.raises(UsageError) as info:
        parse([str(tmp_path / "m.csv"), "--config", str(toml), "--max-total-cost", "-1"])
    assert "--max-total-cost must be at least 0, not -1" in str(info.value)


def test_a_dollar_flag_that_is_not_a_number_is_an_argparse_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "m.csv", "--max-total-cost", "ten"])
    assert info.value.code == 2
    assert "--max-total-cost: expected dollars such as 12.50, got 'ten'" in capsys.readouterr().err


def test_the_key_is_never_shown_in_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        build_config({"manifest": tmp_path, "run_dir": tmp_path, "key": 12345})
    assert "FAL_KEY" in str(info.value) and "12345" not in str(info.value)
