"""--cache DIR: a second run directory completes the demo from the cache at $0 with no submit;
only fixed-seed, unflagged, downloaded outputs are filed; concurrent writers of one entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from runner.emulator import parse_faults
from runner.errors import EXIT_OK
from runner.ledger.schema import OutputImage
from runner.media.cache import (
    ENTRY,
    VERSION,
    OutputCache,
    cache_key,
    keyed_payload,
    publish,
)
from runner.report.data import build_report
from runner.report.text import render_text
from tests.scenario import emulator, manifest, run, run_config
from tests.test_flagged import DEMO_FAULTS, MANIFESTS, demo, jobs

pytestmark = pytest.mark.anyio


def entries(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / VERSION).glob(f"*/*/{ENTRY}"))


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def test_a_second_run_directory_completes_the_demo_from_the_cache_at_0(
    tmp_path: Path,
) -> None:
    path, cache = demo(tmp_path), tmp_path / "cache"
    async with emulator() as emu:
        first = await run(emu, run_config(path, tmp_path / "night1", cache_dir=cache))
    assert first.exit_code == EXIT_OK and first.tally.cached == 0
    assert len(entries(cache)) == 13
    async with emulator() as emu:
        second = await run(emu, run_config(path, tmp_path / "night2", cache_dir=cache))
        stats = emu.snapshot()
    assert second.exit_code == EXIT_OK
    assert stats["submits"]["accepted"] == 0 and stats["calls"].get("upload", 0) == 0
    assert second.tally.cached == second.tally.completed == 13
    assert second.tally.spent_usd == 0
    before = {r["job_key"]: r for r in jobs(tmp_path / "night1")}
    for row in jobs(tmp_path / "night2"):
        origin = before[row["job_key"]]
        assert row["state"] == "completed" and row["billed_usd"] == Decimal(0)
        assert row["cached_from"] == str((tmp_path / "night1").resolve())
        assert row["request_id"] == origin["request_id"] and row["seed"] == origin["seed"]
        for mine, theirs in zip(row["outputs"], origin["outputs"], strict=True):
            assert str(tmp_path / "night2" / "outputs") in mine["local_path"]
            assert sha(mine["local_path"]) == mine["sha256"] == theirs["sha256"]
    text = render_text(build_report(jobs_table(tmp_path / "night2"), None))
    assert "from the cross-run cache ($0): 13 jobs" in text


def jobs_table(run_dir: Path) -> Any:
    from runner.ledger.fold import read_folded

    return read_folded(run_dir).jobs


async def test_a_job_without_a_seed_is_never_served_from_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,endpoint,prompt\nr0,fal-ai/flux-lora,a mug\nr1,fal-ai/flux-lora,a lamp\n")
    cache = tmp_path / "cache"
    async with emulator() as emu:
        await run(emu, run_config(path, tmp_path / "a", cache_dir=cache))
        await run(emu, run_config(path, tmp_path / "b", cache_dir=cache))
        assert emu.snapshot()["submits"]["accepted"] == 4
    assert entries(cache) == []
    assert not any(r["cached_from"] for r in jobs(tmp_path / "b"))


async def test_flagged_outputs_and_untrusted_endpoints_are_not_cached(tmp_path: Path) -> None:
    path, cache = manifest(tmp_path, 2), tmp_path / "cache"
    async with emulator(faults=parse_faults("flagged=1")) as emu:
        await run(emu, run_config(path, tmp_path / "a", cache_dir=cache))
    assert entries(cache) == []
    async with emulator() as emu:
        untrusted = frozenset({"fal-ai/flux-lora"})
        config = run_config(path, tmp_path / "b", cache_dir=cache,
                            nondeterministic_endpoints=untrusted)  # fmt: skip
        await run(emu, config)
    assert entries(cache) == []


async def test_a_cached_rerun_after_re_rolls_is_free_and_steps_over_the_flag_marks(
    tmp_path: Path,
) -> None:
    """The first night re-rolls its flagged images; the second, with the same cache and
    policy, is served every final output at $0 and sends nothing (not the flagged seeds)."""
    path, cache = demo(tmp_path), tmp_path / "cache"
    async with emulator(faults=parse_faults(DEMO_FAULTS)) as emu:
        first = await run(emu, run_config(path, tmp_path / "night1", cache_dir=cache,
                                          flagged="reroll"))  # fmt: skip
    assert first.exit_code == EXIT_OK and first.tally.rerolls > 0
    marks = [p for p in entries(cache) if json.loads((p / ENTRY).read_text()).get("flagged")]
    assert len(marks) == first.tally.rerolls and len(entries(cache)) == 13 + len(marks)
    async with emulator(faults=parse_faults(DEMO_FAULTS)) as emu:
        second = await run(emu, run_config(path, tmp_path / "night2", cache_dir=cache,
                                           flagged="reroll"))  # fmt: skip
        stats = emu.snapshot()
    assert second.exit_code == EXIT_OK and stats["submits"]["accepted"] == 0
    assert second.tally.cached == 13 and second.tally.spent_usd == 0
    before = {r["job_key"]: r for r in jobs(tmp_path / "night1")}
    for row in jobs(tmp_path / "night2"):
        assert row["seed"] == before[row["job_key"]]["seed"] and not row["flagged"]
    # Under --flagged keep a mark is a miss: a job's first, flagged roll is sent as the run
    # would send it (one job may have been re-rolled twice: two marks, one submit).
    rerolled = sum(1 for r in before.values() if r["rerolls"])
    assert 0 < rerolled <= len(marks)
    async with emulator(faults=parse_faults(DEMO_FAULTS)) as emu:
        kept = await run(emu, run_config(path, tmp_path / "night3", cache_dir=cache))
        assert emu.snapshot()["submits"]["accepted"] == rerolled
    assert kept.tally.cached == 13 - rerolled


async def test_a_damaged_entry_is_a_miss_and_the_job_runs(tmp_path: Path) -> None:
    path, cache = manifest(tmp_path, 2), tmp_path / "cache"
    async with emulator() as emu:
        await run(emu, run_config(path, tmp_path / "a", cache_dir=cache))
        damaged = next(p for p in entries(cache)[0].iterdir() if p.name != ENTRY)
        damaged.write_bytes(b"not the image")
        report = await run(emu, run_config(path, tmp_path / "b", cache_dir=cache))
        assert emu.snapshot()["submits"]["accepted"] == 3
    assert report.tally.cached == 1 and report.tally.completed == 2
    for row in jobs(tmp_path / "b"):
        assert all(sha(o["local_path"]) == o["sha256"] for o in row["outputs"])


def test_local_inputs_enter_the_key_by_their_bytes(tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(b"one")
    payload = {"prompt": "x", "image_url": "in.png", "seed": 1}
    first = cache_key("e", keyed_payload(payload, tmp_path))
    image.write_bytes(b"two")
    assert cache_key("e", keyed_payload(payload, tmp_path)) != first
    assert keyed_payload(payload, tmp_path)["image_url"] == (
        "sha256:" + hashlib.sha256(b"two").hexdigest()
    )


_WRITER = """
import sys, time
from pathlib import Path
from runner.ledger.schema import OutputImage
from runner.media.cache import OutputCache
root, source, go, keys = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
cache = OutputCache(root, Path(sys.argv[2]).parent)
while not go.exists():
    time.sleep(0.001)
