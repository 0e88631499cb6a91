"""The endpoint catalog: one frozen request model per fal FLUX endpoint, and output-size rules.

Every parameter, default, range and enum comes from shared/spec/endpoints.md (untangled from
the seed pages). Ranges live in :data:`BOUNDS` as data with a ``confirmed`` flag, because two
of them (flux-kontext/dev steps and guidance) are not published and are borrowed from
flux-kontext-lora. :func:`describe_errors` turns a pydantic error into lines a user can act on.
Field value types (strict-ish numbers, image sizes, LoRAs) are in runner.endpoints.fields.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from runner import errors
from runner.endpoints.diagnostics import describe
from runner.endpoints.fields import (
    Float,
    ImageSize,
    ImageSizeValue,
    Int,
    LoraWeight,
    NonEmpty,
    Seed,
    parse_image_size,
    size_of,
)
from runner.endpoints.limits import (
    BOUNDS,
    FLUX2_EDIT,
    FLUX2_LORA,
    FLUX2_SIDES,
    FLUX_LORA,
    FLUX_LORA_I2I,
    FLUX_LORA_INPAINT,
    FLUX_LORA_STREAM,
    KONTEXT_DEV,
    KONTEXT_LORA,
    KONTEXT_MAX_SIDE,
    KONTEXT_MULTIPLE,
    MEGAPIXEL_PX,
    PRESETS,
    Bound,
    Kind,
    ResolutionMode,
)

# Re-exported from limits, fields and diagnostics (runner.endpoints) for one import site.
__all__ = [
    "BOUNDS",
    "CATALOG",
    "PRESETS",
    "BaseRequest",
    "Bound",
    "EndpointSpec",
    "ImageSize",
    "LoraWeight",
    "describe_errors",
    "get_endpoint",
    "num_outputs",
    "output_size",
    "parse_image_size",
    "parse_request",
]


def _bounded(endpoint: str, name: str) -> Any:
    b = BOUNDS[endpoint][name]
    return Field(default=b.default, ge=b.low, le=b.high)


class BaseRequest(BaseModel):
    """Fields every endpoint takes. Subclasses are the typed bodies of one endpoint each."""

    # Each endpoint's validator is built when first needed (a run builds only its own), by
    # parse_request under a lock: a first validation from two threads at once (the counter
    # thread and admission) once failed every row as "unknown parameter 'image_size'".
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    endpoint_id: ClassVar[str] = ""

    prompt: NonEmpty
    seed: Seed | None = None
    sync_mode: bool = False
    enable_safety_checker: bool = True

    def to_payload(self) -> dict[str, Any]:
        """The JSON body to send: only the fields the user set, None values dropped."""
        payload = self.model_dump(mode="json", exclude_unset=True)
        loras = getattr(self, "loras", None)
        if "loras" in payload and loras is not None:
            # exclude_unset would also drop an unset scale inside each LoRA: keep it explicit.
            payload["loras"] = [{"path": w.path, "scale": w.scale} for w in loras]
        return {k: v for k, v in payload.items() if v is not None}


class _Flux1(BaseRequest):
    output_format: Literal["jpeg", "png"] = "jpeg"
    acceleration: Literal["none", "regular"] = "none"
    loras: tuple[LoraWeight, ...] = Field(default=())


class FluxLoraRequest(_Flux1):
    endpoint_id: ClassVar[str] = FLUX_LORA
    image_size: ImageSizeValue = "landscape_4_3"
    num_inference_steps: Int = _bounded(FLUX_LORA, "num_inference_steps")
    guidance_scale: Float = _bounded(FLUX_LORA, "guidance_scale")
    num_images: Int = _bounded(FLUX_LORA, "num_images")


class FluxLoraStreamRequest(_Flux1):
    endpoint_id: ClassVar[str] = FLUX_LORA_STREAM
    image_size: ImageSizeValue = "landscape_4_3"
    num_inference_steps: Int = _bounded(FLUX_LORA_STREAM, "num_inference_steps")
    guidance_scale: Float = _bounded(FLUX_LORA_STREAM, "guidance_scale")
    num_images: Int = _bounded(FLUX_LORA_STREAM, "num_images")


class FluxLoraImageToImageRequest(_Flux1):
    endpoint_id: ClassVar[str] = FLUX_LORA_I2I
    image_url: NonEmpty
    image_size: ImageSizeValue | None = None  # no default stated: the output follows the input
    strength: Float = _bounded(FLUX_LORA_I2I, "strength")
    num_inference_steps: Int = _bounded(FLUX_LORA_I2I, "num_inference_steps")
    guidance_scale: Float = _bounded(FLUX_LORA_I2I, "guidance_scale")
    num_images: Int = _bounded(FLUX_LORA_I2I, "num_images")


class FluxLoraInpaintingRequest(_Flux1):
    endpoint_id: ClassVar[str] = FLUX_LORA_INPAINT
    image_url: NonEmpty
    mask_url: NonEmpty
    image_size: ImageSizeValue | None = None
    strength: Float = _bounded(FLUX_LORA_INPAINT, "strength")
    num_inference_steps: Int = _bounded(FLUX_LORA_INPAINT, "num_inference_steps")
    guidance_scale: Float = _bounded(FLUX_LORA_INPAINT, "guidance_scale")
    num_images: Int = _bounded(FLUX_LORA_INPAINT, "num_images")


class _Kontext(BaseRequest):
    image_url: NonEmpty
    acceleration: Literal["none", "regular", "high"] = "none"
    resolution_mode: ResolutionMode = "match_input"


class KontextDevRequest(_Kontext):
    """No ``loras`` field: flux-kontext/dev takes none, so passing one is an unknown key."""

    endpoint_id: ClassVar[str] = KONTEXT_DEV
    output_format: Literal["jpeg", "png"] = "jpeg"
    num_inference_steps: Int = _bounded(KONTEXT_DEV, "num_inference_steps")
    guidance_scale: Float = _bounded(KONTEXT_DEV, "guidance_scale")
    num_images: Int = _bounded(KONTEXT_DEV, "num_images")


class KontextLoraRequest(_Kontext):
    endpoint_id: ClassVar[str] = KONTEXT_LORA
    output_format: Literal["jpeg", "png"] = "png"
    loras: tuple[LoraWeight, ...] = Field(default=())
    num_inference_steps: Int = _bounded(KONTEXT_LORA, "num_inference_steps")
    guidance_scale: Float = _bounded(KONTEXT_LORA, "guidance_scale")
    num_images: Int = _bounded(KONTEXT_LORA, "num_images")


class _Flux2(BaseRequest):
    output_format: Literal["jpeg", "png", "webp"] = "png"
    acceleration: Literal["none", "regular", "high"] = "regular"
    enable_prompt_expansion: bool = False
    loras: tuple[LoraWeight, ...] = Field(default=(), max_length=3)
    image_size: ImageSizeValue | None = None

    @field_validator("image_size")
    @classmethod
    def _within_sides(cls, value: str | ImageSize | None) -> str | ImageSize | None:
        if value is None:
            return value
        low, high = FLUX2_SIDES
        for side, px in zip(("width", "height"), size_of(value), strict=True):
            if not low <= px <= high:
                raise PydanticCustomError(
                    "image_size_side",
                    "has {side} {px} outside {low}-{high} px",
                    {"side": side, "px": px, "low": low, "high": high},
                )
        return value


class Flux2LoraRequest(_Flux2):
    endpoint_id: ClassVar[str] = FLUX2_LORA
    image_size: ImageSizeValue | None = "landscape_4_3"
    num_inference_steps: Int = _bounded(FLUX2_LORA, "num_inference_steps")
    guidance_scale: Float = _bounded(FLUX2_LORA, "guidance_scale")
    num_images: Int = _bounded(FLUX2_LORA, "num_images")


class Flux2EditRequest(_Flux2):
    endpoint_id: ClassVar[str] = FLUX2_EDIT
    # fal silently keeps only the first 3 (seed 001): refuse more instead.
    image_urls: tuple[NonEmpty, ...] = Field(min_length=1, max_length=3)
    num_inference_steps: Int = _bounded(FLUX2_EDIT, "num_inference_steps")
    guidance_scale: Float = _bounded(FLUX2_EDIT, "guidance_scale")
    num_images: Int = _bounded(FLUX2_EDIT, "num_images")


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What the runner and the emulator need to know about one endpoint."""

    id: str
    model: type[BaseRequest]
    kind: Kind
    input_image_fields: tuple[str, ...]  # fields holding input image URLs
    max_loras: int | None  # None = any number, 0 = takes none
    size_control: Literal["image_size", "resolution_mode"]
    default_output_format: Literal["jpeg", "png", "webp"]
    output_formats: tuple[str, ...]
    default_image_size: str | None  # preset used when image_size is not given (text-to-image)
    max_input_images: int = 0
    side_limits: tuple[int, int] | None = None  # explicit image_size width/height range
    max_input_side: int | None = None  # largest input image side the endpoint accepts
    streaming: bool = False
    # The same request with the same seed gives the same image. An assumption, not a
    # documented fact: fal does not promise it (shared/spec/endpoints.md is silent), FLUX on
    # the same weights behaves so. The cross-run cache (--cache) trusts it; a run can say
    # otherwise for an endpoint (RunConfig.nondeterministic_endpoints).
    deterministic: bool = True


