"""Split the verified products, embed them, and mine candidate targets for every source, inside each split.

In: the `embed` stage's vectors of the products that passed Stage 2, their dedupe rows (group key, cluster) and
captions (category, gender), all of a dataset at once. Out, per shard: `products` (every product with its split:
the galleries), `candidates` (each source's candidates in the order they will be shown) and `rejects` (a source
with no candidate at all: `no_candidates`).

Mining follows FashionMV: three retrieval paths (image, long caption, short caption), exact inner-product search per
path with faiss, top-k each, union, minus the source itself and its dedupe cluster (optionally restricted to the
same category and gender), then a seeded random sample of the shown candidates. Everything happens inside one split,
so no triplet can cross splits. Above a split size (`triplets.mining`) the search is approximate (an HNSW graph of
PCA-projected vectors, re-ranked exactly): exact search grows as the square of the split and would take hours at a
million products (BENCHMARKS.md).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import faiss
import numpy as np
import pyarrow as pa

from fashionmv_builder.core.build import CANDIDATES, CAPTIONS, DEDUPE_PRODUCTS, EMBEDDINGS, SPLIT_PRODUCTS, Build
from fashionmv_builder.core.config import MiningIndexConfig, RunConfig, digest
from fashionmv_builder.core.ledger import Reject
from fashionmv_builder.core.stage import DatasetPlan, ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.split import split_of


class Mined(NamedTuple):
    """A source's candidates: shown (in shown order), the union they were sampled from, and whether they were kept
    from an earlier run rather than mined in this one."""

    shown: list[str]
    union: list[str]
    carried_over: bool


@dataclass
class Pool:
    """Every product of one dataset that reached Stage 3, with what mining needs."""

    rows: list[dict]  # product_id, split, group_key, cluster_id, category, gender, shard, digest
    image: np.ndarray
    long: np.ndarray
    short: np.ndarray


def product_digest(caption: dict) -> str:
    """What a product is to Stage 3: its views (the caption request's key covers them) and its captions. A product
    whose digest changed since its candidates were mined is mined again."""
    return digest([caption["request_sha256"], caption["long_caption"], caption["short_caption"]])


def load_pool(build: Build, config: RunConfig, dataset: str) -> Pool:
    t = config.triplets
    dedupe = {r["product_id"]: r for r in build.rows(DEDUPE_PRODUCTS, dataset)}
    caption_columns = ["product_id", "category", "gender", "long_caption", "short_caption", "request_sha256"]
    captions = {r["product_id"]: r for r in build.rows(CAPTIONS, dataset, caption_columns)}
    rows: list[dict] = []
    paths: dict[str, list[np.ndarray]] = {"image": [], "long_caption": [], "short_caption": []}
    for marker in build.markers(EMBEDDINGS, dataset):
        shard = build.read_shard(EMBEDDINGS, dataset, marker.shard)
        for pid in shard.column("product_id").to_pylist():
            d = dedupe[pid]
            rows.append(
                {
                    "product_id": pid,
                    "split": split_of(d["group_key"], d["split"], t.val_ratio, t.seed),
                    "group_key": d["group_key"],
                    "cluster_id": d["cluster_id"],
                    "category": captions[pid]["category"],
                    "gender": captions[pid]["gender"],
                    "shard": marker.shard,
                    "digest": product_digest(captions[pid]),
                }
            )
        for name, parts in paths.items():
            if shard.num_rows:
                parts.append(vector_matrix(shard.column(name)))
    if not rows:  # every product was removed upstream: nothing to mine
        return Pool(rows, *(np.zeros((0, 1), dtype=np.float32) for _ in paths))
    return Pool(rows, *(np.concatenate(parts) for parts in paths.values()))


def vector_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float32> column as an (n, d) float32 array, straight from Arrow's buffers: as Python lists, 1M products'
    1280-d image vectors alone would take tens of GB."""
    flat = pa.concat_arrays([chunk.flatten() for chunk in column.chunks])
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), -1)


