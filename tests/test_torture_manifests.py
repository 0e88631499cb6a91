"""Hostile manifests generated with hypothesis: they never crash the runner.

Each example is a CSV or JSONL file of good rows mixed with bad ones (wrong types,
out-of-range values, unknown endpoints, duplicate ids, invalid UTF-8, broken quoting,
extra cells, JSONL garbage), with or without a BOM, CRLF line ends and enormous cells.
The generator knows which lines are bad, so the checks are exact: ``runner validate``
reports every bad line as ``file:line`` and no other, exits 1 (0 when all rows are good,
2 when the file has no rows), and prints no traceback; ``runner plan`` likewise; a run
sends every good row and records each bad one as ``invalid``.

A second family fuzzes *values* rather than rows: JSONL and Parquet cells of every
type (text where numbers go, numbers where text goes, lists, objects, nulls, nesting
past the limit, huge integers, NaN and infinities, booleans, lone surrogates). Nothing
is known about which rows are good, so the checks are the promises that hold for any
input: ``iter_jobs`` yields a job or a row error for every row and raises nothing, and
``validate``, ``plan`` and ``run`` end without a traceback. ``RUNNER_LONG_TESTS=1``
runs many more examples.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import main
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, EXIT_USAGE, RowError
from runner.execution.engine import Hooks, execute
from runner.ledger.state import LedgerState
from runner.manifest.jobs import ExpandOptions, Job, iter_jobs
from runner.manifest.reader import read_rows
from tests.scenario import emulator, run_config
from tests.torture_support import LONG, manifest_jobs

COLUMNS = ["id", "endpoint", "prompt", "image_size", "seed", "num_inference_steps",
           "guidance_scale", "note"]  # fmt: skip
BAD_UTF8 = "@@BADUTF8@@"
FUZZ = settings(
    max_examples=120 if LONG else 30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],  # capsys is drained per call
)

text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
prompts = text.filter(lambda s: s.strip() != "" and BAD_UTF8 not in s)
good_values = st.fixed_dictionaries(
    {
        "prompt": prompts,
        "image_size": st.sampled_from(["square", "square_hd", "landscape_4_3", "64x64", ""]),
        "seed": st.one_of(st.none(), st.integers(0, 2**31 - 1)),
        "num_inference_steps": st.one_of(st.none(), st.integers(1, 50)),
        "guidance_scale": st.one_of(st.none(), st.floats(0, 35, allow_nan=False)),
        "note": st.one_of(text, st.just("n" * 200_000)),  # metadata: never sent
    }
)
# (column, value) pairs that make a row invalid, as native values (JSONL) ...
BAD_NATIVE = [
    ("num_inference_steps", 0), ("num_inference_steps", 51), ("num_inference_steps", 10**12),
    ("num_inference_steps", 2.5), ("num_inference_steps", "many"), ("num_inference_steps", [1]),
    ("guidance_scale", -1), ("guidance_scale", 36), ("guidance_scale", "loud"),
    ("guidance_scale", {"a": 1}), ("guidance_scale", float("nan")), ("guidance_scale", 1e308 * 10),
    ("image_size", "12x"), ("image_size", "huge"), ("image_size", 5), ("endpoint", "acme/nope"),
    ("prompt", ""), ("prompt", "   "), ("num_images", 9),
]  # fmt: skip
# ... and as CSV text.
BAD_TEXT = [
    ("num_inference_steps", "0"), ("num_inference_steps", "51"), ("num_inference_steps", "x"),
    ("num_inference_steps", "2.5"), ("guidance_scale", "-1"), ("guidance_scale", "1.2.3"),
    ("guidance_scale", "nan"), ("guidance_scale", "inf"), ("image_size", "12x"),
    ("image_size", "0x0"), ("endpoint", "acme/nope"), ("prompt", ""), ("seed", "seven"),
]  # fmt: skip
CSV_KINDS = ["good"] * 4 + ["value", "dup_id", "bad_utf8", "bad_quote", "extra_cells"]
JSONL_KINDS = ["good"] * 4 + ["value", "dup_id", "bad_utf8", "garbage", "not_object"]
# Rows whose id cannot be read at all (so they claim none): CSV (False), JSONL (True).
UNREADABLE = {False: {"bad_quote"}, True: {"bad_utf8", "garbage", "not_object"}}
garbage = text.filter(lambda s: s.strip() != "" and "\n" not in s and "\r" not in s)


@dataclass(repr=False)
class Manifest:
    data: bytes
    suffix: str
    bad_lines: set[int] = field(default_factory=set)
    rows: int = 0  # data rows, good and bad

    def __repr__(self) -> str:  # examples hold 200 kB cells: show the start only
        return f"Manifest({self.data[:400]!r}..., {self.suffix!r}, bad={sorted(self.bad_lines)})"

    @property
    def good(self) -> int:
        return self.rows - len(self.bad_lines)


@st.composite
def spec_rows(draw: st.DrawFn, kinds: list[str]) -> list[tuple[str, dict[str, Any], Any]]:
    """(kind, good cells, extra) per row; the id is the row's position unless duplicated."""
    n = draw(st.integers(0, 8))
    out = []
    claimed: list[str] = []  # ids of earlier rows the reader could see
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "dup_id" and not claimed:
            kind = "good"
        row_id = f"row-{i}"
        cells = {"id": row_id, "endpoint": "fal-ai/flux-lora", **draw(good_values)}
        extra: Any = None
        if kind == "value":
            extra = draw(st.sampled_from(BAD_NATIVE if "garbage" in kinds else BAD_TEXT))
        elif kind == "dup_id":
            extra = draw(st.sampled_from(claimed))
        if kind not in UNREADABLE["garbage" in kinds]:
            claimed.append(row_id if kind != "dup_id" else extra)
        elif kind == "garbage":
            extra = draw(garbage.filter(_not_json_object))
        out.append((kind, cells, extra))
    return out


