"""Input files: references, row-level rejection of bad files, the per-file cache, probing."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from runner.endpoints.cost import PriceTable
from runner.manifest.jobs import ExpandOptions, Job, iter_jobs
from runner.manifest.plan import job_estimate
from runner.manifest.reader import RawRow
from runner.media.inputs import (
    InputChecker,
    InputProber,
    InputRef,
    InputSizer,
    input_refs,
)
from runner.media.remote import probe_size


def encode(fmt: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (no pixels: headers are all that is read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def make_job(tmp_path: Path, cells: dict[str, str]) -> Job:
    row = RawRow(file="m.csv", line=2, index=0, cells={"id": "r1", **cells}, typed=False)
    (item,) = list(iter_jobs([row], ExpandOptions(manifest_dir=tmp_path)))
    assert isinstance(item, Job), item
    return item


I2I = "fal-ai/flux-lora/image-to-image"
INPAINT = "fal-ai/flux-lora/inpainting"
KONTEXT = "fal-ai/flux-kontext-lora"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"image_url": "a.png"}, [("image_url", "a.png", "image")]),
        ({"image_url": "https://x.test/a.png"}, []),
        ({"image_url": "data:image/png;base64,AAAA"}, []),
        ({"image_url": "a.png", "mask_url": "m.png"},
         [("image_url", "a.png", "image"), ("mask_url", "m.png", "mask")]),
        ({"image_urls": ["a.png", "https://x.test/b.png", "c.webp"]},
         [("image_urls[0]", "a.png", "image"), ("image_urls[2]", "c.webp", "image")]),
        ({"loras": [{"path": "w/style.safetensors", "scale": 1}]},
         [("loras[0].path", "w/style.safetensors", "lora")]),
        ({"loras": [{"path": "./weights"}]}, [("loras[0].path", "./weights", "lora")]),
        ({"loras": [{"path": "someone/some-lora"}]}, []),  # a hub id, not a file
        ({"loras": [{"path": "https://x.test/w.safetensors"}]}, []),
    ],
)  # fmt: skip
def test_input_refs_name_local_files_only(
    tmp_path: Path, payload: dict[str, Any], expected: list[tuple[str, str, str]]
) -> None:
    refs = input_refs(payload, tmp_path)
    assert [(r.column, r.value, r.kind) for r in refs] == expected
    assert all(r.path.is_absolute() for r in refs)


def test_an_existing_lora_file_counts_whatever_its_name(tmp_path: Path) -> None:
    (tmp_path / "mylora").write_bytes(b"weights")
    (ref,) = input_refs({"loras": [{"path": "mylora"}]}, tmp_path)
    assert ref == InputRef("loras[0].path", "mylora", tmp_path / "mylora", "lora")


BAD_INPUTS = [
    ("missing", I2I, {"image_url": "nope.png"}, "image_url", "image_url=nope.png: file not found"),
    ("not an image", I2I, {"image_url": "notes.png"}, "image_url",
     "image_url=notes.png: not a usable image"),
    ("empty", I2I, {"image_url": "empty.png"}, "image_url", "image_url=empty.png: not a usable"),
    ("a directory", I2I, {"image_url": "adir"}, "image_url", "image_url=adir: is not a regular"),
    ("mask size", INPAINT, {"image_url": "img.png", "mask_url": "small.png"}, "mask_url",
     "mask_url=small.png: mask is 32x32 but image_url is 64x48"),
    ("too many pixels", KONTEXT, {"image_url": "huge.png"}, "image_url",
     "image_url=huge.png: image is 15000x200, above the 14142x14142 limit of "
     "fal-ai/flux-kontext-lora"),
    ("assumed limit", I2I, {"image_url": "huge.png"}, "image_url",
     "(unconfirmed: fal-ai/flux-kontext-lora's limit is assumed)"),
    ("missing lora", "fal-ai/flux-lora", {"loras": "w.safetensors"}, "loras[0].path",
     "loras[0].path=w.safetensors: file not found"),
]  # fmt: skip


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "img.png").write_bytes(encode("PNG", (64, 48)))
    (tmp_path / "mask.png").write_bytes(encode("PNG", (64, 48)))
    (tmp_path / "small.png").write_bytes(encode("PNG", (32, 32)))
    (tmp_path / "notes.png").write_text("not an image at all\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "huge.png").write_bytes(png_header(15000, 200))
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.mark.parametrize(("case", "endpoint", "cells", "column", "message"), BAD_INPUTS)
def test_a_bad_input_file_is_a_problem_of_its_row(
    files: Path, case: str, endpoint: str, cells: dict[str, str], column: str, message: str
) -> None:
    job = make_job(files, {"endpoint": endpoint, "prompt": "p", **cells})
    _, problems = InputChecker(files).check(job)
    assert len(problems) == 1, case
    (problem,) = problems
    assert (problem.file, problem.line, problem.column, problem.row_id) == (
        "m.csv",
        2,
        column,
        "r1",
    )
    assert message in problem.message


def test_good_inputs_pass_with_their_sizes(files: Path) -> None:
    job = make_job(files, {"endpoint": INPAINT, "prompt": "p", "image_url": "img.png",
                           "mask_url": "mask.png"})  # fmt: skip
    found, problems = InputChecker(files).check(job)
    assert problems == []
    assert [(f.image.width, f.image.height) for _, f in found if f.image] == [(64, 48), (64, 48)]
    assert [f.content_type for _, f in found] == ["image/png", "image/png"]


def test_a_file_used_by_many_rows_is_read_once(files: Path) -> None:
    checker = InputChecker(files)
    for i in range(1000):
        job = make_job(files, {"endpoint": I2I, "prompt": f"p{i}", "image_url": "img.png"})
        assert checker.check(job)[1] == []
    assert checker.reads == 1


# -- probing -------------------------------------------------------------------------------------

JPEG = encode("JPEG", (640, 480))
BIG = encode("PNG", (300, 200)) + b"\0" * 200_000  # trailing bytes: a large file


def server(*, honour_range: bool, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        data = BIG if request.url.path == "/big.png" else JPEG
        wanted = request.headers.get("range")
        if honour_range and wanted:
            start, _, end = wanted.removeprefix("bytes=").partition("-")
            part = data[int(start) : int(end) + 1]
            headers = {"content-range": f"bytes {start}-{int(start) + len(part) - 1}/{len(data)}"}
            return httpx.Response(206, content=part, headers=headers)
        return httpx.Response(200, content=data)

    return httpx.MockTransport(handler)


@pytest.mark.anyio
@pytest.mark.parametrize("honour_range", [True, False])
async def test_probe_reads_a_remote_size_with_one_range_request(honour_range: bool) -> None:
    seen: list[httpx.Request] = []
    async with httpx.AsyncClient(transport=server(honour_range=honour_range, seen=seen)) as http:
        assert await probe_size(http, "http://img.test/big.png") == (300, 200)
        assert await probe_size(http, "http://img.test/a.jpg") == (640, 480)
    assert [r.headers["range"] for r in seen] == ["bytes=0-65535"] * 2


@pytest.mark.anyio
async def test_probe_gives_none_for_a_missing_or_non_image_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/gone.png":
            return httpx.Response(404)
        return httpx.Response(200, content=b"<html>hello</html>")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        assert await probe_size(http, "http://img.test/gone.png") is None
        assert await probe_size(http, "http://img.test/page.png") is None


@pytest.mark.anyio
async def test_probed_sizes_make_an_image_to_image_estimate_exact(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"endpoint": I2I, "prompt": "p", "image_url": "http://img.test/a.jpg"})
    sizer = InputSizer(tmp_path)
    prices = PriceTable.default()
    before = job_estimate(job, prices, sizer, sizer.lora_bytes)
    seen: list[httpx.Request] = []
    async with httpx.AsyncClient(transport=server(honour_range=True, seen=seen)) as http:
        prober = InputProber(http, sizer)
        await prober.probe(job)
        await prober.probe(job)  # cached: no second request
    after = job_estimate(job, prices, sizer, sizer.lora_bytes)
    assert len(seen) == 1 and prober.probes == 1
    assert before.approximate and not after.approximate
    assert after.megapixels == 1  # 640x480 in, 640x480 out
