"""A sharded run's budget pool: where it lives, and what the shards' ledgers already spent.

open_pool(config)       this process's (runner.execution.spend.LocalPool), or with
                        --gate-dir a book every process on the run directory shares
                        (runner.execution.spendfile.FilePool)
ledger_priors(config)   with --max-total-cost, each shard's spend so far, read from its
                        ledger (as ``runner status`` reads it), so the total cap counts
                        the shards that are not running yet, not only those that are
"""

from __future__ import annotations

from decimal import Decimal

from runner.config import RunConfig
from runner.execution.spend import LocalPool, Pool
from runner.execution.spendfile import FilePool, book_dir
from runner.ledger.views import is_run_dir, status_summary
from runner.scale.layout import shard_dir


def open_pool(config: RunConfig) -> Pool:
    """The invocation's budget pool, seeded with the shards' earlier spend (when capped)."""
    pool: Pool
    if config.gate_dir is None:
        pool = LocalPool()
    else:
        pool = FilePool(book_dir(config.gate_dir, config.run_dir))
        pool.open()
    if config.max_total_cost_usd is not None:
        pool.seed(ledger_priors(config))
    return pool


def ledger_priors(config: RunConfig) -> dict[int, Decimal]:
    """What each shard's ledger says was spent, for the shards that spent anything."""
    assert config.shards is not None
    priors: dict[int, Decimal] = {}
    for shard in range(config.shards):
        directory = shard_dir(config.run_dir, shard)
        if is_run_dir(directory):
            spent = status_summary(directory).spent_usd
            if spent:
                priors[shard] = spent
    return priors