# Products added to or searched in an index at a time: a split's vectors are not copied whole (1M x 1280 float32
# is 5 GB) besides the pool's and the index's own.
CHUNK = 65_536


def index_kind(size: int, mining: MiningIndexConfig) -> str:
    """The index a split of `size` products is mined with."""
    if mining.index != "auto":
        return mining.index
    return "exact" if size < mining.exact_below else "hnsw-pca"


def nearest(vectors: np.ndarray, members: np.ndarray, k: int, mining: MiningIndexConfig) -> np.ndarray:
    """Each member's k nearest members by inner product, as positions into `members` (-1 where fewer were found)."""
    dim, size = vectors.shape[1], len(members)
    kind = index_kind(size, mining)
    if kind == "hnsw-pca":
        return nearest_by_projection(vectors, members, k, mining)
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, mining.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(mining.hnsw_ef_search, k)
    else:
        # faiss's rule of thumb, 4 * sqrt(n) lists, each with the 39 training vectors k-means needs at least; trained
        # on a seeded sample of at most 64 per list
        lists = max(1, min(int(4 * np.sqrt(size)), size // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(vectors[members[training_sample(size, 64 * lists)]]))
        index.nprobe = min(mining.ivf_nprobe, lists)
    for start in range(0, size, CHUNK):
        index.add(np.ascontiguousarray(vectors[members[start : start + CHUNK]]))
    found = np.empty((size, k), dtype=np.int64)
    for start in range(0, size, CHUNK):
        found[start : start + CHUNK] = index.search(np.ascontiguousarray(vectors[members[start : start + CHUNK]]), k)[1]
    return found


def training_sample(size: int, wanted: int) -> np.ndarray:
    """A seeded, sorted sample of at most `wanted` of `size` positions, to train a projection or a clustering on."""
    return np.sort(np.random.default_rng(0).choice(size, min(size, wanted), replace=False))


def nearest_by_projection(vectors: np.ndarray, members: np.ndarray, k: int, mining: MiningIndexConfig) -> np.ndarray:
    """`nearest` for catalogue-size splits: an HNSW graph of the members projected by PCA to fewer dimensions finds a
    shortlist per member, which is re-ranked by the exact inner products of the full vectors.

    The graph's cost grows with the dimension it compares in, and the exact re-ranking restores the order the
    projection blurs: on 100K real MiniLM text vectors, recall@20 0.943-0.953 of exact search, as plain HNSW's, at
    0.67-0.70x its time (BENCHMARKS.md). Two more measured speed-ups: the members enter the graph sorted by k-means
    cell in the projection, so the neighbours a search visits sit near each other in memory, and each member's search
    starts at the member itself on the graph's base layer, skipping the descent from the top.
    """
    size, dim = len(members), vectors.shape[1]
    shortlist = min(max(mining.rerank_shortlist, k), size)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # the re-ranking reads it in place: no copy if already
    sample = training_sample(size, 65_536)
    training = vectors[members[sample]]
    mean = training.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(training - mean, rowvar=False))  # ascending order
    variance_kept = np.cumsum(eigenvalues[::-1])
    reduced_dim = int(np.searchsorted(variance_kept, mining.pca_variance * variance_kept[-1])) + 1
    basis = np.ascontiguousarray(eigenvectors[:, ::-1][:, :reduced_dim], dtype=np.float32)
    del training
    reduced = np.empty((size, reduced_dim), dtype=np.float32)
    for start in range(0, size, CHUNK):
        reduced[start : start + CHUNK] = (vectors[members[start : start + CHUNK]] - mean) @ basis

    cells = min(int(np.sqrt(size)), len(sample) // 39)  # k-means wants 39 training points per cell at least
    order = np.arange(size)  # graph entry -> member position
    if cells > 1:
        clustering = faiss.Kmeans(reduced_dim, cells, niter=10, seed=0)
        clustering.train(reduced[sample])
        order = np.argsort(clustering.index.search(reduced, 1)[1][:, 0], kind="stable")
        reduced = reduced[order]
    in_pool = np.ascontiguousarray(members[order], dtype=np.int64)  # graph entry -> row of `vectors`
    member_of_row = np.full(len(vectors), -1, dtype=np.int64)
    member_of_row[members] = np.arange(size)

    graph = faiss.IndexHNSWFlat(reduced_dim, mining.hnsw_m)  # L2: the projection centres the vectors
    graph.add(reduced)
    graph.hnsw.efSearch = max(mining.hnsw_ef_search, shortlist)
    found = np.full((size, k), -1, dtype=np.int64)
    for start in range(0, size, CHUNK):
        stop = min(start + CHUNK, size)
        count = stop - start
        queries = np.ascontiguousarray(reduced[start:stop])
        starts = np.arange(start, stop, dtype=np.int32).reshape(-1, 1)  # each search begins at its own member
        start_distances = np.zeros((count, 1), dtype=np.float32)
        distances = np.empty((count, shortlist), dtype=np.float32)
        labels = np.empty((count, shortlist), dtype=np.int64)
        graph.search_level_0(
            count, faiss.swig_ptr(queries), shortlist, faiss.swig_ptr(starts), faiss.swig_ptr(start_distances),
            faiss.swig_ptr(distances), faiss.swig_ptr(labels),
        )  # fmt: skip
        # a -1 (fewer found) ends a row for faiss's re-ranking, which is what it means
        rows = np.ascontiguousarray(np.where(labels >= 0, in_pool[np.maximum(labels, 0)], -1))
        full = np.ascontiguousarray(vectors[in_pool[start:stop]])
        scores = np.empty((count, k), dtype=np.float32)
        best = np.full((count, k), -1, dtype=np.int64)
        faiss.knn_inner_products_by_idx(
            faiss.swig_ptr(full), faiss.swig_ptr(vectors), faiss.swig_ptr(rows), dim, count, len(vectors), shortlist,
            k, faiss.swig_ptr(scores), faiss.swig_ptr(best), shortlist,
        )  # fmt: skip  # the last argument is the shortlist's row stride: faiss's default reads past the array
        found[order[start:stop]] = np.where(best >= 0, member_of_row[np.maximum(best, 0)], -1)
    return found


def mine(pool: Pool, split: str, config: RunConfig) -> dict[str, tuple[list[str], list[str]]]:
    """Each source of the split → (shown candidates in shown order, the union they were sampled from)."""
    t = config.triplets
    members = [i for i, r in enumerate(pool.rows) if r["split"] == split]
    if len(members) < 2:
        return {pool.rows[i]["product_id"]: ([], []) for i in members}
    k = min(t.top_k + 1, len(members))  # +1: the source finds itself
    positions = np.asarray(members)
    neighbours = [nearest(vectors, positions, k, t.mining) for vectors in (pool.image, pool.long, pool.short)]
    result = {}
    for row_pos, i in enumerate(members):
        source = pool.rows[i]
        union: list[str] = []
        for found in neighbours:
            for j in found[row_pos]:
                if j < 0:  # an approximate index found fewer than k
                    continue
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


class CandidatesStage(Stage):
    """Stage 3: split train/val by group, mine each source's candidates inside its split (three paths)."""

    name = CANDIDATES.stage
    version = "3"  # 2: candidates carry the whole union; 3: and whether they were kept from an earlier run
    work = Work.DATASET
    # Mining looks at whole splits: every shard reads every embedding of the dataset.
    reads = (EMBEDDINGS.every_shard(), DEDUPE_PRODUCTS.every_shard(), CAPTIONS.every_shard())
    writes: ClassVar[dict] = {SPLIT_PRODUCTS.table: tables.SPLIT_PRODUCTS, CANDIDATES.table: tables.CANDIDATES}

    def settings(self, dataset: str) -> dict:
        # The model does not mine, and a refresh is a run option: neither is a reason to redo the candidates.
        return {"triplets": self.config.triplets.model_dump(mode="json", exclude={"lmm", "refresh"})}

    def plan(self, dataset: str) -> DatasetPlan:
        """A refresh redoes every shard (the slice's sources are anywhere); otherwise shards whose inputs changed."""
        plan = super().plan(dataset)
        if plan.error is None and self.config.triplets.refresh is not None:
            plan.todo = list(plan.tasks)
        return plan

    def earlier(self, dataset: str) -> dict[str, dict]:
        """The candidates rows this stage wrote with the same settings, by source: kept unless the run refreshes
        them or the source changed."""
        return {row["product_id"]: row for row in self.earlier_rows(dataset, CANDIDATES.table)}

    def prepare(self, dataset: str, todo: list[ShardTask]) -> tuple[list[ShardTask], dict]:
        """Mine new, changed and refreshed sources over the whole split; keep the rest's earlier candidates (less
        the products no longer in the build), so Stage 3 keeps their earlier answers and asks nothing."""
        t = self.config.triplets
        pool = load_pool(self.build, self.config, dataset)
        mined = {}
        for split in ("train", "val"):
            mined.update(mine(pool, split, self.config))
        earlier = self.earlier(dataset)
        alive = {r["product_id"] for r in pool.rows}
        decided: dict[str, Mined] = {}
        for r in pool.rows:
            pid, before = r["product_id"], earlier.get(r["product_id"])
            refreshed = t.refresh is not None and t.refresh.covers(pid, t.seed)
            if (
                before is None
                or refreshed
                or before.get("source_digest") != r["digest"]
                or before["split"] != r["split"]
            ):
                decided[pid] = Mined(*mined[pid], carried_over=False)
            else:
                keep = [c for c in before["candidate_ids"] if c in alive]
                decided[pid] = Mined(keep, [c for c in before["union_ids"] if c in alive], carried_over=True)
        payloads: dict[int, list[tuple[dict, Mined]]] = {task.shard: [] for task in todo}
        for r in pool.rows:
            if r["shard"] in payloads:
                payloads[r["shard"]].append((r, decided[r["product_id"]]))
        counts = Counter("carried_over" if m.carried_over else "mined" for m in decided.values())
        return [replace(task, payload=payloads[task.shard]) for task in todo], {"sources": dict(counts)}

    def run_shard(self, task: ShardTask) -> ShardOutput:
        ledger = self.ledger(task.dataset)
        products, candidates = [], []
        for r, (shown, union, carried_over) in task.payload:
            ledger.take(0)
            products.append({k: v for k, v in r.items() if k not in ("shard", "digest")} | {"dataset": task.dataset})
            ledger.counts[f"products_{r['split']}"] += 1
            if not shown:
                detail = f"no candidate in its split ({r['split']}) after excluding itself and its cluster"
                ledger.reject_product(Reject(RejectReason.NO_CANDIDATES, detail), r["product_id"], views_left=0)
                continue
            if len(shown) < self.config.triplets.candidates_shown:
                ledger.counts["sources_with_fewer_candidates"] += 1
            ledger.keep(0)
            candidates.append(
                {
                    "dataset": task.dataset,
                    "product_id": r["product_id"],
                    "split": r["split"],
                    "candidate_ids": shown,
                    "union_ids": union,
                    "union_size": len(union),
                    "source_digest": r["digest"],
                    "carried_over": carried_over,
                }
            )
        return ShardOutput(
            {
                SPLIT_PRODUCTS.table: pa.Table.from_pylist(products, schema=tables.SPLIT_PRODUCTS),
                CANDIDATES.table: pa.Table.from_pylist(candidates, schema=tables.CANDIDATES),
            },
            ledger,
        )
