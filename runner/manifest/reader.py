"""Streaming manifest rows: CSV, TSV, JSONL and Parquet.

This module owns turning a file into :class:`RawRow` values, one at a time, with
the line number a user sees in an editor. Memory stays flat however long the
file: text formats are read line by line, Parquet by record batch.

Whole-file problems (missing, unreadable, empty, bad header, bad Parquet) raise
one :class:`~runner.errors.ManifestError` naming the file. A single bad row (a
JSONL line that is not an object, a CSV row with invalid UTF-8 or too many
cells) is yielded as a ``RawRow`` with ``problem`` set, so the rest still runs.

It also owns :func:`load_json`, the one JSON parser for manifest text (JSONL lines
here, JSON in CSV cells in :mod:`runner.manifest.cells`): ``json.loads`` behind the
limits that keep hostile text a row problem rather than a crash.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from runner.errors import ManifestError, UsageError

Format = Literal["csv", "tsv", "jsonl", "parquet"]

_FORMAT_NAMES: dict[str, Format] = {
    "csv": "csv",
    "tsv": "tsv",
    "tab": "tsv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "parquet": "parquet",
    "pq": "parquet",
}
_BOM = "\ufeff"
# What errors="surrogateescape" turns an undecodable byte into.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Parquet rows are converted to Python one batch at a time; this bounds memory.
_PARQUET_BATCH_ROWS = 4096
# Nesting past this is refused before json.loads, whose C parser recurses once per level
# (100,000 "[" raise RecursionError). No manifest value needs more than a few levels.
MAX_JSON_DEPTH = 64
# What the nesting scan stops at: brackets, and what opens, closes or escapes a string.
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')
# A "\uD800".."\uDFFF" escape: the only way JSON text yields a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True, slots=True)
class RawRow:
    """One manifest row before any interpretation."""

    file: str
    line: int
    index: int
    cells: dict[str, Any]
    typed: bool
    problem: str | None = None


class JSONLimitError(ValueError):
    """JSON text past a limit of the runner; ``str()`` completes "the line ..."."""


def load_json(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that never recurses deeply and returns only storable text.

    Raises ``json.JSONDecodeError`` for bad syntax and :class:`JSONLimitError` for
    nesting deeper than ``max_depth``, a number past Python's 4300-digit limit, or a
    lone surrogate escape (``"\\ud800"``: not text, so no Parquet ledger can store it).
    Both are ``ValueError``.
    """
    if _nesting_exceeds(text, max_depth):
        raise JSONLimitError(f"is nested deeper than {max_depth} levels")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # int('9' * 5000): Python's guard against quadratic parsing
        raise JSONLimitError(
            f"holds a number of more than {sys.get_int_max_str_digits()} digits"
        ) from exc
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise JSONLimitError(
                "holds a lone surrogate escape (\\ud800-\\udfff), which is not text"
            ) from exc
    return value


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit``: a linear scan, no recursion.

    In a valid prefix of JSON this agrees with the parser exactly; in invalid text it may
    over-count, which only turns one reason for refusing the text into another.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    escaped = -1  # the position a backslash in a string escapes
    for match in _JSON_SPECIAL.finditer(text):
        position = match.start()
        if position == escaped:
            continue
        char = match.group()
        if in_string:
            if char == "\\":
                escaped = position + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def detect_format(path: Path, override: str | None) -> Format:
    """The manifest format: ``override`` if given, else from the file suffix."""
    if override is not None:
        fmt = _FORMAT_NAMES.get(override.strip().lower().lstrip("."))
        if fmt is None:
            choices = ", ".join(sorted(set(_FORMAT_NAMES.values())))
            raise UsageError(f"unknown manifest format {override!r}; use one of: {choices}")
        return fmt
    fmt = _FORMAT_NAMES.get(path.suffix.lower().lstrip("."))
    if fmt is None:
        raise ManifestError(
            f"{path}: cannot tell the manifest format from the suffix {path.suffix!r}; "
            "use .csv, .tsv, .jsonl or .parquet, or pass --format"
        )
    return fmt