def _not_json_object(s: str) -> bool:
    try:
        return not isinstance(json.loads(s), dict)
    except ValueError:
        return True


def _csv_line(values: list[Any], newline: str, sep: str) -> str:
    # Render with CRLF so a cell holding either character is quoted, then end as asked.
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep, lineterminator="\r\n")
    writer.writerow(["" if v is None else v for v in values])
    return buf.getvalue().removesuffix("\r\n") + newline


@st.composite
def csv_manifests(draw: st.DrawFn, sep: str = ",") -> Manifest:
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    bom = draw(st.booleans())
    text_out = ("\ufeff" if bom else "") + _csv_line(COLUMNS, newline, sep)
    m = Manifest(b"", ".csv" if sep == "," else ".tsv")
    rows = draw(spec_rows(CSV_KINDS))
    for position, (kind, cells, extra) in enumerate(rows):
        line = text_out.count("\n") + 1
        if kind == "value":
            cells[extra[0]] = extra[1]
        if kind == "dup_id":
            cells["id"] = extra
        values = [cells.get(c) for c in COLUMNS]
        if kind == "bad_utf8":
            values[2] = "caf" + BAD_UTF8
        if kind == "extra_cells":
            values.append("surplus")
        rendered = _csv_line(values, newline, sep)
        if kind == "bad_quote":
            last = position == len(rows) - 1
            rendered = sep.join([cells["id"], "fal-ai/flux-lora", '"x"y', "square"]) + newline
            if last and draw(st.booleans()):
                rendered = sep.join([cells["id"], "fal-ai/flux-lora", '"never closed']) + newline
        text_out += rendered
        m.rows += 1
        if kind != "good":
            m.bad_lines.add(line)
    if draw(st.booleans()):
        text_out += newline  # a trailing blank line is not a row
    m.data = text_out.encode().replace(BAD_UTF8.encode(), b"\xe9\xff")
    return m


