"""The endpoint catalog: limits, defaults, enums, image_size forms, payloads and output sizes.

The expected values are written out here from shared/spec/endpoints.md, not read back from
runner.endpoints.limits, so a wrong table in the code fails these tests.
"""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from runner import errors
from runner.endpoints import catalog
from runner.endpoints.catalog import (
    CATALOG,
    ImageSize,
    LoraWeight,
    describe_errors,
    get_endpoint,
    num_outputs,
    output_size,
    parse_image_size,
    parse_request,
)

FLUX_LORA = "fal-ai/flux-lora"
I2I = "fal-ai/flux-lora/image-to-image"
INPAINT = "fal-ai/flux-lora/inpainting"
STREAM = "fal-ai/flux-lora/stream"
KONTEXT_DEV = "fal-ai/flux-kontext/dev"
KONTEXT_LORA = "fal-ai/flux-kontext-lora"
FLUX2 = "fal-ai/flux-2/lora"
EDIT = "fal-ai/flux-2/lora/edit"
ALL = [FLUX_LORA, I2I, INPAINT, STREAM, KONTEXT_DEV, KONTEXT_LORA, FLUX2, EDIT]

MINIMAL: dict[str, dict[str, Any]] = {
    FLUX_LORA: {"prompt": "a cat"},
    I2I: {"prompt": "a cat", "image_url": "https://example.com/a.png"},
    INPAINT: {
        "prompt": "a cat",
        "image_url": "https://example.com/a.png",
        "mask_url": "https://example.com/m.png",
    },
    STREAM: {"prompt": "a cat"},
    KONTEXT_DEV: {"prompt": "make it blue", "image_url": "https://example.com/a.png"},
    KONTEXT_LORA: {"prompt": "make it blue", "image_url": "https://example.com/a.png"},
    FLUX2: {"prompt": "a cat"},
    EDIT: {"prompt": "make it blue", "image_urls": ["https://example.com/a.png"]},
}


def parse(endpoint: str, **fields: Any) -> catalog.BaseRequest:
    return parse_request(endpoint, {**MINIMAL[endpoint], **fields})


