"""Prices as data and pure Decimal cost arithmetic.

Prices come from ``runner/data/prices.json`` (source, date and confidence per endpoint) and
may be overridden per endpoint by a user file of the same shape. Billing unit: one megapixel
is 1,048,576 px and each image is rounded *up* to whole megapixels (seed 004: 1024x768 bills
as 1 MP, 1920x1080 as 2 MP). Units:

- ``output_mp``: price x sum of each output image's rounded MP.
- ``image``: price x number of output images.
- ``input_output_mp``: price x (each input image's rounded MP, once per request, plus each
  output image's rounded MP).

A FLUX.2 LoRA surcharge multiplies the whole charge by a tier of the total LoRA file size;
an estimate that does not know that size counts the largest tier, so a cost cap holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.endpoints.catalog import BaseRequest, num_outputs, output_size
from runner.endpoints.money import MONEY_SCALE, decimal_places, trim_usd
from runner.errors import UsageError

MEGAPIXEL_PX = 1_048_576
Unit = Literal["output_mp", "image", "input_output_mp"]
Confidence = Literal["confirmed", "unconfirmed"]
_SIZING_FIELDS = ("image_url", "image_urls")  # inputs that are billed; a mask is not


def megapixels(width: int, height: int) -> int:
    """Billed megapixels of one image: ceil(w*h / 1,048,576)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return -(-(width * height) // MEGAPIXEL_PX)


@dataclass(frozen=True, slots=True)
class SurchargeTier:
    above_gb: Decimal
    multiplier: Decimal


@dataclass(frozen=True, slots=True)
class LoraSurcharge:
    """Multiplier by total LoRA file size; tiers apply strictly above ``above_gb``."""

    tiers: tuple[SurchargeTier, ...]
    max_gb: Decimal
    gb_bytes: int

    def multiplier(self, lora_bytes: int) -> Decimal | None:
        """The multiplier for this many bytes of LoRA files; None above ``max_gb``."""
        gb = Decimal(lora_bytes) / self.gb_bytes
        if gb > self.max_gb:
            return None
        factor = Decimal(1)
        for tier in sorted(self.tiers, key=lambda t: t.above_gb):
            if gb > tier.above_gb:
                factor = tier.multiplier
        return factor

    @property
    def highest(self) -> Decimal:
        """The largest multiplier any allowed size can get (1 below the first tier)."""
        return max((Decimal(1), *(t.multiplier for t in self.tiers)))


@dataclass(frozen=True, slots=True)
class Price:
    endpoint: str
    usd: Decimal
    unit: Unit
    source: str
    date: str
    confidence: Confidence
    lora_surcharge: LoraSurcharge | None = None


# The file's shape. Every field is optional so that an override can change only `usd`;
# the packaged file is checked for completeness separately.
class _TierDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    above_gb: Decimal = Field(ge=0)
    multiplier: Decimal = Field(gt=0)


class _SurchargeDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tiers: list[_TierDoc]
    max_gb: Decimal = Field(gt=0)
    gb_bytes: int = Field(default=1_000_000_000, gt=0)


class _PriceDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    usd: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)
    unit: Unit | None = None
    source: str | None = None
    date: str | None = None
    confidence: Confidence | None = None
    lora_surcharge: _SurchargeDoc | None = None


class _FileDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str | None = None
    endpoints: dict[str, _PriceDoc]


ACCOUNT_PRICE_SOURCE = "account price (fal Platform API)"


