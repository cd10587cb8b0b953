"""Export a build in FashionMV's own layout, so its published evaluation code reads our data unchanged.

    <out>/train_triplets.jsonl  val_triplets.jsonl     source_id, target_id, dataset, views_involved,
                                                      modification_text_short (+ modification_text_long in train)
    <out>/train_captions.jsonl  val_captions.jsonl     product_id, dataset, short_caption (+ long_caption in train)
    <out>/images/<dataset>/<product_id>/<file>         the kept views (at most 5), bytes as ingested

Exactly FashionMV's fields and id formats: long texts are left out of val, as in the released files (our Parquet
shards keep them). One caption record per product that appears in a triplet of the split. Records are written in a
deterministic order (dataset, source, target).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_VIEWS, TRIPLETS, Build
from fashionmv_builder.core.config import RunConfig

SPLITS = ("train", "val")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def export_fashionmv(config: RunConfig, out: Path, datasets: list[str] | None = None) -> dict[str, int]:
    """Write the layout for every dataset of the build; returns counts per file."""
    out.mkdir(parents=True, exist_ok=True)
    triplets: dict[str, list[dict]] = {s: [] for s in SPLITS}
    captions: dict[str, list[dict]] = {s: [] for s in SPLITS}
    images_written = 0
    build = Build(config.output_dir)
    for source in config.sources:
        dataset = source.dataset
        if datasets and dataset not in datasets:
            continue
        rows = build.rows(TRIPLETS, dataset)
        if not rows:
            continue
        in_split: dict[str, set[str]] = defaultdict(set)
        for r in sorted(rows, key=lambda r: (r["source_id"], r["target_id"])):
            record = {
                "source_id": r["source_id"],
                "target_id": r["target_id"],
                "dataset": dataset,
                "views_involved": r["views_involved"],
                "modification_text_short": r["modification_text_short"],
            }
            if r["split"] == "train":
                record["modification_text_long"] = r["modification_text_long"]
            triplets[r["split"]].append(record)
            in_split[r["split"]] |= {r["source_id"], r["target_id"]}
        by_id = {c["product_id"]: c for c in build.rows(CAPTIONS, dataset)}
        for split in SPLITS:
            for pid in sorted(in_split[split]):
                record = {"product_id": pid, "dataset": dataset, "short_caption": by_id[pid]["short_caption"]}
                if split == "train":
                    record["long_caption"] = by_id[pid]["long_caption"]
                captions[split].append(record)
        images_written += write_product_images(
            config, dataset, in_split["train"] | in_split["val"], out / "images" / dataset
        )
    counts = {}
    for split in SPLITS:
        _write_jsonl(out / f"{split}_triplets.jsonl", triplets[split])
        _write_jsonl(out / f"{split}_captions.jsonl", captions[split])
        counts[f"{split}_triplets"] = len(triplets[split])
        counts[f"{split}_captions"] = len(captions[split])
    counts["images"] = images_written
    return counts


def write_product_images(config: RunConfig, dataset: str, products: set[str], folder: Path) -> int:
    """The kept views of `products`, one shard at a time (bytes are never all in memory)."""
    build = Build(config.output_dir)
    written = 0
    for marker in build.markers(DEDUPE_VIEWS, dataset):
        for pid, views in build.kept_views(dataset, [marker.shard], products=products).items():
            for view in views:
                path = folder / pid / view["file_name"]
                data = view["bytes"]
                if not (path.exists() and path.read_bytes() == data):  # a rerun rewrites nothing
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                written += 1
    return written
