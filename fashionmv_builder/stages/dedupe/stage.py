"""Dedupe and filter: duplicate views, re-listed products, non-clothing, image size and the 2-5 view rule.

In: the `ingest` shards of a dataset (hashes and sizes only; image bytes are read just for the few views a hash
match must be confirmed on). Out: `dedupe` shards aligned with the ingest shards (a product stays in its shard
number) holding `products` (with a cluster id), `views` (references to the ingest images, no bytes) and `rejects`,
plus stats.json. The rules, in order, each seeing only what the previous ones kept:

1. category (product): with `dedupe.clothing_categories` set, a product whose source category is not in the list is
   rejected `not_clothing_category`. Products without a category pass and are counted as `category_unknown`: the
   captioning stage decides whether they are clothing.
2. image size (view): a side under `min_image_side` is `image_too_small`; a side ratio over `max_aspect_ratio` is
   `extreme_aspect_ratio`.
3. duplicate views (view): views of one product whose pHash and dHash distances add up to at most
   `within_max_distance`, and whose thumbnails agree, are one view; the largest image is kept, the others are
   rejected `duplicate_view` with the kept file name as `related_id`.
4. re-listed products (product): a view pair of two products is a match when its pHash or its dHash is within the
   cross radii (an exact all-pairs search over every view of the dataset, `neardup.near_pairs`) and its 64×64
   thumbnails agree (`neardup.thumb_distance`). Two products are one when their matched views pair up one-to-one
   and cover at least `min_matched_fraction` of the smaller product's views (and at least `min_matched_views`):
   a re-listing shows the same photos, while a near-miss (same garment, other pocket side, colour or back print)
   differs in at least one view. Matches are merged into clusters with union-find; the product with most views
   (then most pixels, then the smallest id) is kept and carries the cluster id and size; the others are rejected
   `duplicate_product` with the kept id as `related_id`.
5. view count (product/view): under `min_views` views is `too_few_views`; over `max_views`, the first ones in
   plain sorted file-name order are kept (as FashionMV's evaluation reads them) and the rest are rejected
   `view_beyond_limit`.

Horizontal flips are not duplicates. A mirrored photo swaps the wearer's left and right, so for any garment that is
not symmetric it shows a different product: the mirror image of a jacket with a pocket on the wearer's left is the
same jacket with the pocket on the right, which is exactly the near-miss a composed-retrieval triplet is made of.
Neither the hashes (pHash flips about half its bits under a mirror) nor the thumbnail check are mirror-invariant,
and no flipped hash is searched, so a mirrored re-listing stays a separate product; for a symmetric garment that is
a missed duplicate, which we accept rather than merge mirrored-detail products.

Resume: the rules look at the whole dataset, so every shard reads every ingest shard (its fingerprint covers them
all): a rerun with nothing changed reads markers only and does no work; a change anywhere redoes the dataset-wide
search once and rewrites the shards (a few table rows each).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import pyarrow as pa

from fashionmv_builder.core.build import DEDUPE_PRODUCTS, DEDUPE_VIEWS, INGEST_IMAGES, INGEST_PRODUCTS, Build
from fashionmv_builder.core.config import DedupeConfig
from fashionmv_builder.core.ledger import Reject
from fashionmv_builder.core.stage import ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.dedupe.learned import group_candidates, learned_pairs, merge, vectors_by_content
from fashionmv_builder.stages.dedupe.neardup import (
    UnionFind,
    group_pairs,
    matching,
    near_pairs,
    thumb_distance,
    thumbnail,
)

_PRODUCT_COLUMNS = ["product_id", "group_key", "split", "category"]
_VIEW_COLUMNS = ["product_id", "view_index", "file_name", "view", "width", "height", "phash", "dhash"]


@dataclass
class Catalogue:
    """One dataset's products and views as dedupe sees them; views sorted by (product, file name)."""

    dataset: str
    products: list[dict]  # ingest product fields + "shard"
    views: list[dict]  # ingest image fields (no bytes) + "product" (index into products), "shard", "row"
    phash: np.ndarray
    dhash: np.ndarray

    def views_of(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.products]
        for v, view in enumerate(self.views):
            out[view["product"]].append(v)
        return out


@dataclass
class Decisions:
    """What dedupe decided for a dataset: rejects by product and by view, and the clusters of re-listed products."""

    product_rejects: dict[int, Reject] = field(default_factory=dict)
    view_rejects: dict[int, Reject] = field(default_factory=dict)
    cluster: dict[int, tuple[str, int]] = field(default_factory=dict)  # product → (cluster id, size); size>1 only
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# reading