_F1_FMT = ("jpeg", "png")
_F2_FMT = ("jpeg", "png", "webp")
CATALOG: Mapping[str, EndpointSpec] = {
    s.id: s
    for s in (
        EndpointSpec(id=FLUX_LORA, model=FluxLoraRequest, kind="text-to-image",
                     input_image_fields=(), max_loras=None, size_control="image_size",
                     default_output_format="jpeg", output_formats=_F1_FMT,
                     default_image_size="landscape_4_3"),
        EndpointSpec(id=FLUX_LORA_I2I, model=FluxLoraImageToImageRequest, kind="image-to-image",
                     input_image_fields=("image_url",), max_loras=None, size_control="image_size",
                     default_output_format="jpeg", output_formats=_F1_FMT,
                     default_image_size=None, max_input_images=1),
        EndpointSpec(id=FLUX_LORA_INPAINT, model=FluxLoraInpaintingRequest, kind="inpainting",
                     input_image_fields=("image_url", "mask_url"), max_loras=None,
                     size_control="image_size", default_output_format="jpeg",
                     output_formats=_F1_FMT, default_image_size=None, max_input_images=1),
        EndpointSpec(id=FLUX_LORA_STREAM, model=FluxLoraStreamRequest, kind="text-to-image",
                     input_image_fields=(), max_loras=None, size_control="image_size",
                     default_output_format="jpeg", output_formats=_F1_FMT,
                     default_image_size="landscape_4_3", streaming=True),
        EndpointSpec(id=KONTEXT_DEV, model=KontextDevRequest, kind="edit",
                     input_image_fields=("image_url",), max_loras=0,
                     size_control="resolution_mode", default_output_format="jpeg",
                     output_formats=_F1_FMT, default_image_size=None, max_input_images=1),
        EndpointSpec(id=KONTEXT_LORA, model=KontextLoraRequest, kind="edit",
                     input_image_fields=("image_url",), max_loras=None,
                     size_control="resolution_mode", default_output_format="png",
                     output_formats=_F1_FMT, default_image_size=None, max_input_images=1,
                     max_input_side=14142),
        EndpointSpec(id=FLUX2_LORA, model=Flux2LoraRequest, kind="text-to-image",
                     input_image_fields=(), max_loras=3, size_control="image_size",
                     default_output_format="png", output_formats=_F2_FMT,
                     default_image_size="landscape_4_3", side_limits=FLUX2_SIDES),
        EndpointSpec(id=FLUX2_EDIT, model=Flux2EditRequest, kind="edit",
                     input_image_fields=("image_urls",), max_loras=3, size_control="image_size",
                     default_output_format="png", output_formats=_F2_FMT,
                     default_image_size=None, max_input_images=3, side_limits=FLUX2_SIDES),
    )
}  # fmt: skip