out = OutputImage(url="u", width=4, height=4, content_type="image/png", local_path=str(source))
won = [cache.store(k, endpoint="e", seed=1, outputs=[out, out], request_id="r") for k in keys]
print(sum(won))
"""


def _check_whole(root: Path, keys: list[str], source: Path, tmp_path: Path) -> None:
    cache = OutputCache(root, tmp_path)
    digest = sha(str(source))
    for key in keys:
        entry = cache.lookup(key)
        assert entry is not None and len(entry.files) == 2
        assert all(sha(str(entry.folder / f.name)) == f.sha256 == digest for f in entry.files)
    assert list((root / "tmp").iterdir()) == []  # no debris


def _source(tmp_path: Path) -> tuple[Path, list[str]]:
    source = tmp_path / "out.png"
    source.write_bytes(bytes(range(256)) * 1024)
    return source, [hashlib.sha256(str(i).encode()).hexdigest() for i in range(8)]


def test_two_writers_filling_the_same_entries_leave_each_whole_once(tmp_path: Path) -> None:
    source, keys = _source(tmp_path)
    root = tmp_path / "cache"
    start = threading.Barrier(2)
    out = OutputImage(url="u", width=4, height=4, content_type="image/png",
                      local_path=str(source))  # fmt: skip

    def writer() -> int:
        cache = OutputCache(root, tmp_path)
        start.wait()
        return sum(cache.store(k, endpoint="e", seed=1, outputs=[out, out], request_id="r")
                   for k in keys)  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        won = [f.result() for f in [pool.submit(writer), pool.submit(writer)]]
    assert sum(won) == len(keys)  # each entry filled by exactly one writer
    _check_whole(root, keys, source, tmp_path)


@pytest.mark.skipif(not os.environ.get("RUNNER_LONG_TESTS"), reason="RUNNER_LONG_TESTS=1")
def test_two_processes_filling_the_same_entries_leave_each_whole_once(tmp_path: Path) -> None:
    source, keys = _source(tmp_path)
    root, go = tmp_path / "cache", tmp_path / "go"
    argv = [sys.executable, "-c", _WRITER, str(root), str(source), str(go), *keys]
    writers = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    won = [int(w.communicate(timeout=120)[0]) for w in writers]
    assert all(w.returncode == 0 for w in writers)
    assert sum(won) == len(keys)
    _check_whole(root, keys, source, tmp_path)


def test_the_second_writer_of_an_entry_leaves_the_first_one_standing(tmp_path: Path) -> None:
    final, late = tmp_path / "v1" / "ab" / "abc", tmp_path / "tmp" / "late"
    for folder, text in ((tmp_path / "tmp" / "early", "first"), (late, "second")):
        folder.mkdir(parents=True)
        (folder / ENTRY).write_text(text)
    assert publish(tmp_path / "tmp" / "early", final)
    assert not publish(late, final)  # what a writer that lost the race sees
    assert (final / ENTRY).read_text() == "first"


def test_store_refuses_outputs_without_a_local_file(tmp_path: Path) -> None:
    cache = OutputCache(tmp_path / "cache", tmp_path)
    remote = OutputImage(url="u", local_path="s3://bucket/x.png")
    assert not cache.store("ab" * 32, endpoint="e", seed=1, outputs=[remote], request_id=None)
    assert cache.lookup("ab" * 32) is None


async def test_the_emulator_renders_the_same_bytes_for_the_same_request_and_seed(
    tmp_path: Path,
) -> None:
    """What the cache relies on, as FLUX behaves: an edit of a local file uploaded again
    (a new URL) and a text-to-image row give the same bytes in two run directories."""
    shutil.copytree(MANIFESTS / "images", tmp_path / "images")
    path = tmp_path / "m.csv"
    path.write_text(
        "id,endpoint,prompt,seed,image_url,strength\n"
        "t,fal-ai/flux-lora,a mug,5,,\n"
        "e,fal-ai/flux-lora/image-to-image,red chair,6,images/chair.jpg,0.6\n"
    )
    hashes = []
    for name in ("a", "b"):
        async with emulator() as emu:
            await run(emu, run_config(path, tmp_path / name))
        rows = sorted(jobs(tmp_path / name), key=lambda r: r["row_id"])
        hashes.append([(r["row_id"], r["outputs"][0]["sha256"]) for r in rows])
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2