@st.composite
def jsonl_manifests(draw: st.DrawFn) -> Manifest:
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    ascii_only = draw(st.booleans())
    lines: list[bytes] = [b"\xef\xbb\xbf"] if draw(st.booleans()) else [b""]
    m = Manifest(b"", ".jsonl")
    number = 1
    for kind, cells, extra in draw(spec_rows(JSONL_KINDS)):
        if draw(st.booleans()):
            lines.append(newline.encode())  # blank lines are allowed, and counted
            number += 1
        if kind == "value":
            cells[extra[0]] = extra[1]
        if kind == "dup_id":
            cells["id"] = extra
        body = json.dumps({k: v for k, v in cells.items() if v is not None},
                          ensure_ascii=ascii_only)  # fmt: skip
        if kind == "bad_utf8":
            body = body.replace('"prompt": ', f'"prompt": "{BAD_UTF8}", "x": ', 1)
        elif kind == "garbage":
            body = extra
        elif kind == "not_object":
            body = json.dumps([cells["id"], 1])
        lines.append(body.encode().replace(BAD_UTF8.encode(), b"\xe9\xff") + newline.encode())
        m.rows += 1
        if kind != "good":
            m.bad_lines.add(number)
        number += 1
    m.data = b"".join(lines)
    return m


manifests = st.one_of(csv_manifests(), csv_manifests(sep="\t"), jsonl_manifests())
REPORTED = re.compile(r"^(?P<file>.+?):(?P<line>\d+): ", re.MULTILINE)


def _write(directory: Path, m: Manifest) -> Path:
    path = directory / f"fuzz{m.suffix}"
    path.write_bytes(m.data)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _expected_code(m: Manifest) -> int:
    if m.rows == 0:
        return EXIT_USAGE
    return EXIT_JOBS_FAILED if m.bad_lines else EXIT_OK


@FUZZ
@given(m=manifests)
def test_validate_reports_every_bad_line_and_only_those(
    m: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), m)
        code, out, err = _cli(capsys, "validate", str(path))
    assert code == _expected_code(m), out + err
    if m.rows == 0:
        assert err.count("\n") == 1 and str(path) in err  # one line naming the file
        return
    reported = {int(hit["line"]) for hit in REPORTED.finditer(out) if hit["file"] == str(path)}
    assert reported == m.bad_lines, out
    jobs_ok = "1 job ok" if m.good == 1 else f"{m.good} jobs ok"
    bad = "1 bad row" if len(m.bad_lines) == 1 else f"{len(m.bad_lines)} bad rows"
    assert f"{jobs_ok}, {bad}" in err


@FUZZ
@given(m=manifests, as_json=st.booleans())
def test_plan_never_crashes_on_a_hostile_manifest(
    m: Manifest, as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), m)
        code, out, err = _cli(capsys, "plan", str(path), *(["--json"] if as_json else []))
    assert code == _expected_code(m), out + err
    if as_json and m.rows:
        assert isinstance(json.loads(out), dict)


async def _run_once(path: Path, run_dir: Path, **overrides: Any) -> None:
    async with emulator(concurrency=4) as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(),
                      handle_signals=False)  # fmt: skip
        config = run_config(path, run_dir, completion="stream", concurrency=4, download=False,
                            **overrides)  # fmt: skip
        await execute(config, hooks=hooks)


@settings(FUZZ, max_examples=24 if LONG else 6)
@given(m=manifests.filter(lambda m: m.rows > 0))
def test_a_run_sends_the_good_rows_and_records_each_bad_one_as_invalid(m: Manifest) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), m)
        run_dir = Path(tmp) / "run"
        anyio.run(_run_once, path, run_dir)
        jobs = manifest_jobs(path)
        rows = LedgerState.load(run_dir).jobs.to_pylist()
    assert len(jobs) == m.good
    by_state: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_state.setdefault(r["state"], []).append(r)
    assert {r["job_key"] for r in by_state.get("completed", [])} == set(jobs)
    invalid = by_state.get("invalid", [])
    assert sorted(r["line"] for r in invalid) == sorted(m.bad_lines)
    assert all(r["error_type"] == "invalid_row" and r["error_message"] for r in invalid)
    assert set(by_state) <= {"completed", "invalid"}


# -- regressions: bugs the fuzzing found ---------------------------------------------------


