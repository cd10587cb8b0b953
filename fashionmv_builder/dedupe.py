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

Resume: each shard's marker holds the dedupe config hash and an input fingerprint made of the ingest shard's file
checksums and the cross-product decisions that touch its products (cluster ids and sizes). Computing those decisions
needs the dataset-wide search, so its fingerprints are memoised in `_plan.json` beside the shards, keyed by every
ingest marker's checksums and the config hash: a rerun with nothing changed reads markers only and does no work.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import DEDUP_PRODUCTS, DEDUP_VIEWS
from fashionmv_builder.config import DedupeConfig, RunConfig, digest
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.neardup import UnionFind, group_pairs, near_pairs, thumb_distance, thumbnail
from fashionmv_builder.runner import run_tasks
from fashionmv_builder.shards import ShardMarker, ShardStore

STAGE = "dedupe"
STAGE_VERSION = "1"  # bump when dedupe's output changes for the same input and config
INPUT_STAGE = "ingest"
PLAN_FILE = "_plan.json"
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

    product_rejects: dict[int, tuple[RejectReason, str, str | None]] = field(default_factory=dict)
    view_rejects: dict[int, tuple[RejectReason, str, str | None]] = field(default_factory=dict)
    cluster: dict[int, tuple[str, int]] = field(default_factory=dict)  # product → (cluster id, size); size>1 only
    stats: dict = field(default_factory=dict)


def stage_hash(config: DedupeConfig) -> str:
    return digest({"stage": STAGE, "version": STAGE_VERSION, "dedupe": config.model_dump(mode="json")})


# ----------------------------------------------------------------------------------------------------------
# reading


def load_catalogue(store: ShardStore, markers: list[ShardMarker]) -> Catalogue:
    """Products and view hashes of every marked ingest shard, without image bytes."""
    products: list[dict] = []
    views: list[dict] = []
    for marker in markers:
        part = store.read_part(marker, "products", columns=_PRODUCT_COLUMNS)
        images = store.read_part(marker, "images", columns=_VIEW_COLUMNS)
        index = {}
        for row in part.to_pylist() if part is not None else []:
            index[row["product_id"]] = len(products)
            products.append({**row, "shard": marker.shard})
        for row_number, row in enumerate(images.to_pylist() if images is not None else []):
            views.append({**row, "product": index[row["product_id"]], "shard": marker.shard, "row": row_number})
    views.sort(key=lambda v: (v["product"], v["file_name"]))
    return Catalogue(
        dataset=store.dataset,
        products=products,
        views=views,
        phash=np.array([v["phash"] for v in views], dtype=np.uint64),
        dhash=np.array([v["dhash"] for v in views], dtype=np.uint64),
    )


class Thumbnails:
    """Thumbnails of views, decoded on demand from the ingest images (only the shards and rows asked for)."""

    def __init__(self, store: ShardStore, markers: list[ShardMarker], catalogue: Catalogue) -> None:
        self.store = store
        self.markers = {m.shard: m for m in markers}
        self.catalogue = catalogue
        self.cache: dict[int, np.ndarray] = {}

    def load(self, wanted: Iterable[int]) -> None:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for v in sorted(set(wanted) - self.cache.keys()):
            by_shard[self.catalogue.views[v]["shard"]].append(v)
        for shard, vs in by_shard.items():
            table = self.store.read_part(self.markers[shard], "images", columns=["image"])
            assert table is not None
            column = table.column("image").combine_chunks().field("bytes")
            for v in vs:
                self.cache[v] = thumbnail(column[self.catalogue.views[v]["row"]].as_py())

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
            decisions.product_rejects[p] = (RejectReason.NOT_CLOTHING_CATEGORY, detail, None)


def size_rejects(catalogue: Catalogue, config: DedupeConfig, decisions: Decisions) -> None:
    for v, view in enumerate(catalogue.views):
        if view["product"] in decisions.product_rejects:
            continue
        w, h = view["width"], view["height"]
        if min(w, h) < config.min_image_side:
            detail = f"{w}x{h}: a side is under dedupe.min_image_side={config.min_image_side}"
            decisions.view_rejects[v] = (RejectReason.IMAGE_TOO_SMALL, detail, None)
        elif max(w, h) / min(w, h) > config.max_aspect_ratio:
            detail = f"{w}x{h}: side ratio {max(w, h) / min(w, h):.2f} is over dedupe.max_aspect_ratio"
            decisions.view_rejects[v] = (RejectReason.EXTREME_ASPECT_RATIO, detail, None)


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
                decisions.view_rejects[v] = (RejectReason.DUPLICATE_VIEW, detail, name)


def _match_count(pairs: list[tuple[int, int]]) -> int:
    """Size of a maximum one-to-one matching of the view pairs (augmenting paths; a product has a few views)."""
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

    return sum(augment(a, set()) for a in list(edges))