def get_endpoint(endpoint_id: str, *, allowed: Collection[str] = ()) -> EndpointSpec | None:
    """The spec for an id; None for an unknown id the user allowed (sent untyped).

    Raises UnknownEndpointError, listing the known ids, for any other unknown id.
    """
    spec = CATALOG.get(endpoint_id)
    if spec is None and endpoint_id not in allowed:
        raise errors.UnknownEndpointError(endpoint_id, sorted(CATALOG))
    return spec


def parse_request(endpoint_id: str, payload: Mapping[str, Any]) -> BaseRequest:
    """Validate a payload for a catalog endpoint. Raises pydantic.ValidationError."""
    spec = get_endpoint(endpoint_id)
    assert spec is not None  # no allowed ids were passed
    if not spec.model.__pydantic_complete__:
        with _BUILDING:
            spec.model.model_rebuild()  # does nothing once another thread has built it
    return spec.model.model_validate(dict(payload))


_BUILDING = threading.Lock()


def describe_errors(exc: ValidationError, endpoint_id: str) -> list[tuple[str, str]]:
    """(column, message) pairs, e.g. ("guidance_scale", "guidance_scale=40 is above the
    maximum 35 for fal-ai/flux-lora"). The manifest layer prints them as ``file:line: message``.
    """
    spec = CATALOG.get(endpoint_id)
    return describe(exc, endpoint_id, tuple(spec.model.model_fields) if spec else ())