def messages(endpoint: str, **fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(pydantic.ValidationError) as info:
        parse(endpoint, **fields)
    return describe_errors(info.value, endpoint)


# (endpoint, field, low, high, step just past the limit)
LIMITS = [
    *[
        (ep, field, low, high, step)
        for ep in (FLUX_LORA, I2I, INPAINT, STREAM)
        for field, low, high, step in [
            ("num_inference_steps", 1, 50, 1),
            ("guidance_scale", 0, 35, 0.001),
        ]
    ],
    *[(ep, "num_images", 1, 4, 1) for ep in (FLUX_LORA, I2I, INPAINT)],
    (STREAM, "num_images", 1, 1, 1),
    (I2I, "strength", 0.01, 1, 0.001),
    (INPAINT, "strength", 0.01, 1, 0.001),
    *[
        (ep, field, low, high, step)
        for ep in (KONTEXT_DEV, KONTEXT_LORA)
        for field, low, high, step in [
            ("num_inference_steps", 10, 50, 1),
            ("guidance_scale", 0, 20, 0.001),
            ("num_images", 1, 4, 1),
        ]
    ],
    *[
        (ep, field, low, high, step)
        for ep in (FLUX2, EDIT)
        for field, low, high, step in [
            ("num_inference_steps", 4, 50, 1),
            ("guidance_scale", 0, 20, 0.001),
            ("num_images", 1, 4, 1),
        ]
    ],
]


@pytest.mark.parametrize(("endpoint", "field", "low", "high", "step"), LIMITS)
def test_limits_are_inclusive_and_one_step_past_is_rejected(
    endpoint: str, field: str, low: float, high: float, step: float
) -> None:
    assert getattr(parse(endpoint, **{field: low}), field) == low
    assert getattr(parse(endpoint, **{field: high}), field) == high
    [(column, below)] = messages(endpoint, **{field: low - step})
    assert column == field
    assert below.startswith(f"{field}=") and f"below the minimum {low:g}" in below
    assert endpoint in below
    [(column, above)] = messages(endpoint, **{field: high + step})
    assert column == field and f"above the maximum {high:g} for {endpoint}" in above


def test_every_endpoint_has_a_limits_row() -> None:
    assert {row[0] for row in LIMITS} == set(ALL) == set(CATALOG)


def test_guidance_above_maximum_reads_like_the_manifest_message() -> None:
    assert messages(FLUX_LORA, guidance_scale=40) == [
        ("guidance_scale", "guidance_scale=40 is above the maximum 35 for fal-ai/flux-lora")
    ]


def test_kontext_dev_borrowed_range_is_flagged_unconfirmed() -> None:
    [(_, text)] = messages(KONTEXT_DEV, num_inference_steps=51)
    assert "unconfirmed" in text and KONTEXT_LORA in text
    assert not catalog.BOUNDS[KONTEXT_DEV]["guidance_scale"].confirmed
    assert not catalog.BOUNDS[KONTEXT_DEV]["num_images"].confirmed
    [(_, text)] = messages(KONTEXT_DEV, num_images=5)
    assert "unconfirmed" in text
    assert catalog.BOUNDS[KONTEXT_LORA]["guidance_scale"].confirmed


def test_stream_refuses_more_than_one_image_and_says_why() -> None:
    [(_, text)] = messages(STREAM, num_images=2)
    assert "always returns one image" in text


DEFAULTS = [
    *[
        (ep, {"num_inference_steps": 28, "guidance_scale": 3.5, "num_images": 1,
              "output_format": "jpeg", "acceleration": "none", "loras": ()})
        for ep in (FLUX_LORA, I2I, INPAINT, STREAM)
    ],
    (FLUX_LORA, {"image_size": "landscape_4_3"}),
    (STREAM, {"image_size": "landscape_4_3"}),
    (I2I, {"image_size": None, "strength": 0.85}),
    (INPAINT, {"image_size": None, "strength": 0.85}),
    (KONTEXT_DEV, {"num_inference_steps": 28, "guidance_scale": 2.5, "num_images": 1,
                   "output_format": "jpeg", "acceleration": "none",
                   "resolution_mode": "match_input"}),
    (KONTEXT_LORA, {"num_inference_steps": 30, "guidance_scale": 2.5, "num_images": 1,
                    "output_format": "png", "acceleration": "none",
                    "resolution_mode": "match_input", "loras": ()}),
    *[
        (ep, {"num_inference_steps": 28, "guidance_scale": 2.5, "num_images": 1,
              "output_format": "png", "acceleration": "regular",
              "enable_prompt_expansion": False, "loras": ()})
        for ep in (FLUX2, EDIT)
    ],
    (FLUX2, {"image_size": "landscape_4_3"}),
    (EDIT, {"image_size": None}),
    *[(ep, {"seed": None, "sync_mode": False, "enable_safety_checker": True}) for ep in ALL],
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "expected"), DEFAULTS)
def test_defaults_match_the_spec(endpoint: str, expected: dict[str, Any]) -> None:
    request = parse(endpoint)
    assert {name: getattr(request, name) for name in expected} == expected


def test_spec_default_output_format_agrees_with_the_model() -> None:
    for spec in CATALOG.values():
        assert parse(spec.id).output_format == spec.default_output_format  # type: ignore[attr-defined]
        assert spec.default_output_format in spec.output_formats


ENUMS = [
    *[(ep, "output_format", ["jpeg", "png"], ["webp", "PNG"]) for ep in ALL[:6]],
    *[(ep, "output_format", ["jpeg", "png", "webp"], ["gif"]) for ep in (FLUX2, EDIT)],
    *[(ep, "acceleration", ["none", "regular"], ["high"]) for ep in ALL[:4]],
    *[(ep, "acceleration", ["none", "regular", "high"], ["max"]) for ep in ALL[4:]],
    *[
        (ep, "resolution_mode",
         ["auto", "match_input", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3",
          "9:16", "9:21"],
         ["2:1", "match"])
        for ep in (KONTEXT_DEV, KONTEXT_LORA)
    ],
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "field", "good", "bad"), ENUMS)
def test_enums_accept_listed_values_only(
    endpoint: str, field: str, good: list[str], bad: list[str]
) -> None:
    for value in good:
        assert getattr(parse(endpoint, **{field: value}), field) == value
    for value in bad:
        [(column, text)] = messages(endpoint, **{field: value})
        assert column == field and f"{field}={value!r} is not one of" in text


