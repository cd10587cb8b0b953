"""Recall@K exactly as FashionMV's `evaluate.py` scores it.

Per dataset, the gallery is every val source and target of that dataset that has images, keyed by `(dataset, id)`
and sorted. The source product stays in the gallery and in the ranking. Scores are cosine similarities of
L2-normalised float32 vectors; a query hits at K when its one ground-truth target is among the top min(K, |gallery|).
The average is the unweighted mean of R@5 and R@10 over the evaluated datasets.

Ties are broken by gallery order (a stable sort: an equal-scoring item earlier in the sorted gallery ranks first).
The reference uses `torch.topk`, whose tie order is unspecified; ties need two gallery items with bit-identical
scores, which only happens with duplicate images.

Pure numpy, no model: Stage 3's quality report reuses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KS = (1, 5, 10)
AVERAGED_KS = (5, 10)
# Display names of the JSON keys; any other dataset tag is shown as itself.
DISPLAY_NAMES = {"deepfashion": "DeepFashion", "f200k": "Fashion200K", "fashiongen_val": "FashionGen-val"}
RESULTS_FILE = "eval_results.json"
_SCORE_CHUNK = 1024  # query rows scored at once: bounds memory at chunk × |gallery| floats

ProductKey = tuple[str, str]  # (dataset, product_id)
# One vector per item as rows of an array, or one [views, dim] array per item (multi-vector, scored by MaxSim).
Embeddings = np.ndarray | list[np.ndarray]


@dataclass(frozen=True)
class QueryResult:
    index: int  # position of the triplet in val_triplets.jsonl: a query's identity across processes
    dataset: str
    source_id: str
    target_id: str
    embedding: np.ndarray


@dataclass(frozen=True)
class DatasetRecall:
    dataset: str
    recall: dict[int, float]  # K -> percentage, unrounded
    queries: int
    gallery: int


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32; the epsilon matches torch's F.normalize."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def maxsim_scores(queries: Sequence[np.ndarray], gallery: Sequence[np.ndarray]) -> np.ndarray:
    """[Q, G] MaxSim scores of multi-vector items (one row per view): the best cosine over every pair of a query's
    vectors and a gallery item's vectors."""
    q_starts = np.cumsum([0, *(len(v) for v in queries[:-1])])
    g_starts = np.cumsum([0, *(len(v) for v in gallery[:-1])])
    scores = l2_normalise(np.concatenate(queries)) @ l2_normalise(np.concatenate(gallery)).T
    return np.maximum.reduceat(np.maximum.reduceat(scores, g_starts, axis=1), q_starts, axis=0)


def target_ranks(query_emb: Embeddings, gallery_emb: Embeddings, target_index: np.ndarray) -> np.ndarray:
    """0-based rank of each query's target: gallery items scoring higher, plus equal scores earlier in the gallery.

    Arrays of single vectors are scored by cosine; lists of [views, dim] arrays (multi-vector) by MaxSim."""
    multi = isinstance(query_emb, list)
    if not multi:
        query_emb, gallery_emb = l2_normalise(query_emb), l2_normalise(gallery_emb)
    chunk = _SCORE_CHUNK // 8 if multi else _SCORE_CHUNK  # several rows per item: keep the score block bounded
    target_index = np.asarray(target_index, dtype=np.int64)
    positions = np.arange(len(gallery_emb))
    ranks = np.empty(len(query_emb), dtype=np.int64)
    for start in range(0, len(query_emb), chunk):
        stop = min(start + chunk, len(query_emb))
        part = query_emb[start:stop]
        scores = maxsim_scores(part, gallery_emb) if multi else part @ gallery_emb.T
        targets = target_index[start:stop]
        target_scores = scores[np.arange(stop - start), targets][:, None]
        ahead = (scores > target_scores) | ((scores == target_scores) & (positions[None, :] < targets[:, None]))
        ranks[start:stop] = ahead.sum(axis=1)
    return ranks


