"""``runner ray``: shards as Ray actors (half a CPU each), gates as named actors.

    run_ray(config, address=..., workers=N)
      prepare the sharded run directory (runner.scale.shards.prepare) on the shared fs
      one SlotGate actor per key, named ``runner-gate-<fingerprint>`` (leases with a TTL)
      one ProgressBoard actor: each shard pushes its tally there; the driver shows the sum
      keep at most N ShardWorker actors running; each runs one shard to its end with
        runner.execution.engine.execute, admitting through its key's gate actor
      a shard whose worker dies is started again (up to ``restarts`` times): it resumes
        from its own ledger and adopts the leases its previous worker still held

No key travels through Ray (its task arguments pass through the object store and the GCS,
which can spill to disk under /tmp/ray): a shard's worker is sent its config without the key,
the key's fingerprint and limits (:class:`runner.scale.keys.KeyRef`) and the path of
``--keys-file``, and finds the key on its own machine, in ``FAL_KEY`` or that file
(:func:`shard_call`, :func:`runner.scale.keys.find_key`).

The ledger, not Ray, decides what is sent again: Ray only restarts a shard, whose run
re-attaches or reconciles what its ledger left in flight. A dead worker's leases expire
after ``lease_ttl_s`` unless its shard's next worker adopts them first.

Only this module imports ``ray`` (the optional extra ``runner[ray]``), and nothing imports
this module except the ``ray`` command.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import ray

from runner.config import RunConfig
from runner.errors import UsageError
from runner.execution.budget import Budget
from runner.execution.engine import Hooks, execute
from runner.execution.progress import Progress, Tally
from runner.execution.summary import RunReport
from runner.scale.keys import KeyRef, KeySpec, find_key
from runner.scale.shards import build_gate, combine, prepare, shard_config, sum_tallies

NAMESPACE = "runner"
SHARD_CPUS = 0.5


@ray.remote(num_cpus=0)
class SlotGate:
    """A key's in-flight slots for every worker of every machine: leases with a deadline."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.leases: dict[str, tuple[str, float]] = {}  # id -> (holder, expires at)
        self.peak = 0

    def _expire(self) -> None:
        now = time.monotonic()
        for lease, (_holder, expires) in list(self.leases.items()):
            if expires < now:
                del self.leases[lease]

    def acquire(self, holder: str, ttl_s: float) -> str | None:
        self._expire()
        if len(self.leases) >= self.limit:
            return None
        lease = uuid.uuid4().hex
        self.leases[lease] = (holder, time.monotonic() + ttl_s)
        self.peak = max(self.peak, len(self.leases))
        return lease

    def adopt(self, holder: str, ttl_s: float) -> list[str]:
        """The leases ``holder`` (a shard) still holds from a previous worker, renewed."""
        self.renew(holder, ttl_s)
        return [lease for lease, (h, _e) in self.leases.items() if h == holder]

    def renew(self, holder: str, ttl_s: float) -> None:
        self._expire()
        deadline = time.monotonic() + ttl_s
        for lease, (h, _e) in self.leases.items():
            if h == holder:
                self.leases[lease] = (h, deadline)

    def release(self, lease: str) -> None:
        self.leases.pop(lease, None)

    def stats(self) -> dict[str, int]:
        self._expire()
        return {"limit": self.limit, "held": len(self.leases), "peak": self.peak}


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Each shard's latest tally, for one progress view."""

    def __init__(self) -> None:
        self.tallies: dict[int, Tally] = {}

    def update(self, shard: int, tally: Tally) -> None:
        self.tallies[shard] = tally

    def all(self) -> list[Tally]:
        return list(self.tallies.values())


class ActorSlots:
    """:class:`runner.execution.gate.Slots` over a SlotGate actor (polls when all are held)."""

    def __init__(self, gate: Any, holder: str, *, ttl_s: float, poll_s: float = 0.02) -> None:
        self._gate, self._holder, self._ttl_s, self._poll_s = gate, holder, ttl_s, poll_s
        self._held: list[str] = []
        self._spare: list[str] = []  # adopted from this shard's previous worker

    async def start(self) -> None:
        self._spare = await self._gate.adopt.remote(self._holder, self._ttl_s)

    async def acquire(self) -> None:
        if self._spare:
            self._held.append(self._spare.pop())
            return
        while True:
            lease = await self._gate.acquire.remote(self._holder, self._ttl_s)
            if lease is not None:
                self._held.append(lease)
                return
            await anyio.sleep(self._poll_s)

    def release(self) -> None:
        self._gate.release.remote(self._held.pop())

    async def renew_forever(self) -> None:
        while True:
            await anyio.sleep(self._ttl_s / 3)
            await self._gate.renew.remote(self._holder, self._ttl_s)

    def close(self) -> None:
        for lease in self._held + self._spare:
            self._gate.release.remote(lease)
        self._held, self._spare = [], []