def load_catalogue(build: Build, dataset: str) -> Catalogue:
    """Products and view hashes of every marked ingest shard, without image bytes."""
    products: list[dict] = []
    views: list[dict] = []
    for marker in build.markers(INGEST_PRODUCTS, dataset):
        part = build.read_shard(INGEST_PRODUCTS, dataset, marker.shard, columns=_PRODUCT_COLUMNS)
        images = build.read_shard(INGEST_IMAGES, dataset, marker.shard, columns=_VIEW_COLUMNS)
        index = {}
        for row in part.to_pylist():
            index[row["product_id"]] = len(products)
            products.append({**row, "shard": marker.shard})
        for row_number, row in enumerate(images.to_pylist()):
            views.append({**row, "product": index[row["product_id"]], "shard": marker.shard, "row": row_number})
    views.sort(key=lambda v: (v["product"], v["file_name"]))
    return Catalogue(
        dataset=dataset,
        products=products,
        views=views,
        phash=np.array([v["phash"] for v in views], dtype=np.uint64),
        dhash=np.array([v["dhash"] for v in views], dtype=np.uint64),
    )


class Thumbnails:
    """Thumbnails of views, decoded on demand from the ingest images (only the shards and rows asked for)."""

    def __init__(self, build: Build, catalogue: Catalogue) -> None:
        self.build = build
        self.catalogue = catalogue
        self.cache: dict[int, np.ndarray] = {}

    def load(self, wanted: Iterable[int]) -> None:
        for v, data in self.images(sorted(set(wanted) - self.cache.keys())).items():
            self.cache[v] = thumbnail(data)

    def images(self, wanted: list[int]) -> dict[int, bytes]:
        """The encoded bytes of these views, read shard by shard."""
        by_shard: dict[int, list[int]] = defaultdict(list)
        for v in wanted:
            by_shard[self.catalogue.views[v]["shard"]].append(v)
        out = {}
        for shard, vs in by_shard.items():
            table = self.build.read_shard(INGEST_IMAGES, self.catalogue.dataset, shard, columns=["image"])
            column = table.column("image").combine_chunks().field("bytes")
            for v in vs:
                out[v] = column[self.catalogue.views[v]["row"]].as_py()
        return out

    def distance(self, a: int, b: int) -> float:
        return thumb_distance(self.cache[a], self.cache[b])


# ----------------------------------------------------------------------------------------------------------
# the rules


def _category_key(category: str | None) -> str:
    return (category or "").strip().lower()


def category_rejects(catalogue: Catalogue, allow: tuple[str, ...] | None, decisions: Decisions) -> None:
    if allow is None:
        return
    allowed = {_category_key(c) for c in allow}
    for p, product in enumerate(catalogue.products):
        key = _category_key(product["category"])
        if key and key not in allowed and key.split("/", 1)[0] not in allowed:
            detail = f"category {product['category']!r} is not in dedupe.clothing_categories"
            decisions.product_rejects[p] = Reject(RejectReason.NOT_CLOTHING_CATEGORY, detail, None)


def size_rejects(catalogue: Catalogue, config: DedupeConfig, decisions: Decisions) -> None:
    for v, view in enumerate(catalogue.views):
        if view["product"] in decisions.product_rejects:
            continue
        w, h = view["width"], view["height"]
        if min(w, h) < config.min_image_side:
            detail = f"{w}x{h}: a side is under dedupe.min_image_side={config.min_image_side}"
            decisions.view_rejects[v] = Reject(RejectReason.IMAGE_TOO_SMALL, detail, None)
        elif max(w, h) / min(w, h) > config.max_aspect_ratio:
            detail = f"{w}x{h}: side ratio {max(w, h) / min(w, h):.2f} is over dedupe.max_aspect_ratio"
            decisions.view_rejects[v] = Reject(RejectReason.EXTREME_ASPECT_RATIO, detail, None)


def _alive_views(catalogue: Catalogue, decisions: Decisions) -> np.ndarray:
    return np.array(
        [
            v
            for v, view in enumerate(catalogue.views)
            if v not in decisions.view_rejects and view["product"] not in decisions.product_rejects
        ],
        dtype=np.int64,
    )


def _pixels(view: dict) -> int:
    return int(view["width"]) * int(view["height"])


