"""Before/after pairs for edits: the input images a job's request names, for the gallery.

A request's ``image_url``, ``image_urls`` and ``mask_url`` (:data:`runner.media.inputs.
IMAGE_FIELDS`) each hold a local file (absolute, or relative to the manifest's folder), an
http(s) URL or a ``data:`` URI, as the manifest gave it (the ledger records the request
before any upload). The gallery takes them out of the request
(:attr:`runner.report.gallery.GalleryItem.inputs`); :class:`InputPictures` turns each into
what a card shows, the way the gallery shows outputs: a local file as an embedded
thumbnail (or, with ``link_images``, a path relative to the page); a URL as a link, never an
image the page would load; a data URI as a note.

The manifest's folder is run.json's ``manifest.dir`` (absolute, recorded since run ids
were), else the folder of its ``manifest.path`` as seen from where the report runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from runner.media.inputs import is_data_uri, is_remote, local_path
from runner.report.gallery import Thumbnails


def manifest_dir(folder: str | None, manifest: str | None) -> Path | None:
    """The folder the manifest's relative input paths start from: run.json's
    ``manifest.dir``, else the folder of its ``manifest.path``; None when neither is known."""
    if folder:
        return Path(folder)
    return Path(manifest).parent if manifest else None


class InputPictures:
    """Input images as gallery pictures: ``{"f", "t", "h", "u", "n"}`` per input."""

    def __init__(
        self, base: Path | None, thumbs: Thumbnails | None, page_dir: Path, link: bool
    ) -> None:
        self.base = base
        self.thumbs = thumbs
        self.page_dir = page_dir
        self.link = link

    def picture(self, field: str, value: str) -> dict[str, Any]:
        """``f`` the field, ``v`` its value, ``t`` an image source (data URI or relative
        path) or None, ``h`` a link to the local file, ``u`` a remote URL to link, ``n`` a
        note."""
        shown: dict[str, Any] = {"f": field, "v": value[:200], "t": None, "h": None, "u": None,
                                 "n": None}  # fmt: skip
        if is_remote(value):
            shown["u"] = value if value.startswith(("https://", "http://")) else None
            shown["n"] = "input at a URL (not loaded)"
            return shown
        if is_data_uri(value):
            shown["n"] = "input sent inline (data URI)"
            return shown
        path = local_path(value, self.base or Path.cwd())
        if path is None or not path.is_file():
            shown["n"] = f"input file not found: {value}"
            return shown
        shown["h"] = quote(os.path.relpath(path.resolve(), self.page_dir))
        if self.link:
            shown["t"] = shown["h"]
        elif self.thumbs is not None:
            shown["t"] = self.thumbs.data_uri(path)
            shown["n"] = None if shown["t"] else "unreadable image"
        else:
            shown["n"] = value
        return shown
