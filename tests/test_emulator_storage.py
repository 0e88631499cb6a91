"""The emulator's storage REST API and CDN uploads: in-process, then with the official client."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import anyio
import anyio.to_thread
import fal_client
import fal_client.client
import httpx
import pytest
import uvicorn
from fal_client.auth import AuthCredentials
from PIL import Image
from pydantic import SecretStr
from starlette.applications import Starlette

from runner.emulator.filestore import FileStore, StorageError, safe_file_name
from runner.emulator.images import ImageStore
from runner.emulator.storage_api import storage_routes

KEY = "kid:secret-value"
T0 = 1_900_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    files: FileStore
    clock: FakeClock
    http: httpx.AsyncClient

    async def token(self) -> str:
        response = await self.http.post(
            "/rest/storage/auth/token?storage_type=fal-cdn-v3",
            json={},
            headers={"Authorization": f"Key {KEY}"},
        )
        assert response.status_code == 200
        return str(response.json()["token"])

    def key_of(self, access_url: str) -> str:
        prefix = "http://testserver/cdn/files/"
        assert access_url.startswith(prefix)
        return access_url[len(prefix) :]


@asynccontextmanager
async def env(max_total_bytes: int = 1 << 20, lifetime_s: float = 600.0) -> AsyncIterator[Env]:
    clock = FakeClock()
    files = FileStore(max_total_bytes=max_total_bytes, clock=clock)
    routes = storage_routes(files, key=SecretStr(KEY), clock=clock, token_lifetime_s=lifetime_s)
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield Env(files, clock, http)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- token -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_token_carries_bearer_type_cdn_base_url_and_clock_expiry() -> None:
    async with env(lifetime_s=600.0) as e:
        response = await e.http.post(
            "/rest/storage/auth/token?storage_type=fal-cdn-v3",
            json={},
            headers={"Authorization": f"Key {KEY}"},
        )
    body = response.json()
    assert response.status_code == 200
    assert body["token_type"] == "Bearer"
    assert body["base_url"] == "http://testserver/cdn"
    assert datetime.fromisoformat(body["expires_at"]).timestamp() == T0 + 600.0
    assert len(body["token"]) >= 32
    assert e.files.stats()["tokens_issued"] == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Key wrong:key"},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": "Key "},
    ],
)
async def test_token_refuses_anything_but_the_configured_key(headers: dict[str, str]) -> None:
    async with env() as e:
        response = await e.http.post("/rest/storage/auth/token", json={}, headers=headers)
    assert response.status_code == 401
    assert KEY not in response.text
    assert e.files.stats()["auth_rejected"] == 1


# -- simple upload ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_simple_upload_stores_bytes_type_and_name() -> None:
    async with env() as e:
        token = await e.token()
        response = await e.http.post(
            "/cdn/files/upload",
            content=b"\x89PNG-bytes",
            headers={**bearer(token), "Content-Type": "image/png", "X-Fal-File-Name": "my cat.png"},
        )
        assert response.status_code == 200
        stored = e.files.get(e.key_of(response.json()["access_url"]))
    assert stored is not None
    assert stored.data == b"\x89PNG-bytes"
    assert stored.content_type == "image/png"
    assert stored.key.endswith("/my_cat.png")
    assert e.files.stats()["uploads_simple"] == 1


@pytest.mark.anyio
async def test_cdn_upload_refuses_key_auth_unknown_and_expired_tokens() -> None:
    async with env(lifetime_s=60.0) as e:
        token = await e.token()
        refused = [
            await e.http.post("/cdn/files/upload", content=b"x", headers=headers)
            for headers in ({}, {"Authorization": f"Key {KEY}"}, bearer("not-a-token"))
        ]
        ok = await e.http.post("/cdn/files/upload", content=b"x", headers=bearer(token))
        e.clock.now += 61.0
        expired = await e.http.post("/cdn/files/upload", content=b"x", headers=bearer(token))
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert ok.status_code == 200
    assert expired.status_code == 401


@pytest.mark.anyio
async def test_upload_lifecycle_header_expires_the_file() -> None:
    async with env() as e:
        token = await e.token()
        response = await e.http.post(
            "/cdn/files/upload",
            content=b"short-lived",
            headers={
                **bearer(token),
                "X-Fal-Object-Lifecycle": '{"expiration_duration_seconds": 60}',
            },
        )
        key = e.key_of(response.json()["access_url"])
        assert e.files.get(key) is not None
        e.clock.now += 60.0
        assert e.files.get(key) is None
    assert e.files.stats()["expired"] == 1


# -- multipart -------------------------------------------------------------------------------


async def start_multipart(e: Env, token: str) -> tuple[str, str]:
    response = await e.http.post(
        "/cdn/files/upload/multipart",
        headers={**bearer(token), "Content-Type": "application/zip", "X-Fal-File-Name": "w.zip"},
    )
    assert response.status_code == 200
    body = response.json()
    return str(body["access_url"]), str(body["uploadId"])


@pytest.mark.anyio
async def test_multipart_assembles_parts_in_number_order_whatever_the_list_order() -> None:
    chunks = {1: b"aaaa", 2: b"bbbb", 3: b"cc"}
    async with env() as e:
        token = await e.token()
        access_url, upload_id = await start_multipart(e, token)
        assert e.files.get(e.key_of(access_url)) is None  # not readable before complete
        etags = {}
        for number in (3, 1, 2):
            put = await e.http.put(
                f"{access_url}/multipart/{upload_id}/{number}",
                content=chunks[number],
                headers=bearer(token),
            )
            assert put.status_code == 200
            etags[number] = put.headers["etag"]
        done = await e.http.post(
            f"{access_url}/multipart/{upload_id}/complete",
            json={"parts": [{"partNumber": n, "etag": etags[n]} for n in (2, 3, 1)]},
            headers=bearer(token),
        )
        stored = e.files.get(e.key_of(access_url))
    assert done.status_code == 200
    assert etags[1] == '"' + hashlib.md5(b"aaaa").hexdigest() + '"'
    assert stored is not None
    assert stored.data == b"aaaabbbbcc"
    assert stored.content_type == "application/zip"
    stats = e.files.stats()
    assert (stats["uploads_multipart"], stats["multipart_parts"], stats["pending_bytes"]) == (
        1,
        3,
        0,
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        ([{"partNumber": 1, "etag": '"0000"'}], "etag mismatch"),
        ([{"partNumber": 1, "etag": "ETAG1"}, {"partNumber": 1, "etag": "ETAG1"}], "twice"),
        ([{"partNumber": 1, "etag": "ETAG1"}, {"partNumber": 2, "etag": "x"}], "not uploaded"),
        ([], "non-empty"),
        ([{"partNumber": "1", "etag": "ETAG1"}], "partNumber"),
    ],
)
async def test_multipart_complete_rejects_bad_part_lists(
    parts: list[dict[str, object]], reason: str
) -> None:
    async with env() as e:
        token = await e.token()
        access_url, upload_id = await start_multipart(e, token)
        put = await e.http.put(
            f"{access_url}/multipart/{upload_id}/1", content=b"part", headers=bearer(token)
        )
        for part in parts:
            if part["etag"] == "ETAG1":
                part["etag"] = put.headers["etag"]
        done = await e.http.post(
            f"{access_url}/multipart/{upload_id}/complete",
            json={"parts": parts},
            headers=bearer(token),
        )
    assert done.status_code == 400
    assert reason in done.json()["detail"]


@pytest.mark.anyio
async def test_multipart_unknown_upload_id_and_bad_part_number() -> None:
    async with env() as e:
        token = await e.token()
        access_url, upload_id = await start_multipart(e, token)
        unknown = await e.http.put(
            f"{access_url}/multipart/nope/1", content=b"x", headers=bearer(token)
        )
        zero = await e.http.put(
            f"{access_url}/multipart/{upload_id}/0", content=b"x", headers=bearer(token)
        )
        unauthenticated = await e.http.put(f"{access_url}/multipart/{upload_id}/1", content=b"x")
    assert (unknown.status_code, zero.status_code, unauthenticated.status_code) == (404, 400, 401)


# -- initiate (signed URL) fallback ----------------------------------------------------------


@pytest.mark.anyio
async def test_initiate_returns_a_one_time_upload_url_for_the_file_url() -> None:
    async with env() as e:
        refused = await e.http.post("/rest/storage/upload/initiate?storage_type=gcs", json={})
        response = await e.http.post(
            "/rest/storage/upload/initiate?storage_type=gcs",
            json={"file_name": "in.jpg", "content_type": "image/jpeg"},
            headers={"Authorization": f"Key {KEY}"},
        )
        body = response.json()
        first = await e.http.put(body["upload_url"], content=b"jpeg-bytes")
        again = await e.http.put(body["upload_url"], content=b"other")
        stored = e.files.get(e.key_of(body["file_url"]))
    assert refused.status_code == 401
    assert body["upload_url"].startswith("http://testserver/cdn/")
    assert (first.status_code, again.status_code) == (200, 403)
    assert stored is not None
    assert (stored.data, stored.content_type) == (b"jpeg-bytes", "image/jpeg")
    assert e.files.stats()["uploads_initiate"] == 1


# -- bounds ------------------------------------------------------------------------------------


def test_store_evicts_oldest_files_to_stay_within_its_size() -> None:
    files = FileStore(max_total_bytes=10, clock=FakeClock())
    first = files.put(b"aaaa", content_type="x/y")
    second = files.put(b"bbbb", content_type="x/y")
    third = files.put(b"cccc", content_type="x/y")
    assert files.get(first.key) is None
    assert files.get(second.key) is not None and files.get(third.key) is not None
    assert files.stats()["stored_bytes"] == 8
    assert files.stats()["evicted"] == 1


def test_store_refuses_a_file_larger_than_its_size() -> None:
    files = FileStore(max_total_bytes=10, clock=FakeClock())
    with pytest.raises(StorageError) as caught:
        files.put(b"x" * 11, content_type="x/y")
    assert caught.value.status_code == 413


@pytest.mark.anyio
async def test_oversized_upload_answers_413() -> None:
    async with env(max_total_bytes=8) as e:
        token = await e.token()
        response = await e.http.post(
            "/cdn/files/upload", content=b"123456789", headers=bearer(token)
        )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cat.png", "cat.png"),
        ("../../etc/passwd", "passwd"),
        ("a b?c#d.jpg", "a_b_c_d.jpg"),
        ("", "upload.bin"),
        (None, "upload.bin"),
        ("...", "upload.bin"),
    ],
)
def test_safe_file_name(name: str | None, expected: str) -> None:
    assert safe_file_name(name) == expected


# -- the official client against a real loopback server ---------------------------------------


@asynccontextmanager
async def served(files: FileStore) -> AsyncIterator[str]:
    images = ImageStore(files, clock=time.time)
    routes = [*storage_routes(files, key=KEY, clock=time.time), *images.routes()]
    config = uvicorn.Config(
        Starlette(routes=routes),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        ws="none",
    )
    server = uvicorn.Server(config)
    # Bind and listen first: the port is known at once and early connections wait in the backlog.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True


def point_client_at(monkeypatch: pytest.MonkeyPatch, origin: str, *, cdn: str = "/cdn") -> None:
    monkeypatch.setattr(fal_client.client, "REST_URL", f"{origin}/rest")
    monkeypatch.setattr(fal_client.client, "CDN_URL", f"{origin}{cdn}")


def stored_bytes(files: FileStore, url: str, origin: str) -> bytes:
    assert url.startswith(f"{origin}/cdn/files/")
    stored = files.get(url[len(f"{origin}/cdn/files/") :])
    assert stored is not None
    return stored.data


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_official_async_client_simple_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    files = FileStore(clock=time.time)
    async with served(files) as origin:
        point_client_at(monkeypatch, origin)
        url = await fal_client.AsyncClient(key=KEY).upload(b"hello", "text/plain", "hi.txt")
    assert stored_bytes(files, url, origin) == b"hello"
    assert url.endswith("/hi.txt")
    assert files.stats()["uploads_simple"] == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("sync", [False, True])
async def test_official_client_multipart_upload(
    monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    # Shrink the client's 100 MiB threshold and 10 MiB parts so the test moves ~5 KB.
    monkeypatch.setattr(fal_client.client, "MULTIPART_THRESHOLD", 1000)
    monkeypatch.setattr(fal_client.client, "MULTIPART_CHUNK_SIZE", 512)
    data = bytes(range(256)) * 20  # 5120 bytes -> 10 parts, PUT concurrently
    files = FileStore(clock=time.time)
    async with served(files) as origin:
        point_client_at(monkeypatch, origin)
        if sync:
            # SyncClient.upload never closes the httpx.Client it makes for this path, so drive
            # the same MultipartUpload.save (threads, parts listed in finishing order) with ours.
            def upload() -> str:
                tokens = fal_client.client.CDNTokenManager(AuthCredentials("Key", KEY))
                with httpx.Client() as http:
                    access_url = fal_client.client.MultipartUpload.save(
                        client=http,
                        token_manager=tokens,
                        file_name="big.bin",
                        data=data,
                        content_type="application/octet-stream",
                    )
                # The sync save carries no return annotation upstream (the async one does).
                assert isinstance(access_url, str)
                return access_url

            url = await anyio.to_thread.run_sync(upload)
        else:
            url = await fal_client.AsyncClient(key=KEY).upload(
                data, "application/octet-stream", "big.bin"
            )
    assert stored_bytes(files, url, origin) == data
    stats = files.stats()
    assert (stats["uploads_multipart"], stats["multipart_parts"], stats["uploads_simple"]) == (
        1,
        10,
        0,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_official_client_falls_back_to_initiate_when_cdn_upload_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = FileStore(clock=time.time)
    async with served(files) as origin:
        point_client_at(monkeypatch, origin, cdn="/no-cdn-here")  # v3 upload 404s
        client = fal_client.AsyncClient(key=KEY)
        url = await client.upload(b"fallback", "image/png", "f.png")
        # The client never closes the httpx client it used for the fallback; close it here
        # so its socket does not outlive the test.
        await (await client._client).aclose()
    assert stored_bytes(files, url, origin) == b"fallback"
    stats = files.stats()
    assert (stats["uploads_simple"], stats["uploads_initiate"]) == (0, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_official_client_with_wrong_key_cannot_upload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = FileStore(clock=time.time)
    async with served(files) as origin:
        point_client_at(monkeypatch, origin)
        client = fal_client.AsyncClient(key="kid:wrong")
        with pytest.raises(fal_client.client.FalClientHTTPError) as caught:
            await client.upload(b"x", "text/plain")
        await (await client._client).aclose()
    assert caught.value.status_code == 401
    assert files.stats()["files"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uploaded_image_reads_back_over_http_and_resolves_locally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="PNG")
    files = FileStore(clock=time.time)
    async with served(files) as origin:
        point_client_at(monkeypatch, origin)
        url = await fal_client.AsyncClient(key=KEY).upload(buffer.getvalue(), "image/png", "r.png")
        async with httpx.AsyncClient() as http:
            response = await http.get(url)
            size = await ImageStore(files, clock=time.time).read_input_size(url, http)
    assert (response.status_code, response.headers["content-type"]) == (200, "image/png")
    assert response.content == buffer.getvalue()
    assert size == (40, 30)
