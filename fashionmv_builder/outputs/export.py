"""Export a build in FashionMV's own layout, so its published evaluation code reads our data unchanged; and in a
MegaPairs-style layout that carries what FashionMV's cannot (every paraphrase, the hard negatives).

    <out>/train_triplets.jsonl  val_triplets.jsonl     source_id, target_id, dataset, views_involved,
                                                      modification_text_short (+ modification_text_long in train)
    <out>/train_captions.jsonl  val_captions.jsonl     product_id, dataset, short_caption (+ long_caption in train)
    <out>/images/<dataset>/<product_id>/<file>         the kept views (at most 5), bytes as ingested

Exactly FashionMV's fields and id formats: long texts are left out of val, as in the released files (our Parquet
shards keep them). One caption record per product that appears in a triplet of the split. Records are written in a
deterministic order (dataset, source, target).

    <out>/megapairs/<split>.jsonl     per triplet: source views, the list of short texts, target views and the hard
                                      negatives' views (paths relative to <out>), as MegaPairs gives each pair several
                                      instructions; `datasets.load_dataset("json", ...)` reads it
    <out>/images/...                  the same image folder as above

Both exports take `drop_redundant` ("text", "image" or "both": both filters) to leave out triplets whose text alone or
whose source image alone already ranks the target first among the shown candidates (the discriminate stage's flags).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_VIEWS, HARD_NEGATIVES, TRIPLETS, Build
from fashionmv_builder.core.config import RunConfig

SPLITS = ("train", "val")
Redundancy = Literal["text", "image", "both"]
FLAGS: dict[str, tuple[str, ...]] = {
    "text": ("text_alone_ranks_target_first",),
    "image": ("image_alone_ranks_target_first",),
    "both": ("text_alone_ranks_target_first", "image_alone_ranks_target_first"),
}


def triplet_rows(build: Build, dataset: str, drop_redundant: Redundancy | None = None) -> list[dict]:
    """The build's triplets of a dataset in export order (source, target), less the redundant ones if asked."""
    rows = sorted(build.rows(TRIPLETS, dataset), key=lambda r: (r["source_id"], r["target_id"]))
    if drop_redundant is None:
        return rows
    return [r for r in rows if not any(r.get(flag) for flag in FLAGS[drop_redundant])]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _datasets_with_triplets(
    config: RunConfig, build: Build, datasets: list[str] | None, drop_redundant: Redundancy | None
) -> Iterator[tuple[str, list[dict]]]:
    """Each dataset of the build to export (all, or only `datasets`) that has triplets, with them."""
    for source in config.sources:
        if datasets and source.dataset not in datasets:
            continue
        if rows := triplet_rows(build, source.dataset, drop_redundant):
            yield source.dataset, rows


def export_fashionmv(
    config: RunConfig, out: Path, datasets: list[str] | None = None, drop_redundant: Redundancy | None = None
) -> dict[str, int]:
    """Write the layout for every dataset of the build; returns counts per file."""
    out.mkdir(parents=True, exist_ok=True)
    triplets: dict[str, list[dict]] = {s: [] for s in SPLITS}
    captions: dict[str, list[dict]] = {s: [] for s in SPLITS}
    images_written = 0
    build = Build(config.output_dir)
    for dataset, rows in _datasets_with_triplets(config, build, datasets, drop_redundant):
        in_split: dict[str, set[str]] = defaultdict(set)
        for r in rows:
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


def export_megapairs(
    config: RunConfig, out: Path, datasets: list[str] | None = None, drop_redundant: Redundancy | None = None
) -> dict[str, int]:
    """Write `<out>/megapairs/<split>.jsonl` and the images they name; returns counts per file."""
    (out / "megapairs").mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    images_written = 0
    build = Build(config.output_dir)
    for dataset, rows in _datasets_with_triplets(config, build, datasets, drop_redundant):
        negatives: dict[str, list[dict]] = defaultdict(list)
        for n in build.rows(HARD_NEGATIVES, dataset):
            negatives[n["triplet_id"]].append(n)
        products = {pid for r in rows for pid in (r["source_id"], r["target_id"])}
        products |= {n["negative_id"] for r in rows for n in negatives[r["triplet_id"]]}
        paths = {
            pid: [f"images/{dataset}/{pid}/{v['file_name']}" for v in vs]
            for pid, vs in build.kept_views(dataset, with_bytes=False).items()
        }
        for r in rows:
            shown = sorted(negatives[r["triplet_id"]], key=lambda n: n["rank_shown"])
            records[r["split"]].append(
                {
                    "triplet_id": r["triplet_id"],
                    "dataset": dataset,
                    "source_id": r["source_id"],
                    "source_images": paths[r["source_id"]],
                    "texts": r["modification_texts_short"] or [r["modification_text_short"]],
                    "text_long": r["modification_text_long"],
                    "target_id": r["target_id"],
                    "target_images": paths[r["target_id"]],
                    "negative_ids": [n["negative_id"] for n in shown],
                    "negative_images": [paths[n["negative_id"]] for n in shown],
                }
            )
        images_written += write_product_images(config, dataset, products, out / "images" / dataset)
    counts = {}
    for split in SPLITS:
        _write_jsonl(out / "megapairs" / f"{split}.jsonl", records[split])
        counts[f"{split}_triplets"] = len(records[split])
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