def within_duplicates(catalogue: Catalogue, config: DedupeConfig, thumbs: Thumbnails, decisions: Decisions) -> None:
    """Collapse near-identical views of one product; the largest image (then the first file name) is kept."""
    alive = _alive_views(catalogue, decisions)
    products = np.array([catalogue.views[v]["product"] for v in alive], dtype=np.int64)
    a, b = group_pairs(products)
    a, b = alive[a], alive[b]
    distance = np.bitwise_count(catalogue.phash[a] ^ catalogue.phash[b]) + np.bitwise_count(
        catalogue.dhash[a] ^ catalogue.dhash[b]
    )
    close = distance <= config.within_max_distance
    a, b = a[close], b[close]
    thumbs.load(np.concatenate([a, b]).tolist())
    verified = [
        (int(x), int(y)) for x, y in zip(a, b, strict=True) if thumbs.distance(x, y) <= config.verify_max_difference
    ]
    decisions.stats["within_product"] = {"candidate_view_pairs": int(close.sum()), "confirmed": len(verified)}
    sets = UnionFind(len(catalogue.views))
    for x, y in verified:
        sets.union(x, y)
    for members in sets.groups().values():
        if len(members) < 2:
            continue
        kept = min(members, key=lambda v: (-_pixels(catalogue.views[v]), catalogue.views[v]["file_name"]))
        for v in members:
            if v != kept:
                name = catalogue.views[kept]["file_name"]
                detail = f"the same image as {name} (kept: the larger, or the first in file-name order)"
                decisions.view_rejects[v] = Reject(RejectReason.DUPLICATE_VIEW, detail, name)


def _needed(n_a: int, n_b: int, config: DedupeConfig) -> int:
    return max(config.min_matched_views, int(np.ceil(config.min_matched_fraction * min(n_a, n_b) - 1e-9)))


def candidate_view_pairs(codes_p: np.ndarray, codes_d: np.ndarray, config: DedupeConfig) -> np.ndarray:
    """(i, j) rows whose pHash OR dHash is within its radius: two exact searches, united."""
    pi, pj, _ = near_pairs(codes_p, config.cross_phash_radius)
    di, dj, _ = near_pairs(codes_d, config.cross_dhash_radius)
    pairs = np.concatenate([np.stack([pi, pj], axis=1), np.stack([di, dj], axis=1)])
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


ViewVectors = Callable[[dict[int, bytes]], dict[int, np.ndarray]]  # view index → unit vector, from its bytes


def cross_duplicates(
    catalogue: Catalogue,
    config: DedupeConfig,
    thumbs: Thumbnails,
    decisions: Decisions,
    vectors: ViewVectors | None = None,
) -> None:
    """Find re-listed products across the dataset, cluster them, keep one per cluster. With `vectors`, the learned
    pass (learned.py) then looks again at the pairs the hashes made plausible and at those sharing a source group."""
    alive = _alive_views(catalogue, decisions)
    pairs = alive[candidate_view_pairs(catalogue.phash[alive], catalogue.dhash[alive], config)]
    owner = np.array([v["product"] for v in catalogue.views], dtype=np.int64)
    pairs = pairs[owner[pairs[:, 0]] != owner[pairs[:, 1]]]
    n_views = np.bincount(owner[alive], minlength=len(catalogue.products))

    by_products: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for a, b in pairs.tolist():
        if owner[a] > owner[b]:
            a, b = b, a
        by_products[(int(owner[a]), int(owner[b]))].append((a, b))
    # only product pairs that could still reach the rule are worth decoding thumbnails for
    hopeful = {
        key: vp
        for key, vp in by_products.items()
        if min(len({a for a, _ in vp}), len({b for _, b in vp})) >= _needed(n_views[key[0]], n_views[key[1]], config)
    }
    thumbs.load(v for vp in hopeful.values() for pair in vp for v in pair)
    sets = UnionFind(len(catalogue.products))
    duplicates = 0
    for (pa_, pb), vp in sorted(hopeful.items()):
        confirmed = [(a, b) for a, b in vp if thumbs.distance(a, b) <= config.verify_max_difference]
        if len(matching(confirmed)) >= _needed(n_views[pa_], n_views[pb], config):
            sets.union(pa_, pb)
            duplicates += 1
    if vectors is not None and config.learned:
        _learned_pass(catalogue, config, thumbs, decisions, vectors, sets, set(by_products), alive)
    clusters = [m for m in sets.groups().values() if len(m) > 1]
    pixels = np.bincount(owner[alive], weights=[_pixels(catalogue.views[v]) for v in alive], minlength=len(n_views))
    for members in clusters:
        _keep_one(catalogue, members, n_views, pixels, decisions)
    decisions.stats["cross_product"] = {
        "views_searched": len(alive),
        "candidate_view_pairs": len(pairs),
        "candidate_product_pairs": len(by_products),
        "product_pairs_checked": len(hopeful),
        "duplicate_product_pairs": duplicates,
        "clusters": len(clusters),
        "largest_cluster": max((len(m) for m in clusters), default=1),
    }