class PriceTable:
    """Prices by endpoint id. Immutable once built."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)

    @classmethod
    def default(cls) -> PriceTable:
        """The packaged prices (runner/data/prices.json)."""
        return _packaged()

    @classmethod
    def from_file(cls, path: Path, *, base: PriceTable | None = None) -> PriceTable:
        """``base`` (default: the packaged table) with the endpoints ``path`` lists replaced.

        An entry may give only some fields; the rest come from the base entry, except
        ``source`` (defaults to the file's name) and ``date`` (the file's modification date).
        Raises UsageError naming the file on unreadable or malformed content.
        """
        base = base if base is not None else cls.default()
        try:
            text = path.read_text(encoding="utf-8")
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC).date().isoformat()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"price file {path}: cannot read it ({exc})") from exc
        doc = _parse(text, f"price file {path}")
        merged = dict(base._prices)
        for endpoint, entry in doc.endpoints.items():
            merged[endpoint] = _merge(endpoint, entry, base.get(endpoint), path, mtime)
        return cls(merged)

    def with_account_prices(self, unit_prices: Mapping[str, Decimal], *, date: str) -> PriceTable:
        """This table with the account's own unit prices (fal's pricing endpoint) in place.

        fal lists FLUX prices per ``image`` while billing per megapixel, so a unit price is
        read as the price of one billed unit of the entry it replaces (one megapixel): an
        assumption, kept here and in the README. Endpoints the table does not know are
        left out (their billing rules are unknown), and so are prices of more decimal places
        than the ledger keeps (:meth:`unrecordable`: the caller says so).
        """
        merged = dict(self._prices)
        for endpoint, usd in unit_prices.items():
            old = merged.get(endpoint)
            if old is None or not recordable(usd, old.lora_surcharge):
                continue
            merged[endpoint] = Price(
                endpoint, usd, old.unit, ACCOUNT_PRICE_SOURCE, date, "confirmed",
                old.lora_surcharge,
            )  # fmt: skip
        return PriceTable(merged)

    def unrecordable(self, unit_prices: Mapping[str, Decimal]) -> list[str]:
        """The endpoints of this table whose account price ``unit_prices`` gives has more
        decimal places than the ledger keeps (counting the LoRA multiplier's): left out by
        :meth:`with_account_prices`."""
        return [
            endpoint
            for endpoint, usd in unit_prices.items()
            if (old := self._prices.get(endpoint)) is not None
            and not recordable(usd, old.lora_surcharge)
        ]

    def get(self, endpoint: str) -> Price | None:
        return self._prices.get(endpoint)

    def __iter__(self) -> Iterator[Price]:
        return iter(self._prices.values())

    def __len__(self) -> int:
        return len(self._prices)


def _parse(text: str, what: str) -> _FileDoc:
    try:
        raw = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what}: not valid JSON: {exc}") from exc
    try:
        return _FileDoc.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise UsageError(f"{what}: {where}: {first['msg']}") from exc


def recordable(usd: Decimal, surcharge: LoraSurcharge | None) -> bool:
    """Whether every estimate at ``usd`` fits the ledger's money scale: an estimate is the
    price times whole units and the LoRA multiplier, so their decimal places add up."""
    factors = [t.multiplier for t in surcharge.tiers] if surcharge else []
    places = decimal_places(usd) + max(map(decimal_places, factors), default=0)
    return places <= MONEY_SCALE


def _surcharge(doc: _SurchargeDoc) -> LoraSurcharge:
    tiers = tuple(SurchargeTier(t.above_gb, t.multiplier) for t in doc.tiers)
    return LoraSurcharge(tiers, doc.max_gb, doc.gb_bytes)


def _merge(endpoint: str, doc: _PriceDoc, old: Price | None, path: Path, mtime: str) -> Price:
    if doc.usd is None:
        raise UsageError(f"price file {path}: endpoints.{endpoint}.usd is required")
    unit = doc.unit or (old.unit if old else None)
    if unit is None:
        raise UsageError(
            f"price file {path}: endpoints.{endpoint}.unit is required for a new endpoint"
        )
    if "lora_surcharge" in doc.model_fields_set:
        surcharge = _surcharge(doc.lora_surcharge) if doc.lora_surcharge else None
    else:
        surcharge = old.lora_surcharge if old else None
    if not recordable(doc.usd, surcharge):
        # An estimate is the price times whole units and the LoRA multiplier: past the
        # ledger's scale it could not be recorded (a traceback at the first job, before).
        raise UsageError(
            f"price file {path}: endpoints.{endpoint}.usd={doc.usd} has more decimal places "
            f"than the ledger keeps ({MONEY_SCALE}, counting the LoRA multiplier's)"
        )
    return Price(
        endpoint=endpoint,
        usd=trim_usd(doc.usd),
        unit=unit,
        source=doc.source or f"price file {path.name}",
        date=doc.date or mtime,
        # The user supplies the figure, so it counts as confirmed unless the file says otherwise.
        confidence=doc.confidence or "confirmed",
        lora_surcharge=surcharge,
    )


@cache
def _packaged() -> PriceTable:
    text = resources.files("runner").joinpath("data/prices.json").read_text(encoding="utf-8")
    doc = _parse(text, "packaged prices.json")
    prices: dict[str, Price] = {}
    for endpoint, e in doc.endpoints.items():
        if e.usd is None or e.unit is None or not (e.source and e.date and e.confidence):
            raise UsageError(f"packaged prices.json: {endpoint} is incomplete")
        surcharge = _surcharge(e.lora_surcharge) if e.lora_surcharge else None
        prices[endpoint] = Price(endpoint, e.usd, e.unit, e.source, e.date, e.confidence, surcharge)
    return PriceTable(prices)


@dataclass(frozen=True, slots=True)
class Estimate:
    """The expected charge of one job (one call, ``images`` outputs)."""

    usd: Decimal | None  # None: no price, or the request cannot be billed
    images: int
    megapixels: int  # output MP (rounded per image), plus input MP where inputs are billed
    approximate: bool
    unconfirmed: bool
    notes: tuple[str, ...] = ()
    price_source: str | None = None  # where the unit price came from (recorded per job)


def billed_cost(
    endpoint: str,
    outputs: Sequence[tuple[int, int]],
    prices: PriceTable,
    *,
    input_sizes: Sequence[tuple[int, int]] = (),
    lora_bytes: int | None = None,
) -> Decimal | None:
    """What a finished call costs, from its actual output sizes.

    ``lora_bytes`` is the total size of the LoRA files the call used (None: none or unknown,
    no surcharge). None when there is no price or the LoRAs exceed the endpoint's maximum.
    """
    price = prices.get(endpoint)
    if price is None:
        return None
    factor = Decimal(1)
    if price.lora_surcharge is not None and lora_bytes is not None:
        found = price.lora_surcharge.multiplier(lora_bytes)
        if found is None:
            return None
        factor = found
    out_mp = sum(megapixels(w, h) for w, h in outputs)
    in_mp = sum(megapixels(w, h) for w, h in input_sizes)
    return _charge(price, len(outputs), out_mp, in_mp) * factor


def _charge(price: Price, images: int, out_mp: int, in_mp: int) -> Decimal:
    if price.unit == "image":
        return price.usd * images
    if price.unit == "input_output_mp":
        return price.usd * (in_mp + out_mp)
    return price.usd * out_mp


def estimate(
    endpoint: str,
    request: BaseRequest | None,
    prices: PriceTable,
    *,
    input_sizes: Sequence[tuple[int, int]] = (),
    lora_bytes: int | None = None,
) -> Estimate:
    """The expected charge of one job before it runs.

    ``input_sizes`` are the sizes of the request's image inputs (image_url / image_urls, in
    order; empty when unknown). Whatever is unknown is assumed to be about 1 MP per image and
    flagged ``approximate`` with a note; an unconfirmed price is flagged ``unconfirmed``.
    ``lora_bytes`` is the total size of the request's LoRA files; when it is None and the
    endpoint has a LoRA surcharge, the largest multiplier of its table is counted (an upper
    bound, so a cost cap holds) and the estimate is flagged ``approximate``.
    """
    notes: list[str] = []
    price = prices.get(endpoint)
    if request is None:
        images, out_mp, in_mp = 1, 1, 0
        notes.append("untyped endpoint: assumed one ~1 MP image per job")
    else:
        images = num_outputs(request)
        # A per-image price does not depend on sizes: its assumptions are not worth a note.
        size_notes = [] if price is not None and price.unit == "image" else notes
        out_mp = images * _output_mp(request, input_sizes, size_notes)
        in_mp = _input_mp(request, input_sizes, notes) if _bills_inputs(price) else 0
    billed_mp = out_mp + in_mp
    if price is None:
        notes.append(f"no price for {endpoint}; give one in a price file")
        return Estimate(None, images, billed_mp, True, False, tuple(notes))
    factor = _surcharge_factor(price, request, lora_bytes, notes)
    approximate = bool(notes)  # every note so far names an assumption
    unconfirmed = price.confidence != "confirmed"
    if unconfirmed:
        notes.append(f"price unconfirmed: {price.source}")
    usd = None if factor is None else _charge(price, images, out_mp, in_mp) * factor
    return Estimate(usd, images, billed_mp, approximate, unconfirmed, tuple(notes), price.source)


def _bills_inputs(price: Price | None) -> bool:
    return price is not None and price.unit == "input_output_mp"


def _output_mp(
    request: BaseRequest, input_sizes: Sequence[tuple[int, int]], notes: list[str]
) -> int:
    size = output_size(request, input_sizes[0] if input_sizes else None)
    if size is None:
        notes.append("output size follows an input image of unknown size; assumed ~1 MP per image")
        return 1
    return megapixels(*size)


def _input_mp(
    request: BaseRequest, input_sizes: Sequence[tuple[int, int]], notes: list[str]
) -> int:
    count = 0
    for name in _SIZING_FIELDS:
        value: Any = getattr(request, name, None)
        count += 1 if isinstance(value, str) else len(value or ())
    known = [megapixels(w, h) for w, h in input_sizes[:count]]
    if len(known) < count:
        notes.append("input image sizes unknown; assumed ~1 MP per input image")
    return sum(known) + (count - len(known))


def _surcharge_factor(
    price: Price, request: BaseRequest | None, lora_bytes: int | None, notes: list[str]
) -> Decimal | None:
    surcharge = price.lora_surcharge
    if surcharge is None or request is None or not getattr(request, "loras", ()):
        return Decimal(1)
    if lora_bytes is None:
        # Counting no surcharge could let a hard cap be exceeded: assume the largest.
        notes.append(
            f"LoRA file sizes unknown; counted at the largest LoRA surcharge "
            f"(x{surcharge.highest}) so a cost cap holds"
        )
        return surcharge.highest
    factor = surcharge.multiplier(lora_bytes)
    if factor is None:
        notes.append(
            f"LoRA files exceed {surcharge.max_gb} GB in total, which {price.endpoint} refuses"
        )
    return factor
