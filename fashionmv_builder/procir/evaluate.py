"""`fashionmv evaluate`: FashionMV's evaluation protocol , batched as FashionMV's released ProCIR code does.

1. Gallery: every distinct source and target id of the selected datasets' val triplets whose folder has an image,
   keyed by (dataset, id), sorted, each encoded with the document prompt.
2. Queries: triplets in file order whose source and target both have images, each encoded with the two-turn prompt
   (s and q from one forward). Source reuse: a source missing from the gallery joins it with its s, which equals its
   d (the prefix property); with a complete, deterministic gallery this adds nothing.
3. Recall per dataset (recall.py), written to eval_results.json with the reference's keys.

Batches are built with one processor call per batch (the reference calls it per sample), optionally in data-loader
worker processes, and hold items of similar size (shortest first) so little is padded. Right padding and a causal
model make an embedding independent of its batch, up to float noise.
Under torchrun each process takes every world-th item of the sorted lists, and the gathered results are merged with
each product and query counted once, so the output equals a single-process run.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from fashionmv_builder.procir.data import MAX_VIEWS, VAL_DATASETS, EvalData, Triplet, load_eval_data, load_views
from fashionmv_builder.procir.model import (
    DTYPES,
    MAX_PIXELS,
    MIN_PIXELS,
    ProCIREncoder,
    prepare_docs,
    prepare_queries,
    prepare_texts,
)
from fashionmv_builder.procir.recall import (
    DatasetRecall,
    ProductKey,
    QueryResult,
    l2_normalise,
    merge_gallery,
    merge_queries,
    recall_by_dataset,
    write_results,
)

log = logging.getLogger("fashionmv")
T = TypeVar("T")
R = TypeVar("R")

# How a query is encoded: the ProCIR two-turn dialogue, the single-turn baseline, or one modality alone.
QUERY_MODES = ("two-turn", "single-turn", "text-only", "image-only")
# How a product's views become embeddings: all in one prompt (Joint, ProCIR's way), or each view alone, then averaged
# (MeanPool) or kept as one vector per view and scored by the best pair (MaxSim): the three encodings of FashionMV's
# baseline table, so a single-image model can be compared on the same protocol.
ENCODINGS = ("joint", "meanpool", "maxsim")
_VIEW_SEP = "#view"


def process_rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather(obj: object) -> list[object]:
    """Every process's `obj`, in rank order (just [obj] in a single process)."""
    world = process_rank()[1]
    if world == 1:
        return [obj]
    parts: list[object] = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def prepared(items: Sequence[T], prepare: Callable[[T], R], workers: int) -> Iterator[R]:
    """`prepare(item)` for each item in order; with workers > 0, in data-loader processes, in parallel with the
    model's forward (images load and preprocess there). Used for evaluation batches and training steps."""
    if workers == 0:
        yield from map(prepare, items)
        return
    loader = torch.utils.data.DataLoader(list(items), batch_size=None, collate_fn=prepare, num_workers=workers)
    yield from loader


def _doc_batch(processor: Qwen3VLProcessor, items: list[list[Path]]) -> BatchFeature:
    return prepare_docs(processor, [load_views(paths) for paths in items])


def _query_batch(processor: Qwen3VLProcessor, mode: str, items: list[tuple[list[Path], str]]) -> BatchFeature:
    if mode == "text-only":
        return prepare_texts(processor, [text for _, text in items])
    sources = [load_views(paths) for paths, _ in items]
    if mode == "image-only":
        return prepare_docs(processor, sources)
    return prepare_queries(processor, sources, [text for _, text in items], two_turn=mode == "two-turn")


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


@torch.no_grad()
def encode_gallery(
    encoder: ProCIREncoder,
    keys: Sequence[ProductKey],
    views: dict[ProductKey, list[Path]],
    batch_size: int,
    workers: int,
) -> dict[ProductKey, np.ndarray]:
    chunks = _chunks([views[key] for key in keys], batch_size)
    embeddings: list[np.ndarray] = []
    for inputs in prepared(chunks, functools.partial(_doc_batch, encoder.processor), workers):
        embeddings.extend(_to_numpy(encoder.pooled(inputs)[1]))
    return dict(zip(keys, embeddings, strict=True))


@torch.no_grad()
def encode_queries(
    encoder: ProCIREncoder,
    queries: Sequence[Triplet],
    views: dict[ProductKey, list[Path]],
    batch_size: int,
    workers: int,
    mode: str = "two-turn",
) -> tuple[list[QueryResult], dict[ProductKey, np.ndarray]]:
    """Query embeddings q, plus each source's s (two-turn mode only; the first per source is kept)."""
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown query mode {mode!r}; one of {', '.join(QUERY_MODES)}")
    items = [(views[(t.dataset, t.source_id)], t.modification_text_short) for t in queries]
    prepare = functools.partial(_query_batch, encoder.processor, mode)
    results: list[QueryResult] = []
    sources: dict[ProductKey, np.ndarray] = {}
    batches = prepared(_chunks(items, batch_size), prepare, workers)
    for batch, inputs in zip(_chunks(queries, batch_size), batches, strict=True):
        s, q = (_to_numpy(x) for x in encoder.pooled(inputs))
        for t, s_emb, q_emb in zip(batch, s, q, strict=True):
            results.append(QueryResult(t.index, t.dataset, t.source_id, t.target_id, q_emb))
            if mode == "two-turn":
                sources.setdefault((t.dataset, t.source_id), s_emb)
    return results, sources


def reuse_sources(gallery: dict[ProductKey, np.ndarray], sources: dict[ProductKey, np.ndarray]) -> int:
    """Add the s of sources the gallery lacks, as the reference does; returns how many were added."""
    missing = [key for key in sources if key not in gallery]
    for key in missing:
        gallery[key] = sources[key]
    return len(missing)