def _learned_pass(
    catalogue: Catalogue,
    config: DedupeConfig,
    thumbs: Thumbnails,
    decisions: Decisions,
    vectors: ViewVectors,
    sets: UnionFind,
    hash_pairs: set[tuple[int, int]],
    alive: np.ndarray,
) -> None:
    alive_set = set(alive.tolist())
    views_of = [[v for v in vs if v in alive_set] for vs in catalogue.views_of()]
    kept = {p for p, vs in enumerate(views_of) if vs and p not in decisions.product_rejects}
    groups = group_candidates([p["group_key"] for p in catalogue.products], kept)
    candidates = {(a, b) for a, b in hash_pairs | groups if a in kept and b in kept and sets.find(a) != sets.find(b)}

    def hash_close(a: int, b: int) -> bool:
        phash = int(catalogue.phash[a] ^ catalogue.phash[b]).bit_count() <= config.cross_phash_radius
        return phash or int(catalogue.dhash[a] ^ catalogue.dhash[b]).bit_count() <= config.cross_dhash_radius

    found, stats = learned_pairs(views_of, candidates, config, thumbs.images, vectors, hash_close)
    merge(sets, found)
    decisions.stats["learned"] = stats


def _keep_one(
    catalogue: Catalogue, members: list[int], n_views: np.ndarray, pixels: np.ndarray, decisions: Decisions
) -> None:
    """The product with most views, then most pixels (the original over a shrunk copy), then the smallest id."""
    kept = min(members, key=lambda p: (-n_views[p], -pixels[p], catalogue.products[p]["product_id"]))
    kept_id = catalogue.products[kept]["product_id"]
    for p in members:
        decisions.cluster[p] = (kept_id, len(members))
        if p != kept:
            detail = f"a re-listing of {kept_id!r} (cluster of {len(members)}; kept: most views, then most pixels)"
            decisions.product_rejects[p] = Reject(RejectReason.DUPLICATE_PRODUCT, detail, kept_id)


def view_count_rules(catalogue: Catalogue, config: DedupeConfig, decisions: Decisions) -> None:
    """2-5 views: too few rejects the product; beyond the limit, the first in file-name order are kept."""
    for p, views in enumerate(catalogue.views_of()):
        if p in decisions.product_rejects:
            continue
        kept = sorted(
            (v for v in views if v not in decisions.view_rejects), key=lambda v: catalogue.views[v]["file_name"]
        )
        if len(kept) < config.min_views:
            detail = f"{len(kept)} usable view(s) of {len(views)}; at least dedupe.min_views={config.min_views} needed"
            decisions.product_rejects[p] = Reject(RejectReason.TOO_FEW_VIEWS, detail, None)
            continue
        for rank, v in enumerate(kept[config.max_views :], start=config.max_views + 1):
            detail = f"view {rank} of {len(kept)} in file-name order; the first {config.max_views} are kept"
            decisions.view_rejects[v] = Reject(RejectReason.VIEW_BEYOND_LIMIT, detail, None)


def decide(
    catalogue: Catalogue, config: DedupeConfig, thumbs: Thumbnails, vectors: ViewVectors | None = None
) -> Decisions:
    """Every rule, in order, over one dataset (the learned pass only with `vectors`)."""
    decisions = Decisions()
    category_rejects(catalogue, config.clothing_categories, decisions)
    size_rejects(catalogue, config, decisions)
    within_duplicates(catalogue, config, thumbs, decisions)
    cross_duplicates(catalogue, config, thumbs, decisions, vectors)
    view_count_rules(catalogue, config, decisions)
    return decisions


# ----------------------------------------------------------------------------------------------------------
# writing


