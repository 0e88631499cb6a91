"""``runner ray``: shards as Ray actors (half a CPU each), gates as named actors.

    run_ray(config, address=..., workers=N)
      prepare the sharded run directory (runner.scale.shards.prepare) on the shared fs
      one SlotGate actor per key, named ``runner-gate-<fingerprint>`` (leases with a TTL,
        the key's AIMD level); one SpendActor for the run's budget (runner.scale.ray_gate)
      one ProgressBoard actor: each shard pushes its tally and messages there; the driver
        shows the sum, and the messages prefixed with their shard
      keep at most N ShardWorker actors running; each runs one shard to its end with
        runner.execution.engine.execute, admitting through its key's gate actor and the
        run's budget actor
      a shard whose worker dies is started again (up to ``restarts`` times): it resumes
        from its own ledger and adopts the leases its previous worker still held
      at the end (or a failure) the actors this run created are killed: none outlives it

No key travels through Ray (its task arguments pass through the object store and the GCS,
which can spill to disk under /tmp/ray): a shard's worker is sent its config without the key,
the key's fingerprint and limits (:class:`runner.scale.keys.KeyRef`) and the path of
``--keys-file``, and finds the key on its own machine, in ``FAL_KEY`` or that file
(:func:`shard_call`, :func:`runner.scale.keys.find_key`).

The ledger, not Ray, decides what is sent again: Ray only restarts a shard, whose run
re-attaches or reconciles what its ledger left in flight. A dead worker's leases expire
after ``lease_ttl_s`` unless its shard's next worker adopts them first.

Only this module and :mod:`runner.scale.ray_gate` import ``ray`` (the optional extra
``runner[ray]``), and nothing imports them except the ``ray`` command.
"""

from __future__ import annotations

import os
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
from runner.execution.budget import Caps
from runner.execution.engine import Hooks, execute
from runner.execution.progress import Progress, Tally
from runner.execution.spend import PooledSpend
from runner.execution.summary import RunReport
from runner.scale.keys import KeyRef, KeySpec, find_key
from runner.scale.ray_gate import (
    NAMESPACE,
    ActorLevel,
    ActorPool,
    ActorSlots,
    Message,
    ProgressBoard,
    SlotGate,
    SpendActor,
)
from runner.scale.shardlog import Relay, ShardLines
from runner.scale.shards import build_gate, combine, prepare, shard_config, sum_tallies
from runner.scale.spending import ledger_priors

SHARD_CPUS = 0.5


@ray.remote(num_cpus=SHARD_CPUS, max_restarts=0)
class ShardWorker:
    """Runs one shard to its end in this worker process."""

    async def run(
        self, config: RunConfig, ref: KeyRef, keys_file: Path | None, gate_name: str,
        names: tuple[str, str], ttl_s: float,
    ) -> tuple[Tally, int, str, list[str]]:  # fmt: skip
        # An async actor: this runs on the worker's asyncio loop (anyio runs on it as is).
        assert config.shard is not None
        shard = config.shard
        spec = await anyio.to_thread.run_sync(
            lambda: find_key(ref, environ=os.environ, keys_file=keys_file)
        )
        config = config.model_copy(update={"key": spec.key})
        gate_actor = ray.get_actor(gate_name, namespace=NAMESPACE)
        slots = ActorSlots(gate_actor, f"shard-{shard}", ttl_s=ttl_s)
        level = ActorLevel(gate_actor)
        await slots.start()
        budget_name, board_name = names
        pool = ActorPool(ray.get_actor(budget_name, namespace=NAMESPACE))
        spend = PooledSpend(pool, Caps(config.max_cost_usd, config.max_total_cost_usd), shard=shard)
        board = ray.get_actor(board_name, namespace=NAMESPACE)
        messages: list[Message] = []
        relay = Relay(lambda text: messages.append(("say", text)),
                      lambda *failure: messages.append(("failure", *failure)))  # fmt: skip
        hooks = Hooks(stream=ShardLines(shard, relay), handle_signals=False)
        gate = build_gate(config, spec, spend, hooks, slots=slots, level=level)
        assert gate.lost is not None  # the key's slots held for lost jobs: marked in the actor
        gate.lost.mark, slots.on_all_lost = slots.hold_lost, gate.lost.stop_all
        tallies: list[Tally] = []
        hooks = replace(hooks, gate=gate, on_tally=tallies.append)

        async def push() -> None:
            while True:
                await anyio.sleep(0.5)
                if tallies:
                    sent, messages[:] = list(messages), []
                    await board.update.remote(shard, _portable(tallies[0]), sent)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(slots.renew_forever)
                tg.start_soon(level.refresh_forever)
                tg.start_soon(push)
                report = await execute(config, hooks=hooks)
                tg.cancel_scope.cancel()
        finally:
            slots.close()
        tally = _portable(report.tally)
        await board.update.remote(shard, tally, list(messages))
        return tally, report.exit_code, report.message, report.lines


