"""What a run takes besides its config: the edges a test (or a sharded run) injects.

Hooks         transport, clocks, sleep, randomness, output stream, shared parts
MAX_REQUESTS  queue calls in flight at once
USER_AGENT    what every call of the runner says it is
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import anyio

from runner import __version__
from runner.fal.retry import RetryPolicies

if TYPE_CHECKING:  # types only: `runner cancel` imports this module, not what a run needs
    import httpx

    from runner.execution.gate import AccountGate
    from runner.execution.interrupts import Interrupts
    from runner.execution.jobsource import JobSource
    from runner.execution.progress import Tally
    from runner.fal.storage import UploadSettings
    from runner.ledger.commits import CommitGroup
    from runner.media.sink import OutputSink

# Queue calls (submit, status, result, cancel) in flight at once. 16 measured best: CPU per
# 1,000 jobs 12.1 s -> 5.4 s at 32 jobs in flight (bench/README.md, "Bottlenecks").
MAX_REQUESTS = 16
USER_AGENT = f"runner/{__version__}"


@dataclass(slots=True)
class Hooks:
    """The edges a test injects: transport, clocks, sleep, randomness, output stream."""

    transport: httpx.AsyncBaseTransport | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    rng: random.Random = field(default_factory=random.Random)
    stream: TextIO | None = None
    handle_signals: bool = True
    upload_settings: UploadSettings | None = None  # e.g. a small multipart threshold
    sink: OutputSink | None = None  # where outputs are written (a full disk, in tests)
    # The one table of retry policies; tests shrink the waits, never the rules.
    policies: RetryPolicies = field(default_factory=RetryPolicies)
    # The account gate this run admits through (shared with other shards on the key);
    # None: the run's own slots, rate, budget and pacing.
    gate: AccountGate | None = None
    # Called with the run's tally once it exists (a sharded run's one progress view).
    on_tally: Callable[[Tally], None] | None = None
    # Ctrl-C presses shared with other runs (a process's shards): watched even when
    # handle_signals is False, for the same two-step stop.
    interrupts: Interrupts | None = None
    # Shared by a process's shards (None: the run's own): one reading of the manifest,
    # one TLS context (~0.04-0.3 CPU s each to build), commit rounds over their ledgers.
    jobs: JobSource | None = None
    ssl_context: ssl.SSLContext | None = None
    commits: CommitGroup | None = None
