"""Serving the emulator on loopback with uvicorn, optionally over self-signed TLS.

- :func:`serve` is the fixture API: ``async with serve(emulator, port=0) as served:``
  binds the socket first (so the port is known), starts uvicorn inside a task
  group via ``await tg.start(...)`` and yields only once it accepts connections.
- :func:`serve_main` is ``runner emulator serve``'s body (the CLI only forwards argv).

uvicorn runs on asyncio only, so the server half needs anyio's asyncio backend.
With ``tls=True`` a certificate for ``localhost`` and ``127.0.0.1`` is generated
with ``cryptography`` into a temporary directory; point ``SSL_CERT_FILE`` at
``served.cert_file`` and ``FAL_QUEUE_RUN_HOST`` at ``127.0.0.1:<port>`` to reach it
with the official client unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import uvicorn
from anyio.abc import TaskStatus
from pydantic import SecretStr

from runner.emulator.app import Emulator
from runner.emulator.breakage import QuietAborts
from runner.emulator.faults import parse_faults
from runner.emulator.settings import DEFAULT_KEY, EmulatorConfig, ServiceTime
from runner.errors import EXIT_OK, EXIT_USAGE, UsageError


@dataclass(frozen=True, slots=True)
class Served:
    """Where a running emulator answers."""

    base_url: str  # e.g. http://127.0.0.1:51234 (no trailing slash)
    host: str
    port: int
    cert_file: Path | None = None  # the self-signed certificate, with tls=True


def write_self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A fresh self-signed certificate and key for localhost/``host``: (cert, key) paths."""
    from cryptography import x509  # with tls=True only
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runner emulator")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt_names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "emulator-cert.pem", directory / "emulator-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _bind(host: str, port: int) -> socket.socket:
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on transports
    # whose socket says TCP. With Nagle on, a response written as headers then body waits
    # for the client's delayed ACK, and every keep-alive call took ~44 ms on loopback.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _run_uvicorn(
    server: uvicorn.Server, sock: socket.socket, *, task_status: TaskStatus[None]
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:
            if server.should_exit:
                raise UsageError("the emulator's server failed to start")
            await anyio.sleep(0.005)
        task_status.started()


@asynccontextmanager
async def serve(
    emulator: Emulator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: bool = False,
    log_level: str = "warning",
) -> AsyncIterator[Served]:
    """Run ``emulator`` (and its background task) behind uvicorn until the block exits."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietAborts) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(QuietAborts())
    with tempfile.TemporaryDirectory(prefix="runner-emulator-") as tmp:
        cert_file = key_file = None
        if tls:
            cert_file, key_file = write_self_signed(Path(tmp), host)
        sock = _bind(host, port)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            emulator.app,
            log_level=log_level,
            lifespan="off",
            ws="none",  # no WebSocket route: spares importing a websockets implementation
            timeout_graceful_shutdown=1,
            ssl_certfile=str(cert_file) if cert_file else None,
            ssl_keyfile=str(key_file) if key_file else None,
        )
        server = uvicorn.Server(config)
        scheme = "https" if tls else "http"
        url_host = f"[{host}]" if ":" in host else host
        try:
            async with emulator.running(), anyio.create_task_group() as tg:
                await tg.start(_run_uvicorn, server, sock)
                try:
                    yield Served(f"{scheme}://{url_host}:{bound_port}", host, bound_port, cert_file)
                finally:
                    server.should_exit = True
        finally:
            sock.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runner emulator serve",
        description="Serve a local fal queue emulator on loopback.",
    )
    a = p.add_argument
    a("--host", default="127.0.0.1",
      help="the address to listen on; loopback keeps it private (default 127.0.0.1)")  # fmt: skip
    a("--port", type=int, default=8787,
      help="the port to listen on; 0 picks a free one (default 8787)")  # fmt: skip
    a("--concurrency", type=int, default=4,
      help="the emulated account's slots: jobs IN_PROGRESS at once (default 4)")  # fmt: skip
    a("--time-scale", type=float, default=1.0,
      help="multiply every emulated duration, e.g. 0.01 for quick tests (default 1.0)")  # fmt: skip
    a("--service-s", type=float, default=None, metavar="S",
      help="every job runs S emulated seconds (default: by size and steps)")  # fmt: skip
    a("--faults", default="", metavar="SPEC",
      help='faults to inject, e.g. "submit_429=0.1,seed=7" (default none; see README)')  # fmt: skip
    a("--seed", type=int, default=0,
      help="seed for the generated images' seeds and for jitter (default 0)")  # fmt: skip
    a("--key", default=None,
      help=f"the FAL key the emulator accepts (default {DEFAULT_KEY!r})")  # fmt: skip
    a("--tls", action="store_true",
      help="serve https with a self-signed certificate (default plain http)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        key=SecretStr(args.key or DEFAULT_KEY),
        concurrency=args.concurrency,
        time_scale=args.time_scale,
        service=ServiceTime(fixed_s=args.service_s),
        faults=parse_faults(args.faults),
        seed=args.seed,
    )


def how_to_use(base_url: str, key: str | None, cert_file: object = None) -> list[str]:
    """What a run needs to use this emulator: the environment and the flags, exactly.

    Storage (``/rest``), the CDN (``/cdn``) and the Platform API (``/api``) follow a
    loopback queue URL by themselves, so ``--queue-url`` is the only flag.
    """
    shown_key = "<the --key you gave>" if key is not None else DEFAULT_KEY
    env = f"FAL_KEY='{shown_key}'"
    if cert_file is not None:
        env += f" SSL_CERT_FILE={cert_file}"
    jwks = f"{base_url}/rest/.well-known/jwks.json"
    return [
        "to run against it:",
        f"  {env} runner run MANIFEST --queue-url {base_url}",
        f"  (webhook mode also: --webhook-jwks-url {jwks} --webhook-url http://127.0.0.1:PORT/"
        " --webhook-listen 127.0.0.1:PORT)",
    ]


def serve_main(argv: list[str]) -> int:
    """``runner emulator serve [flags]``: serve until Ctrl-C. Returns an exit code."""
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> None:
        async with serve(Emulator(config), host=args.host, port=args.port, tls=args.tls) as s:
            print(f"fal queue emulator listening on {s.base_url}", flush=True)
            if args.key is None:
                print(f"accepting the default key: Authorization: Key {DEFAULT_KEY}", flush=True)
            if s.cert_file is not None:
                print(f"self-signed certificate: {s.cert_file}", flush=True)
            for line in how_to_use(s.base_url, args.key, s.cert_file):
                print(line, flush=True)
            await anyio.sleep_forever()

    try:
        anyio.run(main)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return EXIT_OK
