"""Run a sharded run directory's shards in this process, each key's shards behind one gate.

    execute_sharded(config)
      refuse another shard count than run.json's; write the top run.json
      pick each shard's key (the one its ledger recorded, else shard mod keys)
      one AccountGate per key: slots (in-process, or file-lock leases with --gate-dir),
        rate with AIMD (its level in a file with --gate-dir), pacing
      one budget pool for the invocation (with --gate-dir, a file every process on the run
        directory shares: runner.execution.spendfile); each shard's run its own handle on it
      one ManifestFeed: the manifest read once (and counted once), each job to its shard;
        one TLS context; one CommitGroup: the shards' ledgers fsync in shared rounds; one price
        table per key (on its gate)
      task group: every shard (or --shard K's) runs runner.execution.engine.execute on
        RUN_DIR/shards/K with only its jobs; one progress view over all their tallies;
        Ctrl-C counted once for all of them (the two-step stop of runner.execution.interrupts)

The shards' own progress lines go nowhere (the view here sums their tallies); their messages
and failures reach the view's stream, prefixed with the shard (runner.scale.shardlog).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx

from runner.config import RunConfig
from runner.errors import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    AuthError,
    UsageError,
)
from runner.execution.budget import Caps, Spend
from runner.execution.engine import Hooks, execute
from runner.execution.gate import AccountGate, LostSlots, Slots, local_gate
from runner.execution.interrupts import Interrupts, announce
from runner.execution.lease import FileSlots
from runner.execution.progress import Progress, Tally
from runner.execution.ratelimit import Level
from runner.execution.runmeta import manifest_fingerprint
from runner.execution.sharedrate import FileLevel
from runner.execution.spend import PooledSpend
from runner.execution.spendfile import FilePool
from runner.execution.summary import RunReport
from runner.ledger.commits import CommitGroup
from runner.ledger.inflight import in_flight_count
from runner.scale.feed import ManifestFeed
from runner.scale.keys import KeySpec, key_for_shard, load_keys
from runner.scale.layout import claim, recorded_keys, shard_dir
from runner.scale.shardlog import Relay, ShardLines
from runner.scale.spending import open_pool

# Worst exit first: the one a sharded run reports is the worst of its shards'.
_EXIT_ORDER = (EXIT_INTERRUPTED, EXIT_BUDGET, EXIT_JOBS_FAILED, EXIT_OK)


def run_keys(config: RunConfig) -> list[KeySpec]:
    """--keys-file's keys, else the one key of the config (FAL_KEY or the emulator's)."""
    if config.keys_file is not None:
        return load_keys(config.keys_file)
    if config.key is None:
        raise UsageError("FAL_KEY is not set (or use --keys-file, or --emulator)")
    return [KeySpec.of(config.key)]


def shard_config(config: RunConfig, shard: int, spec: KeySpec) -> RunConfig:
    """What shard ``shard`` runs: its own run directory, its jobs only, its key's limits."""
    return config.model_copy(
        update={
            "run_dir": shard_dir(config.run_dir, shard),
            "shard": shard,
            "key": spec.key,
            "concurrency": spec.concurrency or config.concurrency,
            "rate_per_s": spec.rate_per_s or config.rate_per_s,
            "keys_file": None,
        }
    )


def build_gate(
    config: RunConfig, spec: KeySpec, budget: Spend, hooks: Hooks, slots: Slots | None = None,
    level: Level | None = None,
) -> AccountGate:  # fmt: skip
    """The gate of one key: its slots and AIMD level (given, files under --gate-dir, or this
    process's own)."""
    keyed = shard_config(config, 0, spec)
    limit = keyed.in_flight_limit
    lost = LostSlots(limit)
    if config.gate_dir is not None:
        if slots is None:
            slots = FileSlots(config.gate_dir / spec.fingerprint, limit, sleep=hooks.sleep,
                              on_all_lost=lost.stop_all)  # fmt: skip
            lost.mark = slots.hold_lost
        if level is None:
            level = FileLevel(config.gate_dir / spec.fingerprint)
    return local_gate(
        fingerprint=spec.fingerprint, slots=slots or anyio.Semaphore(limit), limit=limit,
        concurrency=keyed.concurrency, rate_per_s=keyed.rate_per_s, budget=budget,
        clock=hooks.clock, sleep=hooks.sleep, level=level, lost=lost,
    )  # fmt: skip


def prepare(config: RunConfig) -> tuple[list[int], dict[int, KeySpec]]:
    """Check and write the sharded run directory; the shards to run and each one's key."""
    assert config.shards is not None
    claim(config, manifest_fingerprint(config.manifest))
    keys = run_keys(config)
    picks = [config.shard] if config.shard is not None else list(range(config.shards))
    recorded = recorded_keys(config.run_dir, config.shards)
    left = lambda k: in_flight_count(shard_dir(config.run_dir, k))  # noqa: E731
    changed = config.key_changed
    return picks, {
        k: key_for_shard(k, keys, recorded, in_flight=left, key_changed=changed) for k in picks
    }


