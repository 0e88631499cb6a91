"""The official fal-client 1.0.3, unchanged, against the emulator on a real loopback server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import fal_client
import fal_client.client
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runner.emulator import (
    DEFAULT_KEY,
    Emulator,
    EmulatorConfig,
    Served,
    ServiceTime,
    parse_faults,
    serve,
    serve_main,
)
from runner.emulator.server import _bind
from tests.emulator_support import png_bytes

pytestmark = pytest.mark.anyio
LORA = "fal-ai/flux-lora"
I2I = "fal-ai/flux-lora/image-to-image"
SCALE = 0.01
JOB_S = 20.0  # emulated: 0.2 s of real time per job


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and fal-client's AsyncClient are asyncio-only


def emulator(**overrides: Any) -> Emulator:
    http = overrides.pop("http_client", None)
    options: dict[str, Any] = {
        "time_scale": SCALE,
        "concurrency": 1,
        "service": ServiceTime(fixed_s=JOB_S),
    }
    return Emulator(EmulatorConfig(**options | overrides), http_client=http)


@pytest.fixture
def point_fal_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Points fal-client's module globals at a served emulator; yields a client maker."""

    @asynccontextmanager
    async def point(served: Served) -> AsyncIterator[fal_client.AsyncClient]:
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", served.base_url + "/")
        monkeypatch.setattr(fal_client.client, "REST_URL", served.base_url + "/rest")
        monkeypatch.setattr(fal_client.client, "CDN_URL", served.base_url + "/cdn")
        client = fal_client.AsyncClient(key=DEFAULT_KEY)
        try:
            yield client
        finally:
            # fal-client never closes the httpx client it caches; close it so no socket leaks.
            await (await client._client).aclose()

    yield point


async def stats(served: Served) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        return dict((await http.get(served.base_url + "/_emulator/stats")).json())


async def test_submit_status_with_logs_and_result(point_fal_client: Any) -> None:
    async with serve(emulator()) as served, point_fal_client(served) as client:
        handle = await client.submit(LORA, {"prompt": "a red fox", "seed": 5}, path="")
        seen: list[Any] = []
        async for event in handle.iter_events(with_logs=True, interval=0.02):
            seen.append(event)
        result = await handle.get()
        again = await client.result(LORA, handle.request_id)
        async with httpx.AsyncClient() as http:
            image = await http.get(result["images"][0]["url"])
    assert handle.status_url == f"{served.base_url}/{LORA}/requests/{handle.request_id}/status"
    kinds = [type(e).__name__ for e in seen]
    assert kinds[-1] == "Completed" and "InProgress" in kinds
    progress = next(e for e in seen if isinstance(e, fal_client.InProgress))
    assert isinstance(progress.logs, list)
    done = seen[-1]
    assert isinstance(done, fal_client.Completed) and done.error is None
    assert done.metrics["inference_time"] == pytest.approx(JOB_S * SCALE, rel=0.01)
    assert isinstance(done.logs, list) and done.logs[-1]["message"] == "Inference finished"
    assert result == again and result["seed"] == 5 and result["prompt"] == "a red fox"
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


async def test_cancel_a_queued_request(point_fal_client: Any) -> None:
    slow = emulator(service=ServiceTime(fixed_s=1000.0))  # 10 s real: cancelled long before
    async with serve(slow) as served, point_fal_client(served) as client:
        blocker = await client.submit(LORA, {"prompt": "first"})
        queued = await client.submit(LORA, {"prompt": "second"})
        assert isinstance(await queued.status(), fal_client.Queued)
        await queued.cancel()
        status = await queued.status(with_logs=True)
        await blocker.cancel()
        with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
            await blocker.cancel()
        counted = await stats(served)
    assert isinstance(status, fal_client.Completed)
    assert status.error_type == "request_cancelled" and status.logs == []
    assert raised.value.status_code == 400
    assert counted["jobs"]["endings"] == {"cancelled": 2}


async def test_webhook_submit_delivers_signed_body(point_fal_client: Any) -> None:
    arrived = anyio.Event()
    bodies: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        bodies.append(json.loads(await request.body()))
        assert request.headers["x-fal-webhook-signature"]
        arrived.set()
        return Response(b"ok")

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver)) as http,
        serve(emulator(http_client=http)) as served,
        point_fal_client(served) as client,
    ):
        handle = await client.submit(
            LORA, {"prompt": "hooked"}, webhook_url="http://receiver/hook?x=1"
        )
        with anyio.fail_after(5):
            await arrived.wait()
        result = await handle.get()
    assert bodies == [
        {
            "request_id": handle.request_id,
            "gateway_request_id": handle.request_id,
            "status": "OK",
            "payload": result,
        }
    ]


async def test_upload_then_use_the_url_as_an_input(point_fal_client: Any) -> None:
    data = png_bytes(320, 240)
    async with serve(emulator()) as served, point_fal_client(served) as client:
        url = await client.upload(data, "image/png", "input.png")
        async with httpx.AsyncClient() as http:
            fetched = await http.get(url)
        handle = await client.submit(I2I, {"prompt": "edit", "image_url": url})
        result = await handle.get()
    assert url.startswith(served.base_url + "/cdn/files/")
    assert fetched.content == data
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (320, 240)


