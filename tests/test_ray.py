"""runner ray on one machine: ``ray.init(num_cpus=2)``, the emulator on loopback
(runner.scale.ray_driver). Skipped without the ``ray`` extra; .ci/run installs it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from anyio.from_thread import start_blocking_portal  # noqa: E402

from runner.cli import main  # noqa: E402
from runner.emulator.faults import parse_faults  # noqa: E402
from runner.emulator.server import serve  # noqa: E402
from runner.emulator.settings import DEFAULT_KEY  # noqa: E402
from runner.errors import EXIT_BUDGET, EXIT_USAGE  # noqa: E402
from runner.fal.key import fingerprint, secret_forms  # noqa: E402
from runner.ledger.views import status_summary  # noqa: E402
from runner.scale.ray_driver import RayRun, gate_actor_name, run_ray  # noqa: E402
from tests.accounts_support import Accounts  # noqa: E402
from tests.scenario import emulator, manifest, run_config  # noqa: E402
from tests.test_keys import KEY_A, KEY_B  # noqa: E402
from tests.torture_support import LONG  # noqa: E402


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # No key travels through Ray: each worker finds its own in FAL_KEY (or --keys-file). A
    # local cluster's workers inherit this environment as it is at ray.init.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FAL_KEY", DEFAULT_KEY)
        ray.init(num_cpus=2, include_dashboard=False, namespace="runner", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@asynccontextmanager
async def _served(thing: Any) -> Any:
    async with serve(thing) as served:
        yield served


def _urls(base: str) -> dict[str, str]:
    return {"queue_url": base, "rest_url": f"{base}/rest", "cdn_url": f"{base}/cdn",
            "api_url": f"{base}/api"}  # fmt: skip


# The full size runs with RUNNER_LONG_TESTS=1 (67 s of the suite's time on 2 cores, most
# of it eight ray workers starting); the default keeps a shard killed mid-run on fewer jobs.
SHARD_KILLS = [
    pytest.param(600, 4, 150, id="600-jobs-4-shards"),
    pytest.param(
        2000, 8, 300, id="2000-jobs-8-shards",
        marks=pytest.mark.skipif(not LONG, reason="long variant: set RUNNER_LONG_TESTS=1"),
    ),
]  # fmt: skip


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("jobs", "shards", "kill_after"), SHARD_KILLS)
def test_jobs_over_shards_survive_a_killed_worker(
    ray_local: None, tmp_path: Path, jobs: int, shards: int, kill_after: int
) -> None:
    path = manifest(tmp_path, jobs)
    run_dir = tmp_path / "run"
    killed: list[int] = []

    def kill_one(run: RayRun) -> None:
        done = sum(t.completed for t in run.tallies)
        if not killed and done >= kill_after and 3 in run.actors:
            ray.kill(run.actors[3])
            killed.append(done)

    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(emulator(concurrency=8, time_scale=0.002)) as emu,
        portal.wrap_async_context_manager(_served(emu)) as served,
    ):
        config = run_config(
            path, run_dir, **_urls(served.base_url), shards=shards, concurrency=8,
            download=False, reconcile_after_s=0.5,
        )  # fmt: skip
        report = run_ray(config, on_tick=kill_one, lease_ttl_s=5.0)
        stats = emu.stats
    assert killed, "the shard was not killed mid-run"
    assert killed[0] < jobs, killed
    assert report.exit_code == 0, report.message
    assert status_summary(run_dir).by_state == {"completed": jobs}
    assert stats.duplicates == 0
    assert stats.endings["succeeded"] == jobs
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


def _ray_argv(path: Path, run_dir: Path, base_url: str) -> list[str]:
    return ["ray", str(path), "--ledger", str(run_dir), "--shards", "2", "--workers", "2",
            "--queue-url", base_url, "--concurrency", "2", "--rate", "1000", "--no-download",
            "--quiet"]  # fmt: skip


def test_runner_ray_command_runs_the_shards(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, run_dir = manifest(tmp_path, 20), tmp_path / "run"
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(emulator(concurrency=2, time_scale=0.002)) as emu,
        portal.wrap_async_context_manager(_served(emu)) as served,
    ):
        code = main(_ray_argv(path, run_dir, served.base_url))
        stats = emu.stats
    assert code == 0, capsys.readouterr().err
    assert status_summary(run_dir).by_state == {"completed": 20}
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["0", "1"]
    assert stats.duplicates == 0 and stats.endings["succeeded"] == 20


def test_a_worker_without_the_drivers_key_fails_naming_its_fingerprint(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # The driver's FAL_KEY is not the workers' (theirs is the emulator's, from ray.init).
    other = "0a1b2c3d-4e5f-6a7b-8c9d-driverkey001:ffeeddccbbaa00998877665544332211aabbccdd"
    monkeypatch.setenv("FAL_KEY", other)
    code = main(_ray_argv(manifest(tmp_path, 4), tmp_path / "run", "http://127.0.0.1:9"))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert f"no key with fingerprint {fingerprint(other)}" in err
    assert "set FAL_KEY or --keys-file" in err and "every node" in err
    assert not [form for form in secret_forms(other) if form in err]


def _gate_is_gone(key: str) -> bool:
    try:
        ray.get_actor(gate_actor_name(fingerprint(key)), namespace="runner")
    except ValueError:
        return True
    return False


@pytest.mark.timeout(600)
def test_max_cost_holds_across_ray_workers(ray_local: None, tmp_path: Path) -> None:
    path, cap, job = manifest(tmp_path, 200), Decimal("1.05"), Decimal("0.035")  # 30 jobs
    stream = io.StringIO()
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(emulator(concurrency=4, time_scale=0.005)) as emu,
        portal.wrap_async_context_manager(_served(emu)) as served,
    ):
        config = run_config(
            path, tmp_path / "run", **_urls(served.base_url), shards=4, concurrency=4,
            download=False, max_cost_usd=cap, quiet=False,
        )  # fmt: skip
        report = run_ray(config, workers=4, stream=stream)
        billed = sum((b.usd for b in emu.stats.billing.values()), Decimal(0))
        duplicates = emu.stats.duplicates
    assert report.exit_code == EXIT_BUDGET, report.message
    assert billed <= cap, billed
    assert billed > cap - 4 * job, billed  # reached, not merely respected
    assert duplicates == 0
    assert status_summary(tmp_path / "run").by_state == {"completed": int(billed / job)}
    # The shards' budget messages reached the driver's stream, each with its shard.
    assert "runner: shard " in stream.getvalue() and "budget reached" in stream.getvalue()
    assert _gate_is_gone(DEFAULT_KEY)  # the run's actors do not outlive it


def test_a_429_on_one_ray_worker_lowers_the_keys_level(ray_local: None, tmp_path: Path) -> None:
    path = manifest(tmp_path, 60)
    seen: list[dict[str, Any]] = []

    def look(run: RayRun) -> None:
        seen.extend(ray.get([gate.stats.remote() for gate in run.gates.values()]))

    faults = parse_faults("submit_429=@1+2+3")
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(
            emulator(concurrency=4, time_scale=0.01, faults=faults)
        ) as emu,  # fmt: skip
        portal.wrap_async_context_manager(_served(emu)) as served,
    ):
        config = run_config(path, tmp_path / "run", **_urls(served.base_url), shards=4,
                            concurrency=4, download=False)  # fmt: skip
        report = run_ray(config, workers=4, on_tick=look)
    assert report.exit_code == 0, report.message
    assert seen and max(s["throttles"] for s in seen) >= 1
    # One gate for the key: every worker's rate follows this level. Its lowest point, not a
    # sample: at this time scale accepted submits bring it back to 1 between two ticks.
    assert min(s["lowest"] for s in seen) < 1.0
    assert _gate_is_gone(DEFAULT_KEY)