def num_outputs(request: BaseRequest) -> int:
    """How many images one call returns."""
    return int(getattr(request, "num_images", 1))


def output_size(request: BaseRequest, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (width, height) of each output image; None when it follows an unknown input size.

    ``input_size`` is the first input image's size. Image-to-image, inpainting and FLUX.2
    edit without ``image_size`` follow the input exactly (no limits are published for that).
    """
    mode = getattr(request, "resolution_mode", None)
    if mode is not None:
        return _kontext_size(str(mode), input_size)
    size = getattr(request, "image_size", None)
    if size is not None:
        return size_of(size)
    spec = CATALOG.get(request.endpoint_id)
    if spec is not None and spec.default_image_size is not None:
        return PRESETS[spec.default_image_size]
    return input_size


def _floor16(px: float) -> int:
    return max(KONTEXT_MULTIPLE, int(px) // KONTEXT_MULTIPLE * KONTEXT_MULTIPLE)


def _about_one_mp(ratio: float) -> tuple[int, int]:
    # Floored to multiples of 16 so the result never exceeds 1 MP (and so never bills as 2 MP).
    # fal snaps to trained presets near this ratio; their exact list is not published.
    width = _floor16(math.sqrt(MEGAPIXEL_PX * ratio))
    height = _floor16(math.sqrt(MEGAPIXEL_PX / ratio))
    return min(width, KONTEXT_MAX_SIDE), min(height, KONTEXT_MAX_SIDE)


def _kontext_size(mode: str, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if ":" in mode:
        w, h = mode.split(":")
        return _about_one_mp(int(w) / int(h))
    if input_size is None:
        return None
    width, height = input_size
    if mode == "auto":
        return _about_one_mp(width / height)
    # match_input: each side floored to a multiple of 16 (as diffusers' Kontext pipeline does),
    # then clamped to 16..KONTEXT_MAX_SIDE.
    return min(_floor16(width), KONTEXT_MAX_SIDE), min(_floor16(height), KONTEXT_MAX_SIDE)
