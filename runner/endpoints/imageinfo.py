"""Image dimensions and format from a file's header, without decoding the pixels.

Pillow's format plugins parse only the header when an image file object is constructed (the
lazy half of ``Image.open``). The plugin is called directly rather than through
``Image.open`` because that also runs the decompression-bomb check, which warns above ~89 MP
and raises above ~179 MP, while fal accepts inputs up to 14142 x 14142 (200 MP): here we
never decode, so there is no bomb to defuse.

A file truncated *after* its header still reports its size: finding that out needs a full
decode, which is exactly what this module avoids. EXIF orientation is not applied; the
sizes are those stored in the header. (The WebP plugin reads the whole file to parse its
header: fine for input images, which are small.)
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

if TYPE_CHECKING:  # Pillow is imported when the first image is opened, not at start-up
    from PIL import ImageFile

Format = Literal["png", "jpeg", "webp"]


class ImageInfoError(ValueError):
    """The bytes are not a readable PNG, JPEG or WebP header. Callers make it a row problem."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    width: int
    height: int
    format: Format


def _plugin(fmt: Format) -> type[ImageFile.ImageFile]:
    from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin

    plugins: dict[Format, type[ImageFile.ImageFile]] = {
        "png": PngImagePlugin.PngImageFile,
        "jpeg": JpegImagePlugin.JpegImageFile,
        "webp": WebPImagePlugin.WebPImageFile,
    }
    return plugins[fmt]


def sniff_format(head: bytes) -> Format | None:
    """The format named by a file's first 12 bytes, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def read_image_info(path: Path) -> ImageInfo:
    """Width, height and format of a local image file, from its header.

    Raises ImageInfoError for anything that is not a readable PNG/JPEG/WebP header, and
    OSError when the file cannot be opened.
    """
    with path.open("rb") as fp:
        try:
            return _read(fp)
        except ImageInfoError as exc:
            raise ImageInfoError(f"{path.name}: {exc}") from exc


def read_image_info_bytes(data: bytes) -> ImageInfo:
    """The same as :func:`read_image_info`, for an image held in memory."""
    return _read(io.BytesIO(data))


def _read(fp: BinaryIO) -> ImageInfo:
    head = fp.read(12)
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageInfoError("not a PNG, JPEG or WebP image")
    fp.seek(0)
    plugin = _plugin(fmt)
    try:
        image = plugin(fp)
    except (OSError, SyntaxError, ValueError, IndexError, EOFError, struct.error) as exc:
        # Pillow reports a bad header as SyntaxError, a short one as OSError/EOFError.
        raise ImageInfoError(f"unreadable {fmt.upper()} header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageInfoError(f"{fmt.upper()} header gives an empty size {width}x{height}")
    return ImageInfo(width, height, fmt)
