"""Split the verified products, embed them, and mine candidate targets for every source, inside each split.

In: the products that passed Stage 2 (`verify` verdicts), with their dedupe rows, captions, views and ingest image
bytes. Out, per shard (aligned with the verify shards): `products` (every product with its split: the galleries),
`candidates` (each source's candidates in the order they will be shown) and `rejects` (a source with no candidate
at all: `no_candidates`). Per-product embeddings are cached in the `embed` stage's shards.

Mining follows FashionMV: three retrieval paths (image, long caption, short caption), exact inner-product search per
path with faiss, top-k each, union, minus the source itself and its dedupe cluster (optionally restricted to the
same category and gender), then a seeded random sample of the shown candidates. Everything happens inside one split,
so no triplet can cross splits.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import CANDIDATES, EMBEDDINGS, SPLIT_PRODUCTS
from fashionmv_builder.config import RunConfig, digest
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.shards import ShardMarker, ShardStore
from fashionmv_builder.triplets.embed import encode_texts, product_vector, view_descriptor
from fashionmv_builder.triplets.split import split_of

STAGE = "candidates"
EMBED_STAGE = "embed"
STAGE_VERSION = "2"  # 2: candidates carry the whole union
EMBED_VERSION = "3"  # 3: gradient-orientation image descriptor


@dataclass
class Pool:
    """Every product of one dataset that reached Stage 3, with what mining needs."""

    rows: list[dict]  # product_id, split, group_key, cluster_id, category, gender, shard
    image: np.ndarray
    long: np.ndarray
    short: np.ndarray


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["product_id"]: r for r in table.to_pylist()}


def _embed_shard(config: RunConfig, dataset: str, verify_marker: ShardMarker) -> pa.Table:
    """Embeddings of one verify shard's products, cached as an `embed` shard keyed by its inputs."""
    out = config.output_dir
    store = ShardStore(out, EMBED_STAGE, dataset)
    caption_store = ShardStore(out, "caption", dataset)
    caption_marker = caption_store.read_marker(verify_marker.shard)
    ingest_store = ShardStore(out, "ingest", dataset)
    ingest_marker = ingest_store.read_marker(verify_marker.shard)
    fingerprint = digest(
        [
            verify_marker.files["verdicts"].sha256,
            caption_marker.files["captions"].sha256,
            ingest_marker.files["images"].sha256,
        ]
    )
    config_hash = digest({"stage": EMBED_STAGE, "version": EMBED_VERSION, "text_model": config.triplets.text_model})
    if store.is_complete(verify_marker.shard, config_hash, fingerprint):
        return store.read_part(store.read_marker(verify_marker.shard), "embeddings")
    verdicts = ShardStore(out, "verify", dataset).read_part(verify_marker, "verdicts").to_pylist()
    captions = _by_id(caption_store.read_part(caption_marker, "captions"))
    kept_views = defaultdict(set)
    for v in ShardStore(out, "dedupe", dataset).read_table("views", columns=["product_id", "view_index"]).to_pylist():
        kept_views[v["product_id"]].add(v["view_index"])
    wanted = {r["product_id"] for r in verdicts}
    descriptors = defaultdict(list)
    images = ingest_store.read_part(ingest_marker, "images", columns=["product_id", "view_index", "image"])
    for r in images.to_pylist():
        if r["product_id"] in wanted and r["view_index"] in kept_views[r["product_id"]]:
            descriptors[r["product_id"]].append(view_descriptor(r["image"]["bytes"]))
    ids = [r["product_id"] for r in verdicts]
    long = encode_texts([captions[i]["long_caption"] for i in ids], config.triplets.text_model)
    short = encode_texts([captions[i]["short_caption"] for i in ids], config.triplets.text_model)
    table = pa.Table.from_pylist(
        [
            {
                "dataset": dataset,
                "product_id": pid,
                "image": product_vector(descriptors[pid]).tolist(),
                "long_caption": long[k].tolist(),
                "short_caption": short[k].tolist(),
            }
            for k, pid in enumerate(ids)
        ],
        schema=EMBEDDINGS,
    )
    store.write(
        verify_marker.shard,
        {"embeddings": table},
        config_hash=config_hash,
        input_fingerprint=fingerprint,
        counts={"products": table.num_rows},
    )
    return table


def load_pool(config: RunConfig, dataset: str) -> tuple[Pool, list[ShardMarker]]:
    out = config.output_dir
    t = config.triplets
    markers = ShardStore(out, "verify", dataset).markers()
    dedupe = _by_id(ShardStore(out, "dedupe", dataset).read_table("products"))
    captions = _by_id(
        ShardStore(out, "caption", dataset).read_table("captions", columns=["product_id", "category", "gender"])
    )
    rows, image, long, short = [], [], [], []
    for marker in markers:
        for e in _embed_shard(config, dataset, marker).to_pylist():
            d = dedupe[e["product_id"]]
            rows.append(
                {
                    "product_id": e["product_id"],
                    "split": split_of(d["group_key"], d["split"], t.val_ratio, t.seed),
                    "group_key": d["group_key"],
                    "cluster_id": d["cluster_id"],
                    "category": captions[e["product_id"]]["category"],
                    "gender": captions[e["product_id"]]["gender"],
                    "shard": marker.shard,
                }
            )
            image.append(e["image"])
            long.append(e["long_caption"])
            short.append(e["short_caption"])

    def as_array(vectors: list) -> np.ndarray:
        return np.asarray(vectors, dtype=np.float32).reshape(len(rows), -1)

    return Pool(rows, as_array(image), as_array(long), as_array(short)), markers


