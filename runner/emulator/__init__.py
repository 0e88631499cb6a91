"""A local fal queue: the runner's embedded default backend and its test bed.

It speaks fal's queue protocol (shared/spec/fal-queue.md) closely enough that the
official ``fal-client`` works against it unchanged, and it imports nothing from the
runner's client side (only ``catalog``, ``cost``, ``imageinfo`` and ``errors``), so a
client bug cannot be mirrored by the fake.

    settings  EmulatorConfig, ServiceTime: one frozen object
    faults    FaultConfig, parse_faults, FaultInjector: seeded, per-kind fault streams
    queue     QueueModel: pure, event-driven, advanced from an injected clock
    results   status/result JSON, logs, failure bodies
    stats     Stats: submits per canonical input, calls, slot time, billing
    app       Emulator: state + outcomes + background waker (``running()``)
    routes    the Starlette routes (queue, storage, CDN, JWKS, stats)
    history   RequestHistory: every accepted request, kept after the queue forgets it
    platform_api  fal's Platform API under /api: request history and prices
    breakage  broken answers for faults: nginx error pages, connections cut mid-answer
    server    serve() on loopback via uvicorn (+ self-signed TLS), serve_main for the CLI
    images, filestore, webhooks: outputs/CDN, uploads, signed webhook delivery
    rendering the pictures: a function of (seed, request, index), black when flagged

Typical use in a test::

    emulator = Emulator(EmulatorConfig(time_scale=0.01), clock=fake_clock)
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
        ...
"""

from runner.emulator.app import Emulator
from runner.emulator.faults import FaultConfig, Trigger, parse_faults
from runner.emulator.server import Served, serve, serve_main
from runner.emulator.settings import DEFAULT_KEY, EmulatorConfig, ServiceTime

__all__ = [
    "DEFAULT_KEY",
    "Emulator",
    "EmulatorConfig",
    "FaultConfig",
    "Served",
    "ServiceTime",
    "Trigger",
    "parse_faults",
    "serve",
    "serve_main",
]
