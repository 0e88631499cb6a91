"""Start-up: ``runner --help`` and 10-job runs, each in a fresh process, beside fal-client's.

    PYTHONPATH=. python bench/bench_startup.py [--repeat 5]

Prints, for each, the best and median wall seconds and CPU seconds (user + system, from
``os.wait4``: the child's own rusage, every thread) over ``--repeat`` runs, interleaved, and
which heavy packages ``--help`` imported. Each run is 10 jobs of 64x64 at a time scale of 1e-6
(``--no-download``), so nearly all of its CPU is the fixed cost of a run: the interpreter,
imports, the price table, run.json, the ledger's open, checkpoint and close, the summary.

- ``runner run --queue-url`` (10 jobs, emulator process): the runner as it runs against fal,
  the emulator in its own process (``runner emulator serve``, not counted). This is the
  figure issue 18 goal 4 asks for (a 10-job run's fixed CPU at most 0.5 s).
- ``fal-client`` (10 jobs, same emulator): the official client's ``submit`` + ``handle.get()``
  for the same 10 requests under a semaphore of the emulator's slots, in a fresh process that
  imports it (``bench_overhead.py`` points it at the emulator the same way).
- ``runner run --emulator`` (10 jobs, embedded): the demo, whose emulator (uvicorn, starlette,
  Pillow) starts and runs inside the measured process, so it counts.

``--tls``: the emulator process serves https with a self-signed certificate, and both
clients trust ``SSL_CERT_FILE`` = certifi's bundle plus that certificate, so each TLS context
loads as many CA certificates as it does against fal (the ``--queue-url`` and fal-client rows).

The measured runner's modules are byte-compiled first (``compileall``), as a pip install
leaves them: this environment sets PYTHONDONTWRITEBYTECODE, and without the .pyc files every
run would compile ~100 modules again (~1 CPU s on a loaded machine).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEY = "emulator:local-key"
SLOTS = 2  # the emulator's slots = runner's default --concurrency = fal-client's semaphore
HEAVY = ("pyarrow", "numpy", "pandas", "pydantic", "httpx", "PIL", "runner.emulator",
         "runner.report", "runner.execution")  # fmt: skip
_PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['runner', '--help']\n"
    "try:\n    runpy.run_module('runner', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)
# fal-client's 10 jobs: argv = base URL, manifest (JSONL), slots.
_FAL_CLIENT = f"""
import asyncio, json, sys
import fal_client, fal_client.client
base, manifest, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
fal_client.client.QUEUE_URL_FORMAT = base + "/"
fal_client.client.REST_URL = base + "/rest"
fal_client.client.CDN_URL = base + "/cdn"
rows = [json.loads(line) for line in open(manifest)]
async def main():
    client = fal_client.AsyncClient(key={KEY!r})
    semaphore = asyncio.Semaphore(slots)
    async def one(arguments):
        async with semaphore:
            handle = await client.submit("fal-ai/flux-lora", arguments=arguments)
            return await handle.get()
    results = await asyncio.gather(*(one(row) for row in rows))
    assert all(r.get("images") for r in results), results
asyncio.run(main())
"""


def timed(
    argv: list[str], cwd: Path, repo: Path = REPO, extra_env: dict[str, str] | None = None
) -> tuple[float, float]:
    """(wall s, CPU s) of one child process; it must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(repo), **(extra_env or {})}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            err.seek(0)
            said = err.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(argv)} exited with status {status}:\n{said}")
    return wall, usage.ru_utime + usage.ru_stime


@contextmanager
def tls_emulator(tmp: Path, repo: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``runner emulator serve --tls``: its https URL, and the environment that trusts it."""
    import certifi

    argv = [sys.executable, "-m", "runner", "emulator", "serve", "--tls", "--host", "127.0.0.1",
            "--port", "0", "--concurrency", str(SLOTS), "--time-scale", "1e-6",
            "--faults", "result_retention_s=3.6e9"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        url = cert = None
        while cert is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the TLS emulator did not start")
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].strip()
            if line.startswith("self-signed certificate: "):
                cert = Path(line.split(": ", 1)[1].strip())
        assert url is not None
        bundle = tmp / "bundle.pem"
        bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + cert.read_bytes())
        yield url, {"SSL_CERT_FILE": str(bundle)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def row(name: str, samples: list[tuple[float, float]]) -> str:
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return (f"| {name} | {min(walls):.3f} | {statistics.median(walls):.3f} | "
            f"{min(cpus):.3f} | {statistics.median(cpus):.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the runner to measure")
    parser.add_argument("--tls", action="store_true", help="the emulator process over https")
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(REPO / "bench"))
    from common import EmulatorProcess, load_avg

    print(f"runner from {repo}; load average before: {load_avg()}")
    compileall.compile_dir(repo / "runner", quiet=1)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    # The current directory comes first on sys.path: run where the measured runner is.
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=repo,
                           capture_output=True, text=True, check=True)  # fmt: skip
    print(f"`runner --help` imports: {probe.stderr.strip() or 'none of ' + ', '.join(HEAVY)}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp,
        EmulatorProcess(concurrency=SLOTS, time_scale=1e-6) as emu,
        tls_emulator(Path(tmp), REPO) if args.tls else _plain(emu.base_url) as (base_url, trust),
    ):
        manifest = Path(tmp) / "ten.jsonl"
        lines = [{"prompt": f"a small test image {i}", "image_size": {"width": 64, "height": 64},
                  "num_inference_steps": 1} for i in range(10)]  # fmt: skip
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        runs = iter(range(1_000_000))
        common = [str(manifest), "--endpoint", "fal-ai/flux-lora", "--no-download", "--quiet"]

        def runner_run(*extra: str) -> list[str]:
            return [sys.executable, "-m", "runner", "run", *common, *extra,
                    "--ledger", f"{tmp}/run{next(runs)}"]  # fmt: skip

        cases: dict[str, tuple[Callable[[], list[str]], Path, dict[str, str]]] = {
            "runner --help": (lambda: [sys.executable, "-m", "runner", "--help"], repo, {}),
            "python -c pass": (lambda: [sys.executable, "-c", "pass"], REPO, {}),
            "runner run --queue-url (10 jobs, emulator process)": (
                lambda: runner_run("--queue-url", base_url), Path(tmp), {"FAL_KEY": KEY, **trust}),
            "fal-client (10 jobs, same emulator)": (
                lambda: [sys.executable, "-c", _FAL_CLIENT, base_url, str(manifest),
                         str(SLOTS)], Path(tmp), trust),
            "runner run --emulator (10 jobs, embedded)": (
                lambda: runner_run("--emulator", "--emulator-time-scale", "1e-6"), Path(tmp), {}),
        }  # fmt: skip
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(args.repeat):  # interleaved: a change in load hits every row alike
            for name, (argv, cwd, extra_env) in cases.items():
                samples[name].append(timed(argv(), cwd, repo, extra_env))
    print("| command | best wall s | median wall s | best CPU s | median CPU s |")
    print("| --- | --- | --- | --- | --- |")
    for name, got in samples.items():
        print(row(name, got))
    print(f"load average after: {load_avg()}")


@contextmanager
def _plain(url: str) -> Iterator[tuple[str, dict[str, str]]]:
    yield url, {}


if __name__ == "__main__":
    main()
