"""fal storage against the in-process emulator: the token flow, multipart, the initiate
fallback, dedup by content across rows and resumes, inlining, and row-level input errors."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx
import pyarrow.dataset as ds
import pytest
from PIL import Image
from pydantic import SecretStr

from runner.config import RunConfig
from runner.emulator import DEFAULT_KEY, Emulator
from runner.errors import AuthError, HTTPStatusError
from runner.execution.engine import Hooks, execute
from runner.fal.storage import StorageClient, UploadSettings
from runner.ledger.state import LedgerState
from runner.media.inputs import InputChecker, InputRef, LocalFile, inspect_file
from runner.media.uploads import CachedUpload, UploadCache, Uploader, substitute
from tests.scenario import EMULATOR_URL, emulator, run, run_config

pytestmark = pytest.mark.anyio
I2I = "fal-ai/flux-lora/image-to-image"


async def no_sleep(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


def png(size: tuple[int, int] = (64, 48), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with emulator(concurrency=8) as running:
        yield running


def storage(
    transport: httpx.AsyncBaseTransport, *, key: str = DEFAULT_KEY,
    wall_clock: Callable[[], float] = time.time, **settings: object,
) -> tuple[httpx.AsyncClient, StorageClient]:  # fmt: skip
    http = httpx.AsyncClient(transport=transport)
    client = StorageClient(
        http, rest_url=f"{EMULATOR_URL}/rest", cdn_url=f"{EMULATOR_URL}/cdn",
        key=SecretStr(key), settings=UploadSettings(**settings),  # type: ignore[arg-type]
        sleep=no_sleep, wall_clock=wall_clock,
    )  # fmt: skip
    return http, client


async def test_simple_uploads_share_one_cdn_token(emu: Emulator, tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(png(color=["red", "green", "blue"][i]))
    http, client = storage(httpx.ASGITransport(app=emu.app))
    async with http:
        done = [await client.upload(p, size=p.stat().st_size, content_type="image/png")
                for p in paths]  # fmt: skip
        fetched = [(await http.get(d.url)).content for d in done]
    assert [d.via for d in done] == ["simple"] * 3
    assert fetched == [p.read_bytes() for p in paths]
    stats = emu.snapshot()["storage"]
    assert stats["tokens_issued"] == 1 and stats["uploads_simple"] == 3


async def test_a_large_lora_goes_multipart_in_parts(emu: Emulator, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    data = bytes(range(256)) * 40  # 10,240 bytes
    lora.write_bytes(data)
    http, client = storage(httpx.ASGITransport(app=emu.app), multipart_threshold=4096,
                           part_size=3000)  # fmt: skip
    async with http:
        done = await client.upload(lora, size=len(data), content_type="application/octet-stream")
        assert (await http.get(done.url)).content == data
    assert done.via == "multipart"
    stats = emu.snapshot()["storage"]
    assert stats["uploads_multipart"] == 1 and stats["multipart_parts"] == 4  # 3000 x 3 + 1240


async def test_the_initiate_flow_takes_over_when_the_cdn_fails(
    emu: Emulator, tmp_path: Path
) -> None:
    app = httpx.ASGITransport(app=emu.app)
    refused: list[str] = []

    async def cdn_down(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/cdn/files/upload"):
            refused.append(request.url.path)
            return httpx.Response(503, text="cdn unavailable")
        return await app.handle_async_request(request)

    path = tmp_path / "a.png"
    path.write_bytes(png())
    http, client = storage(httpx.MockTransport(cdn_down))
    async with http:
        done = await client.upload(path, size=path.stat().st_size, content_type="image/png")
        assert (await http.get(done.url)).content == path.read_bytes()
    assert done.via == "initiate"
    assert len(refused) == UploadSettings().policy.attempts  # retried as a read, then fallback
    assert emu.snapshot()["storage"]["uploads_initiate"] == 1


async def test_a_refused_key_is_an_auth_error_without_the_key(
    emu: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png())
    secret = "wrong-id:wrong-secret-value"
    http, client = storage(httpx.ASGITransport(app=emu.app), key=secret)
    async with http:
        with pytest.raises(AuthError) as caught:
            await client.upload(path, size=path.stat().st_size, content_type="image/png")
    assert "wrong-secret-value" not in str(caught.value)
    assert "wrong-secret-value" not in repr(client)


def ref_and_file(path: Path) -> tuple[InputRef, LocalFile]:
    return InputRef("image_url", path.name, path, "image"), inspect_file(path, image=True)


async def test_concurrent_rows_share_one_upload_per_content(emu: Emulator, tmp_path: Path) -> None:
    a, b, a_copy = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "copy-of-a.png"
    a.write_bytes(png(color="red"))
    a_copy.write_bytes(a.read_bytes())
    b.write_bytes(png(color="blue"))
    http, client = storage(httpx.ASGITransport(app=emu.app))
    uploader = Uploader(client, UploadCache(tmp_path / "uploads.jsonl"))
    urls: dict[int, str] = {}

    async def one(i: int) -> None:
        ref, found = ref_and_file([a, b, a_copy][i % 3])
        urls[i] = await uploader.url_for(ref, found)

    async with http, anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)
    assert uploader.counts.uploads == 2  # a and its copy have one content
    assert len(set(urls.values())) == 2
    assert emu.snapshot()["storage"]["uploads_simple"] == 2
    assert uploader.counts.hashed == 3  # one hash per file, not per row


async def test_a_resume_reuses_cached_urls_until_they_expire(emu: Emulator, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png())
    cache_file = tmp_path / "uploads.jsonl"
    clock = Clock()
    http, client = storage(
        httpx.ASGITransport(app=emu.app), wall_clock=clock, ttl_s=7200.0, min_remaining_s=600.0
    )
    async with http:
        first = Uploader(client, UploadCache(cache_file), wall_clock=clock)
        url = await first.url_for(*ref_and_file(path))
        resumed = Uploader(client, UploadCache(cache_file), wall_clock=clock)
        assert await resumed.url_for(*ref_and_file(path)) == url
        assert resumed.counts.uploads == 0 and resumed.counts.reused == 1
        clock.now += 7200.0 - 599.0  # under 10 minutes left: too close to expiry
        late = Uploader(client, UploadCache(cache_file), wall_clock=clock)
        assert await late.url_for(*ref_and_file(path)) != url
        assert late.counts.uploads == 1
    lines = [json.loads(line) for line in cache_file.read_text().splitlines()]
    assert len(lines) == 2 and {line["storage"] for line in lines} == {f"{EMULATOR_URL}/rest"}


def test_the_cache_ignores_a_torn_line_and_other_storages(tmp_path: Path) -> None:
    entry = CachedUpload("ab" * 32, "https://cdn.test/a.png", None, 10, "simple", "https://rest")
    path = tmp_path / "uploads.jsonl"
    torn = '{"sha256": "cd'
    path.write_text(json.dumps(dataclasses.asdict(entry)) + "\n" + torn, encoding="utf-8")
    cache = UploadCache(path)
    assert len(cache) == 1
    assert cache.get(entry.sha256, storage="https://rest", now_s=0, min_remaining_s=0) == entry
    assert cache.get(entry.sha256, storage="http://other", now_s=0, min_remaining_s=0) is None


async def test_inline_inputs_become_data_uris_and_loras_never_do(tmp_path: Path) -> None:
    small = tmp_path / "a.png"
    small.write_bytes(png())

    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no upload expected, got {request.url}")

    http, client = storage(httpx.MockTransport(refuse))
    uploader = Uploader(client, UploadCache(tmp_path / "u.jsonl"), inline_max_bytes=1 << 20)
    async with http:
        uri = await uploader.url_for(*ref_and_file(small))
    assert uri.startswith("data:image/png;base64,")
    assert uploader.counts.inlined == 1 and uploader.counts.uploads == 0


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ({"image_url": "U"}, {"image_url": "U", "image_urls": ["a", "b"],
                              "loras": [{"path": "w"}]}),
        ({"image_urls[1]": "U"}, {"image_url": "x", "image_urls": ["a", "U"],
                                  "loras": [{"path": "w"}]}),
        ({"loras[0].path": "U"}, {"image_url": "x", "image_urls": ["a", "b"],
                                  "loras": [{"path": "U"}]}),
    ],
)  # fmt: skip
def test_substitute_replaces_only_the_named_values(
    urls: dict[str, str], expected: dict[str, object]
) -> None:
    payload = {"image_url": "x", "image_urls": ["a", "b"], "loras": [{"path": "w"}]}
    assert substitute(payload, urls) == expected
    assert payload == {"image_url": "x", "image_urls": ["a", "b"], "loras": [{"path": "w"}]}


# -- whole runs ------------------------------------------------------------------------------------


def i2i_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["id,endpoint,prompt,image_url,strength,seed"]
    lines += [f"{rid},{I2I},edit {rid},{image},0.5,{i}" for i, (rid, image) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def ledger_rows(run_dir: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = ds.dataset(run_dir / "ledger", format="parquet").to_table()\
        .to_pylist()  # fmt: skip
    return rows


def config(manifest: Path, run_dir: Path, **extra: object) -> RunConfig:
    return run_config(
        manifest, run_dir, rest_url=f"{EMULATOR_URL}/rest", cdn_url=f"{EMULATOR_URL}/cdn",
        download=False, concurrency=8, completion="stream", **extra,
    )  # fmt: skip


async def test_one_upload_serves_every_row_and_every_resume(emu: Emulator, tmp_path: Path) -> None:
    (tmp_path / "chair.png").write_bytes(png((96, 64)))
    rows = [(f"r{i}", "chair.png") for i in range(40)]
    manifest = i2i_manifest(tmp_path / "m.csv", rows)
    first = await run(emu, config(manifest, tmp_path / "run"))
    assert first.exit_code == 0 and first.tally.completed == 40
    i2i_manifest(manifest, [*rows, *((f"more{i}", "chair.png") for i in range(10))])
    second = await run(emu, config(manifest, tmp_path / "run"))
    assert second.tally.completed == 10 and second.tally.skipped == 40
    stats = emu.snapshot()
    assert stats["storage"]["uploads_simple"] == 1
    assert stats["submits"]["accepted"] == 50
    folded = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert len(folded) == 50
    assert all(json.loads(r["request"])["image_url"] == "chair.png" for r in folded)


async def test_bad_files_fail_only_their_rows(emu: Emulator, tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(png((64, 48)))
    (tmp_path / "text.png").write_text("hello")
    rows = [("ok1", "good.png"), ("gone", "missing.png"), ("ok2", "good.png"), ("text", "text.png")]
    manifest = i2i_manifest(tmp_path / "m.csv", rows)
    report = await run(emu, config(manifest, tmp_path / "run"))
    assert report.exit_code == 1 and report.tally.completed == 2 and report.tally.failed == 2
    events = ledger_rows(tmp_path / "run")
    failed = {r["row_id"]: r for r in events if r["state"] == "failed"}
    assert set(failed) == {"gone", "text"}
    assert all(r["error_type"] == "input_error" and r["retryable"] is False
               for r in failed.values())  # fmt: skip
    assert "image_url=missing.png: file not found" in str(failed["gone"]["error_message"])
    assert "image_url=text.png: not a usable image" in str(failed["text"]["error_message"])
    keys = {r["job_key"] for r in failed.values()}
    assert not [r for r in events if r["job_key"] in keys and r["state"] == "submitting"]
    assert emu.snapshot()["submits"]["accepted"] == 2


async def test_checker_and_uploader_counts_for_a_shared_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png())
    checker = InputChecker(tmp_path)
    ref = InputRef("image_url", "a.png", tmp_path / "a.png", "image")
    assert not checker.is_cached(ref)
    checker.inspect(ref)
    assert checker.is_cached(ref) and checker.reads == 1


async def test_a_run_uploads_a_big_local_lora_multipart_once(emu: Emulator, tmp_path: Path) -> None:
    (tmp_path / "style.safetensors").write_bytes(bytes(range(256)) * 40)
    lines = ["id,endpoint,prompt,image_size,loras,seed"]
    lines += [f"r{i},fal-ai/flux-lora,p{i},square,style.safetensors:0.8,{i}" for i in range(6)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    hooks = Hooks(
        transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(), handle_signals=False,
        upload_settings=UploadSettings(multipart_threshold=4096, part_size=3000),
    )  # fmt: skip
    report = await execute(config(tmp_path / "m.csv", tmp_path / "run"), hooks=hooks)
    assert report.exit_code == 0 and report.tally.completed == 6
    stats = emu.snapshot()["storage"]
    assert stats["uploads_multipart"] == 1 and stats["multipart_parts"] == 4
    assert stats["uploads_simple"] == 0
    (entry,) = [
        json.loads(x) for x in (tmp_path / "run" / "uploads.jsonl").read_text().splitlines()
    ]
    assert entry["via"] == "multipart" and entry["size_bytes"] == 10_240


async def test_a_server_echoing_the_key_does_not_put_it_in_an_error(tmp_path: Path) -> None:
    secret = "key-id:very-secret-part"

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text=f"bad request from {request.headers['authorization']}")

    path = tmp_path / "a.png"
    path.write_bytes(png())
    http, client = storage(httpx.MockTransport(echo), key=secret)
    async with http:
        with pytest.raises(HTTPStatusError) as caught:
            await client.upload(path, size=path.stat().st_size, content_type="image/png")
    assert "very-secret-part" not in str(caught.value) + caught.value.body
    assert "[redacted]" in caught.value.body