def _needed(n_a: int, n_b: int, config: DedupeConfig) -> int:
    return max(config.min_matched_views, int(np.ceil(config.min_matched_fraction * min(n_a, n_b) - 1e-9)))


def candidate_view_pairs(codes_p: np.ndarray, codes_d: np.ndarray, config: DedupeConfig) -> np.ndarray:
    """(i, j) rows whose pHash OR dHash is within its radius: two exact searches, united."""
    pi, pj, _ = near_pairs(codes_p, config.cross_phash_radius)
    di, dj, _ = near_pairs(codes_d, config.cross_dhash_radius)
    pairs = np.concatenate([np.stack([pi, pj], axis=1), np.stack([di, dj], axis=1)])
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def cross_duplicates(catalogue: Catalogue, config: DedupeConfig, thumbs: Thumbnails, decisions: Decisions) -> None:
    """Find re-listed products across the dataset, cluster them, keep one per cluster."""
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
        if _match_count(confirmed) >= _needed(n_views[pa_], n_views[pb], config):
            sets.union(pa_, pb)
            duplicates += 1
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
            decisions.product_rejects[p] = (RejectReason.DUPLICATE_PRODUCT, detail, kept_id)


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
            decisions.product_rejects[p] = (RejectReason.TOO_FEW_VIEWS, detail, None)
            continue
        for rank, v in enumerate(kept[config.max_views :], start=config.max_views + 1):
            detail = f"view {rank} of {len(kept)} in file-name order; the first {config.max_views} are kept"
            decisions.view_rejects[v] = (RejectReason.VIEW_BEYOND_LIMIT, detail, None)


def decide(catalogue: Catalogue, config: DedupeConfig, thumbs: Thumbnails) -> Decisions:
    """Every rule, in order, over one dataset."""
    decisions = Decisions()
    category_rejects(catalogue, config.clothing_categories, decisions)
    size_rejects(catalogue, config, decisions)
    within_duplicates(catalogue, config, thumbs, decisions)
    cross_duplicates(catalogue, config, thumbs, decisions)
    view_count_rules(catalogue, config, decisions)
    return decisions


# ----------------------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class DedupeShard:
    out: str
    dataset: str
    shard: int
    config_hash: str
    fingerprint: str
    products: tuple[dict, ...]  # {"product": ingest product row, "views": [view rows], decisions for both}
    run_config_hash: str


def shard_fingerprint(marker: ShardMarker, product_ids: list[str], cluster: dict[str, tuple[str, int]]) -> str:
    """The ingest shard's checksums plus the cross-product decisions on its products."""
    return digest(
        {
            "ingest": {name: f.sha256 for name, f in sorted(marker.files.items())},
            "clusters": [[pid, *cluster[pid]] for pid in sorted(product_ids) if pid in cluster],
        }
    )


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


def run_shard(task: DedupeShard) -> ShardMarker:
    ledger = ShardLedger(STAGE, task.dataset)
    for key in ("products_truncated", "category_unknown"):  # always present, so stats.json has one shape
        ledger.counts.setdefault(key, 0)
    products, views = [], []
    for item in task.products:
        product = item["product"]
        pid = product["product_id"]
        ledger.counts["products_in"] += 1
        ledger.counts["views_in"] += len(item["views"])
        kept = []
        for view, reject in item["views"]:
            if reject is None:
                kept.append(view)
                continue
            reason, detail, related = reject
            ledger.reject(
                RejectLevel.VIEW,
                reason,
                pid,
                detail,
                view_index=view["view_index"],
                file_name=view["file_name"],
                related_id=related,
            )
        if item["reject"] is not None:
            reason, detail, related = item["reject"]
            ledger.reject(RejectLevel.PRODUCT, reason, pid, detail, related_id=related)
            ledger.counts["views_dropped_with_product"] += len(kept)
            continue
        if any(r is not None and r[0] == RejectReason.VIEW_BEYOND_LIMIT for _, r in item["views"]):
            ledger.counts["products_truncated"] += 1
        if not _category_key(product["category"]):
            ledger.counts["category_unknown"] += 1
        ledger.counts["products_out"] += 1
        ledger.counts["views_out"] += len(kept)
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
        views.extend({**{k: view.get(k) for k in DEDUP_VIEWS.names}, "dataset": task.dataset} for view in kept)
    ledger.check()
    return ShardStore(task.out, STAGE, task.dataset).write(
        task.shard,
        {
            "products": pa.Table.from_pylist(products, schema=DEDUP_PRODUCTS),
            "views": pa.Table.from_pylist(views, schema=DEDUP_VIEWS),
            "rejects": ledger.rejects_table(),
        },
        config_hash=task.config_hash,
        input_fingerprint=task.fingerprint,
        counts=ledger.counts,
        metadata={"fashionmv.stage": STAGE, "fashionmv.run_config_hash": task.run_config_hash},
    )