def test_two_bad_rows_sharing_an_id_are_two_invalid_records(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "id,endpoint,prompt,num_inference_steps\na,fal-ai/flux-lora,x,0\na,fal-ai/flux-lora,y,\n"
    )
    anyio.run(_run_once, path, tmp_path / "run")
    rows = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert sorted(r["line"] for r in rows if r["state"] == "invalid") == [2, 3]


def test_a_row_that_cannot_be_parsed_still_claims_its_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"id,endpoint,prompt\n"
        b"a,fal-ai/flux-lora,caf\xe9\n"
        b"b,fal-ai/flux-lora,x,surplus\n"
        b"a,fal-ai/flux-lora,fine\n"
        b"b,fal-ai/flux-lora,fine\n"
    )
    code, out, _ = _cli(capsys, "validate", str(path))
    assert code == EXIT_JOBS_FAILED
    assert {int(hit["line"]) for hit in REPORTED.finditer(out)} == {2, 3, 4, 5}


def test_typed_values_of_the_wrong_type_are_bad_rows_in_validate_plan_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "prompt": 5}\n{"id": "b", "prompt": "fine"}\n'
        '{"id": "c", "prompt": ["x"]}\n' + "[" * 100_000 + "\n"
    )
    code, out, _ = _cli(capsys, "validate", str(path), "--endpoint", "fal-ai/flux-lora")
    assert code == EXIT_JOBS_FAILED
    assert out.splitlines() == [
        f"{path}:1: prompt=5 is not text",
        f"{path}:3: prompt=['x'] is not text",
        f"{path}:4: the line is nested deeper than 64 levels",
    ]
    code, out, _ = _cli(capsys, "plan", str(path), "--endpoint", "fal-ai/flux-lora", "--json")
    assert code == EXIT_JOBS_FAILED and json.loads(out)["bad_rows"] == 3
    anyio.run(partial(_run_once, default_endpoint="fal-ai/flux-lora"), path, tmp_path / "run")
    rows = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert sorted((r["line"], r["state"]) for r in rows) == [
        (1, "invalid"), (2, "completed"), (3, "invalid"), (4, "invalid"),
    ]  # fmt: skip


def test_one_bad_row_is_one_invalid_record_however_the_path_is_spelt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dir").mkdir()
    path = tmp_path / "dir" / "bad.csv"
    path.write_text("id,endpoint,prompt\n,fal-ai/flux-lora,\nr,fal-ai/flux-lora,\n")
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    for spelling in (path, Path("dir/bad.csv"), Path("dir/../dir/bad.csv")):
        anyio.run(_run_once, spelling, run_dir)
    monkeypatch.chdir(tmp_path / "dir")
    anyio.run(_run_once, Path("bad.csv"), run_dir)
    rows = LedgerState.load(run_dir).jobs.to_pylist()
    assert sorted((r["line"], r["row_id"], r["state"]) for r in rows) == [
        (2, "#1", "invalid"), (3, "r", "invalid"),
    ]  # fmt: skip


# -- values of every type: JSONL and Parquet -------------------------------------------------

VALUE_FUZZ = settings(FUZZ, max_examples=1000 if LONG else 60)
CLI_FUZZ = settings(FUZZ, max_examples=150 if LONG else 12)
RUN_FUZZ = settings(FUZZ, max_examples=40 if LONG else 3)
UNKNOWN = "acme/unknown"  # sent untyped when allowed: every value goes through as JSON
ENDPOINTS = ["fal-ai/flux-lora", "fal-ai/flux-2/lora", "fal-ai/flux-2/lora/edit",
             "fal-ai/flux-lora/image-to-image", "fal-ai/flux-kontext/dev", UNKNOWN]  # fmt: skip
# Request fields of the catalog, control columns and one metadata column.
VALUE_COLUMNS = ["prompt", "image_size", "seed", "seeds", "variants", "num_images",
                 "num_inference_steps", "guidance_scale", "loras", "image_url", "image_urls",
                 "strength", "output_format", "sync_mode", "prompt_template", "note"]  # fmt: skip
