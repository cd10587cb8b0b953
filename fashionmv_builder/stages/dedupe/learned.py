"""The learned duplicate pass: re-listings the hash rule misses (crops, one photo swapped or added, small re-edits).

Learned features propose, pixels confirm. The pass looks only at product pairs that the hashes already make
plausible (some view pair within the cross radii) or that share a source group, and only at products the hash rule
kept. For such a pair, every view pair whose learned vectors (the embed stage's image encoder, through the same
content-hash cache) are within `learned_min_cosine` is checked on thumbnails with crop tolerance: the 64×64 check of
neardup.py, also after a central crop of either image by 1.5-6% per edge. The pair is one product when the confirmed
pairs match one-to-one all the views of the smaller product, or all but `learned_max_unmatched` of them when it has
at least 3 views: then no left-over view of one may look like a left-over view of the other (hashes within the cross
radii, or cosine at least `learned_conflict_cosine`), because a view that nearly matches but fails the pixel check is
a changed detail, which makes a different product, not a swapped photo.

Measured on the sample (benchmarks/dedupe_quality.py): EfficientNet-Lite0 cosines of 3%/edge crops to their
originals are 0.87-0.99; of the views in which near-misses differ from their base 0.86-0.97 (colour), 0.94-0.99
(mirrored pocket) and 0.63-0.88 (other back detail): no cosine threshold separates a crop from a near-miss, which
is why a learned match is only ever a reason to run the pixel check, never a merge by itself.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from PIL import Image

from fashionmv_builder.core.config import DedupeConfig
from fashionmv_builder.stages.dedupe.neardup import THUMB_SIDE, UnionFind, matching, thumb_distance

CROPS = (0.015, 0.03, 0.045, 0.06)  # central crops per edge tried by the crop-tolerant check
MAX_GROUP = 50  # a source group larger than this is not paired all-to-all (a catch-all group key)


def crop_thumbnail(data: bytes, crop: float) -> np.ndarray:
    """neardup.thumbnail of the image's central part, `crop` of each side cut off."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))
        rgb = img.convert("RGB")
        dx, dy = round(rgb.width * crop), round(rgb.height * crop)
        rgb = rgb.crop((dx, dy, rgb.width - dx, rgb.height - dy)).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(rgb, dtype=np.float32)
    return pixels - pixels.reshape(-1, 3).mean(axis=0)


class CropThumbnails:
    """Thumbnails of views at each crop, decoded once from the view's bytes."""

    def __init__(self, images: Callable[[list[int]], dict[int, bytes]]) -> None:
        self.images = images
        self.cache: dict[tuple[int, float], np.ndarray] = {}

    def load(self, views: list[int]) -> None:
        todo = sorted({v for v in views if (v, 0.0) not in self.cache})
        for v, data in self.images(todo).items():
            for crop in (0.0, *CROPS):
                self.cache[(v, crop)] = crop_thumbnail(data, crop)

    def distance(self, a: int, b: int) -> float:
        """The thumbnail difference, the smallest over a central crop of either image (a crop of the other)."""
        best = thumb_distance(self.cache[(a, 0.0)], self.cache[(b, 0.0)])
        for crop in CROPS:
            best = min(
                best,
                thumb_distance(self.cache[(a, crop)], self.cache[(b, 0.0)]),
                thumb_distance(self.cache[(a, 0.0)], self.cache[(b, crop)]),
            )
        return best


def vectors_by_content(
    encode: Callable[[list[bytes]], np.ndarray], cache_get, cache_put
) -> Callable[[dict[int, bytes]], dict[int, np.ndarray]]:
    """View index → unit vector, through the content-hash cache of the embed stage."""

    def vectors(images: dict[int, bytes]) -> dict[int, np.ndarray]:
        hashes = {v: hashlib.sha256(data).hexdigest() for v, data in images.items()}
        known = cache_get(list(hashes.values()))
        missing = {h: images[v] for v, h in hashes.items() if h not in known}
        fresh = dict(zip(missing, encode(list(missing.values())), strict=True)) if missing else {}
        cache_put(fresh)
        return {v: known.get(h, fresh.get(h)) for v, h in hashes.items()}

    return vectors


def learned_pairs(
    views_of: list[list[int]],
    candidates: set[tuple[int, int]],
    config: DedupeConfig,
    images: Callable[[list[int]], dict[int, bytes]],
    vectors: Callable[[dict[int, bytes]], dict[int, np.ndarray]],
    hash_close: Callable[[int, int], bool],
) -> tuple[list[tuple[int, int]], dict]:
    """The product pairs (of `candidates`) the learned pass finds to be one product, and its counters."""
    involved = sorted({v for pair in candidates for p in pair for v in views_of[p]})
    vector = vectors(images(involved))
    thumbs = CropThumbnails(images)
    found, view_pairs_checked, conflicts = [], 0, 0
    for pa_, pb in sorted(candidates):
        va, vb = views_of[pa_], views_of[pb]
        if not va or not vb:
            continue
        sims = np.stack([vector[v] for v in va]) @ np.stack([vector[v] for v in vb]).T
        close = [(va[i], vb[j]) for i, j in zip(*np.nonzero(sims >= config.learned_min_cosine), strict=True)]
        thumbs.load([v for pair in close for v in pair])
        view_pairs_checked += len(close)
        confirmed = [(a, b) for a, b in close if thumbs.distance(a, b) <= config.verify_max_difference]
        partner = matching(confirmed)
        smaller = min(len(va), len(vb))
        slack = config.learned_max_unmatched if smaller >= 3 else 0
        needed = max(config.min_matched_views, smaller - slack)
        if len(partner) < needed:
            continue
        left_a = [a for a in va if a not in partner.values()]
        left_b = [b for b in vb if b not in partner]
        cosine = {(va[i], vb[j]): float(sims[i, j]) for i in range(len(va)) for j in range(len(vb))}
        if len(partner) < smaller and any(
            hash_close(a, b) or cosine[(a, b)] >= config.learned_conflict_cosine for a in left_a for b in left_b
        ):
            conflicts += 1  # a left-over view nearly matches: a changed detail, not a swapped photo
            continue
        found.append((pa_, pb))
    stats = {
        "candidate_product_pairs": len(candidates),
        "views_encoded_or_cached": len(involved),
        "view_pairs_checked": view_pairs_checked,
        "rejected_for_a_near_matching_left_over_view": conflicts,
        "duplicate_product_pairs": len(found),
    }
    return found, stats


def group_candidates(group_keys: list[str], alive: set[int]) -> set[tuple[int, int]]:
    """Pairs of kept products sharing a source group (groups of at most MAX_GROUP products)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for p, key in enumerate(group_keys):
        if p in alive:
            groups[key].append(p)
    return {
        (a, b) for members in groups.values() if len(members) <= MAX_GROUP for a in members for b in members if a < b
    }


def merge(sets: UnionFind, pairs: list[tuple[int, int]]) -> None:
    for a, b in pairs:
        sets.union(a, b)
