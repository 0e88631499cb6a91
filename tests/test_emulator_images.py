"""Emulator output images (lazy, deterministic, cached, expiring), CDN serving and input sizes."""

from __future__ import annotations

import base64
import io
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest
import uvicorn
from PIL import Image, ImageChops, ImageStat
from starlette.applications import Starlette

from runner.emulator.filestore import FileStore
from runner.emulator.images import (
    ImageStore,
    InputImageError,
    decode_data_uri,
    parse_range,
)
from runner.emulator.rendering import render

T0 = 1_900_000_000.0
ORIGIN = "http://testserver"


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    images: ImageStore
    files: FileStore
    clock: FakeClock
    http: httpx.AsyncClient


@asynccontextmanager
async def env(**options: object) -> AsyncIterator[Env]:
    clock = FakeClock()
    files = FileStore(clock=clock)
    images = ImageStore(files, clock=clock, **options)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=Starlette(routes=images.routes()))
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as http:
        yield Env(images, files, clock, http)


def add(
    images: ImageStore,
    *,
    seed: int = 1,
    fmt: str = "jpeg",
    size: tuple[int, int] = (64, 48),
    **kw: object,
) -> dict[str, object]:
    return images.add_output(
        width=size[0],
        height=size[1],
        fmt=fmt,
        seed=seed,
        salt="fal-ai/flux/dev",
        base_url=ORIGIN,
        **kw,  # type: ignore[arg-type]
    )


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("JPG", "JPEG")]
)
def test_render_is_deterministic_and_has_the_asked_size_and_format(
    fmt: str, pil_format: str
) -> None:
    first = render(width=96, height=64, fmt=fmt, seed=5, salt="s")
    assert first == render(width=96, height=64, fmt=fmt, seed=5, salt="s")
    with Image.open(io.BytesIO(first)) as image:
        assert (image.size, image.format) == ((96, 64), pil_format)


@pytest.mark.parametrize(
    "other",
    [
        {"seed": 6, "salt": "s"},
        {"seed": 5, "salt": "t"},
    ],
)
def test_render_differs_visibly_per_seed_and_salt(other: dict[str, object]) -> None:
    def pixels(seed: object, salt: object) -> Image.Image:
        data = render(width=128, height=128, fmt="png", seed=seed, salt=salt)  # type: ignore[arg-type]
        return Image.open(io.BytesIO(data)).convert("RGB")

    diff = ImageChops.difference(pixels(5, "s"), pixels(other["seed"], other["salt"]))
    assert sum(ImageStat.Stat(diff).mean) / 3 > 10  # mean channel difference, out of 255


@pytest.mark.parametrize(
    ("width", "height", "fmt"), [(0, 10, "png"), (10, 20_000, "png"), (10, 10, "gif")]
)
def test_render_rejects_bad_sizes_and_formats(width: int, height: int, fmt: str) -> None:
    with pytest.raises(ValueError):
        render(width=width, height=height, fmt=fmt, seed=1, salt="")


# -- outputs -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_output_json_points_at_a_url_serving_the_rendered_bytes() -> None:
    async with env() as e:
        image = add(e.images, fmt="png", size=(80, 40))
        assert e.images.stats()["renders"] == 0  # registering renders nothing
        response = await e.http.get(str(image["url"]))
    assert str(image["url"]).startswith(f"{ORIGIN}/cdn/files/")
    assert {k: image[k] for k in ("width", "height", "content_type")} == {
        "width": 80,
        "height": 40,
        "content_type": "image/png",
    }
    assert "file_size" not in image
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["accept-ranges"] == "bytes"
    assert response.content == render(
        width=80, height=40, fmt="png", seed=1, salt="fal-ai/flux/dev"
    )


@pytest.mark.anyio
async def test_file_size_renders_once_and_matches_what_is_served() -> None:
    async with env() as e:
        image = add(e.images, fmt="webp")
        size = e.images.file_size(str(image["file_name"]))
        body = (await e.http.get(str(image["url"]))).content
        stats = e.images.stats()
    assert size == len(body)
    assert (stats["renders"], stats["cache_hits"]) == (1, 1)


