"""What the workers of one run share, built once by the engine: the client, the recorder,
the strategy, the limits, the policies and the injected clock and sleep."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio

from runner.config import RunConfig
from runner.endpoints.cost import PriceTable
from runner.execution.completion import Pacing, Strategy
from runner.execution.progress import Tally
from runner.execution.ratelimit import AdaptiveRate
from runner.execution.reconcile import Reconciler
from runner.execution.recorder import Recorder
from runner.fal.client import QueueClient
from runner.fal.retry import RetryPolicies
from runner.ledger.schema import utcnow
from runner.manifest.jobs import Job
from runner.media.uploads import InputFailure

if TYPE_CHECKING:  # --cache only: the cache's modules load when a run uses one
    from runner.execution.reuse import Reuse

Resolve = Callable[[Job], Awaitable[Mapping[str, Any] | InputFailure]]


class NotSentError(Exception):
    """A job stopped before it sent anything (an interrupt): nothing to record or settle."""


class Unsent:
    """The jobs that have sent nothing yet: their uploads and waits for a rate token.

    On an interrupt they stop at once (:meth:`abandon`): nothing of theirs reached fal, so
    there is nothing to wait for or settle, and a stuck upload no longer holds Ctrl-C for
    its retries. A job already past its intent is waited for as before.
    """

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self.abandoned = False

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the body until it ends or :meth:`abandon`; then :class:`NotSentError`."""
        with anyio.CancelScope() as scope:
            if self.abandoned:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield
            finally:
                self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise NotSentError

    def abandon(self) -> None:
        self.abandoned = True
        for scope in list(self._scopes):
            scope.cancel()


@dataclass(slots=True)
class Shared:
    """Everything the workers of one run share; built once by the engine."""

    config: RunConfig
    client: QueueClient
    recorder: Recorder
    strategy: Strategy
    pacing: Pacing
    prices: PriceTable
    rate: AdaptiveRate
    tally: Tally
    input_sizes: Callable[[Job], list[tuple[int, int]]]
    lora_bytes: Callable[[Job], int | None] = lambda _job: None
    policies: RetryPolicies = field(default_factory=RetryPolicies)
    webhook_url: str | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    endpoint_limits: dict[str, anyio.CapacityLimiter] = field(default_factory=dict)
    on_change: Callable[[], None] = lambda: None
    resolve: Resolve | None = None  # local inputs -> URLs; None sends the payload as is
    reconciler: Reconciler | None = None  # --on-unknown reconcile: fal's history settles
    reuse: Reuse | None = None  # --cache: outputs of earlier runs, reused at $0
    now: Callable[[], datetime] = utcnow
    unsent: Unsent = field(default_factory=Unsent)
