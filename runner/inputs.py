"""Input files named by a manifest: where they are and how big their images are.

A value in `image_url`, `mask_url`, `image_urls` or a LoRA path is one of: an http(s)
URL (passed through untouched), a `data:` URI, or a local file (absolute, or relative
to the manifest's folder). Sizes are read from file headers only, and cached per path,
so a file used by 10,000 rows is read once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path

from runner.catalog import CATALOG
from runner.imageinfo import ImageInfoError, read_image_info, read_image_info_bytes
from runner.jobs import Job

# Fields whose images decide output size and input billing, in that order. A mask
# has the size of its image, so it adds nothing to either.
SIZING_FIELDS = ("image_url", "image_urls")


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
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, str))


class InputSizer:
    """Reads input image sizes from local headers and data URIs, with a cache."""

    def __init__(self, manifest_dir: Path) -> None:
        self.manifest_dir = manifest_dir
        self._sizes: dict[str, tuple[int, int] | None] = {}

    def size_of(self, value: str) -> tuple[int, int] | None:
        if value in self._sizes:
            return self._sizes[value]
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
        if len(self._sizes) < 100_000:
            self._sizes[value] = size
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