def test_file_size_of_unknown_image_raises_key_error() -> None:
    images = ImageStore(FileStore(clock=FakeClock()), clock=FakeClock())
    with pytest.raises(KeyError):
        images.file_size("nope.jpg")


@pytest.mark.anyio
async def test_render_cache_stays_within_its_byte_bound_and_rerenders_identically() -> None:
    async with env(cache_max_bytes=30_000) as e:
        outputs = [add(e.images, seed=s, fmt="png", size=(128, 128)) for s in range(6)]
        first = [(await e.http.get(str(o["url"]))).content for o in outputs]
        assert e.images.stats()["cache_bytes"] <= 30_000
        again = [(await e.http.get(str(o["url"]))).content for o in outputs]
    assert first == again
    assert e.images.stats()["renders"] > 6  # evicted ones were rendered again


@pytest.mark.anyio
async def test_outputs_expire_after_retention_on_the_injected_clock() -> None:
    async with env(retention_s=3600.0) as e:
        default = add(e.images)
        short = add(e.images, retention_s=60.0)
        e.clock.now += 60.0
        after_minute = [(await e.http.get(str(o["url"]))).status_code for o in (default, short)]
        e.clock.now += 3540.0
        after_hour = (await e.http.get(str(default["url"]))).status_code
    assert after_minute == [200, 404]
    assert after_hour == 404
    assert e.images.stats()["expired"] == 2


@pytest.mark.anyio
async def test_registry_keeps_at_most_max_outputs() -> None:
    async with env(max_outputs=2) as e:
        oldest, *_ = [add(e.images, seed=s) for s in range(3)]
        gone = await e.http.get(str(oldest["url"]))
    assert gone.status_code == 404
    assert e.images.stats()["live_outputs"] == 2


def test_data_uri_carries_the_rendered_image() -> None:
    images = ImageStore(FileStore(clock=FakeClock()), clock=FakeClock())
    uri = images.data_uri(width=32, height=16, fmt="jpeg", seed=9, salt="x")
    assert uri.startswith("data:image/jpeg;base64,")
    assert decode_data_uri(uri) == render(width=32, height=16, fmt="jpeg", seed=9, salt="x")


# -- serving: uploads, 404, Range, HEAD ---------------------------------------------------------


