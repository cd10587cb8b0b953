"""The four published tables (the Hub configs) of a build, and the takedown filter over them.

    products        every product of Stage 3 with its split, source, licence and kept views (file name, source
                    path, sha256 of the bytes); with images, an `images` column of `Image`s too
    captions        Stage 1 captions of those products
    triplets        Stage 3 triplets: source, target, modification texts, views involved, candidates shown
    hard_negatives  the shown candidates not chosen, per triplet

Products are referenced by `(dataset, product_id)`; `source_id`, `target_id`, `negative_id` and `candidate_ids` are
product ids within the row's dataset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from fashionmv_builder.core import build as refs
from fashionmv_builder.core.build import Build
from fashionmv_builder.data_schema import tables as schema

CONFIGS = ("triplets", "captions", "products", "hard_negatives")
SPLITS = ("train", "val")

VIEW = pa.struct(
    [
        ("view_index", pa.int16()),
        ("file_name", pa.string()),
        ("view", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_uri", pa.string()),  # where the image came from: a user who owns it can fetch it again
        ("sha256", pa.string()),  # of the ingested bytes, to check a re-fetched image is the same
    ]
)

PRODUCTS = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("product_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("group_key", pa.string()),
        pa.field("cluster_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("gender", pa.string()),
        pa.field("source_kind", pa.string()),
        pa.field("licence", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("views", pa.list_(VIEW)),
    ]
)
# `images[i]` is the image of `views[i]`, stored as the `datasets` Image struct.
PRODUCTS_WITH_IMAGES = PRODUCTS.append(pa.field("images", pa.list_(schema.IMAGE_STRUCT)))

CAPTIONS = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("product_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("short_caption", pa.string()),
        pa.field("long_caption", pa.string()),
        schema.CAPTIONS.field("view_captions"),
        pa.field("category", pa.string()),
        pa.field("gender", pa.string()),
        pa.field("is_clothing", pa.bool_()),
        pa.field("prompt_version", pa.string()),
        pa.field("model", pa.string()),
    ]
)

TRIPLETS = pa.schema(
    [
        pa.field(f.name, f.type)
        for f in schema.TRIPLETS
        if f.name != "request_sha256"  # an internal cache key, meaningless to users
    ]
)

HARD_NEGATIVES = pa.schema([pa.field(f.name, f.type) for f in schema.HARD_NEGATIVES])


@dataclass(frozen=True)
class Takedown:
    """Products to remove: `(dataset, product_id)` pairs, and bare product ids that match in every dataset."""

    pairs: frozenset[tuple[str, str]] = frozenset()
    bare: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, lines: Iterable[str], datasets: Iterable[str]) -> Takedown:
        """One `dataset/product_id` or `product_id` per line; blank lines and `#` comments are skipped."""
        tags = set(datasets)
        pairs, bare = set(), set()
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tag, _, rest = line.partition("/")
            if tag in tags and rest:
                pairs.add((tag, rest))
            else:
                bare.add(line)
        return cls(frozenset(pairs), frozenset(bare))

    def __bool__(self) -> bool:
        return bool(self.pairs or self.bare)

    def __or__(self, other: Takedown) -> Takedown:
        return Takedown(self.pairs | other.pairs, self.bare | other.bare)

    def names(self, dataset: str, product_id: str) -> bool:
        return product_id in self.bare or (dataset, product_id) in self.pairs

    def lines(self) -> list[str]:
        return sorted([f"{d}/{p}" for d, p in self.pairs] + list(self.bare))


def _mask(table: pa.Table, columns: tuple[str, ...], takedown: Takedown) -> list[bool]:
    """True for rows where none of the product-id columns names a removed product."""
    datasets = table.column("dataset").to_pylist()
    ids = [table.column(c).to_pylist() for c in columns]
    return [not any(takedown.names(d, col[i]) for col in ids) for i, d in enumerate(datasets)]


def dropped_triplets(triplets: pa.Table, takedown: Takedown) -> set[str]:
    """Ids of the triplets whose source or target is removed."""
    keep = _mask(triplets, ("source_id", "target_id"), takedown)
    return {t for t, k in zip(triplets.column("triplet_id").to_pylist(), keep, strict=True) if not k}


def apply_takedown(config: str, table: pa.Table, takedown: Takedown, dropped: set[str]) -> pa.Table:
    """The table without rows that name a removed product (or a dropped triplet); removed ids also leave the
    candidate lists of the triplets kept."""
    if not takedown or table.num_rows == 0:
        return table
    if config in ("products", "captions"):
        return table.filter(pa.array(_mask(table, ("product_id",), takedown)))
    if config == "hard_negatives":
        keep = _mask(table, ("source_id", "negative_id"), takedown)
        triplet_ids = table.column("triplet_id").to_pylist()
        return table.filter(pa.array([k and t not in dropped for k, t in zip(keep, triplet_ids, strict=True)]))
    table = table.filter(pa.array(_mask(table, ("source_id", "target_id"), takedown)))
    scrubbed = [
        None if ids is None else [c for c in ids if not takedown.names(d, c)]
        for d, ids in zip(table.column("dataset").to_pylist(), table.column("candidate_ids").to_pylist(), strict=True)
    ]
    index = table.schema.get_field_index("candidate_ids")
    return table.set_column(index, table.schema.field(index), pa.array(scrubbed, table.schema.field(index).type))


def _select(rows: list[dict], target: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{name: r.get(name) for name in target.names} for r in rows], schema=target)


def _views(build: Build, dataset: str) -> dict[str, list[dict]]:
    """The kept views of each product, in view order, with where each image came from."""
    columns = ["product_id", "view_index", "source_uri", "sha256"]
    sources = {(r["product_id"], r["view_index"]): r for r in build.rows(refs.INGEST_IMAGES, dataset, columns)}
    views: dict[str, list[dict]] = defaultdict(list)
    for v in build.rows(refs.DEDUPE_VIEWS, dataset):
        origin = sources.get((v["product_id"], v["view_index"]), {})
        views[v["product_id"]].append({**v, "source_uri": origin.get("source_uri"), "sha256": origin.get("sha256")})
    for product_views in views.values():
        product_views.sort(key=lambda v: v["view_index"])
    return views


def product_rows(out: str, dataset: str) -> list[dict]:
    """Every product of Stage 3 of one dataset, sorted by id, joined with its source record and kept views."""
    build = Build(out)
    split = build.rows(refs.SPLIT_PRODUCTS, dataset)
    columns = ["product_id", "source_kind", "licence", "source_uri"]
    source = {r["product_id"]: r for r in build.rows(refs.INGEST_PRODUCTS, dataset, columns)}
    views = _views(build, dataset)
    rows = [{**source.get(p["product_id"], {}), **p, "views": views.get(p["product_id"], [])} for p in split]
    return sorted(rows, key=lambda r: r["product_id"])


def build_tables(out: str, datasets: list[str]) -> dict[str, pa.Table]:
    """The four annotation tables over every dataset, in a stable row order (reruns give identical files)."""
    build = Build(out)
    products, captions, triplets, negatives = [], [], [], []
    for dataset in datasets:
        rows = product_rows(out, dataset)
        products += rows
        split = {r["product_id"]: r["split"] for r in rows}
        for c in build.rows(refs.CAPTIONS, dataset):
            if c["product_id"] in split:  # products removed by the verifier are not published
                captions.append({**c, "split": split[c["product_id"]]})
        triplets += build.rows(refs.TRIPLETS, dataset)
        negatives += build.rows(refs.HARD_NEGATIVES, dataset)
    return {
        "products": _select(products, PRODUCTS),
        "captions": _select(sorted(captions, key=lambda r: (r["dataset"], r["product_id"])), CAPTIONS),
        "triplets": _select(sorted(triplets, key=lambda r: (r["dataset"], r["triplet_id"])), TRIPLETS),
        "hard_negatives": _select(
            sorted(negatives, key=lambda r: (r["dataset"], r["triplet_id"], r["rank_shown"] or 0, r["negative_id"])),
            HARD_NEGATIVES,
        ),
    }


def image_parts(out: str, dataset: str, products: pa.Table) -> list[tuple[int, pa.Table]]:
    """`products` (of one dataset) grouped by the shard that holds them (and their images), so that each part's
    bytes are read once and never all at the same time."""
    shard_of = Build(out).product_shards(dataset)
    shards = [shard_of.get(pid) for pid in products.column("product_id").to_pylist()]
    parts = []
    for shard in sorted({s for s in shards if s is not None}):
        part = products.filter(pa.array([s == shard for s in shards]))
        parts.append((shard, part))
    return parts


def add_images(out: str, dataset: str, shard: int, products: pa.Table) -> pa.Table:
    """`products` with the bytes of their kept views, from shard `shard`."""
    ids, views = products.column("product_id").to_pylist(), products.column("views").to_pylist()
    kept = Build(out).kept_views(dataset, [shard], products=set(ids))
    images = {
        (pid, v["view_index"]): {"bytes": v["bytes"], "path": v["file_name"]} for pid, vs in kept.items() for v in vs
    }
    column = [[images.get((pid, v["view_index"])) for v in vs] for pid, vs in zip(ids, views, strict=True)]
    field = PRODUCTS_WITH_IMAGES.field("images")
    return products.append_column(field, pa.array(column, field.type))
