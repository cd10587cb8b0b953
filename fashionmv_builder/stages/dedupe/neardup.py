"""Near-duplicate search over 64-bit perceptual hashes, and the pixel check that confirms a match.

`near_pairs` finds every pair of hashes within a Hamming radius r, exactly, without comparing all N² pairs: it is
multi-index hashing. Split the 64 bits into m disjoint chunks; if two hashes differ in at most r bits, at least one
chunk differs in at most r//m bits (pigeonhole). So each chunk indexes the hashes in a dense table keyed by the
chunk's value, and every hash probes the keys within r//m flips of its own; only the hashes found there are compared
in full. A pair is reported from the first chunk that finds it, so exactly once. With m=3 (21-bit chunks) and r=8,
a million hashes take 3×254 probe passes and about a million candidate comparisons instead of 5·10¹¹. m is chosen by
a small cost model; for small inputs, where a full comparison is cheaper, faiss `IndexBinaryFlat.range_search`
(SIMD popcount, exact) does it in blocks over the upper triangle.

`thumbnail` and `thumb_distance` are the confirmation step. 64-bit hashes see only the coarse layout of an image: on
the sample catalogue, the backs of one garment with a star print or with a cut-out of the same size hash 0-4 bits
apart on one of the two hashes, as close as a re-encoded copy of one photo. A pair found by its hashes is therefore
checked on 64×64 colour thumbnails: the largest mean difference over 4×4-pixel blocks, after removing each image's
mean colour (brightness changes) and letting every pixel match its best neighbour within one pixel (resampling
shifts). Resized, re-encoded or brightened copies score a median of 2.5-9; a changed print, pocket or colour scores
22 and up (docs/dedupe-quality.md has the measurements).
"""

from __future__ import annotations

import io
import itertools
import math
from collections import defaultdict
from collections.abc import Iterator

import faiss
import numpy as np
from PIL import Image

THUMB_SIDE = 64
_BLOCK = 4  # pixels per side of the blocks whose mean difference is scored
_SHIFT = 1  # a pixel may match its neighbours up to this far away
_MAX_TABLE_BITS = 22  # chunks are indexed by a dense table of 2^width counts
_MAX_CANDIDATES = 4_000_000  # candidate pairs expanded at once
_BRUTE_BLOCK = 16384  # rows per faiss call in brute force
# Rough costs on this machine, used only to choose between plans (ns per code per probe pass, per candidate pair,
# per brute-force comparison).
_PASS_NS, _CANDIDATE_NS, _BRUTE_NS = 30.0, 10.0, 0.5