def pixel_cost(paths: Sequence[Path]) -> int:
    """Roughly a product's visual-token count: its views' pixels, clipped to the processor's bounds (headers only)."""
    total = 0
    for path in paths:
        with Image.open(path) as img:
            width, height = img.size
        total += min(max(width * height, MIN_PIXELS), MAX_PIXELS)
    return total


def run_evaluation(
    encoder: ProCIREncoder,
    data: EvalData,
    datasets: Sequence[str],
    batch_size: int = 10,
    mode: str = "two-turn",
    workers: int = 0,
    sources_from_queries: bool = False,
    encoding: str = "joint",
) -> list[DatasetRecall] | None:
    """All three phases; every process encodes its share, and the merged recall comes back on rank 0 only.

    Each process batches its share shortest first, so a batch pads little. With `sources_from_queries`, a product
    that is some query's source is not encoded as a document: its s from the query pass (equal to d up to float
    noise) takes its gallery place, which saves one forward per source. With a view-wise `encoding` every view is
    encoded alone (each query once per source view) and pooled afterwards; source reuse does not apply there.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; one of {', '.join(ENCODINGS)}")
    if encoding != "joint":
        data, sources_from_queries = split_views(data), False
    rank, world = process_rank()
    cost = {key: pixel_cost(paths) for key, paths in data.views.items()}
    reused = {(t.dataset, t.source_id) for t in data.queries} if sources_from_queries and mode == "two-turn" else set()
    doc_keys = sorted((k for k in data.gallery if k not in reused), key=cost.__getitem__)
    queries = sorted(data.queries[rank::world], key=lambda t: cost[(t.dataset, t.source_id)])
    gallery_part = encode_gallery(encoder, doc_keys[rank::world], data.views, batch_size, workers)
    query_part, source_part = encode_queries(encoder, queries, data.views, batch_size, workers, mode)
    galleries, query_parts, source_parts = gather(gallery_part), gather(query_part), gather(source_part)
    if rank != 0:
        return None
    gallery, merged = merge_gallery(galleries), merge_queries(query_parts)
    if encoding == "joint":
        added = reuse_sources(gallery, merge_gallery(source_parts))
    else:
        added = 0
        gallery, merged = join_views(gallery, merged, encoding)
    log.info("gallery %d products (%d added by source reuse), %d queries", len(gallery), added, len(merged))
    return recall_by_dataset(gallery, merged, datasets)


def split_views(data: EvalData) -> EvalData:
    """Every view as an item of its own: product id P becomes "P#view<i>", and query j with m source views becomes m
    queries, one per view, with index j·MAX_VIEWS + i (so the merge across processes still counts each once)."""
    views = {
        (dataset, f"{pid}{_VIEW_SEP}{i}"): [path]
        for (dataset, pid), paths in data.views.items()
        for i, path in enumerate(paths)
    }
    queries = [
        replace(t, index=t.index * MAX_VIEWS + i, source_id=f"{t.source_id}{_VIEW_SEP}{i}")
        for t in data.queries
        for i in range(len(data.views[(t.dataset, t.source_id)]))
    ]
    return EvalData(views=views, gallery=sorted(views), queries=queries)


def join_views(
    gallery: dict[ProductKey, np.ndarray], queries: list[QueryResult], encoding: str
) -> tuple[dict[ProductKey, np.ndarray], list[QueryResult]]:
    """Per-view embeddings back to products: the mean of unit vectors (meanpool) or a [views, dim] array (maxsim)."""

    def pool(vectors: list[np.ndarray]) -> np.ndarray:
        stacked = l2_normalise(np.stack(vectors))
        return stacked.mean(axis=0) if encoding == "meanpool" else stacked

    products: dict[ProductKey, list[np.ndarray]] = {}
    for (dataset, item), emb in gallery.items():
        products.setdefault((dataset, item.rsplit(_VIEW_SEP, 1)[0]), []).append(emb)
    grouped: dict[int, list[QueryResult]] = {}
    for q in queries:
        grouped.setdefault(q.index // MAX_VIEWS, []).append(q)
    joined = [
        QueryResult(
            index, g[0].dataset, g[0].source_id.rsplit(_VIEW_SEP, 1)[0], g[0].target_id, pool([q.embedding for q in g])
        )
        for index, g in grouped.items()
    ]
    return {key: pool(v) for key, v in sorted(products.items())}, joined


def init_distributed() -> None:
    """Join the torchrun process group when launched by torchrun (RANK set); one GPU per process."""
    if "RANK" not in os.environ or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def evaluate(
    model_dir: Path,
    data_dir: Path,
    image_root: Path,
    output_dir: Path,
    datasets: Sequence[str] = VAL_DATASETS,
    batch_size: int = 10,
    mode: str = "two-turn",
    workers: int = 0,
    device: torch.device | None = None,
    dtype: str = "bf16",
    sources_from_queries: bool = False,
    encoding: str = "joint",
) -> list[DatasetRecall] | None:
    """Load the model and evaluate; rank 0 writes eval_results.json and returns the results, other ranks None.

    With dtype bf16 the whole model runs in bf16, as in the reference (which does so on CPU too): fp32 can rank a
    near-tie differently from the reference's numbers."""
    device = device or default_device()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
    if not is_torchvision_available():
        log.warning("torchvision is not installed: the PIL image processor may differ by one 8-bit level per pixel")
    encoder = ProCIREncoder.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    data = load_eval_data(data_dir, image_root, datasets)
    results = run_evaluation(encoder, data, datasets, batch_size, mode, workers, sources_from_queries, encoding)
    if results is not None:
        write_results(output_dir, results, dtype=dtype)
    return results