def read_rows(path: Path, *, fmt: str | None = None) -> Iterator[RawRow]:
    """Stream the rows of a manifest.

    The path, format and header are checked before this returns, so a missing
    file or a bad header raises :class:`ManifestError` at the call; a file with
    no data rows raises it when the iterator runs out.
    """
    kind = detect_format(path, fmt)
    display = str(path)
    if not path.exists():
        raise ManifestError(f"{display}: manifest not found")
    if not path.is_file():
        raise ManifestError(f"{display}: not a file")
    if kind == "parquet":
        _check_parquet(path, display)
        return _parquet_rows(path, display)
    if kind == "jsonl":
        with _open(path, display) as fh:
            if not fh.read(1):
                raise ManifestError(f"{display}: the manifest is empty")
        return _jsonl_rows(path, display)
    delimiter = "\t" if kind == "tsv" else ","
    with _open(path, display) as fh:
        _read_header(_decoded_lines(fh), delimiter, display)
    return _delimited_rows(path, display, delimiter)


def _open(path: Path, display: str) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise ManifestError(f"{display}: cannot read the manifest: {exc.strerror}") from exc


# --- CSV / TSV -------------------------------------------------------------------


def _decoded_lines(fh: BinaryIO) -> Iterator[str]:
    # Decoding line by line, with surrogateescape, means one row's bad bytes
    # become visible surrogates in that row only instead of failing the file.
    first = True
    for raw in fh:
        text = raw.decode("utf-8", errors="surrogateescape")
        if first:
            text = text.removeprefix(_BOM)
            first = False
        yield text


def _has_surrogates(values: list[str]) -> bool:
    return any(not value.isascii() and _ESCAPED_BYTE.search(value) for value in values)


def _raise_field_limit() -> None:
    # The csv module refuses cells over 128 KiB by default; prompts and inline
    # JSON may be larger. The C long limit is the platform's real ceiling.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _read_header(lines: Iterator[str], delimiter: str, display: str) -> tuple[Any, list[str], int]:
    """The csv reader, the header names and the line the header ends on."""
    _raise_field_limit()
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = next((rec for rec in reader if any(c.strip() for c in rec)), None)
    except csv.Error as exc:
        raise ManifestError(f"{display}: cannot parse the header: {exc}") from exc
    except OSError as exc:
        raise ManifestError(f"{display}: cannot read the manifest: {exc.strerror}") from exc
    if header is None:
        raise ManifestError(f"{display}: the manifest is empty")
    if _has_surrogates(header):
        raise ManifestError(f"{display}: the header is not UTF-8 text (save the file as UTF-8)")
    names = [name.strip() for name in header]
    if len(names) == 1 and any(sep in names[0] for sep in ";,\t" if sep != delimiter):
        raise ManifestError(
            f"{display}: the header has one column {names[0]!r}; "
            "is the file separated by something else? (use .csv for commas, .tsv for tabs)"
        )
    for position, name in enumerate(names, start=1):
        if not name:
            raise ManifestError(f"{display}: header column {position} has no name")
    _check_unique(names, display)
    return reader, names, reader.line_num


def _check_unique(names: list[str], display: str) -> None:
    seen: set[str] = set()
    duplicates: set[str] = set()
    for name in names:
        (duplicates if name in seen else seen).add(name)
    if duplicates:
        listed = ", ".join(sorted(duplicates))
        raise ManifestError(f"{display}: duplicate column names in the header: {listed}")


def _delimited_rows(path: Path, display: str, delimiter: str) -> Iterator[RawRow]:
    with _open(path, display) as fh:
        reader, names, last_line = _read_header(_decoded_lines(fh), delimiter, display)
        index = 0
        for row in delimited_records(reader, names, display, last_line, 0):
            yield row
            index += 1
    if index == 0:
        raise ManifestError(f"{display}: the manifest has a header but no data rows")


