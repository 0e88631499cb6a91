"""What an emulated output image looks like: a cheap picture, a function of its request.

:func:`render` draws a picture from (seed, salt, size, format): the same inputs always give
the same bytes. :func:`render_salt` is what the salt is: the request (input images named by
their content, :func:`render_body`) and the image's index, never the request id, so the same
request with the same seed renders the same bytes, as FLUX does.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Pillow loads when the first image is rendered, not when the emulator starts
    from PIL import Image

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_FORMATS = {name: name for name in CONTENT_TYPES} | {"jpg": "jpeg"}
MAX_SIDE = 16_384


def normalize_format(fmt: str) -> str:
    """``jpeg``/``jpg``/``png``/``webp`` (any case) -> the canonical name; ValueError otherwise.

    The name returned is always the same string object, so the output registry does not hold
    a copy per image.
    """
    name = _FORMATS.get(fmt.lower())
    if name is None:
        raise ValueError(f"unsupported output format {fmt!r}")
    return name


def render_salt(endpoint: str, body: Mapping[str, Any], index: int) -> str:
    """What, besides the seed, an output's picture is a function of: the request and the
    image's index. Not the request id: the same request with the same seed renders the same
    bytes, as FLUX does. The seed is left out (it is rendered in its own right) and so is
    ``sync_mode``, which changes how an image is delivered, not what it shows."""
    kept = {k: v for k, v in body.items() if k not in ("seed", "sync_mode")}
    text = json.dumps([endpoint, kept], sort_keys=True, separators=(",", ":"), default=str)
    return f"{hashlib.sha256(text.encode()).hexdigest()[:32]}/{index}"


def render(
    *, width: int, height: int, fmt: str, seed: int, salt: str, black: bool = False
) -> bytes:
    """Encode a cheap picture that differs visibly per seed; same inputs, same bytes.

    ``black``: what FLUX returns for an image its safety checker flagged.
    """
    fmt = normalize_format(fmt)
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"image size {width}x{height} is out of range")
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    if black:
        return _encode(Image.new("RGB", (width, height)), fmt)
    digest = hashlib.sha256(f"{seed}|{salt}|{width}x{height}|{fmt}".encode()).digest()
    rng = random.Random(digest)

    def color() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    # Rotate, then keep the central square that every rotation still covers (256 / sqrt 2).
    gradient = (
        Image.linear_gradient("L")
        .rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
        .crop((38, 38, 218, 218))
        .resize((width, height), Image.Resampling.BILINEAR)
    )
    image = ImageOps.colorize(gradient, color(), color())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 6)):
        x0, x1 = sorted((rng.randrange(width), rng.randrange(width)))
        y0, y1 = sorted((rng.randrange(height), rng.randrange(height)))
        shape = rng.choice(("ellipse", "rectangle", "triangle"))
        if shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=color())
        elif shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=color())
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=color())
    font = ImageFont.load_default(size=max(8, min(width, height) // 12))
    draw.text((width // 20, height // 20), f"seed {seed}", fill=(255, 255, 255), font=font)
    return _encode(image, fmt)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    elif fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="WEBP", quality=80, method=0)
    return buffer.getvalue()


def render_body(
    body: Mapping[str, Any], fields: Sequence[str], content_id: Callable[[str], str | None]
) -> dict[str, Any]:
    """``body`` with each input image ``content_id`` knows named by its content."""
    out = dict(body)
    for name in fields:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = content_id(value) or value
        elif isinstance(value, list):
            out[name] = [(content_id(v) or v) if isinstance(v, str) else v for v in value]
    return out