@pytest.mark.parametrize("endpoint", ALL)
def test_unknown_keys_are_errors(endpoint: str) -> None:
    [(column, text)] = messages(endpoint, negative_prompt="blurry")
    assert column == "negative_prompt"
    assert text == f"unknown parameter 'negative_prompt' for {endpoint}"


def test_unknown_key_suggests_the_close_name() -> None:
    [(_, text)] = messages(FLUX_LORA, guidance=3)
    assert "did you mean 'guidance_scale'?" in text


def test_kontext_dev_takes_no_loras() -> None:
    assert messages(KONTEXT_DEV, loras=[{"path": "a"}]) == [
        ("loras", "fal-ai/flux-kontext/dev takes no loras")
    ]
    assert get_endpoint(KONTEXT_DEV).max_loras == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("endpoint", ALL)
def test_prompt_is_required_and_not_blank(endpoint: str) -> None:
    fields = {k: v for k, v in MINIMAL[endpoint].items() if k != "prompt"}
    with pytest.raises(pydantic.ValidationError) as info:
        parse_request(endpoint, fields)
    assert describe_errors(info.value, endpoint) == [
        ("prompt", f"prompt is required for {endpoint}")
    ]
    for blank in ("", "   "):
        assert messages(endpoint, prompt=blank) == [("prompt", "prompt must not be empty")]