async def execute_sharded(config: RunConfig, *, hooks: Hooks | None = None) -> RunReport:
    """Run the shards this invocation takes, all in this process; one report for them."""
    hooks = hooks or Hooks()
    picks, chosen = await anyio.to_thread.run_sync(prepare, config)
    caps = Caps(config.max_cost_usd, config.max_total_cost_usd)
    pool = await anyio.to_thread.run_sync(open_pool, config)
    gates: dict[str, AccountGate] = {}
    for spec in chosen.values():
        if spec.fingerprint not in gates:  # each shard's run gets its own budget handle
            gates[spec.fingerprint] = build_gate(config, spec, PooledSpend(pool, caps), hooks)
    tallies: list[Tally] = []
    reports: dict[int, RunReport] = {}
    feed = ManifestFeed(config, picks)  # the manifest read once for all of them
    tls = None if hooks.transport else await anyio.to_thread.run_sync(httpx.create_ssl_context)
    commits = CommitGroup()  # the shards' ledgers fsync in shared rounds
    view = Tally(redact=config.redactor())
    progress = Progress(view, stream=hooks.stream, quiet=config.quiet, log_format=config.log_format)
    relay = Relay(progress.say, view.listener)  # the listener: JSON failure events
    # Ctrl-C is counted once here and watched by every shard: the two-step stop, said once.
    interrupts = Interrupts(announce=False) if hooks.handle_signals else hooks.interrupts

    async def one(shard: int) -> None:
        spec = chosen[shard]
        gate = replace(gates[spec.fingerprint], budget=PooledSpend(pool, caps, shard=shard))
        shard_hooks = replace(
            hooks, gate=gate, handle_signals=False, interrupts=interrupts,
            stream=ShardLines(shard, relay), on_tally=tallies.append, jobs=feed.source(shard),
            ssl_context=tls, commits=commits,
        )  # fmt: skip
        try:
            reports[shard] = await execute(shard_config(config, shard, spec), hooks=shard_hooks)
        except AuthError as exc:
            raise exc.naming(spec.name) from None  # the keys file's line, not FAL_KEY

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_show, view, tallies, progress)
            if hooks.handle_signals and interrupts is not None:
                tg.start_soon(interrupts.from_signals)
                # The shards' jobs in flight now (the view is summed only when it draws).
                in_flight = lambda: sum(t.in_flight for t in tallies)  # noqa: E731
                tg.start_soon(announce, interrupts, in_flight, progress.say)
            tg.start_soon(feed.run)
            tg.start_soon(feed.run_count)
            async with anyio.create_task_group() as shards:
                for shard in picks:
                    shards.start_soon(one, shard)
            tg.cancel_scope.cancel()
    finally:
        commits.close()
        feed.close()
        for gate in gates.values():
            if isinstance(gate.slots, FileSlots):
                gate.slots.close()
        if isinstance(pool, FilePool):
            pool.close()
        sum_tallies(tallies, into=view)
        progress.close()
    return combine(config.run_dir, [reports[k] for k in picks], view)


async def _show(view: Tally, tallies: Sequence[Tally], progress: Progress) -> None:
    while True:
        if progress.due():  # summing 16 tallies twice a second for nothing cost ~1% CPU
            sum_tallies(tallies, into=view)
            progress.refresh()
        await anyio.sleep(0.5)


def sum_tallies(tallies: Sequence[Tally], *, into: Tally) -> Tally:
    """Add the shards' counts into one tally (the fields that are counts or dollars)."""
    for f in fields(Tally):
        if f.name in _NOT_SUMMED:
            continue
        values = [getattr(t, f.name) for t in tallies]
        total = _sum(values, getattr(into, f.name))
        if total is not None:
            setattr(into, f.name, total)
    into.examples = [e for t in tallies for e in t.examples][: into.max_examples]
    into.invalid_reasons = [r for t in tallies for r in t.invalid_reasons][: into.max_invalid_shown]
    return into


_NOT_SUMMED = frozenset(
    {"redact", "listener", "max_invalid_shown", "max_examples", "examples", "invalid_reasons"}
)


def _sum(values: list[Any], current: Any) -> Any:
    if isinstance(current, Counter):
        out: Counter[str] = Counter()
        for v in values:
            out.update(v)
        return out
    if isinstance(current, dict):
        merged: dict[str, int] = {}
        for v in values:
            for k, n in v.items():
                merged[k] = merged.get(k, 0) + n
        return merged
    if isinstance(current, int | Decimal) or current is None:
        known = [v for v in values if isinstance(v, int | Decimal) and not isinstance(v, bool)]
        if current is None and len(known) < len(values):
            return None  # a total not counted by every shard yet
        return sum(known, type(known[0])(0)) if known else current
    return None


def combine(run_dir: Path, reports: Sequence[RunReport], tally: Tally) -> RunReport:
    """One report for several shards: the worst exit, its message, every shard's lines."""
    worst = min(reports, key=lambda r: _EXIT_ORDER.index(r.exit_code)
                if r.exit_code in _EXIT_ORDER else 0)  # fmt: skip
    lines: list[str] = []
    for r in reports:
        lines.extend(f"shard {r.run_dir.name}: {line}" for line in r.lines)
    message = worst.message if len(reports) == 1 else f"{worst.message} ({len(reports)} shards)"
    return RunReport(tally, worst.exit_code, message, run_dir, lines)
