"""The gallery's JSON: one compact card per job, as the page's script reads it.

Keys are one letter to keep a 10,000-card page small: ``r`` row id, ``w`` where (file:line,
variant), ``e`` endpoint, ``s`` state, ``p`` prompt, ``k`` parameters, ``l`` LoRAs, ``m``
metadata, ``d`` seed, ``c`` cost, ``x`` error, ``imgs`` the outputs and ``i`` the inputs
of an edit (:mod:`runner.report.pairs`), each picture ``t`` image source or None, ``h`` link
to the local file, ``u`` remote URL (a link, never loaded), ``n`` a note, ``z`` its size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from runner.endpoints.money import format_usd
from runner.ledger import OutputImage
from runner.report.gallery import GalleryItem, Thumbnails
from runner.report.pairs import InputPictures

_PARAM_CHARS = 120


def card(
    item: GalleryItem,
    thumbs: Thumbnails | None,
    page_dir: Path,
    link: bool,
    inputs: InputPictures | None = None,
) -> dict[str, Any]:
    """One job's card."""
    imgs = []
    for output in item.outputs:
        local = thumbs.local_file(output) if thumbs else None
        href = None if local is None else quote(os.path.relpath(local, page_dir))
        if local is None:
            src, note = None, _missing(output)
        elif link:
            src, note = href, None
        else:
            src = thumbs.data_uri(local) if thumbs else None
            note = None if src else "unreadable image"
        remote = output.url if output.url.startswith(("https://", "http://")) else None
        size = f"{output.width}x{output.height}" if output.width and output.height else None
        imgs.append({"t": src, "h": href, "u": remote, "n": note, "z": size})
    cost = f"billed {format_usd(item.billed_usd)}" if item.billed_usd is not None else None
    if cost is None and item.estimated_usd is not None:
        cost = f"est. {format_usd(item.estimated_usd)}"
    where = f"{item.source or '?'}:{item.line if item.line is not None else '?'}"
    return {
        "r": item.row_id or item.job_key[:12],
        "w": where + (f" #{item.variant}" if item.variant else ""),
        "e": item.endpoint or "",
        "s": item.state.value,
        "p": item.prompt or "",
        "k": [[k, _param(v)] for k, v in sorted(item.parameters.items())],
        "l": [f"{path} × {scale:g}" for path, scale in item.loras],
        "m": [[k, v] for k, v in sorted(item.metadata.items())],
        "d": item.seed,
        "c": cost,
        "x": item.error,
        "imgs": imgs,
        "i": [inputs.picture(f, v) for f, v in item.inputs] if inputs is not None else [],
    }


def _missing(output: OutputImage) -> str:
    if output.local_path and "://" in output.local_path:
        return f"stored at {output.local_path}"
    return "file missing" if output.local_path else "not downloaded"


def _param(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping) and "width" in value and "height" in value:
        text = f"{value['width']}x{value['height']}"
    return text if len(text) <= _PARAM_CHARS else text[: _PARAM_CHARS - 1] + "…"