# ----------------------------------------------------------------------------------------------------------
# the stage


@dataclass
class DedupeReport:
    dataset: str
    shards: int
    skipped: int
    stats: dict


def _ingest_fingerprint(markers: list[ShardMarker]) -> str:
    return digest([[m.shard, m.config_hash, {k: f.sha256 for k, f in sorted(m.files.items())}] for m in markers])


def _read_plan(store: ShardStore) -> dict:
    try:
        return json.loads(store.fs.cat_file(f"{store.base}/{PLAN_FILE}"))
    except (FileNotFoundError, ValueError):
        return {}


def _write_plan(store: ShardStore, plan: dict) -> None:
    store.fs.makedirs(store.base, exist_ok=True)
    store.fs.pipe_file(f"{store.base}/{PLAN_FILE}", (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode())


@dataclass
class DedupePlan:
    """One dataset after the global step: the shards to (re)write, and what to record once they are written."""

    dataset: str
    shards: list[int]  # every ingest shard; the dedupe shards mirror them
    todo: list[DedupeShard]
    extra: dict  # stats.json fields beyond the summed counts
    memo: dict | None = None  # the _plan.json to write after the shards; None when nothing changed
    error: str | None = None


def plan_dataset(config: RunConfig, dataset: str) -> DedupePlan:
    """The dataset-wide step: read the hashes, decide, and cut the decisions into per-shard tasks."""
    source_store = ShardStore(config.output_dir, INPUT_STAGE, dataset)
    markers = source_store.markers()
    if not markers:
        return DedupePlan(dataset, [], [], {}, error="no ingest shards: run ingest first")
    store = ShardStore(config.output_dir, STAGE, dataset)
    config_hash = stage_hash(config.dedupe)
    key = {"config_hash": config_hash, "ingest": _ingest_fingerprint(markers)}
    shards = [m.shard for m in markers]
    plan = _read_plan(store)
    if plan.get("key") == key and all(
        store.is_complete(m.shard, config_hash, plan["fingerprints"].get(str(m.shard), "")) for m in markers
    ):
        return DedupePlan(dataset, shards, [], plan["stats"])

    catalogue = load_catalogue(source_store, markers)
    decisions = decide(catalogue, config.dedupe, Thumbnails(source_store, markers, catalogue))
    cluster = {catalogue.products[p]["product_id"]: c for p, c in decisions.cluster.items()}
    items = _shard_items(catalogue, decisions)
    tasks = []
    for m in markers:
        products = items.get(m.shard, [])
        fp = shard_fingerprint(m, [i["product"]["product_id"] for i in products], cluster)
        tasks.append(
            DedupeShard(config.output_dir, dataset, m.shard, config_hash, fp, tuple(products), config.config_hash())
        )
    todo = [t for t in tasks if not store.is_complete(t.shard, config_hash, t.fingerprint)]
    extra = {
        "thresholds": config.dedupe.model_dump(mode="json"),
        **decisions.stats,
        "notes": {"category_unknown": "products without a source category; the captioning stage decides"},
    }
    memo = {"key": key, "fingerprints": {str(t.shard): t.fingerprint for t in tasks}, "stats": extra}
    return DedupePlan(dataset, shards, todo, extra, memo)


def finish_dataset(config: RunConfig, plan: DedupePlan) -> DedupeReport:
    """After every shard of the plan is written: drop stale markers, memoise the decisions, sum the stats."""
    if plan.error is not None:
        return DedupeReport(plan.dataset, 0, 0, {"error": plan.error})
    store = ShardStore(config.output_dir, STAGE, plan.dataset)
    if plan.memo is not None:
        store.remove_stale(plan.shards)
        _write_plan(store, plan.memo)
    skipped = len(plan.shards) - len(plan.todo)
    return DedupeReport(plan.dataset, len(plan.shards), skipped, store.write_stats(plan.extra))


def dedupe_dataset(config: RunConfig, dataset: str) -> DedupeReport:
    plan = plan_dataset(config, dataset)
    # A shard is a few table rows to write: the work was the dataset-wide search, so one process does it.
    run_tasks(run_shard, plan.todo, workers=1, desc=f"dedupe {dataset}")
    return finish_dataset(config, plan)


def run_dedupe(config: RunConfig, datasets: list[str] | None = None) -> list[DedupeReport]:
    """Dedupe and filter every ingested dataset (or the named ones), skipping shards whose marker matches."""
    return [dedupe_dataset(config, s.dataset) for s in config.sources if not datasets or s.dataset in datasets]
