"""Input files named by a manifest: where they are, whether they are usable, how big.

A value in `image_url`, `mask_url`, `image_urls` or a LoRA path is one of: an http(s)
URL (passed through untouched), a `data:` URI, or a local file (absolute, or relative
to the manifest's folder). Local files are checked before anything is sent (readable;
PNG, JPEG or WebP; within the endpoint's pixel limit; a mask as large as its image);
a bad one becomes a :class:`~runner.errors.RowProblem` of the rows that use it. Facts
about a file come from its header only and are cached per path, so a file used by
10,000 rows is read once. ``--probe-inputs`` reads remote images' sizes with a Range
request (:class:`InputProber`, :mod:`runner.media.remote`), so that costs can be estimated
exactly.

A LoRA path that is not a URL counts as a local file when it exists, looks like a path
(``/``, ``./``, ``../``, ``~``) or ends like a weights file; anything else (a Hugging Face
id, say) is passed through for fal to resolve.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from runner.endpoints.catalog import CATALOG
from runner.endpoints.imageinfo import (
    ImageInfo,
    ImageInfoError,
    read_image_info,
    read_image_info_bytes,
)
from runner.endpoints.limits import KONTEXT_LORA
from runner.errors import RowProblem
from runner.manifest.jobs import Job
from runner.media.remote import probe_size

# Fields whose images decide output size and input billing, in that order. A mask
# has the size of its image, so it adds nothing to either.
SIZING_FIELDS = ("image_url", "image_urls")
IMAGE_FIELDS = ("image_url", "mask_url", "image_urls")
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_CACHED = 100_000

Kind = Literal["image", "mask", "lora"]


def is_remote(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def is_data_uri(value: str) -> bool:
    return value.startswith("data:")


def local_path(value: str, manifest_dir: Path) -> Path | None:
    """The file a value names, or None for URLs and data URIs."""
    if is_remote(value) or is_data_uri(value):
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else manifest_dir / path


def data_uri_bytes(value: str) -> bytes:
    header, _, data = value.partition(",")
    if not header.endswith(";base64"):
        raise ValueError("only base64 data URIs are supported")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in data URI: {exc}") from exc


def image_values(job: Job, fields: tuple[str, ...] = SIZING_FIELDS) -> Iterator[str]:
    for name in fields:
        value = job.payload.get(name)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if isinstance(v, str))


# -- pixel limits (data) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PixelLimit:
    """The largest input image an endpoint accepts, and whether a source states it."""

    max_side: int
    confirmed: bool
    note: str = ""


# fal states 14142 x 14142 for flux-kontext-lora (seed 000); for the others nothing is
# published, so the same limit is assumed and says so in its message.
_ASSUMED = PixelLimit(14142, False, f"unconfirmed: {KONTEXT_LORA}'s limit is assumed")


def pixel_limit(endpoint: str) -> PixelLimit:
    spec = CATALOG.get(endpoint)
    if spec is not None and spec.max_input_side is not None:
        return PixelLimit(spec.max_input_side, True)
    return _ASSUMED


# -- references and file facts ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputRef:
    """One local file a job's payload names, and where: ``image_urls[1]``, ``loras[0].path``."""

    column: str
    value: str
    path: Path
    kind: Kind


def _is_lora_file(value: str, manifest_dir: Path) -> Path | None:
    path = local_path(value, manifest_dir)
    if path is None:
        return None
    looks_like_path = value.startswith(("/", "./", "../", "~")) or value.lower().endswith(
        LORA_SUFFIXES
    )
    return path if looks_like_path or path.exists() else None


def input_refs(payload: Mapping[str, Any], manifest_dir: Path) -> list[InputRef]:
    """Every local file the payload names (URLs and data URIs are not references)."""
    refs: list[InputRef] = []
    for name in IMAGE_FIELDS:
        value = payload.get(name)
        values: list[tuple[str, str]] = [(name, value)] if isinstance(value, str) else []
        if isinstance(value, list | tuple):
            values = [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, str)]
        for column, text in values:
            path = local_path(text, manifest_dir)
            if path is not None:
                refs.append(InputRef(column, text, path, "mask" if name == "mask_url" else "image"))
    loras = payload.get("loras")
    for i, lora in enumerate(loras if isinstance(loras, list | tuple) else ()):
        weights = lora.get("path") if isinstance(lora, Mapping) else None
        path = _is_lora_file(weights, manifest_dir) if isinstance(weights, str) else None
        if path is not None and isinstance(weights, str):
            refs.append(InputRef(f"loras[{i}].path", weights, path, "lora"))
    return refs


@dataclass(frozen=True, slots=True)
class LocalFile:
    """What one look at a local file found. ``problem`` is None when the file is usable."""

    path: Path
    size_bytes: int = 0
    mtime_ns: int = 0
    image: ImageInfo | None = None
    problem: str | None = None

    @property
    def content_type(self) -> str:
        return f"image/{self.image.format}" if self.image else "application/octet-stream"


