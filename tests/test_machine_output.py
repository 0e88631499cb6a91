"""Machine-readable runs: ``--log-format json`` lines, ``status --json`` and ``report --json``
all name their schema and validate against it (:mod:`runner.report.schemas`)."""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.cli import build_parser, main
from runner.emulator import parse_faults
from runner.errors import EXIT_JOBS_FAILED
from runner.execution.engine import Hooks, execute
from runner.execution.progress import Progress, Tally
from runner.execution.summary import print_summary_json
from runner.options import run_config as config_from_args
from runner.report.schemas import (
    LOG,
    LOG_EVENT_SCHEMA,
    REPORT,
    REPORT_SCHEMA,
    SCHEMAS,
    STATUS,
    STATUS_SCHEMA,
)
from tests.report_support import sample_run
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config

README = (Path(__file__).parent.parent / "README.md").read_text()

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def problems(doc: Any, schema: dict[str, Any], at: str = "$") -> list[str]:
    """The subset of JSON Schema the runner's schemas use: type, const, required,
    properties, additionalProperties, items, anyOf, oneOf, minimum, pattern."""
    found: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](doc) for t in types):
            return [f"{at}: {doc!r} is not {types}"]
    if "const" in schema and doc != schema["const"]:
        found.append(f"{at}: {doc!r} != {schema['const']!r}")
    if "minimum" in schema and isinstance(doc, int | float) and doc < schema["minimum"]:
        found.append(f"{at}: {doc} < {schema['minimum']}")
    if "pattern" in schema and isinstance(doc, str) and not re.search(schema["pattern"], doc):
        found.append(f"{at}: {doc!r} does not match {schema['pattern']}")
    for branch in ("anyOf", "oneOf"):
        if branch in schema:
            fits = sum(not problems(doc, s, at) for s in schema[branch])
            if fits == 0 or (branch == "oneOf" and fits > 1):
                found.append(f"{at}: {fits} of the {branch} schemas fit {doc!r:.200}")
    if isinstance(doc, dict):
        found += [f"{at}: no {key!r}" for key in schema.get("required", []) if key not in doc]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if key in props:
                found += problems(value, props[key], f"{at}.{key}")
            elif isinstance(extra, dict):
                found += problems(value, extra, f"{at}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += problems(item, schema["items"], f"{at}[{i}]")
    return found


def assert_valid(doc: Any, schema: dict[str, Any]) -> None:
    assert problems(doc, schema) == []
    try:  # the real validator too, where it is installed (not a dependency)
        jsonschema: Any = importlib.import_module("jsonschema")
    except ImportError:
        return
    jsonschema.Draft202012Validator(schema).validate(doc)


def test_the_small_validator_catches_what_the_schemas_say() -> None:
    line = {"schema": LOG, "event": "failure", "at": "2026-01-01T00:00:00+00:00",
            "row_id": "r1", "reason": "runner_disconnected", "message": "gone"}  # fmt: skip
    assert problems(line, LOG_EVENT_SCHEMA) == []
    assert problems({**line, "reason": 3}, LOG_EVENT_SCHEMA)
    assert problems({**line, "event": "fialure"}, LOG_EVENT_SCHEMA)
    assert problems({k: v for k, v in line.items() if k != "reason"}, LOG_EVENT_SCHEMA)
    assert problems({"schema": STATUS}, STATUS_SCHEMA)
    assert problems({"spent_usd": 1.5}, {"properties": {"spent_usd": {"type": "string"}}})


def test_every_schema_is_draft_2020_12_and_in_the_readme() -> None:
    for name, schema in SCHEMAS.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert f"`{name}`" in README
    try:
        jsonschema: Any = importlib.import_module("jsonschema")
    except ImportError:
        return
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "nothing was written"
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    for doc in docs:
        assert_valid(doc, LOG_EVENT_SCHEMA)
    return docs


@pytest.mark.anyio
async def test_json_log_of_a_run_with_failures_validates_and_names_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest(tmp_path, 4)
    run_dir = tmp_path / "run"
    config = run_config(path, run_dir, max_attempts=1, log_format="json")
    stream = io.StringIO()
    faults = parse_faults("fail_runner_disconnected=@1")
    async with emulator(faults=faults) as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=stream,
                      handle_signals=False, policies=FAST_POLICIES)  # fmt: skip
        report = await execute(config, hooks=hooks)
    print_summary_json(report, stream)

    events = json_lines(stream.getvalue())
    kinds = [e["event"] for e in events]
    assert {"progress", "failure", "summary", "exit"} <= set(kinds)
    assert kinds[0] == "progress"  # a watcher sees the counts at once
    assert kinds[-2:] == ["summary", "exit"]
    failures = [e for e in events if e["event"] == "failure"]
    assert len(failures) == report.tally.failed >= 1
    assert {f["reason"] for f in failures} == {"runner_disconnected"}
    assert {f["row_id"] for f in failures} <= {"r0", "r1", "r2", "r3"}
    summary, end = events[-2], events[-1]
    assert summary["outcomes"]["failed"] == len(failures)
    assert summary["outcomes"]["completed"] == 4 - len(failures)
    assert summary["reasons"] == {"runner_disconnected": len(failures)}
    assert Decimal(summary["spent_usd"]) == report.tally.spent_usd
    assert end["code"] == report.exit_code == EXIT_JOBS_FAILED
    assert end["message"].startswith("not every job completed")
    last_progress = [e for e in events if e["event"] == "progress"][-1]
    assert last_progress["done"] == 4 and last_progress["in_flight"] == 0

    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["schema"] == STATUS
    assert_valid(status, STATUS_SCHEMA)
    assert main(["report", str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == REPORT and doc["failed_jobs"] == len(failures)
    assert_valid(doc, REPORT_SCHEMA)


def test_json_progress_comes_first_then_at_the_interval_and_last_on_close() -> None:
    now = [0.0]
    stream = io.StringIO()
    tally = Tally(total=3)
    progress = Progress(tally, stream=stream, interval_s=10.0, clock=lambda: now[0],
                        log_format="json")  # fmt: skip
    progress.refresh()
    now[0] = 5.0
    progress.refresh()  # within the interval: nothing
    tally.completed = 2
    now[0] = 10.0
    progress.refresh()
    progress.close()
    events = json_lines(stream.getvalue())
    assert [e["event"] for e in events] == ["progress"] * 3
    assert [e["done"] for e in events] == [0, 2, 2]
    assert events[0]["spent_usd"] == "0" and events[0]["estimate_usd"] is None


def test_json_messages_and_failures_pass_the_redaction() -> None:
    stream = io.StringIO()
    hide: Callable[[str], str] = lambda s: s.replace("SECRET", "***")  # noqa: E731
    tally = Tally(redact=hide)
    progress = Progress(tally, stream=stream, redact=hide, log_format="json")
    progress.say("budget reached; key SECRET")
    tally.fail("http_500", "r7: server said SECRET")
    tally.bad_row(["m.csv:3: guidance_scale=40 is above 20"])
    tally.note("left_failed", "no row id here")
    message, failed, invalid, left = json_lines(stream.getvalue())
    assert message == {**message, "event": "message", "text": "budget reached; key ***"}
    assert (failed["row_id"], failed["reason"], failed["message"]) == (
        "r7", "http_500", "server said ***"
    )  # fmt: skip
    assert (invalid["row_id"], invalid["reason"]) == (None, "invalid_row")
    assert invalid["message"] == "m.csv:3: guidance_scale=40 is above 20"
    assert (left["row_id"], left["message"]) == (None, "no row id here")
    assert "SECRET" not in stream.getvalue()
    assert tally.reasons == {"http_500": 1, "invalid_row": 1, "left_failed": 1}


def test_log_format_flag_reaches_the_config(tmp_path: Path) -> None:
    path = manifest(tmp_path, 1)
    parser = build_parser()
    args = parser.parse_args(["run", str(path), "--emulator", "--log-format", "json"])
    assert config_from_args(args, {}).log_format == "json"
    args = parser.parse_args(["run", str(path), "--emulator"])
    assert config_from_args(args, {}).log_format == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", str(path), "--log-format", "yaml"])


def test_a_fatal_error_ends_the_json_log_with_an_exit_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    path = manifest(tmp_path, 1)
    code = main(["run", str(path), "--log-format", "json"])  # no FAL_KEY, no --emulator
    err = capsys.readouterr().err
    end = json_lines(err)[-1]
    assert end["event"] == "exit" and end["code"] == code == 2
    assert "FAL_KEY" in end["message"]


def test_status_json_of_a_run_with_invalid_rows_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Invalid rows have no endpoint: their group's endpoint is null, which the schema allows.
    run_dir = sample_run(tmp_path / "run")
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert None in [e["endpoint"] for e in status["by_endpoint"]]
    assert_valid(status, STATUS_SCHEMA)
    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "  (no endpoint): 1 job (invalid=1)" in text and "None:" not in text
