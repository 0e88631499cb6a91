"""Downloading outputs: safe paths, verification with retries, the stage and its ledger records,
resuming only what is missing, data: URIs, and a filesystem URL as --out."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow as pa
import pytest
from PIL import Image

from runner.errors import HTTPStatusError
from runner.fal.retry import RetryPolicy
from runner.ledger.schema import JobRecord, JobState, LedgerEvent, OutputImage
from runner.ledger.state import LedgerState
from runner.ledger.store import Ledger
from runner.media.downloads import (
    Downloader,
    DownloadError,
    DownloadItem,
    DownloadStage,
    OutputSink,
    output_name,
    pending_downloads,
    safe_segment,
)
from tests.scenario import emulator, manifest, run, run_config

pytestmark = pytest.mark.anyio


async def no_sleep(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


def encode(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, fmt)
    return buffer.getvalue()


PNG = encode("PNG")
JPEG = encode("JPEG")

# -- paths -----------------------------------------------------------------------------------------

HOSTILE = [
    "..", ".", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "C:\\x", "NUL", "con.txt",
    "Com1", "lpt9.log", "x\x00y", "line\nbreak", "tab\there", "\x7f", "", " ", "...",
    ".hidden", "trailing.", " spaced ", "café", "ｆｕｌｌ", "日本語", "a" * 500, "a:b*c?d\"e<f>g|h",
    "\u202eevil", "%2e%2e",
]  # fmt: skip
SAFE = ["mug-01", "chair_edit.2", "SKU-1001", "x"]
RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}


@pytest.mark.parametrize("row_id", HOSTILE + SAFE)
def test_a_row_id_becomes_one_safe_path_segment(row_id: str) -> None:
    segment = safe_segment(row_id)
    assert segment not in ("", ".", "..")
    assert not segment.startswith((".", " ", "-")) or segment.startswith("-")
    assert "/" not in segment and "\\" not in segment
    assert all(ch.isascii() and ch.isprintable() for ch in segment)
    assert segment.split(".")[0].lower() not in RESERVED
    assert len(segment) <= 90
    assert (tmp := Path("/out") / segment).parent == Path("/out") and tmp.name == segment


@pytest.mark.parametrize("row_id", SAFE)
def test_a_safe_row_id_is_kept_as_is(row_id: str) -> None:
    assert safe_segment(row_id) == row_id


def test_sanitised_ids_never_collide() -> None:
    ids = HOSTILE + SAFE + ["a_b", "a/b", "a\\b", "a b", "a_b-1", "NUL", "nul", "_NUL"]
    segments = [safe_segment(i) for i in dict.fromkeys(ids)]
    assert len(set(segments)) == len(segments)


@pytest.mark.parametrize(
    ("row_id", "fmt", "expected"),
    [
        ("mug-01", "png", "mug-01/k1-0.png"),
        ("mug-01", "jpeg", "mug-01/k1-0.jpg"),
        ("../x", "webp", f"x-{hashlib.sha256(b'../x').hexdigest()[:8]}/k1-0.webp"),
    ],
)
def test_output_names_are_row_then_key_and_index(row_id: str, fmt: str, expected: str) -> None:
    assert output_name(row_id, "k1", 0, fmt) == expected


def test_nfkc_lookalikes_still_get_their_own_segment() -> None:
    full = "ｆｕｌｌ"
    assert unicodedata.normalize("NFKC", full) == "full"
    assert safe_segment(full) != safe_segment("full") and safe_segment(full).startswith("full-")


# -- one download ----------------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def downloader(handler: Handler, out: Path, attempts: int = 3) -> Downloader:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Downloader(http, OutputSink(str(out), out.parent),
                      policy=RetryPolicy(attempts=attempts), sleep=no_sleep)  # fmt: skip


def item(*outputs: OutputImage, row_id: str = "row/1") -> DownloadItem:
    return DownloadItem("key1", row_id, tuple(outputs))


def image(url: str = "https://cdn.test/a.png", content_type: str = "image/png") -> OutputImage:
    return OutputImage(url=url, width=40, height=30, content_type=content_type)


async def test_a_good_image_is_stored_hashed_and_recorded(tmp_path: Path) -> None:
    d = downloader(lambda r: httpx.Response(200, content=PNG,
                                            headers={"content-type": "image/png"}),
                   tmp_path / "out")  # fmt: skip
    done = await d.download(item(image()), 0, image())
    assert done.sha256 == hashlib.sha256(PNG).hexdigest()
    assert done.local_path is not None
    path = Path(done.local_path)
    assert await anyio.Path(path).read_bytes() == PNG
    assert path.relative_to(tmp_path / "out").parts == (safe_segment("row/1"), "key1-0.png")
    assert [p.name for p in path.parent.iterdir()] == ["key1-0.png"]  # no temp file left


BAD = [
    ("truncated body", lambda: httpx.Response(200, content=PNG[:-40],
     headers={"content-type": "image/png", "content-length": str(len(PNG))}), "truncated"),
    ("truncated image", lambda: httpx.Response(200, content=PNG[: len(PNG) // 2],
     headers={"content-type": "image/png"}), "does not decode"),
    ("html page", lambda: httpx.Response(200, content=b"<html>oops</html>",
     headers={"content-type": "text/html"}), "not an image"),
    ("lying type", lambda: httpx.Response(200, content=b"<html>oops</html>",
     headers={"content-type": "image/png"}), "not PNG, JPEG or WebP"),
    ("other format", lambda: httpx.Response(200, content=JPEG,
     headers={"content-type": "image/jpeg"}), "bytes are jpeg"),
    ("wrong size", lambda: httpx.Response(200, content=encode("PNG", (41, 30)),
     headers={"content-type": "image/png"}), "image is 41x30, the result said 40x30"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "respond", "message"), BAD)
async def test_a_bad_file_is_retried_then_fails_clearly(
    tmp_path: Path, case: str, respond: Callable[[], httpx.Response], message: str
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return respond()

    d = downloader(handler, tmp_path / "out", attempts=3)
    with pytest.raises(DownloadError) as caught:
        await d.download(item(image()), 0, image())
    assert message in str(caught.value), case
    assert len(calls) == 3 and d.attempts == 3
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


async def test_a_truncated_jpeg_is_caught_by_a_full_decode(tmp_path: Path) -> None:
    half = {"content-type": "image/jpeg"}
    d = downloader(lambda _r: httpx.Response(200, content=JPEG[:-30], headers=half),
                   tmp_path / "out", attempts=2)  # fmt: skip
    out = image(content_type="image/jpeg")
    with pytest.raises(DownloadError, match="jpeg does not decode"):
        await d.download(item(out), 0, out)
    assert d.attempts == 2


async def test_a_bad_first_transfer_is_healed_by_the_retry(tmp_path: Path) -> None:
    png = {"content-type": "image/png"}
    answers = iter([httpx.Response(200, content=PNG[:-20], headers=png),
                    httpx.Response(200, content=PNG, headers=png)])  # fmt: skip
    d = downloader(lambda _r: next(answers), tmp_path / "out")
    done = await d.download(item(image()), 0, image())
    assert d.attempts == 2 and done.sha256 == hashlib.sha256(PNG).hexdigest()


async def test_an_expired_output_is_not_retried(tmp_path: Path) -> None:
    calls: list[httpx.Request] = []

    def gone(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(404)

    with pytest.raises(HTTPStatusError, match=r"HTTP 404 \(gone"):
        await downloader(gone, tmp_path / "out").download(item(image()), 0, image())
    assert len(calls) == 1


async def test_a_data_uri_output_is_decoded_and_verified(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no HTTP for data: URIs")

    uri = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
    out = image(uri, "image/jpeg")
    done = await downloader(refuse, tmp_path / "out").download(item(out), 1, out)
    assert done.local_path is not None and done.local_path.endswith("key1-1.jpg")
    assert await anyio.Path(done.local_path).read_bytes() == JPEG
    bad = image("data:image/jpeg;base64," + base64.b64encode(JPEG[:200]).decode(), "image/jpeg")
    with pytest.raises(DownloadError, match="does not decode"):
        await downloader(refuse, tmp_path / "out").download(item(bad), 2, bad)


async def test_out_may_be_a_filesystem_url(tmp_path: Path) -> None:
    target = (tmp_path / "bucket" / "prefix").as_uri()
    png = {"content-type": "image/png"}
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _r: httpx.Response(200, content=PNG, headers=png))
    )
    d = Downloader(http, OutputSink(target, tmp_path / "run"), sleep=no_sleep)
    done = await d.download(item(image(), row_id="mug-01"), 0, image())
    assert done.local_path == f"{target}/mug-01/key1-0.png"
    assert (tmp_path / "bucket" / "prefix" / "mug-01" / "key1-0.png").read_bytes() == PNG
    assert not list((tmp_path / "bucket").rglob("*.part"))


# -- the stage and the ledger ----------------------------------------------------------------------


def completed_event(key: str, row_id: str, outputs: tuple[OutputImage, ...]) -> LedgerEvent:
    return LedgerEvent(key, JobState.COMPLETED, datetime.now(UTC), row_id=row_id,
                       outputs=outputs, billed_usd=None)  # fmt: skip


async def test_a_failed_download_is_completed_not_downloaded_and_a_rerun_fetches_the_rest(
    tmp_path: Path,
) -> None:
    outputs = (image("https://cdn.test/0.png"), image("https://cdn.test/1.png"))
    broken = {"/1.png"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path in broken:
            return httpx.Response(200, content=b"nope", headers={"content-type": "text/plain"})
        return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})

    run_dir = tmp_path / "run"
    async with Ledger.open(run_dir) as ledger:
        event = completed_event("k1", "r1", outputs)
        ledger.append(event)
        stage = DownloadStage(downloader(handler, tmp_path / "out", attempts=2), ledger)
        async with stage.running():
            await stage.put(DownloadItem("k1", "r1", outputs, event))
        assert stage.counts.jobs_failed == 1 and stage.downloader.files == 1
    record = LedgerState.load(run_dir).get("k1")
    assert record is not None and record.state is JobState.COMPLETED
    assert record.error_type == "download_failed" and "output 1" in (record.error_message or "")
    assert record.outputs is not None and record.outputs[0].local_path is not None
    assert record.outputs[1].local_path is None
    pending = pending_downloads(LedgerState.load(run_dir).jobs)
    assert list(pending) == ["k1"]

    broken.clear()
    async with Ledger.open(run_dir) as ledger:
        stage = DownloadStage(downloader(handler, tmp_path / "out"), ledger)
        async with stage.running():
            await stage.put(pending["k1"])
    assert stage.downloader.files == 1  # only the missing one
    assert pending_downloads(LedgerState.load(run_dir).jobs) == {}
    healed = LedgerState.load(run_dir).get("k1")
    assert healed is not None and healed.outputs is not None
    assert all(o.local_path and o.sha256 for o in healed.outputs)


def test_pending_downloads_finds_only_completed_jobs_missing_a_file(tmp_path: Path) -> None:
    done = OutputImage("u", 1, 1, "image/png", "/x.png", "ab")
    with Ledger.open(tmp_path) as ledger:
        ledger.append(completed_event("all-there", "a", (done,)))
        ledger.append(completed_event("missing", "b", (done, image())))
        ledger.append(completed_event("none", "c", ()))
        ledger.append(LedgerEvent("failed", JobState.FAILED, datetime.now(UTC), row_id="d"))
        ledger.commit_sync()
    pending = pending_downloads(LedgerState.load(tmp_path).jobs)
    assert list(pending) == ["missing"]
    assert pending["missing"].row_id == "b" and len(pending["missing"].outputs) == 2


class CountingState(LedgerState):
    """A state that counts the records built from its rows."""

    built = 0

    def record(self, row: int) -> JobRecord:
        self.built += 1
        return super().record(row)


def no_download_ledger(run_dir: Path, jobs: int) -> None:
    """``jobs`` completed jobs whose outputs were never downloaded, and a few that need nothing."""
    done = OutputImage("u", 1, 1, "image/png", "/x.png", "ab")
    with Ledger.open(run_dir) as ledger:
        for i in range(jobs):
            ledger.append(completed_event(f"k{i}", f"r{i}", (image(f"https://cdn.test/{i}.png"),)))
        ledger.append(completed_event("all-there", "a", (done,)))
        ledger.append(LedgerEvent("failed", JobState.FAILED, datetime.now(UTC), row_id="f"))
        ledger.commit_sync()


def test_pending_downloads_builds_each_item_when_asked_and_hands_it_out_once(
    tmp_path: Path,
) -> None:
    no_download_ledger(tmp_path, 40)
    full = LedgerState.load(tmp_path)
    with Ledger.open(tmp_path) as ledger:
        state = CountingState(ledger.state().jobs)
    pending = pending_downloads(state)
    assert state.built == 0 and len(pending) == 40
    assert list(pending) == [f"k{i}" for i in range(40)]
    item = pending.pop("k7")
    record = full.get("k7")
    assert record is not None and item == DownloadItem("k7", "r7", record.outputs or (), record)
    assert state.built == 1
    assert pending.pop("k7") is None and "k7" not in pending and len(pending) == 39
    assert "k7" not in list(pending) and pending.get("k7") is None
    for key in ("all-there", "failed", "never-seen"):
        assert pending.pop(key) is None and key not in pending
    assert state.built == 1


def test_pending_downloads_reads_a_table_of_several_sliced_chunks(tmp_path: Path) -> None:
    no_download_ledger(tmp_path, 30)
    jobs = LedgerState.load(tmp_path).jobs
    expected = pending_downloads(jobs)
    # Chunks that start inside their buffers: outputs' offsets are relative to each chunk.
    chunked = pa.concat_tables([jobs.slice(0, 7), jobs.slice(7, 11), jobs.slice(18)])
    assert chunked["outputs"].num_chunks == 3
    got = pending_downloads(chunked)
    assert list(got) == list(expected) and len(got) == 30
    assert all(got[key] == expected[key] for key in expected)


# -- whole runs ------------------------------------------------------------------------------------


async def test_a_run_downloads_every_output_and_a_rerun_only_what_is_missing(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 6)
    fast: dict[str, Any] = {"concurrency": 6, "completion": "stream"}
    async with emulator(concurrency=6) as emu:
        first = await run(emu, run_config(path, tmp_path / "run", download=False, **fast))
        assert first.exit_code == 0
        assert pending_downloads(LedgerState.load(tmp_path / "run").jobs).keys() == set(
            LedgerState.load(tmp_path / "run").keys()
        )
        second = await run(emu, run_config(path, tmp_path / "run", **fast))
        third = await run(emu, run_config(path, tmp_path / "run", **fast))
        assert emu.snapshot()["submits"]["accepted"] == 6
    assert second.exit_code == 0 and second.tally.skipped == 6
    assert "outputs: 6 downloaded" in second.lines[-1]
    assert "outputs: 0 downloaded" in third.lines[-1]
    files = sorted((tmp_path / "run" / "outputs").rglob("*.jpg"))
    assert [f.parent.name for f in files] == [f"r{i}" for i in range(6)]
    for record in LedgerState.load(tmp_path / "run").jobs.to_pylist():
        (out,) = record["outputs"]
        data = await anyio.Path(out["local_path"]).read_bytes()
        assert out["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["billed_usd"] is not None  # carried into the download event
        assert json.loads(record["request"])["image_size"] == "square"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"out_dir": None, "download": True, "download_concurrency": 8}),
        (["--out", "s3://bucket/prefix", "--download-concurrency", "3"],
         {"out_dir": "s3://bucket/prefix", "download": True, "download_concurrency": 3}),
        (["--no-download"], {"download": False}),
        (["--inline-inputs", "--inline-max-bytes", "1000", "--probe-inputs"],
         {"inline_inputs": True, "inline_max_bytes": 1000, "probe_inputs": True}),
    ],
)  # fmt: skip
def test_run_flags_reach_the_config(
    tmp_path: Path, flags: list[str], expected: dict[str, Any]
) -> None:
    from runner.cli import build_parser
    from runner.options import run_config as cli_config

    args = build_parser().parse_args(["run", str(tmp_path / "m.csv"), *flags])
    config = cli_config(args, {})
    assert {k: getattr(config, k) for k in expected} == expected
    default = str(config.run_dir / "outputs")
    assert config.output_target == (expected.get("out_dir") or default)


# -- storage that refuses writes -------------------------------------------------------------------


class FullDisk(io.BytesIO):
    """A file on a full disk: every write fails the way write(2) does, naming no file."""

    def write(self, _data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDiskSink(OutputSink):
    """Temp files whose writes fail with ENOSPC."""

    async def open_temp(self, temp: Path) -> anyio.AsyncFile[bytes]:
        await anyio.Path(temp.parent).mkdir(parents=True, exist_ok=True)
        return anyio.AsyncFile(FullDisk())


HAS_DEV_FULL = Path("/dev/full").exists()


class DevFullSink(OutputSink):
    """Temp files written to /dev/full: the kernel's own ENOSPC (the temp path stays real)."""

    async def open_temp(self, temp: Path) -> anyio.AsyncFile[bytes]:
        await anyio.Path(temp.parent).mkdir(parents=True, exist_ok=True)
        return await anyio.open_file("/dev/full", "wb")


