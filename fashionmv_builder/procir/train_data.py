"""Training data for ProCIR: FashionMV's released train files, or the train split of one of our builds.

Either way the trainer gets the same `TrainSet`: triplets, captions (short and long) per product, image paths per
product (the first five, as the evaluator lists them), and per-view captions where the source has them (our builds
do; FashionMV's release may not), which the SFT caption task uses. A build also gives each triplet its hard
negatives (the candidates shown with it and not chosen, in shown order); FashionMV's release has none.

A triplet whose source or target has no image or no caption cannot be trained on: it is skipped with a reason, and
the counts come back so a user sees what was left out (`in = kept + skipped`). A hard negative without images or
caption is left out the same way (counted as `negative_no_images` / `negative_no_caption`); with chain-of-thought
training it gets its caption in the think block like a target, so the block cannot tell positives from negatives.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fashionmv_builder.core.build import CAPTIONS, HARD_NEGATIVES, TRIPLETS, Build
from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.outputs.export import write_product_images
from fashionmv_builder.procir.data import Caption, Triplet, list_views, read_captions, read_triplets
from fashionmv_builder.procir.recall import ProductKey

log = logging.getLogger("fashionmv")

TRAIN_TRIPLETS = "train_triplets.jsonl"
TRAIN_CAPTIONS = "train_captions.jsonl"


@dataclass
class TrainSet:
    triplets: list[Triplet]
    captions: dict[ProductKey, Caption]
    views: dict[ProductKey, list[Path]]
    view_captions: dict[ProductKey, list[str]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    hard_negatives: dict[int, list[str]] = field(default_factory=dict)  # triplet index → product ids, shown order

    def products(self) -> list[ProductKey]:
        """Every source and target product, sorted (the SFT caption task's samples)."""
        return sorted({(t.dataset, pid) for t in self.triplets for pid in (t.source_id, t.target_id)})


def _usable(
    triplets: Sequence[Triplet], captions: dict[ProductKey, Caption], views: dict[ProductKey, list[Path]]
) -> tuple[list[Triplet], Counter]:
    kept, skipped = [], Counter()
    for t in triplets:
        for role, pid in (("source", t.source_id), ("target", t.target_id)):
            key = (t.dataset, pid)
            reason = "no_images" if not views.get(key) else "no_caption" if key not in captions else None
            if reason:
                if sum(skipped.values()) < 5:  # the first few by name; the rest are counted
                    log.warning("skipping triplet %d: %s %s/%s has %s", t.index, role, *key, reason.replace("_", " "))
                skipped[f"{role}_{reason}"] += 1
                break
        else:
            kept.append(t)
    return kept, skipped


def load_fashionmv_train(data_dir: Path, image_root: Path, datasets: Sequence[str] | None = None) -> TrainSet:
    """FashionMV's `train_triplets.jsonl` and `train_captions.jsonl` with the `images/<dataset>/<id>/` folders."""
    triplets = read_triplets(data_dir / TRAIN_TRIPLETS, datasets)
    captions = read_captions(data_dir / TRAIN_CAPTIONS)
    keys = sorted({(t.dataset, pid) for t in triplets for pid in (t.source_id, t.target_id)})
    views = {key: paths for key in keys if (paths := list_views(image_root, *key))}
    kept, skipped = _usable(triplets, captions, views)
    return TrainSet(kept, captions, views, skipped=skipped)


def load_build_train(config: RunConfig, image_root: Path, split: str = "train") -> TrainSet:
    """One split of a build, read from its Parquet shards (triplets and captions tables).

    The kept views of the products involved are written once under `image_root/<dataset>/<id>/` (a rerun rewrites
    nothing), so data-loader workers open files instead of each holding the build's image bytes."""
    triplets: list[Triplet] = []
    captions: dict[ProductKey, Caption] = {}
    view_captions: dict[ProductKey, list[str]] = {}
    negative_ids: dict[int, list[str]] = {}
    build = Build(config.output_dir)
    for source in config.sources:
        dataset = source.dataset
        rows = build.rows(TRIPLETS, dataset)
        rows = sorted((r for r in rows if r["split"] == split), key=lambda r: r["triplet_id"])
        for r in rows:
            triplets.append(
                Triplet(
                    index=len(triplets),
                    dataset=dataset,
                    source_id=r["source_id"],
                    target_id=r["target_id"],
                    modification_text_short=r["modification_text_short"],
                    modification_text_long=r["modification_text_long"],
                    views_involved=tuple(r["views_involved"]),
                    paraphrases=tuple(r.get("modification_texts_short") or ()),
                )
            )
        index = {r["triplet_id"]: i for i, r in enumerate(rows, len(triplets) - len(rows))}
        shown = sorted(
            (r for r in build.rows(HARD_NEGATIVES, dataset) if r["split"] == split and r["triplet_id"] in index),
            key=lambda r: (r["triplet_id"], r["rank_shown"] is None, r["rank_shown"] or 0),
        )
        for r in shown:
            negative_ids.setdefault(index[r["triplet_id"]], []).append(r["negative_id"])
        involved = {pid for r in rows for pid in (r["source_id"], r["target_id"])} | {r["negative_id"] for r in shown}
        for c in build.rows(CAPTIONS, dataset):
            if c["product_id"] in involved:
                key = (dataset, c["product_id"])
                captions[key] = Caption(dataset, c["product_id"], c["short_caption"], c["long_caption"])
                ordered = sorted(c["view_captions"] or [], key=lambda v: v["view_index"])
                view_captions[key] = [f"{v['view_type']}: {v['caption']}" for v in ordered]
        write_product_images(config, dataset, involved, image_root / dataset)
    keys = {(t.dataset, pid) for t in triplets for pid in (t.source_id, t.target_id)}
    keys |= {(t.dataset, pid) for t in triplets for pid in negative_ids.get(t.index, [])}
    views = {key: paths for key in sorted(keys) if (paths := list_views(image_root, *key))}
    kept, skipped = _usable(triplets, captions, views)
    negatives = _usable_negatives(kept, negative_ids, captions, views, skipped)
    return TrainSet(kept, captions, views, view_captions, skipped, negatives)


def _usable_negatives(
    triplets: Sequence[Triplet],
    negative_ids: dict[int, list[str]],
    captions: dict[ProductKey, Caption],
    views: dict[ProductKey, list[Path]],
    skipped: Counter,
) -> dict[int, list[str]]:
    kept: dict[int, list[str]] = {}
    for t in triplets:
        for pid in negative_ids.get(t.index, []):
            key = (t.dataset, pid)
            reason = "no_images" if not views.get(key) else "no_caption" if key not in captions else None
            if reason:
                skipped[f"negative_{reason}"] += 1
            else:
                kept.setdefault(t.index, []).append(pid)
    return kept
