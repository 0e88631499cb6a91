"""Shared pieces of the engine benchmarks: the emulator process, the two clients, the clocks.

- :class:`EmulatorProcess` runs ``python -m runner emulator serve`` in its own process on
  127.0.0.1 and reads its accounting (``GET /_emulator/stats``) and its CPU and memory
  from ``/proc``, so the emulator's work is never counted as the client's.
- :func:`run_runner` runs :func:`runner.execution.engine.execute` in this process;
  :func:`run_baseline` runs the official ``fal_client.AsyncClient`` the way fal's docs show
  (``submit`` then ``handle.get()`` under an ``asyncio.Semaphore``). Both return a
  :class:`ClientRun` with wall seconds and this process's CPU seconds (user + system, all threads).

Run the scripts from the repository root: ``python bench/run_all.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import fal_client  # noqa: E402
import fal_client.client  # noqa: E402
import httpx  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from runner.config import RunConfig  # noqa: E402
from runner.execution.engine import Hooks, execute  # noqa: E402
from runner.execution.summary import RunReport  # noqa: E402
from runner.fal.transport import open_transport  # noqa: E402

KEY = "emulator:local-key"
LORA = "fal-ai/flux-lora"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = resource.getpagesize()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_self_s() -> float:
    """CPU seconds (user + system) of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another live process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB of a live process."""
    now = peak = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return now, peak


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class EmulatorProcess:
    """``runner emulator serve`` in a child process on 127.0.0.1 (a context manager)."""

    def __init__(
        self,
        *,
        concurrency: int,
        time_scale: float,
        seed: int = 7,
        faults: str = "",
        retention_real_s: float = 3600.0,
        service_s: float | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable, "-m", "runner", "emulator", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--concurrency", str(concurrency),
            "--time-scale", repr(time_scale), "--seed", str(seed),
        ]  # fmt: skip
        if service_s is not None:  # every job the same emulated seconds
            argv += ["--service-s", repr(service_s)]
        # Results must outlive the run in real time: the default retention (3600 emulated
        # seconds) is 3.6 ms of real time at a time scale of 1e-6. The emulator forgets a
        # job once its retention has passed, so a shorter one keeps its memory flat.
        retention = f"result_retention_s={retention_real_s / time_scale!r}"
        argv += ["--faults", f"{faults},{retention}" if faults else retention]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.http = httpx.Client(base_url=self.base_url, timeout=120.0)

    def __enter__(self) -> EmulatorProcess:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"emulator did not start: {line!r}")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/_emulator/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset(self) -> None:
        self.http.post("/_emulator/reset").raise_for_status()

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def rss_mb(self) -> tuple[float, float]:
        return proc_rss_mb(self.proc.pid)


@dataclass(frozen=True, slots=True)
class ClientRun:
    """One client's run against the emulator: wall and CPU seconds, jobs done."""

    name: str
    jobs: int
    completed: int
    wall_s: float
    cpu_s: float
    report: RunReport | None = None

    @property
    def jobs_per_s(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_per_1000_s(self) -> float:
        return 1000 * self.cpu_s / max(self.completed, 1)


def write_jsonl(path: Path, rows: Iterator[Mapping[str, Any]]) -> int:
    count = 0
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
            count += 1
    return count


def tiny_rows(n: int, *, prefix: str = "r") -> Iterator[dict[str, Any]]:
    """``n`` flux-lora rows with 64x64 outputs (near-zero work for the emulator)."""
    for i in range(n):
        yield {
            "id": f"{prefix}{i}",
            "endpoint": LORA,
            "prompt": f"a tiny test image number {i}",
            "image_size": {"width": 64, "height": 64},
            "seed": i,
        }


# Sizes and steps whose emulated service time (0.5 s + 0.1 s * MP * steps, +/-20%) spreads
# over about 2-8 s: nominal 2.0 s (1 MP x 15 steps) to 6.75 s (1.25 MP x 50), mean 4.45 s.
REALISTIC_SHAPES: tuple[tuple[dict[str, int], int], ...] = (
    ({"width": 1024, "height": 1024}, 15),
    ({"width": 1024, "height": 768}, 28),
    ({"width": 1024, "height": 1024}, 28),
    ({"width": 1024, "height": 1024}, 40),
    ({"width": 1280, "height": 1024}, 40),
    ({"width": 1024, "height": 1280}, 50),
    ({"width": 1536, "height": 1024}, 40),
)


def realistic_rows(n: int, *, seed: int = 11, prefix: str = "j") -> Iterator[dict[str, Any]]:
    """``n`` flux-lora rows whose emulated service times spread over about 2-8 s."""
    rng = random.Random(seed)
    for i in range(n):
        size, steps = rng.choice(REALISTIC_SHAPES)
        yield {
            "id": f"{prefix}{i}",
            "endpoint": LORA,
            "prompt": f"product photo {i}",
            "image_size": size,
            "num_inference_steps": steps,
            "seed": i,
        }


def request_of(row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """What the baseline sends for a manifest row: (endpoint, arguments)."""
    args = {k: v for k, v in row.items() if k not in ("id", "endpoint")}
    return str(row["endpoint"]), args


def runner_config(
    manifest: Path, run_dir: Path, emulator: EmulatorProcess, *, concurrency: int, **extra: Any
) -> RunConfig:
    base = emulator.base_url
    values: dict[str, Any] = {
        "manifest": manifest,
        "run_dir": run_dir,
        "key": SecretStr(KEY),
        "queue_url": base,
        "rest_url": base + "/rest",
        "cdn_url": base + "/cdn",
        "webhook_jwks_url": base + "/rest/.well-known/jwks.json",
        "concurrency": concurrency,
        "download": False,
        "quiet": True,
        "emulator": True,  # lets webhook mode use its own local receiver URL
    }
    return RunConfig(**(values | extra))


def run_runner(
    name: str, config: RunConfig, jobs: int, *, httpcore_calls: bool = False
) -> ClientRun:
    """``execute(config)`` in this process; CPU is this process's delta (all threads).

    ``httpcore_calls``: the queue's one-shot calls on httpcore's pool (the transport every
    call used before the lean keep-alive one), injected as the run's one transport."""
    transport = None
    if httpcore_calls:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        transport = open_transport(config.queue_url, limits=limits)
    hooks = Hooks(stream=io.StringIO(), handle_signals=False, transport=transport)

    async def go() -> RunReport:
        return await execute(config, hooks=hooks)

    cpu0, t0 = cpu_self_s(), time.perf_counter()
    report = anyio.run(go)
    wall, cpu = time.perf_counter() - t0, cpu_self_s() - cpu0
    return ClientRun(name, jobs, report.tally.completed, wall, cpu, report)


def point_fal_client(emulator: EmulatorProcess) -> None:
    """Point the official client's module globals at the emulator (as its tests do)."""
    fal_client.client.QUEUE_URL_FORMAT = emulator.base_url + "/"
    fal_client.client.REST_URL = emulator.base_url + "/rest"
    fal_client.client.CDN_URL = emulator.base_url + "/cdn"


async def _baseline(
    requests: Sequence[tuple[str, dict[str, Any]]], concurrency: int, interval_s: float
) -> int:
    client = fal_client.AsyncClient(key=KEY)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(endpoint: str, arguments: dict[str, Any]) -> Any:
        async with semaphore:
            handle = await client.submit(endpoint, arguments=arguments)
            return await handle.get(interval=interval_s)

    try:
        results = await asyncio.gather(*(one(e, a) for e, a in requests))
    finally:
        await (await client._client).aclose()  # fal-client never closes the one it caches
    return sum(1 for r in results if isinstance(r, dict) and r.get("images"))


def run_baseline(
    name: str,
    emulator: EmulatorProcess,
    requests: Sequence[tuple[str, dict[str, Any]]],
    *,
    concurrency: int,
    interval_s: float = 0.1,
) -> ClientRun:
    """The official client as fal's docs show it; ``interval_s`` is handle.get's poll interval."""
    point_fal_client(emulator)
    cpu0, t0 = cpu_self_s(), time.perf_counter()
    done = asyncio.run(_baseline(requests, concurrency, interval_s))
    wall, cpu = time.perf_counter() - t0, cpu_self_s() - cpu0
    return ClientRun(name, len(requests), done, wall, cpu)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (what the README quotes)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass(frozen=True, slots=True)
class Phase:
    """One client's run plus what the emulator saw meanwhile."""

    run: ClientRun
    calls: dict[str, int]
    busy_s: float  # slot-seconds (clock) spent on this phase's jobs
    makespan_s: float  # first accepted submit to last finish (clock)
    emulator_cpu_s: float
    webhooks: dict[str, Any]

    @property
    def queue_calls(self) -> int:
        """Calls to the queue and storage APIs (the emulator's own /_emulator routes excluded)."""
        return sum(n for kind, n in self.calls.items() if kind != "emulator")

    def per_job(self, kind: str | None = None) -> float:
        n = self.queue_calls if kind is None else self.calls.get(kind, 0)
        return n / max(self.run.completed, 1)

    def bound_s(self, concurrency: int) -> float:
        """The makespan's lower bound: total service time over the slots."""
        return self.busy_s / concurrency


def measure(emu: EmulatorProcess, start: Callable[[], ClientRun]) -> Phase:
    """Reset the emulator's accounting, run one client, and read the accounting back."""
    emu.reset()
    first = emu.stats()  # reset keeps the slots' and webhooks' running totals
    before = first["slots"]["busy_s"]
    hooks0 = first.get("webhooks") or {}
    cpu0 = emu.cpu_s()
    run = start()
    cpu = emu.cpu_s() - cpu0
    time.sleep(0.2)  # let the last webhooks land before counting
    stats = emu.stats()
    slots = stats["slots"]
    return Phase(
        run=run,
        calls={k: int(v) for k, v in stats["calls"].items()},
        busy_s=float(slots["busy_s"]) - float(before),
        makespan_s=float(slots["makespan_s"]),
        emulator_cpu_s=cpu,
        webhooks={k: v - hooks0.get(k, 0) for k, v in (stats.get("webhooks") or {}).items()},
    )