class ReadOnlySink(OutputSink):
    """Temp files are written, but moving one into --out fails with EROFS, naming the file."""

    def publish(self, temp: Path, relative: str) -> str:
        final = Path(self.target) / relative
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(final))


def png_handler(calls: list[httpx.Request]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})

    return handler


async def run_stage(
    tmp_path: Path, sink: OutputSink, handler: Handler, jobs: int = 3
) -> tuple[DownloadStage, list[str]]:
    """``jobs`` completed jobs of two outputs each through one consumer, in order."""
    said: list[str] = []
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    d = Downloader(http, sink, policy=RetryPolicy(attempts=3), sleep=no_sleep)
    async with Ledger.open(tmp_path / "run") as ledger:
        stage = DownloadStage(d, ledger, concurrency=1, say=said.append)
        async with stage.running():
            for j in range(jobs):
                outputs = (
                    image(f"https://cdn.test/{j}-0.png"),
                    image(f"https://cdn.test/{j}-1.png"),
                )
                event = completed_event(f"k{j}", f"r{j}", outputs)
                ledger.append(event)
                await stage.put(DownloadItem(f"k{j}", f"r{j}", outputs, event))
    return stage, said


@pytest.mark.parametrize(
    ("make_sink", "errno_text", "names"),
    [
        (FullDiskSink, "[Errno 28] No space left on device", ".k0-0.png.part"),
        (ReadOnlySink, "[Errno 30] Read-only file system", "k0-0.png"),
        (DevFullSink, "[Errno 28] No space left on device", ".k0-0.png.part"),
    ],
    ids=["enospc-write", "erofs-publish", "dev-full"],
)
async def test_storage_that_refuses_a_write_stops_the_stage_and_names_the_path(
    tmp_path: Path, make_sink: type[OutputSink], errno_text: str, names: str
) -> None:
    if make_sink is DevFullSink and not HAS_DEV_FULL:
        pytest.skip("no /dev/full here")
    out = tmp_path / "out"
    calls: list[httpx.Request] = []
    stage, said = await run_stage(
        tmp_path, make_sink(str(out), tmp_path / "run"), png_handler(calls)
    )

    problem = stage.storage_problem
    assert problem is not None and stage.storage_failed.is_set()
    where = out / safe_segment("r0") / names
    assert problem == f"storage refused a write to {where}: {errno_text}"
    assert "\n" not in problem
    # One GET: the refused write is not retried, and nothing after it is fetched.
    assert len(calls) == 1 and stage.downloader.attempts == 1
    assert stage.counts.jobs_failed == 3 and stage.counts.jobs_done == 0
    assert stage.counts.outputs_skipped == 5
    assert sum("downloads stopped" in line for line in said) == 1
    assert f"downloads stopped: {problem}" in stage.summary()

    state = LedgerState.load(tmp_path / "run")
    for j in range(3):
        record = state.get(f"k{j}")
        assert record is not None and record.state is JobState.COMPLETED
        assert record.error_type == "download_failed" and record.retryable is True
        assert record.outputs is not None and all(o.local_path is None for o in record.outputs)
        assert problem in (record.error_message or "")
    first = state.get("k0")
    assert first is not None and "output 1: not attempted" in (first.error_message or "")
    assert set(pending_downloads(state)) == {"k0", "k1", "k2"}  # a rerun fetches them all
    assert not [p for p in out.rglob("*") if p.is_file()]