# Text that means something to some column: numbers, JSON, presets, reserved ids.
MEANINGFUL_TEXT = ["5", "2.5", "-1", "0", "nan", "inf", "-Infinity", "1e999", "true", "no", "",
                   " ", "[1]", "[]", "{}", '{"width": 64, "height": 64}', "[" * 200, "#1", "#a",
                   "square_hd", "64x64", "owner/repo:0.5", "a.png|b.png", "{prompt}", "9" * 5000,
                   "jpeg"]  # fmt: skip
lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-(10**300), 10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.text(st.one_of(st.characters(), lone_surrogates), max_size=4),
    st.sampled_from(MEANINGFUL_TEXT),
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(
            st.sampled_from(["path", "scale", "width", "height", "x"]), kids, max_size=3
        )
    ),
    max_leaves=8,
)


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


any_value = st.one_of(
    json_values,
    json_values,
    st.integers(60, 70).map(_nested),  # either side of the depth limit
)


@dataclass(repr=False)
class ValueManifest:
    path_suffix: str
    data: bytes
    lines: set[int]  # the lines of its rows

    def __repr__(self) -> str:
        return (
            f"ValueManifest({self.path_suffix!r}, {self.data[:600]!r}..., {len(self.lines)} rows)"
        )


@st.composite
def jsonl_value_rows(draw: st.DrawFn) -> ValueManifest:
    lines: list[bytes] = []
    for position in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["row"] * 6 + ["deep", "digits", "surrogate"]))
        if kind == "deep":
            lines.append(b"[" * 100_000 if draw(st.booleans()) else b'{"a":' * 100_000)
            continue
        if kind == "digits":
            lines.append(b'{"id": "d%d", "prompt": %s}' % (position, b"9" * 5000))
            continue
        row: dict[str, Any] = {"id": draw(st.one_of(st.just(f"r{position}"), any_value))}
        row["endpoint"] = draw(st.one_of(st.sampled_from(ENDPOINTS), any_value))
        row["prompt"] = draw(st.one_of(st.just("a red chair"), any_value))
        for column in draw(st.lists(st.sampled_from(VALUE_COLUMNS), max_size=5, unique=True)):
            row[column] = draw(any_value)
        body = json.dumps(row, ensure_ascii=True)  # lone surrogates travel as \udxxx escapes
        if kind == "surrogate":
            body = body.replace('"a red chair"', '"a red \\udc80chair"', 1)
        lines.append(body.encode())
    data = b"\n".join(lines) + b"\n"
    return ValueManifest(".jsonl", data, set(range(1, len(lines) + 1)))


def _arrow_column(draw: st.DrawFn, n: int) -> pa.Array:
    """One Parquet column of a random type, with values (and nulls) of that type."""
    nullable = st.none()
    kinds: list[tuple[Any, Any]] = [
        (pa.string(), st.one_of(st.sampled_from(MEANINGFUL_TEXT), st.text(max_size=12))),
        (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
        (pa.uint64(), st.integers(2**63, 2**64 - 1)),
        (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
        (pa.bool_(), st.booleans()),
        (pa.binary(), st.binary(max_size=8)),
        (pa.list_(pa.int64()), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)),
        (pa.list_(pa.string()), st.lists(st.sampled_from(MEANINGFUL_TEXT), max_size=3)),
        (pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())])),
         st.lists(st.fixed_dictionaries({"path": st.one_of(nullable, st.text(max_size=5)),
                                         "scale": st.one_of(nullable, st.floats())}),
                  max_size=3)),
        (pa.struct([("width", pa.int64()), ("height", pa.int64())]),
         st.fixed_dictionaries({"width": st.integers(-(2**63), 2**63 - 1),
                                "height": st.integers(-5, 5000)})),
        (pa.list_(pa.list_(pa.float64())), st.lists(st.lists(st.floats(), max_size=2), max_size=2)),
        (pa.decimal128(12, 3), st.decimals(-10**8, 10**8, places=3, allow_nan=False)),
        (pa.timestamp("s"), st.datetimes()),
        (pa.null(), st.none()),
    ]  # fmt: skip
    arrow_type, values = draw(st.sampled_from(kinds))
    return pa.array(draw(st.lists(st.one_of(nullable, values), min_size=n, max_size=n)), arrow_type)


