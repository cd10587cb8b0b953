"""ProCIR evaluation speed: `fashionmv evaluate`'s queries/s against a straightforward reference-style loop.

Both sides run the same tiny random Qwen3.5 (build/models/tiny-procir, built here if missing) on the same synthetic
FashionMV-layout val set, in one process, interleaved. The peer follows FashionMV's released ProCIR code: one
processor call per sample (its target's images loaded too, unused), batches of 10 padded by hand, the gallery and
the queries in file order, top-k by torch. Image sizes and view counts mimic FashionMV's three val sources
(DeepFashion 750×1101, Fashion200K crops ~234×471, FashionGen 256×256). A query's figure covers the whole run
(gallery, queries and scoring) divided by the number of queries, as a user waits for it.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (only if torch is not loaded yet): on this shared 2-core machine,
# spinning threads made the forward up to 20x slower whenever another process held a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image

from fashionmv_builder.devtools.tiny_procir import build_tiny_procir
from fashionmv_builder.procir.data import VAL_DATASETS, EvalData, load_eval_data, load_views
from fashionmv_builder.procir.evaluate import run_evaluation
from fashionmv_builder.procir.model import (
    MAX_PIXELS,
    MIN_PIXELS,
    ProCIREncoder,
    doc_messages,
    first_and_last,
    query_messages,
    render,
)
from fashionmv_builder.procir.recall import KS, display_name, results_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "build" / "models" / "tiny-procir"
# (dataset, image width × height, mean views) per FashionMV val source; sizes from reference §1.4.
SOURCES = [("deepfashion", (750, 1101), 4.0), ("f200k", (234, 471), 3.3), ("fashiongen_val", (256, 256), 4.1)]
TRIPLETS_PER_PRODUCT = 1.75  # 32,718 queries over 18,803 products
PEER_BATCH = 10


def _write_val_set(root: Path, products_per_source: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images, lines = root / "images", []
    for dataset, (width, height), mean_views in SOURCES:
        ids = [str(10_000_000 + i) for i in range(products_per_source)]
        for pid in ids:
            folder = images / dataset / pid
            folder.mkdir(parents=True)
            for view in range(int(np.clip(rng.poisson(mean_views), 1, 6))):
                w, h = (int(s * rng.uniform(0.85, 1.15)) for s in (width, height))
                blocks = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
                Image.fromarray(blocks).resize((w, h)).save(folder / f"{pid}_{view}.jpg", quality=90)
        for _ in range(int(products_per_source * TRIPLETS_PER_PRODUCT)):
            source, target = rng.choice(ids, size=2, replace=False)
            text = "Switch to a shorter hem, add long sleeves and a round neck in a darker colour."
            lines.append(
                {"source_id": source, "target_id": target, "dataset": dataset, "modification_text_short": text}
            )
    data = root / "data"
    data.mkdir()
    (data / "val_triplets.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data, images


# ---- the peer: a straightforward per-sample loop, as the reference evaluator does it ----------------------------


def _pad_and_batch(samples: list[dict]) -> dict:
    """Right-pad per-sample processor outputs with 0 and concatenate their images in sample order."""
    length = max(s["input_ids"].shape[1] for s in samples)
    batch = {}
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        rows = [torch.nn.functional.pad(s[name][0], (0, length - s[name].shape[1])) for s in samples]
        batch[name] = torch.stack(rows)
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return batch


def _peer_sample(encoder: ProCIREncoder, messages: list, images: list[Image.Image]) -> dict:
    return encoder.processor(
        text=[render(encoder.processor, messages)],
        images=images,
        return_tensors="pt",
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )


@torch.no_grad()
def _peer_forward(encoder: ProCIREncoder, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _pad_and_batch(samples)
    encoder.vlm.model.rope_deltas = None
    hidden = encoder.vlm.model(**batch, use_cache=False).last_hidden_state
    encoder.vlm.model.rope_deltas = None
    first, last = first_and_last(batch["input_ids"], encoder.emb_token_id)
    rows = torch.arange(hidden.shape[0])
    return hidden[rows, first].float(), hidden[rows, last].float()


def _peer_recall(gallery: dict, queries: list[tuple[str, str, torch.Tensor]]) -> dict[str, float]:
    out: dict[str, float] = {}
    per_k: dict[int, list[float]] = {5: [], 10: []}
    for dataset in VAL_DATASETS:
        keys = sorted(k for k in gallery if k[0] == dataset)
        index = {k: i for i, k in enumerate(keys)}
        kept = [(index[(dataset, t)], q) for ds, t, q in queries if ds == dataset and (dataset, t) in index]
        g = torch.nn.functional.normalize(torch.stack([gallery[k] for k in keys]), dim=-1)
        q = torch.nn.functional.normalize(torch.stack([q for _, q in kept]), dim=-1)
        targets = torch.tensor([t for t, _ in kept])
        for k in KS:
            top = (q @ g.T).topk(min(k, len(keys)), dim=1).indices
            recall = 100 * (top == targets[:, None]).any(dim=1).float().mean().item()
            out[f"{display_name(dataset)}_R@{k}"] = round(recall, 2)
            per_k.setdefault(k, []).append(recall)
    for k in (5, 10):
        out[f"Average_R@{k}"] = round(statistics.mean(per_k[k]), 2)
    return out


def _peer(encoder: ProCIREncoder, data: EvalData) -> dict[str, float]:
    gallery: dict = {}
    for start in range(0, len(data.gallery), PEER_BATCH):
        keys = data.gallery[start : start + PEER_BATCH]
        samples = [_peer_sample(encoder, doc_messages(len(data.views[k])), load_views(data.views[k])) for k in keys]
        gallery.update(zip(keys, _peer_forward(encoder, samples)[1], strict=True))
    queries = []
    for start in range(0, len(data.queries), PEER_BATCH):
        batch = data.queries[start : start + PEER_BATCH]
        samples = []
        for t in batch:
            source = load_views(data.views[(t.dataset, t.source_id)])
            load_views(data.views[(t.dataset, t.target_id)])  # the reference loads the target's images too
            samples.append(_peer_sample(encoder, query_messages(len(source), t.modification_text_short), source))
        _, q = _peer_forward(encoder, samples)
        queries.extend((t.dataset, t.target_id, emb) for t, emb in zip(batch, q, strict=True))
    return _peer_recall(gallery, queries)


# ---- timing -------------------------------------------------------------------------------------------------------


def _timed(run) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    scores = run()
    return time.perf_counter() - start, scores


def main(smoke: bool = False) -> None:
    products, reps = (4, 1) if smoke else (16, 3)
    torch.manual_seed(0)
    if not (TINY / "config.json").exists():
        build_tiny_procir(TINY)
    encoder = ProCIREncoder.from_pretrained(TINY).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = load_eval_data(*_write_val_set(Path(tmp), products), VAL_DATASETS)
        sides = {
            "fashionmv evaluate (batch 10)": lambda: results_json(run_evaluation(encoder, data, VAL_DATASETS, 10)),
            "  + --sources-from-queries": lambda: results_json(
                run_evaluation(encoder, data, VAL_DATASETS, 10, sources_from_queries=True)
            ),
            "reference-style loop (per sample, batch 10)": lambda: _peer(encoder, data),
        }
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        scores: dict[str, dict[str, float]] = {}
        for _ in range(reps):  # interleaved, so drifting machine load hits every side alike
            for name, run in sides.items():
                elapsed, scores[name] = _timed(run)
                seconds[name].append(elapsed)
    n = len(data.queries)
    rates = {name: n / statistics.median(s) for name, s in seconds.items()}
    peer = rates["reference-style loop (per sample, batch 10)"]
    print(f"procir evaluate: tiny Qwen3.5, {len(data.gallery)} products, {n} queries, {reps} interleaved repetitions")
    for name, rate in rates.items():
        print(f"  {name:<46} {rate:7.1f} queries/s  ({rate / peer:.2f}x the reference-style loop)")
    same = all(s == scores["reference-style loop (per sample, batch 10)"] for s in scores.values())
    print(f"  same eval_results on every side: {same}")