async def test_a_rerun_after_the_disk_is_fixed_fetches_everything(tmp_path: Path) -> None:
    calls: list[httpx.Request] = []
    out = tmp_path / "out"
    await run_stage(tmp_path, FullDiskSink(str(out), tmp_path / "run"), png_handler(calls), jobs=2)
    pending = pending_downloads(LedgerState.load(tmp_path / "run"))
    calls.clear()
    async with Ledger.open(tmp_path / "run") as ledger:
        stage = DownloadStage(downloader(png_handler(calls), out), ledger)
        async with stage.running():
            for key in list(pending):
                await stage.put(pending[key])
    assert stage.storage_problem is None and stage.counts.jobs_done == 2 and len(calls) == 4
    assert pending_downloads(LedgerState.load(tmp_path / "run")) == {}


def refuse_connect(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def gone(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(404)


def not_an_image(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"<html/>", headers={"content-type": "text/html"})


@pytest.mark.parametrize("handler", [refuse_connect, gone, not_an_image])
async def test_a_network_or_content_failure_is_not_a_storage_failure(
    tmp_path: Path, handler: Handler
) -> None:
    stage, said = await run_stage(tmp_path, OutputSink(str(tmp_path / "out"), tmp_path), handler)
    assert stage.storage_problem is None and not stage.storage_failed.is_set()
    assert stage.counts.jobs_failed == 3 and stage.counts.outputs_skipped == 0
    assert len(said) == 3 and "downloads stopped" not in stage.summary()
    assert stage.downloader.attempts >= 6  # every output was tried