def inspect_file(path: Path, *, image: bool) -> LocalFile:
    """Stat and (for images) read the header of one file; problems are returned, not raised."""
    try:
        stat = path.stat()
        if not path.is_file():
            return LocalFile(path, problem="is not a regular file")
        info = None
        with path.open("rb") as fh:
            if image:
                info = read_image_info(path)
            else:
                fh.read(1)
    except FileNotFoundError:
        return LocalFile(path, problem="file not found")
    except PermissionError:
        return LocalFile(path, problem="file is not readable (permission denied)")
    except OSError as exc:
        return LocalFile(path, problem=f"cannot read file: {exc.strerror or exc}")
    except ImageInfoError as exc:
        return LocalFile(path, stat.st_size, problem=f"not a usable image: {exc}")
    if stat.st_size == 0:
        return LocalFile(path, problem="file is empty")
    return LocalFile(path, stat.st_size, stat.st_mtime_ns, info)


class InputChecker:
    """Checks a job's local files, each file read once (cached by path and kind)."""

    def __init__(
        self, manifest_dir: Path, *, limits: Callable[[str], PixelLimit] = pixel_limit
    ) -> None:
        self.manifest_dir = manifest_dir
        self.limits = limits
        self._files: dict[tuple[Path, bool], LocalFile] = {}
        self.reads = 0  # files actually inspected (cache misses)

    def refs(self, job: Job) -> list[InputRef]:
        return input_refs(job.payload, self.manifest_dir)

    def is_cached(self, ref: InputRef) -> bool:
        return (ref.path, ref.kind != "lora") in self._files

    def inspect(self, ref: InputRef) -> LocalFile:
        key = (ref.path, ref.kind != "lora")
        found = self._files.get(key)
        if found is None:
            self.reads += 1
            found = inspect_file(ref.path, image=key[1])
            if len(self._files) < MAX_CACHED:
                self._files[key] = found
        return found

    def check(self, job: Job) -> tuple[list[tuple[InputRef, LocalFile]], list[RowProblem]]:
        """The job's local files with their facts, and one problem per bad file."""
        files = [(ref, self.inspect(ref)) for ref in self.refs(job)]
        problems: list[RowProblem] = []
        image_size = next(
            (
                (f.image.width, f.image.height)
                for r, f in files
                if r.column == "image_url" and f.image
            ),
            None,
        )
        for ref, found in files:
            message = found.problem or self._limit_problem(job.endpoint, ref, found, image_size)
            if message:
                text = f"{ref.column}={ref.value}: {message}"
                problems.append(RowProblem(job.source, job.line, ref.column, text, job.row_id))
        return files, problems

    def _limit_problem(
        self, endpoint: str, ref: InputRef, found: LocalFile, image_size: tuple[int, int] | None
    ) -> str | None:
        if found.image is None:
            return None
        size = (found.image.width, found.image.height)
        limit = self.limits(endpoint)
        if max(size) > limit.max_side:
            note = f" ({limit.note})" if limit.note else ""
            return (
                f"image is {size[0]}x{size[1]}, above the {limit.max_side}x{limit.max_side} "
                f"limit of {endpoint}{note}"
            )
        if ref.kind == "mask" and image_size is not None and size != image_size:
            return (
                f"mask is {size[0]}x{size[1]} but image_url is {image_size[0]}x{image_size[1]}; "
                "a mask must have the size of its image"
            )
        return None


# -- sizes for cost estimates --------------------------------------------------------------------


class InputSizer:
    """Reads input image sizes from local headers and data URIs, with a cache.

    Remote URLs have no size unless an :class:`InputProber` remembered one.
    """

    def __init__(self, manifest_dir: Path) -> None:
        self.manifest_dir = manifest_dir
        self._sizes: dict[str, tuple[int, int] | None] = {}

    def remember(self, value: str, size: tuple[int, int] | None) -> None:
        if len(self._sizes) < MAX_CACHED:
            self._sizes[value] = size

    def knows(self, value: str) -> bool:
        return value in self._sizes

    def size_of(self, value: str) -> tuple[int, int] | None:
        if value in self._sizes:
            return self._sizes[value]
        if is_remote(value):
            return None  # unknown until probed; not cached, so a probe still happens
        size: tuple[int, int] | None = None
        try:
            if is_data_uri(value):
                info = read_image_info_bytes(data_uri_bytes(value))
                size = (info.width, info.height)
            else:
                path = local_path(value, self.manifest_dir)
                if path is not None:
                    info = read_image_info(path)
                    size = (info.width, info.height)
        except (ImageInfoError, OSError, ValueError):
            size = None
        self.remember(value, size)
        return size

    def __call__(self, job: Job) -> list[tuple[int, int]]:
        """Sizes of the job's sizing inputs; empty when any of them is unknown."""
        if job.endpoint not in CATALOG:
            return []
        sizes = []
        for value in image_values(job):
            size = self.size_of(value)
            if size is None:
                return []
            sizes.append(size)
        return sizes

    def lora_bytes(self, job: Job) -> int | None:
        """Total size of the job's LoRA files when every one is a local file."""
        loras = job.payload.get("loras")
        if not isinstance(loras, list) or not loras:
            return None
        total = 0
        for lora in loras:
            path = local_path(str(lora.get("path", "")), self.manifest_dir)
            if path is None or not path.is_file():
                return None
            total += path.stat().st_size
        return total


class InputProber:
    """Fills an :class:`InputSizer` with the sizes of a job's remote images (``--probe-inputs``)."""

    def __init__(self, http: httpx.AsyncClient, sizer: InputSizer) -> None:
        self.http = http
        self.sizer = sizer
        self.probes = 0

    async def probe(self, job: Job) -> None:
        for value in image_values(job):
            if is_remote(value) and not self.sizer.knows(value):
                self.probes += 1
                self.sizer.remember(value, await probe_size(self.http, value))
