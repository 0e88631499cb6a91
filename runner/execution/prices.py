"""Which prices a run or a plan uses: ``--prices`` wins, then the account's own prices
from fal's Platform API, then the built-in table.

fal says an account's prices may differ from the public ones ("custom pricing or discounts"),
so with a key the pricing endpoint is asked once; without access (a key or plan that may not
read it, no network), the built-in table is used and the caller is told once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
from pydantic import SecretStr

from runner.endpoints.catalog import CATALOG
from runner.endpoints.cost import PriceTable
from runner.endpoints.money import MONEY_SCALE
from runner.errors import PlatformUnavailableError, ProtocolError
from runner.fal.history import HistoryClient
from runner.fal.retry import RetryPolicy
from runner.fal.transport import open_transport

# A plan asks once and does not wait long: the table is a fine answer when fal is far.
PLAN_POLICY = RetryPolicy(attempts=2, timeout_s=10.0)


async def price_table(
    history: HistoryClient | None, price_file: Path | None, say: Callable[[str], None]
) -> PriceTable:
    """--prices wins; else the account's own prices, over the built-in table."""
    if price_file is not None:
        return PriceTable.from_file(price_file)
    table = PriceTable.default()
    if history is None:
        return table
    try:
        found = await history.prices(sorted(CATALOG))
    except (PlatformUnavailableError, ProtocolError) as exc:
        say(f"the account's prices cannot be read ({str(exc)[:200]}): using the built-in table")
        return table
    if not found:
        return table
    unit_prices = {k: p.unit_price for k, p in found.items()}
    for endpoint in table.unrecordable(unit_prices):
        say(
            f"the account's price for {endpoint} ({unit_prices[endpoint]}) has more decimal "
            f"places than the ledger keeps ({MONEY_SCALE}): using the built-in price"
        )
    today = datetime.now(UTC).date().isoformat()
    return table.with_account_prices(unit_prices, date=today)


async def plan_prices(
    api_url: str, key: SecretStr | None, price_file: Path | None, say: Callable[[str], None]
) -> PriceTable:
    """The prices ``runner plan`` uses: the account's when a key is set."""
    if price_file is not None or key is None:
        return await price_table(None, price_file, say)
    transport = open_transport(api_url, limits=httpx.Limits(max_connections=2))
    async with transport:
        history = HistoryClient(transport, api_url=api_url, key=key, policy=PLAN_POLICY)
        return await price_table(history, None, say)


class SharedPrices:
    """One price table for every shard on a key: the first shard asks fal, the rest wait
    for its answer (a sharded run in one process asked once per shard before)."""

    def __init__(self) -> None:
        self._table: PriceTable | None = None
        self._lock: anyio.Lock | None = None

    async def get(self, fetch: Callable[[], Awaitable[PriceTable]]) -> PriceTable:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._table is None:
                self._table = await fetch()
        return self._table
