"""Hostile file systems: a symbolic link planted in --out (where a row folder, a temp file or
an output goes) or as the run directory's lock is never followed, never removed, and reported.
Unusable run directories, exports and a closed stdout are tested in test_cli.py."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest
from PIL import Image

from runner.errors import EXIT_LEDGER, LedgerError
from runner.fal.retry import RetryPolicy
from runner.ledger.schema import JobState, LedgerEvent, OutputImage
from runner.ledger.state import LedgerState
from runner.ledger.store import Ledger
from runner.media.downloads import Downloader, DownloadItem, DownloadStage, OutputSink
from tests.scenario import emulator, manifest, run, run_config


def encode_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "teal").save(buffer, "PNG")
    return buffer.getvalue()


PNG = encode_png()
PRECIOUS = b"a file outside --out that no run may touch\n"


async def no_sleep(_seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


def serve_png(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})


def downloader(
    out: Path, handler: Callable[[httpx.Request], httpx.Response] = serve_png
) -> Downloader:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Downloader(http, OutputSink(str(out), out.parent),
                      policy=RetryPolicy(attempts=2), sleep=no_sleep)  # fmt: skip


def image(url: str = "https://cdn.test/a.png") -> OutputImage:
    return OutputImage(url=url, width=40, height=30, content_type="image/png")


def outside(tmp_path: Path) -> Path:
    """A folder outside --out holding one precious file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.png").write_bytes(PRECIOUS)
    return folder


def untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["precious.png"]
    assert (folder / "precious.png").read_bytes() == PRECIOUS


# -- links at each level below --out ---------------------------------------------------------------


def plant_row_folder(out: Path, away: Path) -> Path:
    out.mkdir()
    (out / "mug-01").symlink_to(away, target_is_directory=True)
    return out / "mug-01"


def plant_output(out: Path, away: Path) -> Path:
    (out / "mug-01").mkdir(parents=True)
    (out / "mug-01" / "key1-0.png").symlink_to(away / "precious.png")
    return out / "mug-01" / "key1-0.png"


def plant_temp(out: Path, away: Path) -> Path:
    (out / "mug-01").mkdir(parents=True)
    (out / "mug-01" / ".key1-0.png.part").symlink_to(away / "precious.png")
    return out / "mug-01" / ".key1-0.png.part"


def plant_dangling_output(out: Path, away: Path) -> Path:
    (out / "mug-01").mkdir(parents=True)
    (out / "mug-01" / "key1-0.png").symlink_to(away / "new.png")
    return out / "mug-01" / "key1-0.png"


def plant_dangling_row_folder(out: Path, away: Path) -> Path:
    out.mkdir()
    (out / "mug-01").symlink_to(away / "made-by-the-runner", target_is_directory=True)
    return out / "mug-01"


PLANTS = [plant_row_folder, plant_output, plant_temp, plant_dangling_output,
          plant_dangling_row_folder]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__.removeprefix("plant_"))
async def test_a_planted_link_is_reported_left_alone_and_nothing_is_written_outside(
    tmp_path: Path, plant: Callable[[Path, Path], Path]
) -> None:
    away = outside(tmp_path)
    out = tmp_path / "out"
    link = plant(out, away)
    pointed = os.readlink(link)

    with pytest.raises(OSError) as caught:
        await downloader(out).download(DownloadItem("key1", "mug-01", (image(),)), 0, image())

    assert caught.value.errno == errno.ELOOP and caught.value.filename == str(link)
    assert "symbolic link" in str(caught.value)
    untouched(away)
    assert link.is_symlink() and os.readlink(link) == pointed


