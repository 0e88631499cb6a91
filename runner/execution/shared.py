"""What the workers of one run share, built once by the engine: the client, the recorder,
the strategy, the limits, the policies and the injected clock and sleep."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio

from runner.config import RunConfig
from runner.endpoints.cost import PriceTable
from runner.execution.completion import Pacing, Strategy
from runner.execution.progress import Tally
from runner.execution.ratelimit import AdaptiveRate
from runner.execution.reconcile import Reconciler
from runner.execution.recorder import Recorder
from runner.execution.reuse import Reuse
from runner.fal.client import QueueClient
from runner.fal.retry import RetryPolicies
from runner.ledger.schema import utcnow
from runner.manifest.jobs import Job
from runner.media.uploads import InputFailure

Resolve = Callable[[Job], Awaitable[Mapping[str, Any] | InputFailure]]


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