def _split(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m disjoint chunks covering the 64 bits, widths as equal as possible."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def _probe_count(width: int, flips: int) -> int:
    return sum(math.comb(width, k) for k in range(flips + 1))


def _mih_cost(n: int, m: int, radius: int) -> float:
    """Estimated ns for m chunks: one pass over the codes per probe, plus the candidates found (uniform codes)."""
    chunks = _split(m)
    flips = radius // m
    probes = sum(_probe_count(w, flips) for _, w in chunks)
    per_bucket = n / 2 ** min(w for _, w in chunks)
    return probes * n * (_PASS_NS + _CANDIDATE_NS * per_bucket)


def _best_chunk_count(n: int, radius: int) -> int:
    """The number of chunks m (table-sized chunks only) that makes the search cheapest."""
    options = [m for m in range(2, max(3, radius + 1) + 1) if 64 / m <= _MAX_TABLE_BITS]
    return min(options, key=lambda m: _mih_cost(n, m, radius))


def _chunk_keys(codes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((codes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int32)


def _masks(width: int, flips: int) -> list[int]:
    """Every width-bit mask with at most `flips` bits set."""
    return [sum(1 << b for b in bits) for k in range(flips + 1) for bits in itertools.combinations(range(width), k)]


def _mih_pairs(codes: np.ndarray, radius: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-index hashing: some chunk of a pair within r bits differs in ≤ r//m bits; probe exactly those keys."""
    chunks = _split(m)
    flips = radius // m
    keys = [_chunk_keys(codes, shift, width) for shift, width in chunks]
    left, right = [], []
    for c, (_, width) in enumerate(chunks):
        counts = np.bincount(keys[c], minlength=1 << width).astype(np.int32)
        starts = np.cumsum(counts) - counts
        order = np.argsort(keys[c], kind="stable")
        for mask in _masks(width, flips):
            probe = keys[c] ^ mask
            # a pair with different keys is found from both ends: probe only upwards, so once
            queries = np.flatnonzero(probe > keys[c]) if mask else np.arange(len(codes))
            for i, j in _probe_candidates(queries, probe, counts, starts, order):
                keep = (i != j) & (np.bitwise_count(codes[i] ^ codes[j]) <= radius)
                if not mask:
                    keep &= i < j  # same key: each pair from its smaller index only
                i, j = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
                # report a pair only from the first chunk within `flips` bits: exactly once
                for earlier in keys[:c]:
                    first = np.bitwise_count(earlier[i] ^ earlier[j]) > flips
                    i, j = i[first], j[first]
                left.append(i)
                right.append(j)
    return _concat(left), _concat(right)


def _probe_candidates(
    queries: np.ndarray, probe: np.ndarray, counts: np.ndarray, starts: np.ndarray, order: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query, member) index pairs of every code whose key equals a query's probe key, in bounded batches."""
    hits = np.zeros(len(probe), dtype=np.int32)
    hits[queries] = counts[probe[queries]]
    queries = queries[hits[queries] > 0]
    total = np.cumsum(hits[queries])
    # batches of at most _MAX_CANDIDATES pairs, so very alike codes cost time but never unbounded memory
    cuts = np.searchsorted(total, np.arange(_MAX_CANDIDATES, int(total[-1]) if len(total) else 0, _MAX_CANDIDATES))
    for q in np.split(queries, cuts):
        reps = hits[q]
        i = np.repeat(q, reps)
        offset = np.arange(len(i)) - np.repeat(np.cumsum(reps) - reps, reps)
        yield i, order[np.repeat(starts[probe[q]], reps) + offset]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _as_bytes(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes, dtype=np.uint64).view(np.uint8).reshape(-1, 8)


def _brute_pairs(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss IndexBinaryFlat range search, block q against blocks q.. only (its radius is exclusive: +1)."""
    n = len(codes)
    left, right = [], []
    for start in range(0, n, _BRUTE_BLOCK):
        index = faiss.IndexBinaryFlat(64)
        index.add(_as_bytes(codes[start:]))
        stop = min(start + _BRUTE_BLOCK, n)
        lims, _, found = index.range_search(_as_bytes(codes[start:stop]), radius + 1)
        i = start + np.repeat(np.arange(stop - start), np.diff(lims).astype(np.int64))
        j = start + found.astype(np.int64)
        left.append(i[i < j])
        right.append(j[i < j])
    return _concat(left), _concat(right)


def near_pairs(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i<j of 64-bit codes within `radius` bits: (i, j, distance), sorted by (i, j). Exact."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    n = len(codes)
    m = _best_chunk_count(n, radius)
    if _BRUTE_NS * n * n / 2 <= _mih_cost(n, m, radius):
        i, j = _brute_pairs(codes, radius)
    else:
        i, j = _mih_pairs(codes, radius, m)
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    return i, j, np.bitwise_count(codes[i] ^ codes[j]).astype(np.int64)


def group_pairs(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i<j of rows in the same group, for rows sorted by group (e.g. the views of each product)."""
    groups = np.asarray(groups)
    left, right = [], []
    for offset in range(1, len(groups)):
        a = np.flatnonzero(groups[:-offset] == groups[offset:])
        if len(a) == 0:
            break  # groups are contiguous: no longer run exists
        left.append(a)
        right.append(a + offset)
    if not left:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(left), np.concatenate(right)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for x in range(len(self.parent)):
            out.setdefault(self.find(x), []).append(x)
        return out


def thumbnail(data: bytes) -> np.ndarray:
    """64×64 RGB thumbnail of encoded image bytes, each channel's mean removed (float32)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))  # JPEG: decode at reduced size, much faster
        rgb = img.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(rgb, dtype=np.float32)
    return pixels - pixels.reshape(-1, 3).mean(axis=0)


def _nearest_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel of a: the smallest mean-over-channels difference to b's pixels within _SHIFT."""
    k, side = _SHIFT, a.shape[0]
    padded = np.pad(b, ((k, k), (k, k), (0, 0)), mode="edge")
    best = np.full(a.shape[:2], np.inf, dtype=np.float32)
    for dy in range(2 * k + 1):
        for dx in range(2 * k + 1):
            diff = np.abs(a - padded[dy : dy + side, dx : dx + side]).mean(axis=2)
            np.minimum(best, diff, out=best)
    return best


def thumb_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The largest mean difference over 4×4 blocks (grey levels, 0–255): small for copies, large for changes."""
    diff = np.maximum(_nearest_difference(a, b), _nearest_difference(b, a))
    n = THUMB_SIDE // _BLOCK
    return float(diff.reshape(n, _BLOCK, n, _BLOCK).mean(axis=(1, 3)).max())


def matching(pairs: list[tuple[int, int]]) -> dict[int, int]:
    """A maximum one-to-one matching of view pairs (augmenting paths): right view → left view."""
    edges: dict[int, list[int]] = defaultdict(list)
    for a, b in pairs:
        edges[a].append(b)
    partner: dict[int, int] = {}

    def augment(a: int, seen: set[int]) -> bool:
        for b in edges[a]:
            if b not in seen:
                seen.add(b)
                if b not in partner or augment(partner[b], seen):
                    partner[b] = a
                    return True
        return False

    for a in list(edges):
        augment(a, set())
    return partner