@st.composite
def parquet_value_rows(draw: st.DrawFn) -> ValueManifest:
    n = draw(st.integers(1, 5))
    columns: dict[str, pa.Array] = {}
    if draw(st.booleans()):
        columns["id"] = _arrow_column(draw, n)
    if draw(st.booleans()):
        columns["endpoint"] = pa.array(draw(st.lists(st.sampled_from(ENDPOINTS), min_size=n,
                                                     max_size=n)))  # fmt: skip
    else:
        columns["endpoint"] = _arrow_column(draw, n)
    columns["prompt"] = pa.array(["a red chair"] * n) if draw(st.booleans()) else (
        _arrow_column(draw, n)
    )  # fmt: skip
    for column in draw(st.lists(st.sampled_from(VALUE_COLUMNS[1:]), max_size=5, unique=True)):
        columns[column] = _arrow_column(draw, n)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return ValueManifest(".parquet", buffer.getvalue(), set(range(1, n + 1)))


value_manifests = st.one_of(jsonl_value_rows(), parquet_value_rows())


def _write_values(directory: Path, m: ValueManifest) -> Path:
    path = directory / f"values{m.path_suffix}"
    path.write_bytes(m.data)
    return path


def _endpoint_flags(allow_unknown: bool) -> list[str]:
    return ["--endpoint", "fal-ai/flux-lora", *(["--allow-endpoint", UNKNOWN] * allow_unknown)]


@VALUE_FUZZ
@given(m=value_manifests, allow_unknown=st.booleans())
def test_values_of_any_type_give_a_job_or_a_row_error_for_every_row(
    m: ValueManifest, allow_unknown: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_values(Path(tmp), m)
        allowed = frozenset({UNKNOWN} if allow_unknown else ())
        options = ExpandOptions(Path(tmp), default_endpoint="fal-ai/flux-lora",
                                allowed_endpoints=allowed)  # fmt: skip
        items = list(iter_jobs(read_rows(path), options))  # raises nothing
    lines: set[int] = set()
    for item in items:
        if isinstance(item, Job):
            lines.add(item.line)
            json.dumps(dict(item.payload))  # what is sent is JSON
        else:
            assert isinstance(item, RowError) and item.problems
            assert {p.file for p in item.problems} == {str(path)}
            assert all(p.message and p.line == item.problems[0].line for p in item.problems)
            lines.add(item.problems[0].line)
            str(item).encode("utf-8")  # printable, whatever the value held
    assert lines == m.lines


@CLI_FUZZ
@given(
    m=value_manifests, command=st.sampled_from(["validate", "plan"]), allow_unknown=st.booleans()
)
def test_validate_and_plan_never_traceback_on_values_of_any_type(
    m: ValueManifest, command: str, allow_unknown: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_values(Path(tmp), m)
        code, out, err = _cli(capsys, command, str(path), *_endpoint_flags(allow_unknown))
    assert code in (EXIT_OK, EXIT_JOBS_FAILED), out + err
    if command == "validate":
        reported = {int(hit["line"]) for hit in REPORTED.finditer(out) if hit["file"] == str(path)}
        assert reported <= m.lines


@RUN_FUZZ
@given(m=value_manifests, allow_unknown=st.booleans())
def test_a_run_records_every_row_of_values_of_any_type(
    m: ValueManifest, allow_unknown: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_values(Path(tmp), m)
        run_dir = Path(tmp) / "run"
        allowed = [UNKNOWN] if allow_unknown else []
        run = partial(_run_once, default_endpoint="fal-ai/flux-lora", allowed_endpoints=allowed)
        anyio.run(run, path, run_dir)
        rows = LedgerState.load(run_dir).jobs.to_pylist()
    assert {r["line"] for r in rows} == m.lines
