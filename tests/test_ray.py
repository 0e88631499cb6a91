"""runner ray on one machine: ``ray.init(num_cpus=2)``, the emulator on loopback
(runner.scale.ray_driver). Skipped without the ``ray`` extra; .ci/run installs it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from anyio.from_thread import start_blocking_portal  # noqa: E402

from runner.emulator.server import serve  # noqa: E402
from runner.ledger.views import status_summary  # noqa: E402
from runner.scale.ray_driver import RayRun, run_ray  # noqa: E402
from tests.accounts_support import Accounts  # noqa: E402
from tests.scenario import emulator, manifest, run_config  # noqa: E402
from tests.test_keys import KEY_A, KEY_B  # noqa: E402


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, namespace="runner", log_to_driver=False)
    yield
    ray.shutdown()


@asynccontextmanager
async def _served(thing: Any) -> Any:
    async with serve(thing) as served:
        yield served


def _urls(base: str) -> dict[str, str]:
    return {"queue_url": base, "rest_url": f"{base}/rest", "cdn_url": f"{base}/cdn",
            "api_url": f"{base}/api"}  # fmt: skip


@pytest.mark.timeout(900)
def test_2000_jobs_over_8_shards_survive_a_killed_worker(ray_local: None, tmp_path: Path) -> None:
    path = manifest(tmp_path, 2000)
    run_dir = tmp_path / "run"
    killed: list[int] = []

    def kill_one(run: RayRun) -> None:
        done = sum(t.completed for t in run.tallies)
        if not killed and done >= 300 and 3 in run.actors:
            ray.kill(run.actors[3])
            killed.append(done)

    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(emulator(concurrency=8, time_scale=0.002)) as emu,
        portal.wrap_async_context_manager(_served(emu)) as served,
    ):
        config = run_config(
            path, run_dir, **_urls(served.base_url), shards=8, concurrency=8,
            download=False, reconcile_after_s=0.5,
        )  # fmt: skip
        report = run_ray(config, on_tick=kill_one, lease_ttl_s=5.0)
        stats = emu.stats
    assert killed, "the shard was not killed mid-run"
    assert report.exit_code == 0, report.message
    assert status_summary(run_dir).by_state == {"completed": 2000}
    assert stats.duplicates == 0
    assert stats.endings["succeeded"] == 2000
    assert stats.peak_outstanding <= config.in_flight_limit


def test_two_keys_on_ray_each_held_to_their_own(ray_local: None, tmp_path: Path) -> None:
    path = manifest(tmp_path, 200)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_A} concurrency=1\n{KEY_B} concurrency=3\n")
    accounts = Accounts({KEY_A: 1, KEY_B: 3}, time_scale=0.005)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(_served(accounts)) as served,
    ):
        config = run_config(
            path, tmp_path / "run", **_urls(served.base_url), shards=4, keys_file=keys,
            key=None, download=False,
        )  # fmt: skip
        report = run_ray(config)
    a, b = accounts.by_key[KEY_A].stats, accounts.by_key[KEY_B].stats
    assert report.exit_code == 0, report.message
    assert a.duplicates == b.duplicates == 0
    assert sum(a.endings.values()) + sum(b.endings.values()) == 200
    assert 0 < a.peak_outstanding <= 3
    assert 0 < b.peak_outstanding <= 9