def delimited_records(
    reader: Any, names: list[str], display: str, last_line: int, index: int
) -> Iterator[RawRow]:
    """The rows of a csv ``reader`` after a header that ended on ``last_line``.

    ``index`` is the 0-based number of the first data row; :mod:`runner.manifest.arrowcsv`
    also uses this for a block of the file it leaves to the csv module.
    """
    line_base = last_line - reader.line_num
    while True:
        start = last_line + 1
        try:
            record = next(reader, None)
        except csv.Error as exc:
            # strict mode: a broken quote is this row's problem, and the
            # reader carries on at the next line.
            last_line = line_base + reader.line_num
            yield RawRow(display, start, index, {}, typed=False, problem=_csv_problem(exc))
            index += 1
            continue
        except OSError as exc:
            raise ManifestError(f"{display}: read failed: {exc.strerror}") from exc
        if record is None:
            break
        # Blank lines end where the reader now stands; they are not rows.
        last_line = line_base + reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        yield _delimited_row(display, start, index, names, record)
        index += 1


def block_reader(lines: Iterator[str], delimiter: str) -> Any:
    """A csv reader as :func:`read_rows` makes one, over lines from the middle of a file."""
    _raise_field_limit()
    return csv.reader(lines, delimiter=delimiter, strict=True)


def _csv_problem(exc: csv.Error) -> str:
    if "unexpected end of data" in str(exc):
        return "a quoted cell is never closed (missing '\"')"
    return f"the row is not valid CSV: {exc}"


def _delimited_row(
    display: str, line: int, index: int, names: list[str], record: list[str]
) -> RawRow:
    problem = None
    if _has_surrogates(record):
        bad = [name for name, cell in zip(names, record, strict=False) if _has_surrogates([cell])]
        where = f"column {bad[0]!r}" if bad else "an extra cell"
        problem = f"the row is not valid UTF-8 text ({where})"
        record = [
            cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for cell in record
        ]
    elif len(record) > len(names):
        problem = f"the row has {len(record)} cells but the header has {len(names)} columns"
    # Short rows are padded: spreadsheets often drop trailing empty cells.
    cells = dict(zip(names, record, strict=False))
    for name in names[len(record) :]:
        cells[name] = ""
    return RawRow(display, line, index, cells, typed=False, problem=problem)


# --- JSONL -------------------------------------------------------------------------


def _jsonl_rows(path: Path, display: str) -> Iterator[RawRow]:
    index = 0
    with _open(path, display) as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(_BOM.encode())
            if not raw.strip():
                continue
            yield _jsonl_row(display, number, index, raw)
            index += 1
    if index == 0:
        raise ManifestError(f"{display}: the manifest has no rows (only blank lines)")


def _jsonl_row(display: str, line: int, index: int, raw: bytes) -> RawRow:
    try:
        value = load_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return RawRow(display, line, index, {}, typed=True, problem="the line is not UTF-8 text")
    except json.JSONDecodeError as exc:
        problem = f"the line is not valid JSON: {exc.msg} (column {exc.colno})"
        return RawRow(display, line, index, {}, typed=True, problem=problem)
    except JSONLimitError as exc:
        return RawRow(display, line, index, {}, typed=True, problem=f"the line {exc}")
    if not isinstance(value, dict):
        problem = f"the line is a JSON {type(value).__name__}, not an object"
        return RawRow(display, line, index, {}, typed=True, problem=problem)
    return RawRow(display, line, index, value, typed=True)


# --- Parquet -------------------------------------------------------------------------


def _check_parquet(path: Path, display: str) -> None:
    pf = _parquet_file(path, display)
    try:
        names = list(pf.schema_arrow.names)
        _check_unique(names, display)
        if pf.metadata.num_rows == 0:
            raise ManifestError(f"{display}: the Parquet manifest has no rows")
    finally:
        pf.close()


def _parquet_file(path: Path, display: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{display}: not a readable Parquet file: {exc}") from exc


def _parquet_rows(path: Path, display: str) -> Iterator[RawRow]:
    import pyarrow as pa

    pf = _parquet_file(path, display)
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for cells in batch.to_pylist():
                yield RawRow(display, index + 1, index, cells, typed=True)
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{display}: Parquet read failed after row {index}: {exc}") from exc
    finally:
        pf.close()
