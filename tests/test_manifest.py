"""Streaming manifest rows: formats, editor line numbers, row problems, whole-file errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.errors import ManifestError, UsageError
from runner.manifest.reader import (
    MAX_JSON_DEPTH,
    JSONLimitError,
    RawRow,
    detect_format,
    load_json,
    read_rows,
)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def lines_and_cells(path: Path) -> list[tuple[int, dict[str, object]]]:
    return [(row.line, row.cells) for row in read_rows(path)]


# --- format ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "override", "expected"),
    [
        ("a.csv", None, "csv"),
        ("a.CSV", None, "csv"),
        ("a.tsv", None, "tsv"),
        ("a.tab", None, "tsv"),
        ("a.jsonl", None, "jsonl"),
        ("a.ndjson", None, "jsonl"),
        ("a.parquet", None, "parquet"),
        ("a.pq", None, "parquet"),
        ("a.txt", "csv", "csv"),
        ("a.csv", "jsonl", "jsonl"),
        ("a.data", ".TSV", "tsv"),
    ],
)
def test_format_comes_from_suffix_unless_overridden(
    name: str, override: str | None, expected: str
) -> None:
    assert detect_format(Path(name), override) == expected


def test_unknown_suffix_is_a_manifest_error_naming_the_file() -> None:
    with pytest.raises(ManifestError, match=r"rows\.xlsx.*--format"):
        detect_format(Path("rows.xlsx"), None)


def test_unknown_format_override_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown manifest format 'xml'"):
        detect_format(Path("a.csv"), "xml")


# --- CSV / TSV line numbers ----------------------------------------------------------


def test_csv_first_data_row_is_line_2(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "id,prompt\na,cat\nb,dog\n")
    rows = list(read_rows(path))
    assert [(r.line, r.index, r.cells) for r in rows] == [
        (2, 0, {"id": "a", "prompt": "cat"}),
        (3, 1, {"id": "b", "prompt": "dog"}),
    ]
    assert all(not r.typed and r.problem is None and r.file == str(path) for r in rows)


def test_quoted_newlines_push_later_rows_down(tmp_path: Path) -> None:
    text = 'id,prompt\na,"one\ntwo\nthree"\nb,"x, y"\nc,z\n'
    path = write(tmp_path, "m.csv", text)
    assert lines_and_cells(path) == [
        (2, {"id": "a", "prompt": "one\ntwo\nthree"}),
        (5, {"id": "b", "prompt": "x, y"}),
        (6, {"id": "c", "prompt": "z"}),
    ]


def test_bom_and_crlf_do_not_shift_lines_or_names(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbfid,prompt\r\na,"multi\r\nline"\r\nb,ok\r\n'
    path = write(tmp_path, "m.csv", data)
    assert lines_and_cells(path) == [
        (2, {"id": "a", "prompt": "multi\r\nline"}),
        (4, {"id": "b", "prompt": "ok"}),
    ]


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "\nid,prompt\n\na,cat\n,\n\nb,dog\n")
    assert [(line, c["id"]) for line, c in lines_and_cells(path)] == [(4, "a"), (7, "b")]
    assert [r.index for r in read_rows(path)] == [0, 1]


def test_header_names_are_trimmed(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", " id , prompt \na,b\n")
    assert lines_and_cells(path) == [(2, {"id": "a", "prompt": "b"})]


def test_tsv_splits_on_tabs_and_honours_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, "m.tsv", 'id\tprompt\na\ta, b\nb\t"tab\there"\n')
    assert lines_and_cells(path) == [
        (2, {"id": "a", "prompt": "a, b"}),
        (3, {"id": "b", "prompt": "tab\there"}),
    ]


def test_short_rows_are_padded_with_empty_cells(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", "id,prompt,seed\na,cat\n")
    assert lines_and_cells(path) == [(2, {"id": "a", "prompt": "cat", "seed": ""})]


def test_very_large_cell_is_read(tmp_path: Path) -> None:
    big = "x" * 2_000_000
    path = write(tmp_path, "m.csv", f'id,prompt\na,"{big}"\nb,small\n')
    rows = list(read_rows(path))
    assert len(rows[0].cells["prompt"]) == 2_000_000
    assert rows[1].line == 3


# --- CSV row problems -------------------------------------------------------------------


def test_invalid_utf8_in_one_row_is_that_rows_problem(tmp_path: Path) -> None:
    data = b'id,prompt\na,"caf\xc3\xa9\nok"\nb,bad \xff byte\nc,fine\n'
    rows = list(read_rows(write(tmp_path, "m.csv", data)))
    assert [(r.line, r.problem) for r in rows] == [
        (2, None),
        (4, "the row is not valid UTF-8 text (column 'prompt')"),
        (5, None),
    ]
    assert rows[0].cells["prompt"] == "café\nok"
    assert rows[1].cells["id"] == "b"


def test_more_cells_than_header_is_a_row_problem(tmp_path: Path) -> None:
    rows = list(read_rows(write(tmp_path, "m.csv", "id,prompt\na,b,c\nd,e\n")))
    assert rows[0].line == 2
    assert rows[0].problem == "the row has 3 cells but the header has 2 columns"
    assert rows[1].problem is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('a,"never closed\nb,c\n', "a quoted cell is never closed"),
        ('a,"x"y\nb,c\n', "the row is not valid CSV"),
    ],
)
def test_broken_quoting_is_a_row_problem(tmp_path: Path, body: str, problem: str) -> None:
    rows = list(read_rows(write(tmp_path, "m.csv", "id,prompt\n" + body)))
    assert rows[0].line == 2
    assert rows[0].problem is not None and rows[0].problem.startswith(problem)


# --- whole-file problems ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("m.csv", b"", "the manifest is empty"),
        ("m.csv", b"\n\n\n", "the manifest is empty"),
        ("m.csv", b"id,prompt\n", "header but no data rows"),
        ("m.csv", b"id,prompt\n\n,\n", "header but no data rows"),
        ("m.csv", b"\xff\xfei\x00d\x00\n", "the header is not UTF-8 text"),
        ("m.csv", b"id,prompt,id\na,b,c\n", "duplicate column names in the header: id"),
        ("m.csv", b"id,,prompt\na,b,c\n", "header column 2 has no name"),
        ("m.csv", b"id;prompt\na;b\n", "the header has one column 'id;prompt'"),
        ("m.tsv", b"id,prompt\na,b\n", "is the file separated by something else?"),
        ("m.jsonl", b"", "the manifest is empty"),
        ("m.jsonl", b"\n  \n", "no rows"),
        ("m.parquet", b"not parquet at all", "not a readable Parquet file"),
    ],
)
def test_whole_file_problems_are_one_manifest_error(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(ManifestError) as caught:
        list(read_rows(path))
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_missing_file_fails_at_the_call_not_on_iteration(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        read_rows(tmp_path / "nope.csv")


def test_bad_header_fails_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        read_rows(write(tmp_path, "m.csv", "a,a\n1,2\n"))


def test_directory_is_not_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(ManifestError, match="not a file"):
        read_rows(tmp_path / "d.csv")


# --- JSONL ------------------------------------------------------------------------------


def test_jsonl_lines_are_physical_and_blank_lines_allowed(tmp_path: Path) -> None:
    data = '\ufeff{"id": "a", "seed": 1}\n\n   \n{"id": "b", "loras": [{"path": "p"}]}\r\n'
    rows = list(read_rows(write(tmp_path, "m.jsonl", data)))
    assert [(r.line, r.index, r.cells) for r in rows] == [
        (1, 0, {"id": "a", "seed": 1}),
        (4, 1, {"id": "b", "loras": [{"path": "p"}]}),
    ]
    assert all(r.typed for r in rows)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"[1, 2]", "the line is a JSON list, not an object"),
        (b'"text"', "the line is a JSON str, not an object"),
        (b"{not json}", "the line is not valid JSON"),
        (b'{"p": "\xff"}', "the line is not UTF-8 text"),
    ],
)
def test_bad_jsonl_line_is_a_row_problem_and_reading_goes_on(
    tmp_path: Path, line: bytes, problem: str
) -> None:
    data = b'{"id": "a"}\n' + line + b'\n{"id": "c"}\n'
    rows = list(read_rows(write(tmp_path, "m.jsonl", data)))
    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[1].problem is not None and rows[1].problem.startswith(problem)
    assert rows[0].problem is None and rows[2].cells == {"id": "c"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"[" * 100_000, f"the line is nested deeper than {MAX_JSON_DEPTH} levels"),
        (b'{"a": ' * 100_000, f"the line is nested deeper than {MAX_JSON_DEPTH} levels"),
        (b'{"prompt": ' + b"9" * 5000 + b"}", "the line holds a number of more than 4300 digits"),
        (b'{"prompt": "\\ud800"}', "the line holds a lone surrogate escape"),
    ],
    ids=["deep-lists", "deep-objects", "5000-digits", "lone-surrogate"],
)
def test_jsonl_line_past_a_json_limit_is_a_row_problem(
    tmp_path: Path, line: bytes, problem: str
) -> None:
    data = b'{"id": "a"}\n' + line + b'\n{"id": "c"}\n'
    rows = list(read_rows(write(tmp_path, "m.jsonl", data)))
    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[1].problem is not None and rows[1].problem.startswith(problem), rows[1].problem
    assert rows[0].problem is None and rows[2].cells == {"id": "c"}


@pytest.mark.parametrize(
    "text",
    [
        "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
        '{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1),
        # Unbalanced and invalid: refused before the parser can recurse into it.
        "[" * 100_000,
        '"x", ' + "[" * 100_000,
        # A string that looks closed by an escaped quote does not hide the brackets after it.
        '["a\\\\", ' + "[" * 100 + "]" * 100 + "]",
    ],
    ids=["lists", "objects", "unclosed", "after-a-string", "after-an-escaped-backslash"],
)
def test_load_json_refuses_nesting_past_the_limit(text: str) -> None:
    with pytest.raises(JSONLimitError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        load_json(text)


@pytest.mark.parametrize(
    "text",
    [
        "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH,
        # Brackets inside strings, escaped quotes included, are text, not nesting.
        json.dumps(["[" * 1000, '\\"' + "{" * 1000, "\\"]),
        json.dumps({"a": [[1, 2], [3, 4]] * 500}),
        json.dumps(["\ud83d\ude00", "caf\u00e9"]),  # a surrogate *pair* is one character
    ],
    ids=["at-the-limit", "brackets-in-strings", "wide", "surrogate-pair"],
)
def test_load_json_reads_what_fits_within_the_limits(text: str) -> None:
    assert load_json(text) == json.loads(text)


def test_load_json_syntax_errors_stay_json_decode_errors() -> None:
    with pytest.raises(json.JSONDecodeError):
        load_json("{not json}")


# --- Parquet ----------------------------------------------------------------------------


LORA_TYPE = pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())]))


def test_parquet_rows_keep_nested_loras_and_number_rows_from_1(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "prompt": ["x", "y", None],
            "loras": pa.array(
                [[{"path": "owner/repo", "scale": 0.5}], None, [{"path": "u", "scale": None}]],
                type=LORA_TYPE,
            ),
            "num_images": pa.array([2, None, 1], type=pa.int64()),
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    rows = list(read_rows(path))
    assert [(r.line, r.index, r.typed) for r in rows] == [(1, 0, True), (2, 1, True), (3, 2, True)]
    assert rows[0].cells == {
        "id": "a",
        "prompt": "x",
        "loras": [{"path": "owner/repo", "scale": 0.5}],
        "num_images": 2,
    }
    assert rows[1].cells["loras"] is None
    assert rows[2].cells["loras"] == [{"path": "u", "scale": None}]


def test_parquet_is_streamed_across_row_groups(tmp_path: Path) -> None:
    count = 10_000
    table = pa.table({"id": [str(i) for i in range(count)], "prompt": ["p"] * count})
    path = tmp_path / "m.pq"
    pq.write_table(table, path, row_group_size=1000)
    assert pq.ParquetFile(path).num_row_groups == 10
    lines = [row.line for row in read_rows(path)]
    assert lines == list(range(1, count + 1))


def test_parquet_without_rows_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.array([], type=pa.string())}), path)
    with pytest.raises(ManifestError, match="has no rows"):
        read_rows(path)


def test_fmt_override_reads_jsonl_from_any_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "rows.txt", json.dumps({"id": "a"}) + "\n")
    assert list(read_rows(path, fmt="jsonl")) == [RawRow(str(path), 1, 0, {"id": "a"}, True)]