@pytest.mark.anyio
async def test_uploaded_files_are_served_publicly_and_unknown_paths_404() -> None:
    async with env() as e:
        stored = e.files.put(b"GIF89a-ish", content_type="image/gif", file_name="a.gif")
        found = await e.http.get(f"/cdn/files/{stored.key}")
        missing = await e.http.get("/cdn/files/up/nothing/here.png")
        missing_output = await e.http.get("/cdn/files/out/0000.jpg")
    assert (found.status_code, found.content, found.headers["content-type"]) == (
        200,
        b"GIF89a-ish",
        "image/gif",
    )
    assert (missing.status_code, missing_output.status_code) == (404, 404)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=0-0", (0, 0)),
        ("bytes=0-9,20-29", None),
        ("items=0-9", None),
        ("bytes=abc-5", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-2", "bytes=-0"])
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(ValueError):
        parse_range(header, 100)


@pytest.mark.anyio
async def test_range_and_head_requests() -> None:
    async with env() as e:
        image = add(e.images, size=(200, 100))
        url = str(image["url"])
        full = (await e.http.get(url)).content
        head = await e.http.head(url)
        part = await e.http.get(url, headers={"Range": "bytes=0-31"})
        tail = await e.http.get(url, headers={"Range": "bytes=-16"})
        bad = await e.http.get(url, headers={"Range": f"bytes={len(full)}-"})
    assert (head.status_code, head.content, head.headers["content-length"]) == (
        200,
        b"",
        str(len(full)),
    )
    assert (part.status_code, part.content) == (206, full[:32])
    assert part.headers["content-range"] == f"bytes 0-31/{len(full)}"
    assert (tail.status_code, tail.content) == (206, full[-16:])
    assert (bad.status_code, bad.headers["content-range"]) == (416, f"bytes */{len(full)}")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_range_and_head_over_a_real_server() -> None:
    clock = FakeClock()
    images = ImageStore(FileStore(clock=clock), clock=clock)
    config = uvicorn.Config(
        Starlette(routes=images.routes()), log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    origin = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            try:
                image = images.add_output(
                    width=300, height=200, fmt="jpeg", seed=3, salt="", base_url=origin
                )
                async with httpx.AsyncClient() as http:
                    head = await http.head(str(image["url"]))
                    part = await http.get(str(image["url"]), headers={"Range": "bytes=0-1023"})
            finally:
                server.should_exit = True
    full = render(width=300, height=200, fmt="jpeg", seed=3, salt="")
    assert head.headers["content-length"] == str(len(full)) and head.content == b""
    assert (part.status_code, part.content) == (206, full[:1024])


# -- input sizes -------------------------------------------------------------------------------


def no_http() -> httpx.AsyncClient:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected HTTP request to {request.url}")

    return httpx.AsyncClient(transport=httpx.MockTransport(refuse))


@pytest.mark.anyio
async def test_input_size_from_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(33, 17)).decode()
    async with env() as e, no_http() as client:
        assert await e.images.read_input_size(uri, client) == (33, 17)


@pytest.mark.anyio
async def test_input_size_of_own_cdn_urls_needs_no_http() -> None:
    async with env() as e, no_http() as client:
        output = add(e.images, size=(640, 480))
        upload = e.files.put(png_bytes(21, 12), content_type="image/png", file_name="in.png")
        sizes = [
            await e.images.read_input_size(str(output["url"]), client),
            await e.images.read_input_size(f"http://localhost:9/cdn/files/{upload.key}", client),
        ]
    assert sizes == [(640, 480), (21, 12)]
    assert e.images.stats()["renders"] == 0


@pytest.mark.anyio
async def test_input_size_fetches_other_urls() -> None:
    seen: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=render(width=50, height=70, fmt="webp", seed=1, salt=""))

    async with env() as e, httpx.AsyncClient(transport=httpx.MockTransport(serve)) as client:
        size = await e.images.read_input_size("https://example.test/cat.webp", client)
    assert size == (50, 70)
    assert seen == ["https://example.test/cat.webp"]


def failing_client(kind: str) -> httpx.AsyncClient:
    def serve(request: httpx.Request) -> httpx.Response:
        if kind == "refused":
            raise httpx.ConnectError("refused", request=request)
        if kind == "404":
            return httpx.Response(404, text="Not Found")
        if kind == "huge":
            return httpx.Response(200, content=b"\0" * 2048)
        return httpx.Response(200, content=b"this is not an image at all")

    return httpx.AsyncClient(transport=httpx.MockTransport(serve))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "kind", "message"),
    [
        ("https://example.test/a.png", "refused", "cannot fetch"),
        ("https://example.test/a.png", "404", "HTTP 404"),
        ("https://example.test/a.png", "garbage", "cannot read"),
        ("https://example.test/a.png", "huge", "too large"),
        ("data:image/png;base64,!!!notbase64", "garbage", "base64"),
        (
            "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
            "garbage",
            "cannot read",
        ),
        ("data-no-comma", "garbage", "unsupported"),
        ("ftp://example.test/a.png", "garbage", "unsupported"),
        ("/local/path.png", "garbage", "unsupported"),
    ],
)
async def test_unreadable_inputs_raise_input_image_error(url: str, kind: str, message: str) -> None:
    async with env(max_input_bytes=1024) as e, failing_client(kind) as client:
        with pytest.raises(InputImageError, match=message):
            await e.images.read_input_size(url, client)


def test_decode_plain_data_uri() -> None:
    assert decode_data_uri("data:text/plain,hello%20world") == b"hello world"
    with pytest.raises(InputImageError):
        decode_data_uri("data:text/plain")
