"""A sharded run's budget pool: where it lives, and what the shards' ledgers already spent.

:func:`open_pool` gives this process's pool (:class:`runner.execution.spend.LocalPool`), or,
with ``--gate-dir`` and a cap, a book every process on the run directory shares
(:class:`runner.execution.spendfile.FilePool`: about 1 CPU ms a job, so not without a cap to
keep). With ``--max-total-cost`` it is seeded with each shard's spend so far, read from its
ledger as ``runner status`` reads it (:func:`ledger_priors`), so the total cap counts the
shards that are not running yet, not only those that are.
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
    capped = config.max_cost_usd is not None or config.max_total_cost_usd is not None
    if config.gate_dir is None or not capped:
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
