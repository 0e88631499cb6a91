"""Endpoint facts as data: ids, size presets, numeric ranges and their provenance.

Read from shared/spec/endpoints.md (untangled from the seed pages). A range the seeds do not
state is still listed, with ``confirmed=False`` and a note naming where it was borrowed from,
so an assumption shows up in error messages instead of hiding in a constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

FLUX_LORA = "fal-ai/flux-lora"
FLUX_LORA_I2I = "fal-ai/flux-lora/image-to-image"
FLUX_LORA_INPAINT = "fal-ai/flux-lora/inpainting"
FLUX_LORA_STREAM = "fal-ai/flux-lora/stream"
KONTEXT_DEV = "fal-ai/flux-kontext/dev"
KONTEXT_LORA = "fal-ai/flux-kontext-lora"
FLUX2_LORA = "fal-ai/flux-2/lora"
FLUX2_EDIT = "fal-ai/flux-2/lora/edit"

# fal's standard size presets (fal docs; the seeds list the names only).
PRESETS: Mapping[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
Preset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
ResolutionMode = Literal[
    "auto", "match_input", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16",
    "9:21",
]  # fmt: skip
Kind = Literal["text-to-image", "image-to-image", "inpainting", "edit"]

MEGAPIXEL_PX = 1_048_576  # "about 1 MP" for Kontext auto / aspect-ratio modes
KONTEXT_MULTIPLE = 16  # Kontext output sides are multiples of 16 (seed 000/002)
# Largest Kontext side: the 14142 px input limit stated for flux-kontext-lora (seed 000), floored
# to a multiple of 16. Not stated for outputs: an assumption, used only to clamp match_input.
KONTEXT_MAX_SIDE = 14142 // KONTEXT_MULTIPLE * KONTEXT_MULTIPLE
FLUX2_SIDES = (512, 2048)  # FLUX.2 image_size width and height (seeds 001, 003)


@dataclass(frozen=True, slots=True)
class Bound:
    """A numeric parameter's default and inclusive range, and whether a seed states it."""

    default: float
    low: float
    high: float
    confirmed: bool = True
    note: str = ""


_BORROWED = f"unconfirmed: no published range, {KONTEXT_LORA}'s is assumed"
_SIBLINGS = "unconfirmed: no published range, the 1-4 of every sibling endpoint is assumed"
_F1 = {
    "num_inference_steps": Bound(28, 1, 50),
    "guidance_scale": Bound(3.5, 0, 35),
    "num_images": Bound(1, 1, 4),
}
_F1_I2I = {**_F1, "strength": Bound(0.85, 0.01, 1)}
_F2 = {
    "num_inference_steps": Bound(28, 4, 50),
    "guidance_scale": Bound(2.5, 0, 20),
    "num_images": Bound(1, 1, 4),
}
BOUNDS: Mapping[str, Mapping[str, Bound]] = {
    FLUX_LORA: _F1,
    FLUX_LORA_I2I: _F1_I2I,
    FLUX_LORA_INPAINT: _F1_I2I,
    # Seed 004: num_images "is always set to 1 for streaming output". Asking for more would be
    # silently ignored, so the runner refuses it instead.
    FLUX_LORA_STREAM: {
        **_F1,
        "num_images": Bound(1, 1, 1, note="the stream endpoint always returns one image"),
    },
    KONTEXT_DEV: {
        "num_inference_steps": Bound(28, 10, 50, confirmed=False, note=_BORROWED),
        "guidance_scale": Bound(2.5, 0, 20, confirmed=False, note=_BORROWED),
        # Seed 002 gives only the default; the siblings' 1-4 is assumed.
        "num_images": Bound(1, 1, 4, confirmed=False, note=_SIBLINGS),
    },
    KONTEXT_LORA: {
        "num_inference_steps": Bound(30, 10, 50),
        "guidance_scale": Bound(2.5, 0, 20),
        "num_images": Bound(1, 1, 4),
    },
    FLUX2_LORA: _F2,
    FLUX2_EDIT: _F2,
}
