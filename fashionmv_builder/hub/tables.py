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
import pyarrow.compute as pc

from data_schema import tables as schema
from fashionmv_builder.shards import ShardMarker, ShardStore

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


def _views(out: str, dataset: str) -> dict[str, list[dict]]:
    """The kept views of each product, in view order, with where each image came from."""
    refs = {
        (r["product_id"], r["view_index"]): r
        for r in ShardStore(out, "ingest", dataset)
        .read_table("images", columns=["product_id", "view_index", "source_uri", "sha256"])
        .to_pylist()
    }
    views: dict[str, list[dict]] = defaultdict(list)
    for v in ShardStore(out, "dedupe", dataset).read_table("views").to_pylist():
        ref = refs.get((v["product_id"], v["view_index"]), {})
        views[v["product_id"]].append({**v, "source_uri": ref.get("source_uri"), "sha256": ref.get("sha256")})
    for product_views in views.values():
        product_views.sort(key=lambda v: v["view_index"])
    return views


def product_rows(out: str, dataset: str) -> list[dict]:
    """Every product of Stage 3 of one dataset, sorted by id, joined with its source record and kept views."""
    split = ShardStore(out, "candidates", dataset).read_table("products").to_pylist()
    columns = ["product_id", "source_kind", "licence", "source_uri"]
    source = {
        r["product_id"]: r
        for r in ShardStore(out, "ingest", dataset).read_table("products", columns=columns).to_pylist()
    }
    views = _views(out, dataset)
    rows = [{**source.get(p["product_id"], {}), **p, "views": views.get(p["product_id"], [])} for p in split]
    return sorted(rows, key=lambda r: r["product_id"])


def build_tables(out: str, datasets: list[str]) -> dict[str, pa.Table]:
    """The four annotation tables over every dataset, in a stable row order (reruns give identical files)."""
    products, captions, triplets, negatives = [], [], [], []
    for dataset in datasets:
        rows = product_rows(out, dataset)
        products += rows
        split = {r["product_id"]: r["split"] for r in rows}
        for c in ShardStore(out, "caption", dataset).read_table("captions").to_pylist():
            if c["product_id"] in split:  # products removed by the verifier are not published
                captions.append({**c, "split": split[c["product_id"]]})
        store = ShardStore(out, "triplets", dataset)
        triplets += store.read_table("triplets").to_pylist()
        negatives += store.read_table("hard_negatives").to_pylist()
    return {
        "products": _select(products, PRODUCTS),
        "captions": _select(sorted(captions, key=lambda r: (r["dataset"], r["product_id"])), CAPTIONS),
        "triplets": _select(sorted(triplets, key=lambda r: (r["dataset"], r["triplet_id"])), TRIPLETS),
        "hard_negatives": _select(
            sorted(negatives, key=lambda r: (r["dataset"], r["triplet_id"], r["rank_shown"] or 0, r["negative_id"])),
            HARD_NEGATIVES,
        ),
    }


def image_parts(out: str, dataset: str, products: pa.Table) -> list[tuple[ShardMarker, pa.Table]]:
    """`products` (of one dataset) grouped by the ingest shard that holds their images, so that each part's bytes
    are read once and never all at the same time."""
    ingest = ShardStore(out, "ingest", dataset)
    parts = []
    for marker in ingest.markers():
        ids = ingest.read_part(marker, "products", columns=["product_id"])
        if ids is None:
            continue
        part = products.filter(pc.is_in(products.column("product_id"), ids.column("product_id")))
        if part.num_rows:
            parts.append((marker, part))
    return parts


def add_images(out: str, dataset: str, marker: ShardMarker, products: pa.Table) -> pa.Table:
    """`products` with the bytes of their kept views, from the ingest shard of `marker`."""
    ingest = ShardStore(out, "ingest", dataset)
    part = ingest.read_part(marker, "images", columns=["product_id", "view_index", "file_name", "image"])
    images = {
        (r["product_id"], r["view_index"]): {"bytes": r["image"]["bytes"], "path": r["file_name"]}
        for r in (part.to_pylist() if part is not None else [])
    }
    ids, views = products.column("product_id").to_pylist(), products.column("views").to_pylist()
    column = [[images.get((pid, v["view_index"])) for v in vs] for pid, vs in zip(ids, views, strict=True)]
    field = PRODUCTS_WITH_IMAGES.field("images")
    return products.append_column(field, pa.array(column, field.type))
