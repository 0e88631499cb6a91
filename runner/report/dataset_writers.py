"""Dataset exports of a run: Hugging Face ImageFolder, WebDataset shards, per-image Parquet.

Each writer takes a :class:`runner.report.datasets.Selection` and writes it whole or not
at all: a folder is built beside ``--out`` under a hidden temporary name and renamed into
place (onto nothing, or onto an empty folder), a file is written under a temporary name
and renamed. Images are hard-linked from the run's downloads where the file system allows
(they are never rewritten), else copied.

- ImageFolder: ``OUT/KEY.EXT`` and ``OUT/metadata.jsonl`` (one line per image, keyed by
  ``file_name``); with a split column, ``OUT/SPLIT/...`` with a ``metadata.jsonl`` each.
- WebDataset: ``OUT/SPLIT-000000.tar``, ... (``train`` without a split column), each
  sample ``KEY.EXT`` plus ``KEY.json``, a new shard once the next sample would take the
  current one past the shard size.
- Parquet: one row per image in ``OUT`` (a file); with a split column ``OUT/SPLIT.parquet``.
  ``--with-bytes`` adds the ``image`` column (the file's bytes), read a batch at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import LedgerError
from runner.report.datasets import (
    DatasetImage,
    DatasetOptions,
    Selection,
    columns_table,
    current_jobs,
    rows_of,
    select_images,
)

DatasetFormat = Literal["imagefolder", "webdataset", "parquet"]
DEFAULT_SHARD_BYTES = 1_000_000_000
DEFAULT_SPLIT = "train"  # WebDataset shards need a name; Hugging Face's default split
_BYTES_BATCH = 256 * 1024 * 1024  # image bytes held at once while writing --with-bytes


@dataclass(frozen=True, slots=True)
class DatasetWritten:
    """What an export wrote."""

    out: Path
    images: int
    files: int  # files written (images, metadata, shards)
    linked: int  # images hard-linked rather than copied


def export_dataset(
    run_dir: Path,
    out: Path,
    fmt: DatasetFormat,
    options: DatasetOptions,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    with_bytes: bool = False,
) -> tuple[Selection, DatasetWritten]:
    """Export the current jobs of ``run_dir`` as ``fmt`` at ``out``.

    Raises LedgerError naming what is missing (outputs not downloaded) or what could not
    be written, UsageError for a bad split column.
    """
    selection = select_images(
        current_jobs(run_dir, all_versions=options.all_versions), run_dir, options
    )
    if fmt != "parquet" or with_bytes:
        selection.require_files(run_dir)
    return selection, write_dataset(
        selection, out, fmt, shard_bytes=shard_bytes, with_bytes=with_bytes
    )


def write_dataset(
    selection: Selection,
    out: Path,
    fmt: DatasetFormat,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    with_bytes: bool = False,
) -> DatasetWritten:
    """Write ``selection`` as ``fmt`` at ``out`` (its images' files checked beforehand)."""
    if fmt == "parquet" and selection.split_column is None:
        return _guarded(out, lambda: _parquet_file(selection.images, out, with_bytes))

    def build(folder: Path) -> DatasetWritten:
        if fmt == "imagefolder":
            return _imagefolder(selection, folder)
        if fmt == "webdataset":
            return _webdataset(selection, folder, shard_bytes)
        return _parquet_splits(selection, folder, with_bytes)

    return _guarded(out, lambda: _staged_folder(out, build))


def _guarded(out: Path, write: Callable[[], DatasetWritten]) -> DatasetWritten:
    """The one boundary for the export's own files: an OSError is one line naming ``out``."""
    try:
        return write()
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)
        where = exc.filename or out
        raise LedgerError(f"cannot write the dataset export {where}: {reason}") from exc