@pytest.mark.parametrize("endpoint", [I2I, INPAINT, KONTEXT_DEV, KONTEXT_LORA])
def test_input_image_url_is_required(endpoint: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        parse_request(endpoint, {"prompt": "x"})
    columns = {column for column, _ in describe_errors(info.value, endpoint)}
    assert "image_url" in columns


STRICTNESS = [
    ({"seed": True}, "seed", "must be a number, not true/false"),
    ({"num_images": True}, "num_images", "must be a number, not true/false"),
    ({"guidance_scale": False}, "guidance_scale", "must be a number, not true/false"),
    ({"num_inference_steps": 28.5}, "num_inference_steps", "must be a whole number"),
    ({"seed": 1.5}, "seed", "must be a whole number"),
    ({"num_images": "two"}, "num_images", "is not a whole number"),
    ({"guidance_scale": "lots"}, "guidance_scale", "is not a number"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "finite"),
    ({"sync_mode": "maybe"}, "sync_mode", "is not true or false"),
]


@pytest.mark.parametrize(("fields", "column", "phrase"), STRICTNESS)
def test_types_are_strictish(fields: dict[str, Any], column: str, phrase: str) -> None:
    [(got_column, text)] = messages(FLUX_LORA, **fields)
    assert got_column == column and phrase in text


def test_whole_floats_and_numeric_text_are_accepted_for_ints_and_ints_for_floats() -> None:
    request = parse(FLUX_LORA, num_images=2.0, num_inference_steps="30", guidance_scale=4, seed=7)
    assert (request.num_images, request.num_inference_steps) == (2, 30)  # type: ignore[attr-defined]
    assert isinstance(request.num_images, int)  # type: ignore[attr-defined]
    assert request.guidance_scale == 4.0  # type: ignore[attr-defined]


IMAGE_SIZES_OK = [
    *[(name, name) for name in catalog.PRESETS],
    (" square_hd ", "square_hd"),
    ("1024x768", ImageSize(width=1024, height=768)),
    ("1024X768", ImageSize(width=1024, height=768)),
    (" 1024 x 768 ", ImageSize(width=1024, height=768)),
    ({"width": 1920, "height": 1080}, ImageSize(width=1920, height=1080)),
    ({"width": 1920.0, "height": 1080}, ImageSize(width=1920, height=1080)),
    (ImageSize(width=640, height=480), ImageSize(width=640, height=480)),
]


@pytest.mark.parametrize(("value", "expected"), IMAGE_SIZES_OK)
def test_image_size_forms_are_normalised(value: Any, expected: Any) -> None:
    assert parse_image_size(value) == expected
    assert parse(FLUX_LORA, image_size=value).image_size == expected  # type: ignore[attr-defined]


IMAGE_SIZES_BAD = [
    "big", "1024x", "x768", "1024*768", "-5x10", "0x768", {"width": 1024},
    {"width": 0, "height": 768}, {"width": 1.5, "height": 768}, {"width": True, "height": 768},
    {"width": 1024, "height": 768, "depth": 3}, {"width": "1024", "height": 768}, 1024,
]  # fmt: skip


@pytest.mark.parametrize("value", IMAGE_SIZES_BAD)
def test_bad_image_sizes_are_rejected_with_a_readable_message(value: Any) -> None:
    with pytest.raises(ValueError, match=r"preset|width|WIDTHxHEIGHT"):
        parse_image_size(value)
    [(column, text)] = messages(FLUX_LORA, image_size=value)
    assert column == "image_size" and text.startswith("image_size=") and FLUX_LORA in text


def test_payload_shapes_image_size_as_preset_or_width_height() -> None:
    assert parse(FLUX_LORA, image_size="square").to_payload()["image_size"] == "square"
    assert parse(FLUX_LORA, image_size="800 x 600").to_payload()["image_size"] == {
        "width": 800,
        "height": 600,
    }


@pytest.mark.parametrize(
    ("size", "ok"),
    [("512x512", True), ("2048x2048", True), ("511x1024", False), ("1024x2049", False),
     ({"width": 4096, "height": 1024}, False), ("square", True)],
)  # fmt: skip
@pytest.mark.parametrize("endpoint", [FLUX2, EDIT])
def test_flux2_sides_must_be_512_to_2048(endpoint: str, size: Any, ok: bool) -> None:
    if ok:
        assert parse(endpoint, image_size=size).image_size is not None  # type: ignore[attr-defined]
    else:
        [(column, text)] = messages(endpoint, image_size=size)
        assert column == "image_size" and "outside 512-2048 px" in text


def test_flux1_explicit_sizes_only_need_to_be_positive() -> None:
    assert parse(FLUX_LORA, image_size="4096x4096").image_size == ImageSize(  # type: ignore[attr-defined]
        width=4096, height=4096
    )


@pytest.mark.parametrize("endpoint", [FLUX2, EDIT])
def test_flux2_takes_at_most_three_loras(endpoint: str) -> None:
    three = [{"path": f"https://example.com/{i}.safetensors"} for i in range(3)]
    assert len(parse(endpoint, loras=three).loras) == 3  # type: ignore[attr-defined]
    [(column, text)] = messages(endpoint, loras=[*three, {"path": "four"}])
    assert column == "loras" and text == f"loras has 4 items; {endpoint} accepts at most 3"


def test_flux1_takes_any_number_of_loras() -> None:
    many = [{"path": f"l{i}", "scale": 0.5} for i in range(8)]
    assert len(parse(FLUX_LORA, loras=many).loras) == 8  # type: ignore[attr-defined]
    assert get_endpoint(FLUX_LORA).max_loras is None  # type: ignore[union-attr]


def test_edit_takes_one_to_three_images_never_truncating() -> None:
    urls = [f"https://example.com/{i}.png" for i in range(4)]
    assert len(parse(EDIT, image_urls=urls[:3]).image_urls) == 3  # type: ignore[attr-defined]
    [(column, text)] = messages(EDIT, image_urls=urls)
    assert column == "image_urls" and "at most 3" in text and "silently" in text
    [(column, text)] = messages(EDIT, image_urls=[])
    assert column == "image_urls" and "at least 1" in text
    [(column, text)] = messages(EDIT, image_urls="a.png")
    assert column == "image_urls" and text.startswith("image_urls='a.png' must be a list")
    [(column, text)] = messages(EDIT, image_urls=["ok", ""])
    assert column == "image_urls" and text == "image_urls[1] must not be empty"


LORA_BAD = [
    ([{"path": ""}], "loras[0].path must not be empty"),
    ([{"scale": 1}], "loras[0].path is required"),
    ([{"path": "a", "weight": 1}], "loras[0] has an unknown key 'weight'"),
    ([{"path": "a", "scale": True}], "loras[0].scale=true must be a number"),
    (["just-a-string"], "loras[0]='just-a-string' must be an object"),
    ("a.safetensors", "loras='a.safetensors' must be a list"),
]


@pytest.mark.parametrize(("loras", "phrase"), LORA_BAD)
def test_bad_loras_name_the_entry(loras: Any, phrase: str) -> None:
    [(column, text)] = messages(KONTEXT_LORA, loras=loras)
    assert column == "loras" and text.startswith(phrase)


def test_payload_has_only_user_fields_and_every_lora_scale() -> None:
    request = parse(
        FLUX_LORA,
        seed=None,
        num_images=1,
        loras=[{"path": "a"}, LoraWeight(path="b", scale=0.5)],
    )
    assert request.to_payload() == {
        "prompt": "a cat",
        "num_images": 1,
        "loras": [{"path": "a", "scale": 1.0}, {"path": "b", "scale": 0.5}],
    }


def test_payload_of_edit_lists_image_urls() -> None:
    assert parse(EDIT, image_size={"width": 512, "height": 640}).to_payload() == {
        "prompt": "make it blue",
        "image_urls": ["https://example.com/a.png"],
        "image_size": {"width": 512, "height": 640},
    }


def test_requests_are_frozen_and_hashable() -> None:
    request = parse(FLUX2, loras=[{"path": "a"}])
    with pytest.raises(pydantic.ValidationError):
        request.prompt = "changed"  # type: ignore[misc]
    assert hash(request) == hash(parse(FLUX2, loras=[{"path": "a"}]))


def test_unknown_endpoint_raises_listing_known_ids() -> None:
    with pytest.raises(errors.UnknownEndpointError) as info:
        get_endpoint("fal-ai/flux-pro")
    assert info.value.known == sorted(ALL)
    assert all(ep in str(info.value) for ep in ALL)
    with pytest.raises(errors.UnknownEndpointError):
        parse_request("fal-ai/flux-pro", {"prompt": "x"})


def test_allowed_unknown_endpoint_is_none_and_known_ids_still_resolve() -> None:
    assert get_endpoint("fal-ai/flux-pro", allowed={"fal-ai/flux-pro"}) is None
    assert get_endpoint(FLUX2, allowed={"fal-ai/flux-pro"}) is CATALOG[FLUX2]


SPECS = [
    (FLUX_LORA, "text-to-image", (), None, "image_size"),
    (I2I, "image-to-image", ("image_url",), None, "image_size"),
    (INPAINT, "inpainting", ("image_url", "mask_url"), None, "image_size"),
    (STREAM, "text-to-image", (), None, "image_size"),
    (KONTEXT_DEV, "edit", ("image_url",), 0, "resolution_mode"),
    (KONTEXT_LORA, "edit", ("image_url",), None, "resolution_mode"),
    (FLUX2, "text-to-image", (), 3, "image_size"),
    (EDIT, "edit", ("image_urls",), 3, "image_size"),
]


@pytest.mark.parametrize(("endpoint", "kind", "inputs", "max_loras", "size_control"), SPECS)
def test_endpoint_specs(
    endpoint: str, kind: str, inputs: tuple[str, ...], max_loras: int | None, size_control: str
) -> None:
    spec = get_endpoint(endpoint)
    assert spec is not None and spec.id == endpoint
    assert (spec.kind, spec.input_image_fields, spec.max_loras, spec.size_control) == (
        kind, inputs, max_loras, size_control,
    )  # fmt: skip
    assert spec.model.endpoint_id == endpoint
    for field in inputs:
        assert field in spec.model.model_fields


OUTPUT_SIZES = [
    (FLUX_LORA, {}, None, (1024, 768)),
    (FLUX_LORA, {"image_size": "square_hd"}, (9, 9), (1024, 1024)),
    (FLUX_LORA, {"image_size": "1920x1080"}, None, (1920, 1080)),
    (STREAM, {"image_size": "portrait_16_9"}, None, (576, 1024)),
    (FLUX2, {}, None, (1024, 768)),
    (I2I, {}, (800, 600), (800, 600)),
    (I2I, {}, None, None),
    (I2I, {"image_size": "landscape_16_9"}, None, (1024, 576)),
    (INPAINT, {}, (640, 480), (640, 480)),
    (EDIT, {}, (1500, 1000), (1500, 1000)),
    (EDIT, {}, None, None),
    (EDIT, {"image_size": "512x768"}, None, (512, 768)),
    (KONTEXT_LORA, {}, (1000, 777), (992, 768)),
    (KONTEXT_LORA, {}, (1024, 768), (1024, 768)),
    (KONTEXT_DEV, {}, (8, 8), (16, 16)),
    (KONTEXT_DEV, {}, (20000, 300), (14128, 288)),
    (KONTEXT_DEV, {}, None, None),
    (KONTEXT_LORA, {"resolution_mode": "auto"}, (4000, 3000), (1168, 880)),
    (KONTEXT_LORA, {"resolution_mode": "auto"}, (1, 1), (1024, 1024)),
    (KONTEXT_LORA, {"resolution_mode": "auto"}, None, None),
    (KONTEXT_LORA, {"resolution_mode": "16:9"}, None, (1360, 768)),
    (KONTEXT_DEV, {"resolution_mode": "1:1"}, (300, 200), (1024, 1024)),
    (KONTEXT_DEV, {"resolution_mode": "9:21"}, None, (656, 1552)),
]


@pytest.mark.parametrize(("endpoint", "fields", "input_size", "expected"), OUTPUT_SIZES)
def test_output_size(
    endpoint: str,
    fields: dict[str, Any],
    input_size: tuple[int, int] | None,
    expected: tuple[int, int] | None,
) -> None:
    assert output_size(parse(endpoint, **fields), input_size) == expected


RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


@pytest.mark.parametrize("ratio", RATIOS)
def test_kontext_ratio_modes_are_about_one_megapixel_in_multiples_of_16(ratio: str) -> None:
    width, height = output_size(parse(KONTEXT_LORA, resolution_mode=ratio), None) or (0, 0)
    assert width % 16 == 0 and height % 16 == 0
    assert 0.9 * 1_048_576 <= width * height <= 1_048_576
    a, b = (int(n) for n in ratio.split(":"))
    assert abs(width / height - a / b) < 0.05 * a / b


@pytest.mark.parametrize(("endpoint", "fields", "expected"), [
    (FLUX_LORA, {}, 1), (FLUX_LORA, {"num_images": 4}, 4), (STREAM, {}, 1),
    (EDIT, {"num_images": 3}, 3), (KONTEXT_DEV, {"num_images": 2}, 2),
])  # fmt: skip
def test_num_outputs_is_num_images(endpoint: str, fields: dict[str, Any], expected: int) -> None:
    assert num_outputs(parse(endpoint, **fields)) == expected


def test_a_seed_past_the_ledgers_int64_is_a_bad_row_not_a_ledger_crash() -> None:
    # A seed of 10**23 once reached the ledger's int64 column and broke the run directory.
    assert parse(FLUX_LORA, seed=2**63 - 1).seed == 2**63 - 1
    assert messages(FLUX_LORA, seed=10**23) == [
        ("seed", f"seed={10**23} is above the maximum 9223372036854775807 for fal-ai/flux-lora")
    ]
