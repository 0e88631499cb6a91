"""The emulator's one frozen configuration object, and its service-time model.

All durations are *emulated* seconds: the emulator multiplies each of them by
``time_scale`` before it waits or compares against its clock, so tests run a
hundred times faster at ``time_scale=0.01`` while every ratio stays the same.
Client-supplied durations (``X-Fal-Request-Timeout``) are scaled the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

from pydantic import SecretStr

from runner.emulator.faults import FaultConfig
from runner.errors import UsageError

DEFAULT_KEY = "emulator:local-key"


@dataclass(frozen=True, slots=True)
class ServiceTime:
    """How long a job runs: ``base_s + per_mp_step_s * MP * steps * num_images``.

    With the defaults a 1 MP, 28-step image takes about 3.3 s, close to what
    fal's FLUX endpoints take; ``jitter`` spreads it by up to +/- that fraction.
    ``fixed_s`` (when set) replaces the model, for tests that want exact times.
    """

    base_s: float = 0.5
    per_mp_step_s: float = 0.1
    jitter: float = 0.2
    fixed_s: float | None = None

    def seconds(self, *, megapixels: float, steps: int, num_images: int, u: float) -> float:
        """Emulated service time; ``u`` in [0, 1) is the job's jitter draw."""
        if self.fixed_s is not None:
            return self.fixed_s
        nominal = self.base_s + self.per_mp_step_s * megapixels * steps * num_images
        return nominal * (1.0 + self.jitter * (2.0 * u - 1.0))


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything the emulator needs; built once (by the CLI or a test) and passed down.

    The defaults suit the demo: 4 slots at real-time speed finish ~20 small jobs
    in well under a minute while queue positions and progress stay visible.

    The request history (the Platform API's ``requests/by-endpoint``) keeps each request
    ``history_retention_s`` (emulated; fal keeps payloads 30 days) after it was sent, and
    at most ``history_max_items`` requests, the oldest dropped first: an emulator limit,
    not fal's. ``account_prices`` are the account's custom unit prices by endpoint id:
    they win over the price table, both in ``/api/v1/models/pricing`` and in billing.
    """

    key: SecretStr = field(default_factory=lambda: SecretStr(DEFAULT_KEY))
    concurrency: int = 4
    time_scale: float = 1.0
    service: ServiceTime = field(default_factory=ServiceTime)
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    result_retention_s: float = 3600.0
    keepalive_s: float = 15.0
    user_id: str = "emulator-user"
    history_retention_s: float = 30 * 86_400.0
    history_max_items: int = 200_000
    account_prices: Mapping[str, Decimal] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.time_scale <= 0:
            raise UsageError(f"time scale must be positive, got {self.time_scale}")
        if self.history_retention_s < 0:
            raise UsageError(f"history retention must be 0 or more, got {self.history_retention_s}")
        if self.history_max_items < 1:
            raise UsageError(f"history_max_items must be at least 1, got {self.history_max_items}")
        prices = MappingProxyType(dict(self.account_prices))
        for endpoint, usd in prices.items():
            if not isinstance(usd, Decimal) or not usd.is_finite() or usd < 0:
                raise UsageError(f"account price of {endpoint} must be a Decimal >= 0, got {usd!r}")
        object.__setattr__(self, "account_prices", prices)  # a caller's dict cannot change it

    def scaled(self, emulated_s: float) -> float:
        """Real (clock) seconds for an emulated duration."""
        return emulated_s * self.time_scale

    @property
    def retention_s(self) -> float:
        """How long (emulated) a finished result stays readable."""
        override = self.faults.result_retention_s
        return self.result_retention_s if override is None else override