def _staged_folder(out: Path, build: Callable[[Path], DatasetWritten]) -> DatasetWritten:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LedgerError(f"{out} already exists and is not an empty folder; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        written = build(staging)
        os.replace(staging, out)  # onto nothing, or onto an empty folder
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DatasetWritten(out, written.images, written.files, written.linked)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _by_split(selection: Selection) -> Iterator[tuple[str | None, list[DatasetImage], pa.Table]]:
    """Each split's images and their rows of the one table of the whole export (so every
    split has the same columns and types)."""
    table = columns_table(selection.images)
    groups: dict[str | None, list[int]] = {}
    for index, image in enumerate(selection.images):
        groups.setdefault(image.split, []).append(index)
    for split, rows in groups.items():
        images = [selection.images[i] for i in rows]
        yield split, images, table.take(pa.array(rows, pa.int64()))


def _source(image: DatasetImage) -> Path:
    assert image.local_file is not None  # Selection.require_files() said so
    return image.local_file


# -- ImageFolder ------------------------------------------------------------------------------


def _imagefolder(selection: Selection, root: Path) -> DatasetWritten:
    files = linked = 0
    for split, images, table in _by_split(selection):
        folder = root if split is None else root / split
        folder.mkdir(exist_ok=True)
        for image in images:
            linked += _place(_source(image), folder / image.file_name)
        with open(folder / "metadata.jsonl", "wb") as handle:
            for row in rows_of(table):
                handle.write(_json_line(row))
            handle.flush()
            os.fsync(handle.fileno())
        files += len(images) + 1
    return DatasetWritten(root, len(selection.images), files, linked)


def _place(src: Path, dst: Path) -> int:
    """Hard-link ``src`` at ``dst`` (1), or copy it where links cannot go (0)."""
    try:
        os.link(src, dst)
        return 1
    except OSError:
        shutil.copyfile(src, dst)
        return 0


def _json_line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


# -- WebDataset -------------------------------------------------------------------------------


def _webdataset(selection: Selection, root: Path, shard_bytes: int) -> DatasetWritten:
    files = 0
    for split, images, table in _by_split(selection):
        name = split or DEFAULT_SPLIT
        rows = rows_of(table)
        files += _shards(root, name, zip(images, rows, strict=True), shard_bytes)
    return DatasetWritten(root, len(selection.images), files, 0)


def _shards(
    root: Path,
    split: str,
    samples: Iterator[tuple[DatasetImage, dict[str, Any]]],
    shard_bytes: int,
) -> int:
    """Write the samples into ``split-NNNNNN.tar`` shards; returns how many shards."""
    shards = _Shards(root, split)
    with contextlib.ExitStack() as stack:
        size = 0
        for image, row in samples:
            path = _source(image)
            meta = json.dumps(row, ensure_ascii=False).encode()
            image_bytes = path.stat().st_size
            sample = _tar_size(image_bytes) + _tar_size(len(meta))
            if shards.count == 0 or (size and size + sample > shard_bytes):
                stack.close()
                shard = stack.enter_context(shards.next())
                size = 0
            key = str(row["key"])
            ext = image.file_name.rpartition(".")[2]
            with open(path, "rb") as data:
                shard.addfile(_member(f"{key}.{ext}", image_bytes), data)
            shard.addfile(_member(f"{key}.json", len(meta)), io.BytesIO(meta))
            size += sample
    return shards.count


class _Shards:
    """Opens ``split-000000.tar``, ``split-000001.tar``, ... one after the other."""

    def __init__(self, root: Path, split: str) -> None:
        self.root = root
        self.split = split
        self.count = 0

    @contextlib.contextmanager
    def next(self) -> Iterator[tarfile.TarFile]:
        path = self.root / f"{self.split}-{self.count:06d}.tar"
        self.count += 1
        with open(path, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as shard:
                yield shard
            handle.flush()
            os.fsync(handle.fileno())


def _tar_size(n: int) -> int:
    """Bytes a member of ``n`` bytes takes in a tar: a header, the data padded to 512."""
    return 512 + (n + 511) // 512 * 512


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


# -- Parquet ----------------------------------------------------------------------------------


def _parquet_splits(selection: Selection, root: Path, with_bytes: bool) -> DatasetWritten:
    for split, images, table in _by_split(selection):
        _write_parquet(images, table, root / f"{split or DEFAULT_SPLIT}.parquet", with_bytes)
    return DatasetWritten(root, len(selection.images), len(selection.splits), 0)


def _parquet_file(images: Sequence[DatasetImage], out: Path, with_bytes: bool) -> DatasetWritten:
    if out.is_dir():
        raise LedgerError(f"{out} is a folder; --format parquet --per-image writes one file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write_parquet(images, columns_table(images), tmp, with_bytes)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return DatasetWritten(out, len(images), 1, 0)


def _write_parquet(
    images: Sequence[DatasetImage], table: pa.Table, path: Path, with_bytes: bool
) -> None:
    if not with_bytes:
        with open(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        return
    schema = table.schema.append(pa.field("image", pa.binary()))
    with open(path, "wb") as handle:
        with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
            for start, stop in _byte_batches(images):
                data = [_source(image).read_bytes() for image in images[start:stop]]
                part = table.slice(start, stop - start).append_column(
                    "image", pa.array(data, pa.binary())
                )
                writer.write_table(part)
        handle.flush()
        os.fsync(handle.fileno())


def _byte_batches(images: Sequence[DatasetImage]) -> Iterator[tuple[int, int]]:
    """Row ranges whose files add up to about ``_BYTES_BATCH`` (at least one row each)."""
    start = held = 0
    for index, image in enumerate(images):
        held += _source(image).stat().st_size
        if held >= _BYTES_BATCH:
            yield start, index + 1
            start, held = index + 1, 0
    if start < len(images):
        yield start, len(images)
