"""Cost arithmetic against hand-computed cases, and the price table's data and overrides.

Every expected dollar figure below was worked out by hand from shared/spec/endpoints.md:
MP = 1,048,576 px, each image rounded up; flux-lora $0.035/MP, flux-2/lora $0.021/MP,
flux-kontext/dev $0.025/image, flux-2/lora/edit $0.021 per input+output MP.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from runner import errors
from runner.endpoints.catalog import parse_request
from runner.endpoints.cost import Estimate, PriceTable, billed_cost, estimate, megapixels
from runner.endpoints.money import decimal_places

PRICES = PriceTable.default()
GB = 1_000_000_000


@pytest.mark.parametrize(
    ("width", "height", "mp"),
    [
        (1024, 768, 1),
        (1024, 1024, 1),  # exactly 1,048,576 px
        (1_048_576, 1, 1),
        (1_048_577, 1, 2),  # one pixel over
        (1025, 1024, 2),
        (1920, 1080, 2),
        (2048, 2048, 4),
        (2049, 2048, 5),
        (1, 1, 1),
    ],
)
def test_megapixels_round_up_per_image(width: int, height: int, mp: int) -> None:
    assert megapixels(width, height) == mp


def test_megapixels_refuses_empty_images() -> None:
    with pytest.raises(ValueError, match="positive"):
        megapixels(0, 768)


def est(endpoint: str, fields: dict[str, Any], **kwargs: Any) -> Estimate:
    request = parse_request(endpoint, {"prompt": "a cat", **fields})
    return estimate(endpoint, request, PRICES, **kwargs)


IMG = "https://example.com/in.png"

# (endpoint, fields, input_sizes, lora_bytes, usd, billed MP, approximate, unconfirmed)
HAND_CASES = [
    ("fal-ai/flux-lora", {"image_size": "1024x768"}, (), None, "0.035", 1, False, False),
    ("fal-ai/flux-lora", {"image_size": "1920x1080"}, (), None, "0.070", 2, False, False),
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "num_images": 4}, (), None, "0.084", 4,
     False, False),
    # default landscape_4_3 = 1024x768 = 1 MP, x4 images
    ("fal-ai/flux-lora", {"num_images": 4}, (), None, "0.140", 4, False, False),
    # 2048x2048 = 4 MP, x2 images = 8 MP
    ("fal-ai/flux-lora", {"image_size": "2048x2048", "num_images": 2}, (), None, "0.280", 8,
     False, False),
    # exactly 1 MP and one pixel more
    ("fal-ai/flux-lora", {"image_size": "1024x1024"}, (), None, "0.035", 1, False, False),
    ("fal-ai/flux-lora", {"image_size": "1025x1024"}, (), None, "0.070", 2, False, False),
    ("fal-ai/flux-lora/stream", {"image_size": "landscape_16_9"}, (), None, "0.035", 1, False,
     False),
    # image-to-image follows a 3000x2000 input: 6,000,000 px -> 6 MP
    ("fal-ai/flux-lora/image-to-image", {"image_url": IMG}, [(3000, 2000)], None, "0.210", 6,
     False, False),
    # ... or assumes 1 MP when the input is unknown
    ("fal-ai/flux-lora/image-to-image", {"image_url": IMG}, (), None, "0.035", 1, True, False),
    ("fal-ai/flux-lora/inpainting", {"image_url": IMG, "mask_url": IMG}, [(1920, 1080)], None,
     "0.070", 2, False, False),
    # kontext-lora match_input 1920x1080 -> 1920x1072 = 2,058,240 px -> 2 MP
    ("fal-ai/flux-kontext-lora", {"image_url": IMG}, [(1920, 1080)], None, "0.070", 2, False,
     False),
    ("fal-ai/flux-kontext-lora", {"image_url": IMG, "resolution_mode": "auto"}, (), None,
     "0.035", 1, True, False),
    ("fal-ai/flux-kontext-lora", {"image_url": IMG, "resolution_mode": "16:9"}, (), None,
     "0.035", 1, False, False),
    # kontext/dev is per image whatever the size: 3 x 0.025
    ("fal-ai/flux-kontext/dev", {"image_url": IMG, "num_images": 3}, [(4000, 3000)], None,
     "0.075", 3 * 12, False, True),
    ("fal-ai/flux-kontext/dev", {"image_url": IMG}, (), None, "0.025", 1, False, True),
    # edit: inputs 1 MP + 2 MP, output follows the first input (1 MP): 4 MP x 0.021
    ("fal-ai/flux-2/lora/edit", {"image_urls": [IMG, IMG]}, [(1024, 1024), (1920, 1080)], None,
     "0.084", 4, False, True),
    # edit: 2 outputs of 2048x2048 (4 MP each) + one 1 MP input = 9 MP
    ("fal-ai/flux-2/lora/edit", {"image_urls": [IMG], "image_size": "2048x2048", "num_images": 2},
     [(1024, 1024)], None, "0.189", 9, False, True),
    # edit with unknown inputs: 2 inputs and 1 output assumed 1 MP each
    ("fal-ai/flux-2/lora/edit", {"image_urls": [IMG, IMG]}, (), None, "0.063", 3, True, True),
    # FLUX.2 LoRA surcharge tiers on one 1 MP image (0.021)
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), 2 * GB,
     "0.021", 1, False, False),
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), 2 * GB + 1,
     "0.0315", 1, False, False),
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), 3 * GB,
     "0.0315", 1, False, False),
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), 3_500_000_000,
     "0.042", 1, False, False),
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), 4_500_000_000,
     "0.0525", 1, False, False),
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), 5 * GB,
     "0.0525", 1, False, False),
    # sizes unknown: the largest surcharge (x2.5) is counted so a cap holds, flagged approximate
    ("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]}, (), None,
     "0.0525", 1, True, False),
    # ... on every image: 2 x 2048x2048 = 8 MP x 0.021 x 2.5
    ("fal-ai/flux-2/lora", {"image_size": "2048x2048", "num_images": 2,
     "loras": [{"path": "a"}, {"path": "b"}]}, (), None, "0.42", 8, True, False),
    # ... and on the edit endpoint's inputs as well: (1 MP in + 1 MP out) x 0.021 x 2.5
    ("fal-ai/flux-2/lora/edit", {"image_urls": [IMG], "loras": [{"path": "a"}]}, [(1024, 1024)],
     None, "0.105", 2, True, True),
    # an endpoint without a surcharge table: LoRAs of unknown size change nothing
    ("fal-ai/flux-lora", {"image_size": "1024x768", "loras": [{"path": "a"}]}, (), None, "0.035",
     1, False, False),
    # LoRA bytes given but no LoRAs in the request: no surcharge
    ("fal-ai/flux-2/lora", {"image_size": "square_hd"}, (), 4 * GB, "0.021", 1, False, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("endpoint", "fields", "inputs", "lora_bytes", "usd", "mp", "approximate", "unconfirmed"),
    HAND_CASES,
)
def test_estimate_matches_hand_computed_cases(
    endpoint: str,
    fields: dict[str, Any],
    inputs: list[tuple[int, int]],
    lora_bytes: int | None,
    usd: str,
    mp: int,
    approximate: bool,
    unconfirmed: bool,
) -> None:
    result = est(endpoint, fields, input_sizes=inputs, lora_bytes=lora_bytes)
    assert result.usd == Decimal(usd)
    assert isinstance(result.usd, Decimal)
    assert (result.megapixels, result.approximate, result.unconfirmed) == (
        mp, approximate, unconfirmed,
    )  # fmt: skip
    assert bool(result.notes) == (approximate or unconfirmed)


def test_unknown_input_size_is_noted_as_assumed_one_megapixel() -> None:
    result = est("fal-ai/flux-lora/image-to-image", {"image_url": IMG, "num_images": 2})
    assert result.images == 2 and result.approximate
    assert any("assumed ~1 MP" in note for note in result.notes)


def test_unknown_lora_sizes_on_flux2_are_counted_at_the_largest_surcharge_and_noted() -> None:
    result = est("fal-ai/flux-2/lora", {"image_size": "square_hd", "loras": [{"path": "a"}]})
    assert result.usd == Decimal("0.021") * Decimal("2.5") and result.approximate
    assert any(
        "LoRA file sizes unknown" in note and "largest LoRA surcharge (x2.5)" in note
        for note in result.notes
    )


# (tiers of an overriding price file, multiplier counted when LoRA sizes are unknown)
SURCHARGE_TABLES = [
    ([{"above_gb": "1", "multiplier": "3"}, {"above_gb": "2", "multiplier": "1.25"}], "3"),
    ([{"above_gb": "0.5", "multiplier": "1.75"}], "1.75"),
    ([{"above_gb": "1", "multiplier": "0.5"}], "1"),  # a discount tier: x1 below it is the most
    ([], "1"),
]


@pytest.mark.parametrize(("tiers", "multiplier"), SURCHARGE_TABLES)
def test_unknown_lora_sizes_count_the_largest_multiplier_of_the_price_data(
    tmp_path: Path, tiers: list[dict[str, str]], multiplier: str
) -> None:
    surcharge = {"max_gb": "5", "tiers": tiers}
    doc = {"endpoints": {"fal-ai/flux-2/lora": {"usd": "0.02", "lora_surcharge": surcharge}}}
    table = PriceTable.from_file(write(tmp_path, doc))
    fields = {"prompt": "x", "image_size": "square_hd", "loras": [{"path": "a"}]}
    request = parse_request("fal-ai/flux-2/lora", fields)
    result = estimate("fal-ai/flux-2/lora", request, table)
    assert result.usd == Decimal("0.02") * Decimal(multiplier)
    assert result.approximate
    assert any(f"(x{multiplier})" in note for note in result.notes)
    # what a finished call is billed does not guess: no LoRA sizes, no surcharge
    assert billed_cost("fal-ai/flux-2/lora", [(1024, 1024)], table) == Decimal("0.02")


def test_loras_over_five_gb_have_no_price_and_say_why() -> None:
    fields = {"image_size": "square_hd", "loras": [{"path": "a"}]}
    result = est("fal-ai/flux-2/lora", fields, lora_bytes=5 * GB + 1)
    assert result.usd is None
    assert any("5 GB" in note for note in result.notes)


def test_unconfirmed_price_is_flagged_with_its_source() -> None:
    result = est("fal-ai/flux-kontext/dev", {"image_url": IMG})
    assert result.unconfirmed
    assert any("unconfirmed" in note and "third-party" in note for note in result.notes)


def test_unknown_endpoint_has_no_price_and_a_note() -> None:
    result = estimate("fal-ai/flux-pro", None, PRICES)
    assert result.usd is None and result.approximate and result.images == 1
    assert any("no price for fal-ai/flux-pro" in note for note in result.notes)


# (endpoint, outputs, input_sizes, lora_bytes, usd)
BILLED = [
    ("fal-ai/flux-lora", [(1024, 768), (1920, 1080)], (), None, "0.105"),
    ("fal-ai/flux-lora/stream", [(1024, 1024)], (), None, "0.035"),
    ("fal-ai/flux-kontext/dev", [(1024, 1024), (2048, 2048)], (), None, "0.050"),
    ("fal-ai/flux-kontext-lora", [(1024, 1024), (2048, 2048)], (), None, "0.175"),
    ("fal-ai/flux-2/lora", [(1024, 1024)] * 4, (), None, "0.084"),
    ("fal-ai/flux-2/lora", [(1024, 1024)], (), 3_500_000_000, "0.042"),
    ("fal-ai/flux-2/lora/edit", [(1024, 1024)], [(2048, 2048)], None, "0.105"),
    ("fal-ai/flux-2/lora", [], (), None, "0"),
]


@pytest.mark.parametrize(("endpoint", "outputs", "inputs", "lora_bytes", "usd"), BILLED)
def test_billed_cost_from_actual_outputs(
    endpoint: str,
    outputs: list[tuple[int, int]],
    inputs: list[tuple[int, int]],
    lora_bytes: int | None,
    usd: str,
) -> None:
    cost = billed_cost(endpoint, outputs, PRICES, input_sizes=inputs, lora_bytes=lora_bytes)
    assert cost == Decimal(usd)


def test_billed_cost_is_none_without_a_price_or_over_the_lora_limit() -> None:
    assert billed_cost("fal-ai/flux-pro", [(1024, 1024)], PRICES) is None
    assert billed_cost("fal-ai/flux-2/lora", [(1024, 1024)], PRICES, lora_bytes=6 * GB) is None


def test_packaged_prices_cover_every_endpoint_with_provenance() -> None:
    expected = {
        "fal-ai/flux-lora": ("0.035", "output_mp", "confirmed"),
        "fal-ai/flux-lora/stream": ("0.035", "output_mp", "confirmed"),
        "fal-ai/flux-lora/image-to-image": ("0.035", "output_mp", "confirmed"),
        "fal-ai/flux-lora/inpainting": ("0.035", "output_mp", "confirmed"),
        "fal-ai/flux-kontext-lora": ("0.035", "output_mp", "confirmed"),
        "fal-ai/flux-kontext/dev": ("0.025", "image", "unconfirmed"),
        "fal-ai/flux-2/lora": ("0.021", "output_mp", "confirmed"),
        "fal-ai/flux-2/lora/edit": ("0.021", "input_output_mp", "unconfirmed"),
    }
    assert {p.endpoint for p in PRICES} == set(expected)
    for endpoint, (usd, unit, confidence) in expected.items():
        price = PRICES.get(endpoint)
        assert price is not None
        assert (price.usd, price.unit, price.confidence) == (Decimal(usd), unit, confidence)
        assert price.source and price.date == "2026-11-21"
    surcharge = PRICES.get("fal-ai/flux-2/lora").lora_surcharge  # type: ignore[union-attr]
    assert surcharge is not None and surcharge.max_gb == 5


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def test_override_file_replaces_only_the_endpoints_it_lists(tmp_path: Path) -> None:
    path = write(tmp_path, {"endpoints": {"fal-ai/flux-lora": {"usd": 0.04}}})
    table = PriceTable.from_file(path)
    price = table.get("fal-ai/flux-lora")
    assert price is not None and price.usd == Decimal("0.04")  # exact, not a binary float
    assert price.unit == "output_mp" and price.confidence == "confirmed"
    assert "prices.json" in price.source
    assert table.get("fal-ai/flux-2/lora") == PRICES.get("fal-ai/flux-2/lora")
    assert len(table) == len(PRICES)
    result = estimate("fal-ai/flux-lora", parse_request("fal-ai/flux-lora", {"prompt": "x"}), table)
    assert result.usd == Decimal("0.04")


def test_override_keeps_or_removes_the_lora_surcharge(tmp_path: Path) -> None:
    keep = PriceTable.from_file(
        write(tmp_path, {"endpoints": {"fal-ai/flux-2/lora": {"usd": "0.03"}}})
    )
    assert keep.get("fal-ai/flux-2/lora").lora_surcharge is not None  # type: ignore[union-attr]
    doc = {"endpoints": {"fal-ai/flux-2/lora": {"usd": "0.03", "lora_surcharge": None}}}
    drop = PriceTable.from_file(write(tmp_path, doc))
    assert drop.get("fal-ai/flux-2/lora").lora_surcharge is None  # type: ignore[union-attr]
    assert billed_cost("fal-ai/flux-2/lora", [(1024, 1024)], drop, lora_bytes=4 * GB) == Decimal(
        "0.03"
    )


def test_override_can_price_an_allowed_unknown_endpoint(tmp_path: Path) -> None:
    doc = {"endpoints": {"fal-ai/flux-pro": {"usd": "0.05", "unit": "image", "date": "2026-11-01"}}}
    table = PriceTable.from_file(write(tmp_path, doc))
    price = table.get("fal-ai/flux-pro")
    assert price is not None and price.date == "2026-11-01"
    assert billed_cost("fal-ai/flux-pro", [(512, 512)] * 2, table) == Decimal("0.10")


BAD_FILES = [
    ("{not json", "not valid JSON"),
    ({"endpoints": {"fal-ai/flux-lora": {"usd": -1}}}, "usd"),
    ({"endpoints": {"fal-ai/flux-lora": {"usd": "0.01", "unit": "per_kg"}}}, "unit"),
    ({"endpoints": {"fal-ai/flux-lora": {"usd": "0.01", "cost": 1}}}, "cost"),
    ({"endpoints": {"fal-ai/flux-lora": {"unit": "image"}}}, "usd is required"),
    ({"endpoints": {"fal-ai/new": {"usd": "0.01"}}}, "unit is required"),
    ({"prices": {}}, "endpoints"),
    ([1, 2], "top level"),
    # Past the ledger's 18 places (a traceback at the first job's record, before):
    ({"endpoints": {"fal-ai/flux-lora": {"usd": "0.0123456789012345678"}}}, "decimal places"),
    # 18 places, times the packaged LoRA multiplier 2.5 (one place): 19
    ({"endpoints": {"fal-ai/flux-2/lora": {"usd": "0.000000000000000001"}}}, "decimal places"),
]


@pytest.mark.parametrize(("doc", "phrase"), BAD_FILES)
def test_bad_override_file_is_a_usage_error_naming_the_file(
    tmp_path: Path, doc: Any, phrase: str
) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(errors.UsageError) as info:
        PriceTable.from_file(path)
    assert str(path) in str(info.value) and phrase in str(info.value)


def test_a_price_at_the_ledgers_scale_is_kept_and_trailing_zeros_do_not_count(
    tmp_path: Path,
) -> None:
    doc = {"endpoints": {"fal-ai/flux-lora": {"usd": "0.123456789012345678000"},
                         "fal-ai/flux-2/lora": {"usd": "0.00000000000000001"}}}  # fmt: skip
    table = PriceTable.from_file(write(tmp_path, doc))
    price = table.get("fal-ai/flux-lora")
    assert price is not None and str(price.usd) == "0.123456789012345678"  # 18 places
    surcharged = billed_cost("fal-ai/flux-2/lora", [(1024, 1024)], table, lora_bytes=4 * GB)
    assert surcharged is not None and surcharged > 0
    assert decimal_places(surcharged) <= 18  # 17 + the multiplier's 1: recordable


def test_missing_override_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(errors.UsageError, match="cannot read"):
        PriceTable.from_file(tmp_path / "absent.json")