def shard_call(
    config: RunConfig, shard: int, spec: KeySpec, names: tuple[str, str], ttl_s: float
) -> tuple[RunConfig, KeyRef, Path | None, str, tuple[str, str], float]:
    """The arguments of ``ShardWorker.run`` for ``shard``: everything but the key.

    They cross Ray's object store, so the config goes without its key, the key as its
    fingerprint and limits, and ``--keys-file`` as its path; the worker finds the key.
    """
    keys_file = None if config.keys_file is None else config.keys_file.resolve()
    wire = shard_config(config, shard, spec).model_copy(update={"key": None})
    return wire, spec.ref(), keys_file, gate_actor_name(spec.fingerprint), names, ttl_s


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
    budget: Any = None  # the SpendActor
    created: list[Any] = field(default_factory=list)  # killed at the end


def _gate(run: RayRun, name: str, limit: int) -> Any:
    """The key's gate actor: another run's on this cluster if there is one, else a new one,
    owned by this driver (it dies with it) and killed when this run ends."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    gate = SlotGate.options(  # type: ignore[attr-defined]
        name=name, namespace=NAMESPACE, get_if_exists=True
    ).remote(limit)
    run.created.append(gate)
    return gate


def _replay(messages: list[Message], progress: Progress, view: Tally) -> None:
    for kind, *fields in messages:
        if kind == "say":
            progress.say(fields[0])
        elif view.listener is not None:  # a failure, shown as JSON lines show them
            view.listener(*fields)


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
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False)
    picks, chosen = prepare(config)
    run = RayRun()
    tag = uuid.uuid4().hex[:8]
    names = (f"runner-budget-{tag}", f"runner-progress-{tag}")
    try:
        for spec in chosen.values():
            if spec.fingerprint not in run.gates:
                limit = shard_config(config, 0, spec).in_flight_limit
                run.gates[spec.fingerprint] = _gate(run, gate_actor_name(spec.fingerprint), limit)
        run.budget = SpendActor.options(name=names[0], namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
        board = ProgressBoard.options(name=names[1], namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
        run.created += [run.budget, board]
        if config.max_total_cost_usd is not None:  # shards not started yet count too
            ray.get(run.budget.seed.remote(ledger_priors(config)))
        results = _drive(
            config, run, board, names, picks, chosen, workers=workers, restarts=restarts,
            ttl_s=lease_ttl_s, stream=stream, on_tick=on_tick,
        )  # fmt: skip
    finally:
        for actor in [*run.actors.values(), *run.created]:  # none outlives the run
            ray.kill(actor)
    tallies = [results[k][0] for k in picks]
    reports = [
        RunReport(results[k][0], results[k][1], results[k][2],
                  shard_config(config, k, chosen[k]).run_dir, results[k][3])
        for k in picks
    ]  # fmt: skip
    return combine(config.run_dir, reports, sum_tallies(tallies, into=Tally()))


def _drive(
    config: RunConfig, run: RayRun, board: Any, names: tuple[str, str], picks: list[int],
    chosen: dict[int, KeySpec], *, workers: int | None, restarts: int, ttl_s: float,
    stream: Any, on_tick: Callable[[RayRun], None] | None,
) -> dict[int, tuple[Tally, int, str, list[str]]]:  # fmt: skip
    """Keep at most ``workers`` shards running until all are done; restart the dead."""
    view = Tally(redact=config.redactor())
    progress = Progress(view, stream=stream, quiet=config.quiet, log_format=config.log_format)
    results: dict[int, tuple[Tally, int, str, list[str]]] = {}
    pending = deque(picks)
    running: dict[Any, int] = {}
    limit = workers or len(picks)

    def start(shard: int) -> None:
        actor = ShardWorker.remote()  # type: ignore[attr-defined]
        run.actors[shard] = actor
        ref = actor.run.remote(*shard_call(config, shard, chosen[shard], names, ttl_s))
        running[ref] = shard

    try:
        while pending or running:
            while pending and len(running) < limit:
                start(pending.popleft())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            run.tallies, messages = ray.get(board.all.remote())
            _replay(messages, progress, view)
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
        _replay(ray.get(board.all.remote())[1], progress, view)
    finally:
        progress.close()
    return results
