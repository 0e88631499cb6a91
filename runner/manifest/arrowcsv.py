"""CSV and TSV in Arrow batches, with the same rows and lines as :func:`reader.read_rows`.

The file is cut into blocks of about :data:`BLOCK_BYTES` at line ends outside quotes, and
pyarrow parses each block into one batch of text columns. A block is only given to pyarrow
when its bytes are plain (quotes only where the csv module reads them the same way, no bare
``\\r``); pyarrow must then find exactly the header's columns in every row, no row blank,
valid UTF-8, and as many line ends as the rows' cells account for. Anything else, the block
goes to the csv module (:func:`reader.delimited_records`), which gives the row problems
exactly as the per-row reader does; after a quote that does not close, the rest of the file.
Line numbers are counted from the line ends, so each batch carries the line of each row.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from runner.errors import ManifestError
from runner.manifest import reader
from runner.manifest.reader import RawRow

BLOCK_BYTES = 1 << 20  # 4 MiB: the same CPU, 60 MB more peak RSS (pyarrow keeps its buffers)
# A block that finds no line end outside quotes within this many bytes is left to the csv
# module with the rest of the file (an unclosed quote swallows everything after it).
MAX_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class ArrowRows:
    """Rows of a manifest as text columns: ``batch`` has the header's names, in order."""

    file: str
    batch: pa.RecordBatch
    lines: list[int]
    first_index: int

    def raw(self, position: int) -> RawRow:
        """One row as the per-row reader gives it."""
        cells = {name: col[position].as_py() for name, col in zip(
            self.batch.schema.names, self.batch.columns, strict=True)}  # fmt: skip
        return RawRow(self.file, self.lines[position], self.first_index + position, cells, False)


Block = ArrowRows | list[RawRow]


def _quote_checks(data: bytes, end: int, delimiter: str) -> tuple[bool, bool]:
    """Quotes the csv module may read otherwise than pyarrow: (whole rest, this block).

    The first is a quote with text on both sides: a quoted cell closed and continued
    (``"a"b``, which pyarrow joins and the csv module refuses) or a quote inside unquoted
    text (``15" sleeve``), after which counting quotes no longer says where rows end. The
    second, a cell opening with an escaped quote (``,""x``), leaves the count right.
    """
    raw = np.frombuffer(data, dtype=np.uint8, count=end)
    at = np.flatnonzero(raw == _QUOTE)
    if at.size == 0:
        return False, False
    # The bytes either side of each quote (a line end past either end of the data).
    before = raw[np.maximum(at - 1, 0)]
    before[at == 0] = _LF
    after = raw[np.minimum(at + 1, end - 1)]
    after[at + 1 >= end] = _LF
    sep = ord(delimiter)
    ends_before = (before == sep) | (before == _LF)
    ends_after = (after == sep) | (after == _LF) | (after == _CR) | (after == _QUOTE)
    lone = ~ends_before & (before != _QUOTE) & ~ends_after
    if lone.any():
        return True, False
    # An opening "" (two quotes right after a separator) followed by text.
    pairs = ends_before[:-1] & (np.diff(at) == 1)
    third = after[1:][pairs]
    return False, bool(((third != sep) & (third != _LF) & (third != _CR) & (third != _QUOTE)).any())


_QUOTE, _LF, _CR = ord('"'), ord("\n"), ord("\r")


def arrow_blocks(path: Path, delimiter: str) -> Iterator[Block]:
    """The data rows of a CSV/TSV manifest, in blocks; raises as :func:`read_rows` does."""
    display = str(path)
    rows = reader.read_rows(path, fmt="tsv" if delimiter == "\t" else "csv")  # checks the header
    names = _plain_header(path, delimiter)
    if names is None:
        return row_chunks(rows)
    return _blocks(path, display, delimiter, *names)


