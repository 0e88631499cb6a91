"""Lost contact on Ray: a key's slots held for lost jobs are marked in its SlotGate actor, so
a worker waiting for a slot of a key whose every slot is so held stops instead of waiting for
ever (runner.scale.ray_gate). Skipped without the ``ray`` extra; .ci/run installs it."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

ray = pytest.importorskip("ray")

from runner.scale.ray_gate import ActorSlots, SlotGate  # noqa: E402


@pytest.fixture(scope="module")
def ray_small() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, namespace="runner", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_worker_waiting_on_a_window_of_lost_jobs_is_told(ray_small: None) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        gate = SlotGate.remote(2)  # type: ignore[attr-defined]
        a = ActorSlots(gate, "shard-0", ttl_s=30)
        b = ActorSlots(gate, "shard-1", ttl_s=30)
        told = anyio.Event()
        c = ActorSlots(gate, "shard-2", ttl_s=30, on_all_lost=told.set)
        await a.acquire()
        await b.acquire()
        a.hold_lost()
        before = await gate.all_lost.remote()
        b.hold_lost()
        with anyio.move_on_after(20):  # waited for ever before
            async with anyio.create_task_group() as tg:
                tg.start_soon(c.acquire)
                await told.wait()
                tg.cancel_scope.cancel()
        b.close()  # its run ended: the lost job's slot is given back
        after = await gate.all_lost.remote()
        a.close()
        return before, told.is_set(), after

    before, told, after = anyio.run(scenario)
    assert (before, told, after) == (False, True, False)