def mine(pool: Pool, split: str, config: RunConfig) -> dict[str, tuple[list[str], list[str]]]:
    """Each source of the split → (shown candidates in shown order, the union they were sampled from)."""
    t = config.triplets
    members = [i for i, r in enumerate(pool.rows) if r["split"] == split]
    if len(members) < 2:
        return {pool.rows[i]["product_id"]: ([], []) for i in members}
    k = min(t.top_k + 1, len(members))  # +1: the source finds itself
    neighbours = []
    for vectors in (pool.image, pool.long, pool.short):
        sub = np.ascontiguousarray(vectors[members])
        index = faiss.IndexFlatIP(sub.shape[1])
        index.add(sub)
        neighbours.append(index.search(sub, k)[1])
    result = {}
    for row_pos, i in enumerate(members):
        source = pool.rows[i]
        union: list[str] = []
        for found in neighbours:
            for j in found[row_pos]:
                other = pool.rows[members[j]]
                if other["product_id"] == source["product_id"] or other["cluster_id"] == source["cluster_id"]:
                    continue
                if t.same_category and other["category"] != source["category"]:
                    continue
                if t.same_gender and other["gender"] != source["gender"]:
                    continue
                if other["product_id"] not in union:
                    union.append(other["product_id"])
        # One RNG per source, seeded by the run seed and the source id: the sample does not depend on shard order.
        rng = random.Random(f"{t.seed}:{source['product_id']}")
        shown = rng.sample(union, min(t.candidates_shown, len(union)))
        result[source["product_id"]] = (shown, union)
    return result


def stage_hash(config: RunConfig) -> str:
    t = config.triplets
    return digest({"stage": STAGE, "version": STAGE_VERSION, "triplets": t.model_dump(mode="json")})


def run_candidates(config: RunConfig, datasets: list[str] | None = None) -> list[dict]:
    """Mine candidates for every dataset; shards whose marker matches are left alone."""
    stats = []
    for source in config.sources:
        if datasets and source.dataset not in datasets:
            continue
        pool, markers = load_pool(config, source.dataset)
        store = ShardStore(config.output_dir, STAGE, source.dataset)
        # Mining looks at the whole split, so every shard's fingerprint covers every embedding of the dataset.
        fingerprint = digest(
            [
                ShardStore(config.output_dir, EMBED_STAGE, source.dataset)
                .read_marker(m.shard)
                .files["embeddings"]
                .sha256
                for m in markers
            ]
        )
        todo = [m for m in markers if not store.is_complete(m.shard, stage_hash(config), fingerprint)]
        if todo:
            mined = {}
            for split in ("train", "val"):
                mined.update(mine(pool, split, config))
            for marker in todo:
                _write_shard(config, source.dataset, marker, pool, mined, store, fingerprint)
        store.remove_stale(m.shard for m in markers)
        stats.append(store.write_stats())
    return stats


def _write_shard(
    config: RunConfig, dataset: str, marker: ShardMarker, pool: Pool, mined: dict, store: ShardStore, fingerprint: str
) -> None:
    ledger = ShardLedger(STAGE, dataset)
    products, candidates = [], []
    for r in pool.rows:
        if r["shard"] != marker.shard:
            continue
        ledger.counts["products_in"] += 1
        products.append({k: v for k, v in r.items() if k != "shard"} | {"dataset": dataset})
        shown, union = mined[r["product_id"]]
        ledger.counts[f"products_{r['split']}"] += 1
        if not shown:
            ledger.reject(
                RejectLevel.PRODUCT,
                RejectReason.NO_CANDIDATES,
                r["product_id"],
                f"no candidate in its split ({r['split']}) after excluding itself and its cluster",
            )
            continue
        if len(shown) < config.triplets.candidates_shown:
            ledger.counts["sources_with_fewer_candidates"] += 1
        ledger.counts["products_out"] += 1
        candidates.append(
            {
                "dataset": dataset,
                "product_id": r["product_id"],
                "split": r["split"],
                "candidate_ids": shown,
                "union_ids": union,
                "union_size": len(union),
            }
        )
    ledger.check()
    store.write(
        marker.shard,
        {
            "products": pa.Table.from_pylist(products, schema=SPLIT_PRODUCTS),
            "candidates": pa.Table.from_pylist(candidates, schema=CANDIDATES),
            "rejects": ledger.rejects_table(),
        },
        config_hash=stage_hash(config),
        input_fingerprint=fingerprint,
        counts=ledger.counts,
        metadata={"fashionmv.stage": STAGE},
    )