def row_chunks(rows: Iterator[RawRow], size: int = 4096) -> Iterator[list[RawRow]]:
    chunk: list[RawRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _plain_header(path: Path, delimiter: str) -> tuple[list[str], int] | None:
    """The header's names and the byte where data starts, when it is one plain first line."""
    with path.open("rb") as fh:
        first = fh.readline(1 << 20)
    text = first.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\n").removesuffix(b"\r")
    if not first.endswith(b"\n") or b'"' in text or b"\r" in text or not text.strip():
        return None
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return [name.strip() for name in decoded.split(delimiter)], len(first)


def _blocks(
    path: Path, display: str, delimiter: str, names: list[str], offset: int
) -> Iterator[Block]:
    line, index = 2, 0
    with path.open("rb") as fh:
        fh.seek(offset)
        pending = b""
        while True:
            data = pending + fh.read(BLOCK_BYTES)
            if not data:
                break
            cut = _cut(data)
            while cut is None and len(data) < MAX_BLOCK_BYTES:
                more = fh.read(BLOCK_BYTES)
                if not more:
                    cut = len(data)
                    break
                data += more
                cut = _cut(data)
            lone, opening = _quote_checks(data, cut or 0, delimiter)
            if cut is None or lone:
                # From here on the csv module reads, as the per-row reader would.
                rest = _rest(fh, data)
                yield from row_chunks(_python_rows(rest, display, delimiter, names, line, index))
                return
            block, pending = data[:cut], data[cut:]
            found = None
            newlines = block.count(b"\n")
            if not _bare_cr(block) and not opening:
                found = _arrow_block(block, newlines, display, delimiter, names, line, index)
            if found is None:
                rows = list(_python_rows(iter([block]), display, delimiter, names, line, index))
                if rows:
                    yield rows
                index += len(rows)
            else:
                yield found
                index += found.batch.num_rows
            line += newlines
    if index == 0:
        raise ManifestError(f"{display}: the manifest has a header but no data rows")


def _cut(data: bytes) -> int | None:
    """Where a block may end: after the last line end with an even number of quotes before."""
    end = data.rfind(b"\n")
    tries = 0
    while end >= 0 and tries < 64:
        if data.count(b'"', 0, end + 1) % 2 == 0:
            return end + 1
        end = data.rfind(b"\n", 0, end)
        tries += 1
    return None


def _bare_cr(block: bytes) -> bool:
    # A bare carriage return ends a row for pyarrow but is an error for the csv module.
    if b"\r" not in block:
        return False
    raw = np.frombuffer(block, dtype=np.uint8)
    at = np.flatnonzero(raw == _CR) + 1
    return bool(at[-1] == len(raw) or (raw[at[at < len(raw)]] != _LF).any())


def _rest(fh: BinaryIO, data: bytes) -> Iterator[bytes]:
    yield data
    yield from iter(lambda: fh.read(BLOCK_BYTES), b"")


def _python_rows(
    chunks: Iterator[bytes],
    display: str,
    delimiter: str,
    names: list[str],
    line: int,
    index: int,
) -> Iterator[RawRow]:
    lines = (
        raw.decode("utf-8", errors="surrogateescape")
        for raw in io.BufferedReader(_ChunkStream(chunks))
    )
    csv_reader = reader.block_reader(lines, delimiter)
    yield from reader.delimited_records(csv_reader, names, display, line - 1, index)


class _ChunkStream(io.RawIOBase):
    """A readable stream over byte chunks (so the csv module reads the rest line by line)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


def _arrow_block(
    block: bytes,
    newlines: int,
    display: str,
    delimiter: str,
    names: list[str],
    line: int,
    index: int,
) -> ArrowRows | None:
    """The block as one batch with each row's line, or None when the csv module must read it."""
    invalid: list[object] = []

    def handler(row: Any) -> str:
        invalid.append(row)
        return "skip"

    try:
        table = pa_csv.read_csv(
            io.BytesIO(block),
            read_options=pa_csv.ReadOptions(
                column_names=[f"c{i}" for i in range(len(names))],
                use_threads=False,
                block_size=len(block) + 1,
            ),
            parse_options=pa_csv.ParseOptions(
                delimiter=delimiter,
                ignore_empty_lines=False,
                newlines_in_values=True,
                invalid_row_handler=handler,
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types={f"c{i}": pa.string() for i in range(len(names))},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowException):
        return None
    if invalid or table.num_rows == 0:
        return None
    batch = table.combine_chunks().to_batches()[0]
    columns = batch.columns
    total = newlines + (0 if block.endswith(b"\n") else 1)
    if _any_blank_row(columns):
        return None
    rows = batch.num_rows
    lines = np.arange(line, line + rows, dtype=np.int64)
    inside = total - rows  # line ends inside cells
    if inside < 0:
        return None
    if inside:
        extra = np.zeros(rows, dtype=np.int64)
        for col in columns:
            text = col.buffers()[2]  # the column's bytes: a column without a line end is skipped
            if text is None or b"\n" not in text.to_pybytes():
                continue
            counts = pc.count_substring(col, "\n").to_numpy(zero_copy_only=False)
            extra += counts
            inside -= int(counts.sum())
            if inside <= 0:
                break
        if inside != 0:
            return None
        lines[1:] += np.cumsum(extra)[:-1]
    renamed = pa.RecordBatch.from_arrays(columns, names=names)
    return ArrowRows(display, renamed, lines.tolist(), index)


def _any_blank_row(columns: list[pa.Array]) -> bool:
    """Whether some row has only blank cells (the csv module skips it: not a row)."""
    candidates = _blank(columns[0])
    if not pc.any(candidates).as_py():
        return False
    where = pc.indices_nonzero(candidates)
    for col in columns[1:]:
        where = pc.filter(where, _blank(pc.take(col, where)))
        if len(where) == 0:
            return False
    return True


def _blank(column: pa.Array) -> pa.Array:
    """Whether each cell is empty or whitespace only (no trimmed copy of the column)."""
    return pc.or_(pc.equal(pc.binary_length(column), 0), pc.utf8_is_space(column))
