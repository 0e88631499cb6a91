"""The gallery's data: one card per job (what was asked, what came back, what it cost),
and small JPEG thumbnails of the outputs downloaded into the run directory.

Thumbnails are downscaled with Pillow and cached under ``RUN_DIR/.report-cache/thumbs``,
keyed by the file's path, size and modification time, so a second report of a large run
decodes nothing. A run directory that cannot be written just goes uncached.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from runner.endpoints.money import trim_usd
from runner.ledger import JobState, OutputImage
from runner.media.inputs import IMAGE_FIELDS

CACHE_DIR = ".report-cache/thumbs"
INPUT_FIELDS = IMAGE_FIELDS  # image_url, mask_url, image_urls


@dataclass(frozen=True, slots=True)
class GalleryItem:
    """One job as a gallery card: what was asked, what came back, what it cost."""

    job_key: str
    row_id: str | None
    line: int | None
    source: str | None
    variant: int | None
    endpoint: str | None
    state: JobState
    prompt: str | None
    loras: tuple[tuple[str, float], ...]
    seed: int | None  # the seed the endpoint reported, else the one requested
    parameters: Mapping[str, Any]  # the request without prompt, loras and seed
    metadata: Mapping[str, str]
    estimated_usd: Decimal | None
    billed_usd: Decimal | None
    outputs: tuple[OutputImage, ...]
    error: str | None
    # Input images the request names (an edit's "before"), as the manifest gave them:
    # (field, value), e.g. ("image_url", "images/chair.jpg"). See runner.report.pairs.
    inputs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Gallery:
    items: tuple[GalleryItem, ...]
    total: int  # jobs that qualified (in ``states``, or all jobs in the ledger)
    states: tuple[JobState, ...] = ()  # the states asked for; () means every state

    @property
    def omitted(self) -> int:
        return self.total - len(self.items)


def gallery(
    jobs: pa.Table, *, limit: int | None = 500, states: Collection[JobState] = ()
) -> Gallery:
    """The first ``limit`` jobs (of those in ``states``, if given) in manifest order."""
    if limit is not None and limit < 0:
        raise ValueError(f"gallery limit must be >= 0, not {limit}")
    wanted = tuple(JobState(s) for s in states)
    if wanted:
        jobs = jobs.filter(pc.is_in(jobs["state"], pa.array([s.value for s in wanted])))
    keys = [("source", "ascending"), ("line", "ascending"), ("variant", "ascending")]
    ordered = jobs.sort_by(keys)
    if limit is not None:
        ordered = ordered.slice(0, limit)
    return Gallery(tuple(_items(ordered)), jobs.num_rows, wanted)


def _items(table: pa.Table) -> Iterator[GalleryItem]:
    for row in table.to_pylist():
        request = _json_object(row["request"])
        prompt = request.pop("prompt", None)
        requested_seed = request.pop("seed", None)
        loras = tuple(_lora(x) for x in request.pop("loras", None) or [] if isinstance(x, dict))
        inputs = _inputs(request)
        error = None
        if row["error_type"] or row["error_message"]:
            error = ": ".join(p for p in (row["error_type"], row["error_message"]) if p)
        yield GalleryItem(
            job_key=row["job_key"],
            row_id=row["row_id"],
            line=row["line"],
            source=row["source"],
            variant=row["variant"],
            endpoint=row["endpoint"],
            state=JobState(row["state"]),
            prompt=None if prompt is None else str(prompt),
            loras=loras,
            seed=row["seed"] if row["seed"] is not None else _int_or_none(requested_seed),
            parameters=request,
            metadata={str(k): str(v) for k, v in _json_object(row["metadata"]).items()},
            estimated_usd=None if row["estimated_usd"] is None else trim_usd(row["estimated_usd"]),
            billed_usd=None if row["billed_usd"] is None else trim_usd(row["billed_usd"]),
            outputs=tuple(OutputImage(**o) for o in row["outputs"] or ()),
            error=error,
            inputs=inputs,
        )


def _inputs(request: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Take the input image fields out of the request: (field, value) each."""
    found: list[tuple[str, str]] = []
    for name in INPUT_FIELDS:
        value = request.get(name)
        if isinstance(value, str) and value:
            found.append((name, value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            found += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        del request[name]
    return tuple(found)


def _json_object(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _lora(entry: Mapping[str, Any]) -> tuple[str, float]:
    scale = entry.get("scale", 1.0)
    return str(entry.get("path", "")), float(scale) if isinstance(scale, int | float) else 1.0


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Thumbnails:
    """Local output files of a run directory, as small JPEG data URIs (cached on disk)."""

    def __init__(self, run_dir: Path, *, max_side: int = 240, quality: int = 70) -> None:
        self.run_dir = run_dir
        self.max_side = max_side
        self.quality = quality
        self.cache_dir = run_dir / CACHE_DIR
        self.made = 0  # decoded and scaled now
        self.cached = 0  # read from the cache
        self.failed = 0  # local files Pillow could not read

    def local_file(self, output: OutputImage) -> Path | None:
        """The downloaded copy of an output (local_path absolute or relative to the run dir)."""
        if not output.local_path or "://" in output.local_path:
            return None  # not downloaded, or published to object storage (s3://...)
        path = Path(output.local_path)
        if not path.is_absolute():
            path = self.run_dir / path
        return path if path.is_file() else None

    def data_uri(self, path: Path) -> str | None:
        """A JPEG thumbnail of the image at ``path`` as a data URI; None when unreadable."""
        try:
            stat = path.stat()
        except OSError:
            return None
        identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.max_side}"
        cached = self.cache_dir / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".jpg")
        try:
            data = cached.read_bytes()
            self.cached += 1
        except OSError:
            made = self._scale(path)
            if made is None:
                self.failed += 1
                return None
            data = made
            self.made += 1
            self._store(cached, data)
        return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")

    def _scale(self, path: Path) -> bytes | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    # JPEG decodes straight at a fraction of its size: far less work.
                    image.draft("RGB", (self.max_side, self.max_side))
                    image.thumbnail((self.max_side, self.max_side))
                    rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=self.quality, optimize=True)
        return out.getvalue()

    def _store(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