async def test_status_stream_over_a_real_socket(point_fal_client: Any) -> None:
    async with serve(emulator()) as served, point_fal_client(served) as client:
        handle = await client.submit(LORA, {"prompt": "streamed"})
        events: list[dict[str, Any]] = []
        async with (
            httpx.AsyncClient(headers={"Authorization": f"Key {DEFAULT_KEY}"}) as http,
            http.stream("GET", handle.status_url + "/stream", params={"logs": 1}) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "COMPLETED"
    assert {e["status"] for e in events} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}


async def test_official_client_retries_a_reset_submit_into_a_duplicate(
    point_fal_client: Any,
) -> None:
    config = {"faults": parse_faults("reset_after_accept=@1"), "concurrency": 4}
    async with serve(emulator(**config)) as served, point_fal_client(served) as client:
        handle = await client.submit(LORA, {"prompt": "once, I hoped"})
        await handle.get()
        counted = await stats(served)
    # The dangerous case: the client never heard about the first, so it submitted again.
    assert counted["submits"]["accepted"] == 2 and counted["submits"]["duplicates"] == 1
    assert counted["faults"] == {"reset_after_accept": 1}


async def test_sync_client_in_a_thread(point_fal_client: Any) -> None:
    async with serve(emulator()) as served, point_fal_client(served):
        sync = fal_client.SyncClient(key=DEFAULT_KEY)

        def run() -> dict[str, Any]:
            try:
                handle = sync.submit(LORA, {"prompt": "sync", "image_size": "square"})
                return dict(handle.get(interval=0.02))
            finally:
                sync._client.close()

        result = await anyio.to_thread.run_sync(run)
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (512, 512)


async def test_tls_server_reached_through_fal_queue_run_host() -> None:
    script = textwrap.dedent(
        f"""
        import fal_client
        client = fal_client.SyncClient(key={DEFAULT_KEY!r})
        handle = client.submit({LORA!r}, {{"prompt": "over tls"}})
        print(handle.get(interval=0.02)["prompt"])
        """
    )
    async with serve(emulator(), tls=True) as served:
        assert served.cert_file is not None and served.base_url.startswith("https://")
        context = ssl.create_default_context(cafile=str(served.cert_file))
        async with httpx.AsyncClient(verify=context) as http:
            direct = await http.get(served.base_url + "/_emulator/stats")
        env = {**os.environ, "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{served.port}",
               "SSL_CERT_FILE": str(served.cert_file)}  # fmt: skip
        done = await anyio.run_process([sys.executable, "-c", script], env=env, check=False)
    assert direct.status_code == 200
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "over tls"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _lines(stream: Any) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


async def test_serve_main_answers_plain_http_and_rejects_bad_faults() -> None:
    assert serve_main(["--faults", "gremlins=1"]) == 2
    port = _free_port()
    code = "import sys; from runner.emulator import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "--port", str(port), "--time-scale", "0.01"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    async with await anyio.open_process(argv, env=env, stderr=subprocess.STDOUT) as proc:
        try:
            assert proc.stdout is not None
            with anyio.fail_after(10):
                async for line in _lines(proc.stdout):
                    if "listening on" in line:
                        break
            async with httpx.AsyncClient() as http:
                response = await http.get(f"http://127.0.0.1:{port}/_emulator/stats")
                refused = await http.post(f"http://127.0.0.1:{port}/{LORA}", json={})
        finally:
            proc.terminate()
    assert response.status_code == 200 and response.json()["slots"]["concurrency"] == 4
    assert refused.status_code == 401


async def test_served_connections_turn_nagle_off(anyio_backend: str) -> None:
    """uvicorn answers in two writes (headers, then body). With Nagle on, the body waited
    for the client's delayed ACK and every keep-alive call took ~44 ms on loopback; asyncio
    turns Nagle off only when the listening socket says TCP. Checked the way uvicorn serves
    the bound socket: ``loop.create_server(sock=...)``."""
    if anyio_backend != "asyncio":
        pytest.skip("uvicorn serves on asyncio only")
    nodelay: list[int] = []
    accepted = anyio.Event()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            accepted.set()
            transport.close()

    sock = _bind("127.0.0.1", 0)
    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        async with await anyio.connect_tcp("127.0.0.1", sock.getsockname()[1]):
            with anyio.fail_after(5):
                await accepted.wait()
    finally:
        server.close()
        await server.wait_closed()
    assert nodelay == [1]


def test_emulator_serve_says_exactly_how_to_run_against_it() -> None:
    from runner.emulator.server import how_to_use

    lines = how_to_use("http://127.0.0.1:8787", None)
    assert (
        "FAL_KEY='emulator:local-key' runner run MANIFEST --queue-url http://127.0.0.1:8787"
        in (lines[1])
    )
    own = how_to_use("https://127.0.0.1:9", "my:key", "/tmp/cert.pem")
    assert "my:key" not in "".join(own) and "SSL_CERT_FILE=/tmp/cert.pem" in own[1]