def recall_at_k(
    query_emb: Embeddings, gallery_emb: Embeddings, target_index: np.ndarray, ks: Sequence[int] = KS
) -> dict[int, float]:
    """R@K in percent for each K: how often the target is among the top min(K, |gallery|) by cosine similarity."""
    if len(target_index) == 0:
        raise ValueError("recall of zero queries is undefined")
    ranks = target_ranks(query_emb, gallery_emb, target_index)
    size = len(gallery_emb)
    return {k: 100.0 * float(np.mean(ranks < min(k, size))) for k in ks}


def recall_for_dataset(
    dataset: str, gallery: Mapping[ProductKey, np.ndarray], queries: Sequence[QueryResult], ks: Sequence[int] = KS
) -> DatasetRecall | None:
    """One dataset's recall; queries whose target is not in its gallery are dropped, as the reference does."""
    keys = sorted(key for key in gallery if key[0] == dataset)
    position = {key: i for i, key in enumerate(keys)}
    kept = [q for q in queries if q.dataset == dataset and (dataset, q.target_id) in position]
    if not kept:
        return None
    gallery_emb = [gallery[key] for key in keys]
    query_emb = [q.embedding for q in kept]
    if gallery_emb[0].ndim == 1:  # one vector per item; [views, dim] arrays are scored by MaxSim
        gallery_emb, query_emb = np.stack(gallery_emb), np.stack(query_emb)
    targets = np.array([position[(dataset, q.target_id)] for q in kept])
    return DatasetRecall(dataset, recall_at_k(query_emb, gallery_emb, targets, ks), len(kept), len(keys))


def recall_by_dataset(
    gallery: Mapping[ProductKey, np.ndarray],
    queries: Sequence[QueryResult],
    datasets: Sequence[str] | None = None,
    ks: Sequence[int] = KS,
) -> list[DatasetRecall]:
    """Each dataset scored against its own gallery; datasets default to those with queries, sorted."""
    if datasets is None:
        datasets = sorted({q.dataset for q in queries})
    results = (recall_for_dataset(ds, gallery, queries, ks) for ds in datasets)
    return [r for r in results if r is not None]


def display_name(dataset: str) -> str:
    return DISPLAY_NAMES.get(dataset, dataset)


def results_json(results: Sequence[DatasetRecall]) -> dict[str, float]:
    """The keys and rounding of the reference's eval_results.json: per-dataset R@K, then Average_R@5/10."""
    out: dict[str, float] = {}
    for r in results:
        for k, value in r.recall.items():
            out[f"{display_name(r.dataset)}_R@{k}"] = round(value, 2)
    for k in AVERAGED_KS:
        values = [r.recall[k] for r in results if k in r.recall]
        if values:
            # Mean of the unrounded percentages (unverified: the reference may average rounded ones; ≤ 0.005 apart).
            out[f"Average_R@{k}"] = round(float(np.mean(values)), 2)
    return out


def write_results(output_dir: Path, results: Sequence[DatasetRecall], dtype: str | None = None) -> Path:
    """The reference's keys, plus the precision the model ran in (`dtype`) when given."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RESULTS_FILE
    extra = {"dtype": dtype} if dtype else {}
    path.write_text(json.dumps(results_json(results) | extra, indent=2) + "\n")
    return path


def summary_line(r: DatasetRecall) -> str:
    """The reference's printed line: R@1 R@5 R@10 (queries=…, gallery=…)."""
    recalls = " ".join(f"R@{k}={v:.2f}" for k, v in r.recall.items())
    return f"{display_name(r.dataset)}: {recalls} (queries={r.queries}, gallery={r.gallery})"


def merge_queries(parts: Iterable[Iterable[QueryResult]]) -> list[QueryResult]:
    """Gathered per-process queries, each counted once (first seen wins), in file order."""
    merged: dict[int, QueryResult] = {}
    for part in parts:
        for q in part:
            merged.setdefault(q.index, q)
    return [merged[i] for i in sorted(merged)]


def merge_gallery(parts: Iterable[Mapping[ProductKey, np.ndarray]]) -> dict[ProductKey, np.ndarray]:
    """Gathered per-process gallery embeddings, each product once (first part wins), in sorted key order."""
    merged: dict[ProductKey, np.ndarray] = {}
    for part in parts:
        for key, emb in part.items():
            merged.setdefault(key, emb)
    return {key: merged[key] for key in sorted(merged)}