def _shard_items(catalogue: Catalogue, decisions: Decisions) -> dict[int, list[dict]]:
    """Per shard, each product with its views and what was decided for them."""
    views_of = catalogue.views_of()
    items: dict[int, list[dict]] = defaultdict(list)
    for p, product in enumerate(catalogue.products):
        cluster_id, size = decisions.cluster.get(p, (product["product_id"], 1))
        items[product["shard"]].append(
            {
                "product": product,
                "reject": decisions.product_rejects.get(p),
                "cluster": (cluster_id, size),
                "views": [(catalogue.views[v], decisions.view_rejects.get(v)) for v in views_of[p]],
            }
        )
    return items


class DedupeStage(Stage):
    """Perceptual-hash dedupe within and across products, image and 2-5 view rules."""

    name = DEDUPE_PRODUCTS.stage
    version = "1"
    work = Work.DATASET
    reads = (INGEST_PRODUCTS.every_shard(), INGEST_IMAGES.every_shard())
    writes: ClassVar[dict] = {DEDUPE_PRODUCTS.table: tables.DEDUP_PRODUCTS, DEDUPE_VIEWS.table: tables.DEDUP_VIEWS}

    def settings(self, dataset: str) -> dict:
        settings = {"dedupe": self.config.dedupe.model_dump(mode="json")}
        if self.config.dedupe.learned:
            settings["image_encoder"] = self._encoder().identity
        return settings

    def _encoder(self):  # -> ImageEncoder; the embed stage's, loaded only when the learned pass runs
        from fashionmv_builder.stages.embed.encoders import image_encoder

        return image_encoder(self.config.embed.image)

    def view_vectors(self) -> ViewVectors:
        """Learned view vectors, through the embed stage's content-hash cache (embed then finds them there)."""
        from fashionmv_builder.stages.embed.cache import VectorCache

        encoder = self._encoder()
        cache = VectorCache(*self.build.image_vector_cache(self.config.embed.image.cache_dir), encoder.identity)
        return vectors_by_content(encoder.encode, cache.get, cache.put)

    def prepare(self, dataset: str, todo: list[ShardTask]) -> tuple[list[ShardTask], dict]:
        """The dataset-wide step: read every hash, decide, and hand each shard its products and decisions."""
        catalogue = load_catalogue(self.build, dataset)
        vectors = self.view_vectors() if self.config.dedupe.learned else None
        decisions = decide(catalogue, self.config.dedupe, Thumbnails(self.build, catalogue), vectors)
        items = _shard_items(catalogue, decisions)
        extra = {
            "thresholds": self.config.dedupe.model_dump(mode="json"),
            **decisions.stats,
            "notes": {"category_unknown": "products without a source category; the captioning stage decides"},
        }
        return [replace(t, payload=tuple(items.get(t.shard, []))) for t in todo], extra

    def run_shard(self, task: ShardTask) -> ShardOutput:
        ledger = self.ledger(task.dataset)
        for key in ("products_truncated", "category_unknown"):  # always present, so stats.json has one shape
            ledger.counts.setdefault(key, 0)
        products, views = [], []
        for item in task.payload:
            product = item["product"]
            pid = product["product_id"]
            ledger.take(len(item["views"]))
            kept = []
            for view, reject in item["views"]:
                if reject is None:
                    kept.append(view)
                    continue
                ledger.reject_view(reject, pid, view_index=view["view_index"], file_name=view["file_name"])
            if item["reject"] is not None:
                ledger.reject_product(item["reject"], pid, views_left=len(kept))
                continue
            if any(r is not None and r.reason == RejectReason.VIEW_BEYOND_LIMIT for _, r in item["views"]):
                ledger.counts["products_truncated"] += 1
            if not _category_key(product["category"]):
                ledger.counts["category_unknown"] += 1
            ledger.keep(len(kept))
            cluster_id, size = item["cluster"]
            products.append(
                {
                    "dataset": task.dataset,
                    "product_id": pid,
                    "cluster_id": cluster_id,
                    "cluster_size": size,
                    "group_key": product["group_key"],
                    "split": product["split"],
                    "category": product["category"],
                    "n_views": len(kept),
                }
            )
            views.extend(
                {**{k: view.get(k) for k in tables.DEDUP_VIEWS.names}, "dataset": task.dataset} for view in kept
            )
        return ShardOutput(
            {
                DEDUPE_PRODUCTS.table: pa.Table.from_pylist(products, schema=tables.DEDUP_PRODUCTS),
                DEDUPE_VIEWS.table: pa.Table.from_pylist(views, schema=tables.DEDUP_VIEWS),
            },
            ledger,
        )
