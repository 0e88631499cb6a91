"""What a dataset export is made of: one record per output image, with its columns.

:func:`current_jobs` reads the jobs an export starts from; :func:`select_images` turns
them into :class:`DatasetImage` records, leaving out failed jobs and flagged images unless
asked for; :func:`columns_table` gives every record the same typed columns, so the
ImageFolder ``metadata.jsonl``, the WebDataset ``.json`` samples and the per-image Parquet
all carry the same fields (the writers are in :mod:`runner.report.dataset_writers`).

The columns of an image, in order:

- its own: ``file_name`` (``KEY.EXT``), ``key`` (WebDataset-safe: letters, digits, ``-``
  and ``_``, unique in the export), ``job_key``, ``row_id``, ``source``, ``line``,
  ``variant``, ``image_index``, ``state``, ``endpoint``, ``prompt``, ``seed`` (the one the
  endpoint reported, else the one requested), ``flagged`` (its ``has_nsfw_concepts``; null
  when the endpoint said nothing), ``width``, ``height``, ``content_type``, ``sha256``,
  ``url``;
- the request's other fields, nested objects flattened with ``.`` (``image_size.width``);
- the manifest row's metadata columns.

A request field or metadata column whose name is already taken gets a ``request.`` or
``metadata.`` prefix. A column whose values have no one Arrow type (a string on one row,
an object on another) holds JSON text, strings as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from runner.errors import LedgerError, UsageError
from runner.ledger import JobState, read_run_meta
from runner.ledger.versions import split_versions
from runner.report.data import load_jobs

OWN_COLUMNS = (
    "file_name", "key", "job_key", "row_id", "source", "line", "variant", "image_index",
    "state", "endpoint", "prompt", "seed", "flagged", "width", "height", "content_type",
    "sha256", "url",
)  # fmt: skip
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def current_jobs(run_dir: Path | str, *, all_versions: bool = False) -> pa.Table:
    """The jobs every dataset export is made of: the folded ledger, one row per job, without
    superseded versions (older content of a row recorded again) unless ``all_versions``.

    The one function the exports read jobs through, so which versions of a manifest row
    count as current is decided here and nowhere else (:mod:`runner.ledger.versions`).
    """
    return split_versions(load_jobs(run_dir), all_versions=all_versions).shown


@dataclass(frozen=True, slots=True)
class DatasetOptions:
    include_failed: bool = False  # images of failed jobs too (a job failed after its outputs)
    include_flagged: bool = False  # images the endpoint's safety checker flagged too
    split_column: str | None = None  # a manifest column naming each image's split
    all_versions: bool = False  # superseded versions of rows too


@dataclass(frozen=True, slots=True)
class DatasetImage:
    """One output image to export: its columns, where its file is, and its split."""

    columns: Mapping[str, Any]
    split: str | None
    local_file: Path | None  # the downloaded copy, when it is a local file that exists
    missing: str | None  # why there is no local file ("not downloaded", ...)
    metadata_columns: tuple[str, ...] = ()  # which of the columns are the row's metadata

    @property
    def file_name(self) -> str:
        return str(self.columns["file_name"])


@dataclass(frozen=True, slots=True)
class Selection:
    """The images an export holds, and what it left out and why."""

    images: tuple[DatasetImage, ...]
    jobs: int  # jobs with at least one image in the export
    failed_jobs_left_out: int  # failed jobs (with or without images) not exported
    flagged_left_out: int  # flagged images not exported
    splits: Mapping[str | None, int] = field(default_factory=dict)  # images per split
    split_column: str | None = None

    def require_files(self, run_dir: Path) -> None:
        """Raise, naming what is missing and how to fix it, unless every image has a file."""
        missing = [image for image in self.images if image.local_file is None]
        if not missing:
            return
        examples = "; ".join(
            f"{image.columns['row_id']} image {image.columns['image_index']}: {image.missing}"
            for image in missing[:3]
        )
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LedgerError(
            f"cannot export {len(missing)} of {len(self.images)} images without their files: "
            f"{examples}{more}. {_how_to_fetch(run_dir, missing)}"
        )


def _how_to_fetch(run_dir: Path, missing: list[DatasetImage]) -> str:
    if all(image.missing and "://" in image.missing for image in missing):
        return "The outputs went to object storage: export from a run whose --out is local."
    meta = read_run_meta(run_dir) or {}
    manifest = meta.get("manifest")
    path = manifest.get("path") if isinstance(manifest, Mapping) else None
    command = f"runner run {path or 'MANIFEST'} --ledger {run_dir}"
    return f"Rerun `{command}` without --no-download: it fetches only the missing outputs."


def select_images(jobs: pa.Table, run_dir: Path, options: DatasetOptions) -> Selection:
    """The images of ``jobs`` an export holds, in manifest order (pure but for stat calls)."""
    order = [("source", "ascending"), ("line", "ascending"), ("variant", "ascending")]
    keys = _Keys()
    images: list[DatasetImage] = []
    failed_out = flagged_out = exported_jobs = 0
    splits: dict[str | None, int] = {}
    for row in _rows(jobs.select(list(_READ)).sort_by(order)):
        state = row["state"]
        if state == JobState.FAILED and not options.include_failed:
            failed_out += 1
            continue
        if state not in (JobState.COMPLETED, JobState.FAILED):
            continue
        nsfw = row["nsfw"] or []
        taken = 0
        for index, output in enumerate(row["outputs"] or []):
            flagged = bool(nsfw[index]) if index < len(nsfw) else None
            if flagged and not options.include_flagged:
                flagged_out += 1
                continue
            image = _image(row, index, output, flagged, keys, run_dir, options.split_column)
            splits[image.split] = splits.get(image.split, 0) + 1
            images.append(image)
            taken += 1
        exported_jobs += taken > 0
    return Selection(
        tuple(images), exported_jobs, failed_out, flagged_out, splits, options.split_column
    )


_READ = ("job_key", "row_id", "source", "line", "variant", "state", "endpoint", "request",
         "metadata", "seed", "nsfw", "outputs")  # fmt: skip


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


class _Keys:
    """WebDataset-safe keys, unique in one export even to a file system that ignores case
    (a clash gets the job key's prefix)."""

    def __init__(self) -> None:
        self.used: set[str] = set()  # lower-cased

    def make(self, row: Mapping[str, Any], index: int) -> str:
        base = _UNSAFE_KEY.sub("_", str(row["row_id"] or "")).strip("_") or "job"
        variant = row["variant"] or 0
        key = f"{base}-v{variant}-{index}" if variant else f"{base}-{index}"
        if key.lower() in self.used:
            key = f"{key}-{_UNSAFE_KEY.sub('_', row['job_key'])[:12]}"
        while key.lower() in self.used:  # only if two job keys share their first 12 characters
            key += "_"
        self.used.add(key.lower())
        return key


def _image(
    row: Mapping[str, Any],
    index: int,
    output: Mapping[str, Any],
    flagged: bool | None,
    keys: _Keys,
    run_dir: Path,
    split_column: str | None,
) -> DatasetImage:
    request = _json_object(row["request"])
    metadata = _json_object(row["metadata"])
    prompt = request.pop("prompt", None)
    requested_seed = request.pop("seed", None)
    key = keys.make(row, index)
    local_file, missing = _local_file(output.get("local_path"), run_dir)
    own: dict[str, Any] = {
        "file_name": f"{key}.{_extension(output)}",
        "key": key,
        "job_key": row["job_key"],
        "row_id": row["row_id"],
        "source": row["source"],
        "line": row["line"],
        "variant": row["variant"],
        "image_index": index,
        "state": row["state"],
        "endpoint": row["endpoint"],
        "prompt": None if prompt is None else str(prompt),
        "seed": row["seed"] if row["seed"] is not None else requested_seed,
        "flagged": flagged,
        "width": output.get("width"),
        "height": output.get("height"),
        "content_type": output.get("content_type"),
        "sha256": output.get("sha256"),
        "url": output.get("url"),
    }
    columns = dict(own)
    _merge(columns, flatten(request), "request.")
    named = _merge(columns, {str(k): v for k, v in metadata.items()}, "metadata.")
    split = None
    if split_column is not None:
        split = _split_of(row, split_column, metadata, request)
    return DatasetImage(columns, split, local_file, missing, named)


def _merge(columns: dict[str, Any], extra: Mapping[str, Any], prefix: str) -> tuple[str, ...]:
    """Add ``extra`` to ``columns`` (``prefix`` on a name already taken); returns the names."""
    named = []
    for name, value in extra.items():
        column = prefix + name if name in columns else name
        columns[column] = value
        named.append(column)
    return tuple(named)


def _split_of(
    row: Mapping[str, Any], column: str, metadata: Mapping[str, Any], request: Mapping[str, Any]
) -> str:
    value = metadata.get(column, request.get(column))
    text = "" if value is None else str(value).strip()
    where = f"row {row['row_id']} (line {row['line']})"
    if not text:
        raise UsageError(f"--split-column {column}: {where} has no value in that column")
    if not _SPLIT_NAME.match(text):
        raise UsageError(
            f"--split-column {column}: {where} has {text!r}; a split is letters, digits and _"
        )
    return text


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become ``outer.inner`` columns; lists and scalars stay as they are."""
    out: dict[str, Any] = {}
    for name, item in value.items():
        if isinstance(item, Mapping) and item:
            out.update(flatten(item, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = item
    return out


def _local_file(local_path: str | None, run_dir: Path) -> tuple[Path | None, str | None]:
    if not local_path:
        return None, "not downloaded"
    if "://" in local_path:
        return None, f"stored at {local_path}"
    path = Path(local_path)
    if not path.is_absolute():
        path = run_dir / path
    if not path.is_file():
        return None, f"file missing: {path}"
    return path, None


def _extension(output: Mapping[str, Any]) -> str:
    found = _EXTENSIONS.get(str(output.get("content_type") or "").split(";")[0].strip())
    if found:
        return found
    for where in (output.get("local_path"), output.get("url")):
        suffix = Path(str(where or "").split("?")[0]).suffix.lower().lstrip(".")
        if suffix in ("jpg", "jpeg", "png", "webp"):
            return "jpg" if suffix == "jpeg" else suffix
    return "png"


def _json_object(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return dict(value) if isinstance(value, dict) else {}


def columns_table(images: Sequence[DatasetImage]) -> pa.Table:
    """Every image's columns as one table: each column one Arrow type, missing cells null.

    A metadata column a row leaves empty is ``""``, as its manifest cell was. With splits,
    a column with no value in some split but values in another is text in every split
    (``""`` where a row has none): Hugging Face's ImageFolder loader infers each split's
    column types from its own ``metadata.jsonl`` and refuses splits that disagree.
    """
    records = [image.columns for image in images]
    names: dict[str, None] = dict.fromkeys(OWN_COLUMNS)
    texts: set[str] = set()
    for image in images:
        names.update(dict.fromkeys(image.columns))
        texts.update(image.metadata_columns)
    splits = _split_rows(images)
    arrays = []
    for name in names:
        values = [record.get(name) for record in records]
        if name in texts:
            values = ["" if v is None else v for v in values]
        elif _empty_in_some_split(values, splits):
            values = ["" if v is None else _as_text(v) for v in values]
        arrays.append(_column(values))
    return pa.Table.from_arrays(arrays, names=list(names))


def _split_rows(images: Sequence[DatasetImage]) -> list[list[int]]:
    groups: dict[str | None, list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.split, []).append(index)
    return list(groups.values()) if len(groups) > 1 else []


def _empty_in_some_split(values: list[Any], splits: list[list[int]]) -> bool:
    filled = [any(values[i] is not None for i in rows) for rows in splits]
    return any(filled) and not all(filled)


def _column(values: list[Any]) -> pa.Array:
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # No one type fits (``"square_hd"`` on one row, ``{"width": ...}`` on another).
        return pa.array([_as_text(v) for v in values], pa.string())
    if pa.types.is_null(array.type):
        return array.cast(pa.string())
    return array


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def rows_of(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The table's rows as JSON-ready dicts (one per image), in order."""
    return _rows(table)


def parse_size(text: str) -> int:
    """``1GB`` -> 10**9; ``512MiB`` -> 512 * 2**20; a bare number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"--shard-size {text!r}: want a size like 1GB, 500MB or 268435456")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    size = int(float(number) * base ** " KMGT".index(unit.upper() or " "))
    if size < 1:
        raise UsageError(f"--shard-size {text!r}: must be at least 1 byte")
    return size