@ray.remote(num_cpus=SHARD_CPUS, max_restarts=0)
class ShardWorker:
    """Runs one shard to its end in this worker process."""

    async def run(
        self, config: RunConfig, ref: KeyRef, keys_file: Path | None, gate_name: str,
        board_name: str, ttl_s: float,
    ) -> tuple[Tally, int, str, list[str]]:  # fmt: skip
        # An async actor: this runs on the worker's asyncio loop (anyio runs on it as is).
        assert config.shard is not None
        shard = config.shard
        spec = await anyio.to_thread.run_sync(
            lambda: find_key(ref, environ=os.environ, keys_file=keys_file)
        )
        config = config.model_copy(update={"key": spec.key})
        slots = ActorSlots(ray.get_actor(gate_name, namespace=NAMESPACE), f"shard-{shard}",
                           ttl_s=ttl_s)  # fmt: skip
        await slots.start()
        board = ray.get_actor(board_name, namespace=NAMESPACE)
        hooks = Hooks(stream=io.StringIO(), handle_signals=False)
        gate = build_gate(config, spec, Budget(None), hooks, slots=slots)
        tallies: list[Tally] = []
        hooks = replace(hooks, gate=gate, on_tally=tallies.append)

        async def push() -> None:
            while True:
                await anyio.sleep(0.5)
                if tallies:
                    await board.update.remote(shard, _portable(tallies[0]))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(slots.renew_forever)
                tg.start_soon(push)
                report = await execute(config, hooks=hooks)
                tg.cancel_scope.cancel()
        finally:
            slots.close()
        tally = _portable(report.tally)
        await board.update.remote(shard, tally)
        return tally, report.exit_code, report.message, report.lines


def shard_call(
    config: RunConfig, shard: int, spec: KeySpec, board_name: str, ttl_s: float
) -> tuple[RunConfig, KeyRef, Path | None, str, str, float]:
    """The arguments of ``ShardWorker.run`` for ``shard``: everything but the key.

    They cross Ray's object store, so the config goes without its key, the key as its
    fingerprint and limits, and ``--keys-file`` as its path; the worker finds the key.
    """
    keys_file = None if config.keys_file is None else config.keys_file.resolve()
    wire = shard_config(config, shard, spec).model_copy(update={"key": None})
    return wire, spec.ref(), keys_file, gate_actor_name(spec.fingerprint), board_name, ttl_s


def gate_actor_name(fingerprint: str) -> str:
    """The named actor holding a key's slots."""
    return f"runner-gate-{fingerprint}"


def _portable(tally: Tally) -> Tally:
    """A copy of a tally without its callables (they do not cross processes)."""
    return replace(tally, redact=None, listener=None)


@dataclass(slots=True)
class RayRun:
    """The driver's view while shards run (what ``on_tick`` is shown)."""

    actors: dict[int, Any] = field(default_factory=dict)
    restarts: Counter[int] = field(default_factory=Counter)
    tallies: list[Tally] = field(default_factory=list)
    gates: dict[str, Any] = field(default_factory=dict)


def run_ray(
    config: RunConfig,
    *,
    address: str | None = None,
    workers: int | None = None,
    restarts: int = 3,
    lease_ttl_s: float = 30.0,
    stream: Any = None,
    on_tick: Callable[[RayRun], None] | None = None,
) -> RunReport:
    """Run the shards of ``config`` on Ray; one report. ``ray.init`` is called if needed."""
    if config.shards is None:
        raise UsageError("runner ray needs --shards N")
    if config.max_cost_usd is not None or config.max_total_cost_usd is not None:
        raise UsageError("--max-cost and --max-total-cost are not yet shared across Ray workers")
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False)
    picks, chosen = prepare(config)
    run = RayRun()
    tag = uuid.uuid4().hex[:8]
    for spec in chosen.values():
        if spec.fingerprint not in run.gates:
            limit = shard_config(config, 0, spec).in_flight_limit
            run.gates[spec.fingerprint] = SlotGate.options(  # type: ignore[attr-defined]
                name=gate_actor_name(spec.fingerprint), namespace=NAMESPACE,
                get_if_exists=True, lifetime="detached",
            ).remote(limit)  # fmt: skip
    board_name = f"runner-progress-{tag}"
    board = ProgressBoard.options(name=board_name, namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
    view = Tally(redact=config.redactor())
    progress = Progress(view, stream=stream, quiet=config.quiet, log_format=config.log_format)
    results: dict[int, tuple[Tally, int, str, list[str]]] = {}
    pending = deque(picks)
    running: dict[Any, int] = {}
    limit = workers or len(picks)

    def start(shard: int) -> None:
        spec = chosen[shard]
        actor = ShardWorker.remote()  # type: ignore[attr-defined]
        run.actors[shard] = actor
        ref = actor.run.remote(*shard_call(config, shard, spec, board_name, lease_ttl_s))
        running[ref] = shard

    try:
        while pending or running:
            while pending and len(running) < limit:
                start(pending.popleft())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            run.tallies = ray.get(board.all.remote())
            sum_tallies(run.tallies, into=view)
            progress.refresh()
            if on_tick is not None:
                on_tick(run)
            for ref in ready:
                shard = running.pop(ref)
                try:
                    results[shard] = ray.get(ref)
                    # A finished shard's actor would keep its half CPU: let the next one in.
                    ray.kill(run.actors.pop(shard))
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, UsageError):  # no key on that node, say
                        raise UsageError(f"shard {shard}: {exc.cause}") from None
                    raise
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    run.restarts[shard] += 1
                    if run.restarts[shard] > restarts:
                        raise
                    progress.say(f"shard {shard}: worker died; starting it again (resumes)")
                    pending.appendleft(shard)
    finally:
        for actor in run.actors.values():  # left running only when the run failed
            ray.kill(actor)
        progress.close()
    tallies = [results[k][0] for k in picks]
    reports = [
        RunReport(results[k][0], results[k][1], results[k][2],
                  shard_config(config, k, chosen[k]).run_dir, results[k][3])
        for k in picks
    ]  # fmt: skip
    return combine(config.run_dir, reports, sum_tallies(tallies, into=Tally()))
