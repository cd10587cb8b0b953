"""Images as the LMM sees them: resized once to the pixel budget, cached by content, sent by reference.

A view is resized to at most `max_pixels` (keeping its aspect ratio), re-encoded as JPEG, and written to a
content-addressed cache. Where the server shares the disk (a local vLLM started with `--allowed-local-media-path`)
it is sent as a `file://` URL, so no base64 travels; otherwise as a data URI. The sha256 of the resized bytes is
what goes into the request key, so a change of pixel budget is a new request.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fashionmv_builder.core.files import atomic_write


@dataclass(frozen=True)
class PreparedImage:
    sha256: str
    url: str


class MediaCache:
    def __init__(self, folder: Path, max_pixels: int, share_disk: bool) -> None:
        self.folder = folder
        self.max_pixels = max_pixels
        self.share_disk = share_disk

    def prepare(self, data: bytes) -> PreparedImage:
        resized = fit_to_pixels(data, self.max_pixels)
        digest = hashlib.sha256(resized).hexdigest()
        if not self.share_disk:
            return PreparedImage(digest, "data:image/jpeg;base64," + base64.b64encode(resized).decode())
        path = self.folder / digest[:2] / f"{digest}.jpg"
        if not path.exists():
            # Shards in threads or processes may prepare the same image at once: each writes a temporary file of its
            # own and renames it, so the server never reads a half-written image.
            atomic_write(path, resized)
        return PreparedImage(digest, path.resolve().as_uri())


def fit_to_pixels(data: bytes, max_pixels: int) -> bytes:
    """The JPEG bytes the LMM is sent for an image: at most `max_pixels`, aspect ratio kept."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        scale = math.sqrt(max_pixels / (img.width * img.height))
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90)
        return out.getvalue()
