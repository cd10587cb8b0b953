"""Images as the LMM sees them: prepared once per pixel budget, cached by content, sent by reference.

A view is resized to at most `max_pixels` (keeping its aspect ratio), re-encoded as JPEG, and written to a cache
addressed by the sha256 of the view's stored bytes and the budget, so every LMM stage after the first one that
prepared it (caption, verify, selection) reads the small file instead of decoding the full-size photo again. Where
the server shares the disk (a local vLLM started with `--allowed-local-media-path`) it is sent as a `file://` URL, so
no base64 travels; otherwise as a data URI. The sha256 of the resized bytes is what goes into the request key, so a
change of pixel budget is a new request.

A JPEG is decoded at a reduced size (libjpeg's DCT scaling, PIL's `draft`) only where that size still has at least
twice the target's width and height, so the resize that follows still averages every output pixel over at least 2×2
decoded ones. Below that margin the bytes are exactly those of a full decode: the request keys of the builds made
before this cache (whose images needed no more than a 2× shrink per side, e.g. 1–5 MP photos at the caption budget,
and every sample image) stay valid.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fashionmv_builder.core.files import atomic_write

JPEG_QUALITY = 90
DRAFT_MARGIN = 2  # a reduced decode keeps at least this many pixels per output pixel, per side


@dataclass(frozen=True)
class PreparedImage:
    sha256: str
    url: str


class MediaCache:
    """The prepared views at one pixel budget. `folder` None: no disk cache (a build that is not on this disk)."""

    def __init__(self, folder: Path | None, max_pixels: int, share_disk: bool) -> None:
        self.folder = folder
        self.max_pixels = max_pixels
        self.share_disk = share_disk and folder is not None

    def path(self, source_sha256: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.max_pixels}px" / source_sha256[:2] / f"{source_sha256}.jpg"

    def cached(self, data: bytes) -> bool:
        return self.folder is not None and self.path(hashlib.sha256(data).hexdigest()).exists()

    def prepare(self, data: bytes) -> PreparedImage:
        if self.folder is None:
            return self._prepared(fit_to_pixels(data, self.max_pixels), None)
        path = self.path(hashlib.sha256(data).hexdigest())
        try:
            resized = path.read_bytes()
        except FileNotFoundError:
            resized = fit_to_pixels(data, self.max_pixels)
            self.store(path, resized)
        return self._prepared(resized, path)

    @staticmethod
    def store(path: Path, resized: bytes) -> None:
        # Shards in threads or processes may prepare the same image at once: each writes a temporary file of its
        # own and renames it, so the server never reads a half-written image.
        atomic_write(path, resized)

    def _prepared(self, resized: bytes, path: Path | None) -> PreparedImage:
        digest = hashlib.sha256(resized).hexdigest()
        if self.share_disk and path is not None:
            return PreparedImage(digest, path.resolve().as_uri())
        return PreparedImage(digest, "data:image/jpeg;base64," + base64.b64encode(resized).decode())


def warm(caches: Sequence[MediaCache], data: bytes) -> None:
    """Prepare one view at every budget of `caches` not yet in the cache, decoding it as few times as possible."""
    source = hashlib.sha256(data).hexdigest()
    missing = [c for c in caches if c.folder is not None and not c.path(source).exists()]
    if not missing:
        return
    prepared = prepare_views(data, [c.max_pixels for c in missing])
    for cache in missing:
        cache.store(cache.path(source), prepared[cache.max_pixels])


def fit_to_pixels(data: bytes, max_pixels: int) -> bytes:
    """The JPEG bytes the LMM is sent for an image: at most `max_pixels`, aspect ratio kept."""
    return prepare_views(data, [max_pixels])[max_pixels]


def prepare_views(data: bytes, budgets: Iterable[int]) -> dict[int, bytes]:
    """`fit_to_pixels` at each budget, sharing one decode among the budgets that decode at the same reduced size."""
    with Image.open(io.BytesIO(data)) as probe:
        size, is_jpeg = probe.size, probe.format == "JPEG"
    by_scale: dict[int, list[tuple[int, tuple[int, int] | None]]] = {}
    for budget in sorted(set(budgets), reverse=True):
        target = _target(size, budget)
        by_scale.setdefault(_draft_scale(size, target) if is_jpeg else 1, []).append((budget, target))
    out: dict[int, bytes] = {}
    for scale, wanted in by_scale.items():
        with Image.open(io.BytesIO(data)) as img:
            if scale > 1:
                img.draft("RGB", (size[0] // scale, size[1] // scale))  # PIL picks the largest scale that fits
            pixels = img.convert("RGB")
        for budget, target in wanted:
            resized = pixels.resize(target) if target is not None else pixels
            buf = io.BytesIO()
            resized.save(buf, format="JPEG", quality=JPEG_QUALITY)
            out[budget] = buf.getvalue()
    return out


def _target(size: tuple[int, int], max_pixels: int) -> tuple[int, int] | None:
    """The size an image of `size` is resized to for `max_pixels`; None when it already fits."""
    scale = math.sqrt(max_pixels / (size[0] * size[1]))
    if scale >= 1:
        return None
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _draft_scale(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that keeps DRAFT_MARGIN× the target's width and height."""
    if target is None:
        return 1
    scale = 1
    while scale < 8 and all(math.ceil(s / (scale * 2)) >= DRAFT_MARGIN * t for s, t in zip(size, target, strict=True)):
        scale *= 2
    return scale