@pytest.mark.anyio
async def test_a_planted_link_fails_its_job_only_and_is_recorded(tmp_path: Path) -> None:
    away = outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "r1").symlink_to(away, target_is_directory=True)
    said: list[str] = []
    async with Ledger.open(tmp_path / "run") as ledger:
        stage = DownloadStage(downloader(out), ledger, concurrency=1, say=said.append)
        async with stage.running():
            for j in range(3):
                outputs = (image(f"https://cdn.test/{j}.png"),)
                event = LedgerEvent(f"k{j}", JobState.COMPLETED, datetime.now(UTC),
                                    row_id=f"r{j}", outputs=outputs)  # fmt: skip
                ledger.append(event)
                await stage.put(DownloadItem(f"k{j}", f"r{j}", outputs, event))

    assert stage.storage_problem is None and not stage.storage_failed.is_set()
    assert stage.counts.jobs_done == 2 and stage.counts.jobs_failed == 1
    state = LedgerState.load(tmp_path / "run")
    bad = state.get("k1")
    assert bad is not None and bad.error_type == "download_failed"
    assert f"'{out / 'r1'}'" in (bad.error_message or "")
    assert "symbolic link" in (bad.error_message or "")
    assert any(str(out / "r1") in line for line in said)
    for key in ("k0", "k2"):
        good = state.get(key)
        assert good is not None and good.error_type is None
    untouched(away)
    assert (out / "r1").is_symlink()


@pytest.mark.anyio
async def test_a_hard_linked_temp_file_is_replaced_not_written_through(tmp_path: Path) -> None:
    away = outside(tmp_path)
    out = tmp_path / "out"
    (out / "mug-01").mkdir(parents=True)
    os.link(away / "precious.png", out / "mug-01" / ".key1-0.png.part")

    done = await downloader(out).download(DownloadItem("key1", "mug-01", (image(),)), 0, image())

    assert done.local_path == str((out / "mug-01" / "key1-0.png").resolve())
    assert (out / "mug-01" / "key1-0.png").read_bytes() == PNG
    untouched(away)


@pytest.mark.anyio
async def test_out_itself_may_be_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    d = downloader(tmp_path / "out")
    done = await d.download(DownloadItem("key1", "mug-01", (image(),)), 0, image())
    assert (real / "mug-01" / "key1-0.png").read_bytes() == PNG
    assert done.local_path == str(real / "mug-01" / "key1-0.png")


@pytest.mark.anyio
async def test_a_run_writes_nothing_through_links_planted_in_out(tmp_path: Path) -> None:
    away = outside(tmp_path)
    out = tmp_path / "out"
    path = manifest(tmp_path, 3)
    async with emulator() as emu:
        first = await run(emu, run_config(path, tmp_path / "run", download=False))
        keys = {row: key for key, row in _records(tmp_path / "run")}
        out.mkdir()
        (out / "r0").symlink_to(away, target_is_directory=True)
        (out / "r1").mkdir()
        (out / "r1" / f"{keys['r1']}-0.jpg").symlink_to(away / "precious.png")
        second = await run(emu, run_config(path, tmp_path / "run", out_dir=str(out)))
    assert first.exit_code == 0 and second.exit_code == 1
    untouched(away)
    assert (out / "r0").is_symlink() and (out / "r1" / f"{keys['r1']}-0.jpg").is_symlink()
    assert [p.name for p in (out / "r2").iterdir()] == [f"{keys['r2']}-0.jpg"]
    state = LedgerState.load(tmp_path / "run")
    records = {row: state.get(key) for row, key in keys.items()}
    said = {row: (r.error_message or "") if r else "no record" for row, r in records.items()}
    assert "symbolic link" in said["r0"] and str(out / "r0") in said["r0"]
    assert "symbolic link" in said["r1"] and str(out / "r1" / f"{keys['r1']}-0.jpg") in said["r1"]
    assert said["r2"] == ""


def _records(run_dir: Path) -> list[tuple[str, str]]:
    jobs = LedgerState.load(run_dir).jobs
    return list(zip(jobs["job_key"].to_pylist(), jobs["row_id"].to_pylist(), strict=True))


# -- the run directory's own files ----------------------------------------------------------------


def test_a_link_planted_as_the_lock_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    away = outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(away / "precious.png")
    with pytest.raises(LedgerError) as caught:
        Ledger.open(run_dir)
    assert caught.value.exit_code == EXIT_LEDGER and str(run_dir / ".lock") in str(caught.value)
    untouched(away)
    assert (run_dir / ".lock").is_symlink()
