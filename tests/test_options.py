"""The one options table: every run flag means the same from the command line and from a
TOML file, booleans turn off with --no-X, errors name flags and keys, help says everything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.cli import build_parser, main, stream_jobs
from runner.config import RunConfig
from runner.errors import UsageError
from runner.options import manifest_config, run_config
from runner.options.table import GROUPS, OPTIONS, Option
from runner.report.schemas import LOG_EVENT_SCHEMA
from tests.test_docs import subcommands
from tests.test_machine_output import problems

SECRET = "abc123:very-secret"
README = Path(__file__).parent.parent / "README.md"

# For every option: (its flag's words, the same value in TOML). Booleans are given in the
# direction away from their default. A new option without a sample fails the walk.
SAMPLES: dict[str, tuple[list[str], Any]] = {
    "format": (["jsonl"], "jsonl"),
    "endpoint": (["fal-ai/flux-lora"], "fal-ai/flux-lora"),
    "allow-endpoint": (["a/b", "--allow-endpoint", "c/d"], ["a/b", "c/d"]),
    "set": (["seed=1", "--set", "style=ink"], {"seed": 1, "style": "ink"}),
    "prompt-template": (["a {title}"], "a {title}"),
    "id-column": (["sku"], "sku"),
    "strict": ([], True),
    "emulator": ([], True),
    "emulator-time-scale": (["0.5"], 0.5),
    "emulator-concurrency": (["3"], 3),
    "emulator-faults": (["submit_429=0.1"], "submit_429=0.1"),
    "queue-url": (["https://queue.example"], "https://queue.example"),
    "rest-url": (["https://rest.example"], "https://rest.example"),
    "cdn-url": (["https://cdn.example"], "https://cdn.example"),
    "api-url": (["https://api.example"], "https://api.example"),
    "priority": (["low"], "low"),
    "output-lifetime": (["3600"], 3600),
    "upload-lifetime": (["60.5"], 60.5),
    "fallbacks": ([], False),
    "store-io": ([], False),
    "concurrency": (["8"], 8),
    "max-in-flight": (["5"], 5),
    "rate": (["2.5"], 2.5),
    "endpoint-limit": (["fal-ai/flux-lora=2"], {"fal-ai/flux-lora": 2}),
    "max-cost": (["0.1"], 0.1),
    "max-total-cost": (["30"], "30"),
    "max-attempts": (["5"], 5),
    "retry-failed": ([], True),
    "key-changed": ([], True),
    "on-unknown": (["skip"], "skip"),
    "shards": (["4"], 4),
    "shard": (["1"], 1),
    "keys-file": (["keys.txt"], "keys.txt"),
    "gate-dir": (["gates"], "gates"),
    "flagged": (["reroll"], "reroll"),
    "max-rerolls": (["4"], 4),
    "cache": (["shared.cache"], "shared.cache"),
    "nondeterministic-endpoint": (["a/b"], ["a/b"]),
    "reconcile-after": (["5"], 5),
    "prices": (["p.json"], "p.json"),
    "completion": (["stream"], "stream"),
    "first-look": (["status"], "status"),
    "webhook-listen": (["0.0.0.0:8080"], "0.0.0.0:8080"),
    "webhook-url": (["https://hook.example/x"], "https://hook.example/x"),
    "webhook-jwks-url": (["https://jwks.example"], "https://jwks.example"),
    "job-timeout": (["30"], 30),
    "start-timeout": (["10"], 10.0),
    "ledger": (["night.runner"], "night.runner"),
    "out": (["s3://bucket/x"], "s3://bucket/x"),
    "download": ([], False),
    "download-concurrency": (["4"], 4),
    "inline-inputs": ([], True),
    "inline-max-bytes": (["1000"], 1000),
    "probe-inputs": ([], True),
    "quiet": ([], True),
    "log-format": (["json"], "json"),
}
# What an option needs beside it to be valid (as flags, and as TOML lines).
CONTEXT: dict[str, tuple[list[str], str]] = {
    "store-io": (["--on-unknown", "skip"], 'on-unknown = "skip"\n'),
    "shard": (["--shards", "4"], "shards = 4\n"),
}


def toml_line(key: str, value: Any) -> str:
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return f"{key} = {{{inner}}}\n"
    return f"{key} = {toml_value(value)}\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def parse(argv: list[str]) -> RunConfig:
    return run_config(build_parser().parse_args(["run", *argv]), {"FAL_KEY": SECRET})


def flag_words(option: Option) -> list[str]:
    words, value = SAMPLES[option.name]
    if option.kind == "bool":
        return [option.flag_for(value)]
    return [option.flag, *words]


def test_every_option_has_a_sample() -> None:
    assert set(SAMPLES) == {o.name for o in OPTIONS}


def test_every_run_config_field_comes_from_the_table() -> None:
    """Besides the manifest (an argument) and the key (FAL_KEY, never a flag or a file)."""
    fields = [o.field for o in OPTIONS]
    assert len(fields) == len(set(fields))
    assert set(RunConfig.model_fields) == {*fields, "manifest", "key"}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_run_flag_lands_in_the_same_field_from_the_cli_and_from_toml(
    tmp_path: Path, option: Option
) -> None:
    manifest = str(tmp_path / "m.csv")
    context_flags, context_toml = CONTEXT.get(option.name, ([], ""))
    from_flags = parse([manifest, *context_flags, *flag_words(option)])
    toml = tmp_path / "run.toml"
    toml.write_text("[runner]\n" + context_toml + toml_line(option.name, SAMPLES[option.name][1]))
    from_file = parse([manifest, "--config", str(toml)])
    default = getattr(parse([manifest]), option.field)
    got = getattr(from_flags, option.field)
    assert got == getattr(from_file, option.field)
    assert got != default, f"{option.flag}'s sample is its default: the walk proves nothing"
    # and the flag wins over the file
    toml.write_text("[runner]\n" + context_toml + toml_line(option.name, SAMPLES[option.name][1]))
    both = parse([manifest, "--config", str(toml), *context_flags, *flag_words(option)])
    assert getattr(both, option.field) == got


def test_a_toml_number_of_dollars_is_exact(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("max-cost = 0.1\n")
    assert str(parse([str(tmp_path / "m.csv"), "--config", str(toml)]).max_cost_usd) == "0.1"


BOOLEANS = [o for o in OPTIONS if o.kind == "bool"]


@pytest.mark.parametrize("option", BOOLEANS, ids=lambda o: o.name)
def test_no_flag_turns_off_a_toml_true(tmp_path: Path, option: Option) -> None:
    manifest = str(tmp_path / "m.csv")
    context_flags, context_toml = CONTEXT.get(option.name, ([], ""))
    toml = tmp_path / "run.toml"
    toml.write_text(f"{context_toml}{option.name} = true\n")
    on = parse([manifest, *context_flags, "--config", str(toml)])
    off = parse([manifest, *context_flags, "--config", str(toml), f"--no-{option.name}"])
    assert getattr(on, option.field) is (not option.invert)
    assert getattr(off, option.field) is option.invert
    # ``no-X = true`` in the file says the same as ``--no-X``
    toml.write_text(f"{context_toml}no-{option.name} = true\n")
    assert getattr(parse([manifest, *context_flags, "--config", str(toml)]), option.field) is (
        option.invert
    )


def test_the_old_negative_flags_keep_their_meaning(tmp_path: Path) -> None:
    config = parse(
        [str(tmp_path / "m.csv"), "--no-download", "--no-fallbacks", "--no-store-io",
         "--on-unknown", "fail"]
    )  # fmt: skip
    assert config.download is False and config.no_fallbacks is True and config.store_io is False
    assert config.submit_headers["x-fal-disable-fallbacks"] == "true"
    assert config.submit_headers["X-Fal-Store-IO"] == "0"


def test_an_unknown_toml_key_is_an_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[runner]\nmax_cost_usd = "3"\nconcurrency = 4\nbogus = 1\n')
    with pytest.raises(UsageError) as info:
        parse([str(tmp_path / "m.csv"), "--config", str(toml)])
    parts = str(info.value).split("; ")
    assert f"unknown option max_cost_usd in {toml} (did you mean max-cost?)" in parts
    assert f"unknown option bogus in {toml}" in parts


def test_a_key_given_twice_in_one_file_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("download = true\nno-download = true\n")
    with pytest.raises(UsageError, match=f"download and no-download in {toml} set the same"):
        parse([str(tmp_path / "m.csv"), "--config", str(toml)])


# (flag words, TOML line, the flag's message, the key's message; {toml} is the file)
BAD = [
    (["--max-cost", "-5"], "max-cost = -5",
     "--max-cost must be at least 0, not -5", "max-cost in {toml} must be at least 0, not -5"),
    (["--concurrency", "0"], "concurrency = 0",
     "--concurrency must be at least 1, not 0", "concurrency in {toml} must be at least 1, not 0"),
    (["--upload-lifetime", "0"], "upload-lifetime = 0",
     "--upload-lifetime must be more than 0, not 0",
     "upload-lifetime in {toml} must be more than 0, not 0"),
    (["--job-timeout", "-1"], "job_timeout = -1",
     "--job-timeout must be more than 0, not -1",
     "job_timeout in {toml} must be more than 0, not -1"),
    (["--completion", "webhook"], 'completion = "webhook"',
     "--completion webhook needs --webhook-url (the public URL fal calls)",
     "--completion webhook needs --webhook-url (the public URL fal calls)"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "line", "flag_message", "key_message"), BAD)
def test_bad_values_are_named_by_flag_or_key_never_by_field(
    tmp_path: Path, flags: list[str], line: str, flag_message: str, key_message: str
) -> None:
    manifest = str(tmp_path / "m.csv")
    with pytest.raises(UsageError) as by_flag:
        parse([manifest, *flags])
    toml = tmp_path / "run.toml"
    toml.write_text(line + "\n")
    with pytest.raises(UsageError) as by_key:
        parse([manifest, "--config", str(toml)])
    assert str(by_flag.value) == flag_message
    assert str(by_key.value) == key_message.format(toml=toml)
    fields = {o.field for o in OPTIONS if o.field.replace("_", "-") != o.name}
    for text in (str(by_flag.value), str(by_key.value)):
        assert not [f for f in fields if f in text], text


@pytest.mark.parametrize("command", ["run", "plan", "validate"])
def test_every_flag_in_help_says_what_it_does_and_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    shown = capsys.readouterr().out
    table = [o for o in OPTIONS if command in o.commands]
    assert table
    for option in table:
        assert option.flag in shown
        if option.kind == "bool":
            assert f"--no-{option.name}" in shown
        assert len(option.help) >= 40, option.name
        assert "default" in option.help or "required" in option.help, option.name
    titles = [g for g in GROUPS if any(o.group == g for o in table)]
    positions = [shown.index(f"\n{title}:\n") for title in titles]
    assert positions == sorted(positions)  # every group shown, in the table's order
    parser = subcommands()[command]
    terse = [a.option_strings or a.dest for a in parser._actions if len(a.help or "") < 20]
    assert not terse, f"flags without a sentence of help: {terse}"


def test_manifest_options_from_toml_reach_validate_plan_and_run(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("sku,title\nA1,a red bicycle\n")
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[runner]\nendpoint = "fal-ai/flux-lora"\nprompt-template = "a photo of {title}"\n'
        'id-column = "sku"\nset = {seed = 7}\n'
    )
    for command in ("validate", "plan"):
        args = build_parser().parse_args([command, str(csv), "--config", str(toml)])
        _warnings, items = stream_jobs(manifest_config(args))
        (job,) = list(items)
        assert not hasattr(job, "problems"), job
        assert job.endpoint == "fal-ai/flux-lora" and job.row_id == "A1"
        assert job.payload["prompt"] == "a photo of a red bicycle" and job.payload["seed"] == 7
    config = parse([str(csv), "--config", str(toml)])
    assert config.default_endpoint == "fal-ai/flux-lora"
    assert config.prompt_template == "a photo of {title}" and dict(config.defaults) == {"seed": "7"}
    assert main(["validate", str(csv), "--config", str(toml)]) == 0


def json_lines(err: str) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in err.splitlines()]
    for doc in docs:
        assert not problems(doc, LOG_EVENT_SCHEMA), problems(doc, LOG_EVENT_SCHEMA)
    return docs


def early_errors(tmp_path: Path) -> list[tuple[list[str], str, str]]:
    """(argv after ``run``, a TOML file's text or "", what the message must hold)."""
    csv = tmp_path / "m.csv"
    csv.write_text("id,endpoint,prompt\nr1,fal-ai/flux-lora,a cat\n")
    return [
        ([str(csv), "--max-cost", "ten"], "", "--max-cost: expected dollars"),
        ([str(csv), "--max-cost", "-5"], "", "--max-cost must be at least 0, not -5"),
        ([str(csv), "--bogus"], "", "unrecognized arguments: --bogus"),
        ([], "", "the following arguments are required: manifest"),
        ([str(tmp_path / "gone.csv")], "", "manifest not found"),
        ([str(csv)], "concurrency = = 3", "not valid TOML"),
        ([str(csv)], "bogus = 1", "unknown option bogus"),
        ([str(csv)], "max-cost = -5", "max-cost in"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_errors_before_the_run_are_json_when_json_logs_were_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: int
) -> None:
    argv, toml_text, said = early_errors(tmp_path)[case]
    toml = tmp_path / "run.toml"
    toml.write_text(toml_text)
    code = main(["run", "--emulator", "--config", str(toml), "--log-format", "json", *argv])
    out = capsys.readouterr()
    (end,) = json_lines(out.err)  # nothing but the one JSON line
    assert end["event"] == "exit" and end["code"] == code == 2
    assert said in end["message"] and end["message"].startswith("error: "), end["message"]
    # as text without --log-format json, the same message (argparse's own exit for usage)
    try:
        text_code: object = main(["run", "--emulator", "--config", str(toml), *argv])
    except SystemExit as exc:
        text_code = exc.code
    err = capsys.readouterr().err
    assert text_code == 2 and said in err and not err.startswith("{")


def test_log_format_json_in_the_toml_file_makes_its_own_errors_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('log-format = "json"\nconcurrency = 0\n')
    code = main(["run", str(tmp_path / "m.csv"), "--emulator", "--config", str(toml)])
    (end,) = json_lines(capsys.readouterr().err)
    assert code == 2 and end["message"] == f"error: concurrency in {toml} must be at least 1, not 0"


def test_the_python_api_takes_false_for_a_boolean_as_its_no_flag(tmp_path: Path) -> None:
    from runner.api import _argv

    argv = _argv("run", "m.csv", {"download": False, "quiet": True, "no_fallbacks": True})
    assert argv == ["run", "m.csv", "--no-download", "--quiet", "--no-fallbacks"]


def readme_block() -> str:
    """The README's options section, rendered from the table."""
    lines = [
        "<!-- options: generated from runner/options/table.py by `python -m tests.test_options` -->"
    ]
    for group in GROUPS:
        lines += [
            "",
            f"**{group}**",
            "",
            "| flag | TOML key | what it does |",
            "| --- | --- | --- |",
        ]
        for o in (o for o in OPTIONS if o.group == group):
            shown = o.metavar or ("|".join(o.choices) if o.choices else "")
            flag = f"`{o.flag} {shown}`" if shown else f"`{o.flag}`"
            key = f"`{o.name}`"
            if o.kind == "bool":
                flag, key = f"`{o.flag}`, `--no-{o.name}`", f"`{o.name} = true|false`"
            cells = [flag, key, o.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("<!-- /options -->")
    return "\n".join(lines)


def test_the_readme_lists_every_option_as_the_table_says() -> None:
    assert readme_block() in README.read_text(encoding="utf-8"), (
        "README's options section is stale: run python -m tests.test_options"
    )


if __name__ == "__main__":  # rewrite the README's options section from the table
    text = README.read_text(encoding="utf-8")
    start, end = text.index("<!-- options"), text.index("<!-- /options -->")
    README.write_text(
        text[:start] + readme_block() + text[end + len("<!-- /options -->") :], encoding="utf-8"
    )


def test_every_emulator_serve_flag_says_what_it_does_and_its_default() -> None:
    from runner.emulator.server import parser

    flags = [a for a in parser()._actions if a.option_strings != ["-h", "--help"]]
    assert {"--host", "--port"} <= {s for a in flags for s in a.option_strings}
    vague = [a.option_strings for a in flags if "default" not in (a.help or "")]
    assert not vague, f"flags whose help gives no default: {vague}"
