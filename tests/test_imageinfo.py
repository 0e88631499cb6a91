"""Image headers: sizes and formats of PNG, JPEG and WebP without decoding; clear errors else."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from runner.endpoints.imageinfo import (
    ImageInfo,
    ImageInfoError,
    read_image_info,
    read_image_info_bytes,
)


def encode(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 1).save(buffer, fmt)
    return buffer.getvalue()


FORMATS = [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")]


@pytest.mark.parametrize(("pil_format", "name"), FORMATS)
@pytest.mark.parametrize("size", [(37, 21), (1, 1), (640, 480)])
def test_reads_size_and_format_from_a_file(
    tmp_path: Path, pil_format: str, name: str, size: tuple[int, int]
) -> None:
    path = tmp_path / f"image.{name}"
    path.write_bytes(encode(pil_format, size))
    assert read_image_info(path) == ImageInfo(size[0], size[1], name)  # type: ignore[arg-type]


@pytest.mark.parametrize(("pil_format", "name"), FORMATS)
def test_reads_size_and_format_from_bytes(pil_format: str, name: str) -> None:
    assert read_image_info_bytes(encode(pil_format, (300, 200))) == ImageInfo(300, 200, name)  # type: ignore[arg-type]


def test_format_comes_from_content_not_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(encode("JPEG", (64, 48)))
    assert read_image_info(path).format == "jpeg"


def test_very_large_dimensions_are_read_without_a_decompression_bomb_error() -> None:
    # 15000 x 15000 = 225 MP: Image.open would refuse it; a header read must not.
    data = encode("PNG", (15000, 15000), mode="1")
    assert read_image_info_bytes(data) == ImageInfo(15000, 15000, "png")


TRUNCATIONS = [("PNG", 12), ("PNG", 20), ("JPEG", 12), ("JPEG", 30), ("WEBP", 12), ("WEBP", 20)]


@pytest.mark.parametrize(("pil_format", "keep"), TRUNCATIONS)
def test_truncated_header_is_an_image_info_error(
    tmp_path: Path, pil_format: str, keep: int
) -> None:
    path = tmp_path / "cut.img"
    path.write_bytes(encode(pil_format, (64, 48))[:keep])
    with pytest.raises(ImageInfoError, match=r"cut\.img: unreadable"):
        read_image_info(path)


def test_file_cut_after_its_header_still_reports_its_size(tmp_path: Path) -> None:
    # Only a full decode would notice; this module deliberately never decodes.
    data = encode("PNG", (64, 48))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) - 12])
    assert read_image_info(path) == ImageInfo(64, 48, "png")


@pytest.mark.parametrize(
    "content",
    [b"prompt,image_url\na cat,x.png\n", b"", b"\x89PN", encode("GIF", (8, 8)),
     encode("BMP", (8, 8))],
)  # fmt: skip
def test_non_images_and_other_formats_are_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ImageInfoError, match="not a PNG, JPEG or WebP image"):
        read_image_info(path)
    with pytest.raises(ImageInfoError):
        read_image_info_bytes(content)


def test_image_info_error_is_a_value_error_and_missing_files_are_os_errors(tmp_path: Path) -> None:
    assert issubclass(ImageInfoError, ValueError)
    with pytest.raises(FileNotFoundError):
        read_image_info(tmp_path / "absent.png")
