"""Which image encoder should mine? Each offline encoder's recall of the sample's planted siblings (issue #18).

On a ground-truth build of the sample catalogue (captions from the sample's truth, so the caption paths mean what
they say; `make truth-triplets`, or one built here), every product's image vector is recomputed with each encoder
and mined as the candidates stage mines (`stages.candidates.mine`, top 20 per path, inside its split, its dedupe
cluster left out). For each product with planted siblings (a base garment and its siblings), the figure is the share
of its siblings in its split found among its mined neighbours: by the image path alone, and by the union of the three
paths (image, long caption, short caption). Speed is images per second on one core (torch held to one thread),
encoding every distinct view of the build once, in the same run for every encoder.

    python -m benchmarks.bench_encoders [--build build/truth] [--catalogue build/sample-catalogue]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 20  # FashionMV's per-path depth
# (label, embed.image settings): every offline encoder, the learned one at its training size and a cheaper one
ENCODERS = [
    ("gradient histogram (no torch)", {"backend": "gradient-histogram"}),
    ("EfficientNet-Lite0, 224 px", {"backend": "efficientnet-lite0", "image_size": 224}),
    ("EfficientNet-Lite0, 160 px", {"backend": "efficientnet-lite0", "image_size": 160}),
]
TRUTH_IDS = {"deepfashion": "deepfashion", "f200k": "fashion200k"}  # build dataset -> the truth's id layout


def sibling_pairs(truth: dict, layout: str) -> list[tuple[str, str]]:
    """Ordered (product, sibling) pairs of the catalogue: a base garment and its planted siblings are siblings."""
    families: dict[int, list[str]] = {}
    for p in truth["products"]:
        if p["ids"].get(layout) is None:
            continue
        base = p["sibling_of"] if p["role"] == "sibling" else p["index"] if p["role"] == "base" else None
        if base is not None:
            families.setdefault(base, []).append(p["ids"][layout])
    return [(a, b) for members in families.values() for a in members for b in members if a != b]


def recall(pool, config, pairs: list[tuple[str, str]], image_only: bool) -> tuple[int, int]:
    from fashionmv_builder.stages.candidates import mine

    if image_only:
        pool = replace(pool, long=pool.image, short=pool.image)
    mined = {}
    for split in ("train", "val"):
        mined.update(mine(pool, split, config))
    split = {r["product_id"]: r["split"] for r in pool.rows}
    found = total = 0
    for a, b in pairs:
        if a in split and b in split and split[a] == split[b]:
            total += 1
            found += b in mined[a][1]
    return found, total


def measure(build_dir: Path, catalogue: Path) -> list[dict]:
    import torch

    from fashionmv_builder.core.build import Build
    from fashionmv_builder.core.config import ImageEncoderConfig, validate_config
    from fashionmv_builder.stages.candidates import load_pool
    from fashionmv_builder.stages.embed.encoders import image_encoder, product_vector

    torch.set_num_threads(1)
    truth = json.loads((catalogue / "ground_truth.json").read_text())
    build = Build(str(build_dir))
    datasets = [d for d in build.datasets("embed") if d in TRUTH_IDS]
    config = validate_config(
        {
            "output_dir": str(build_dir),
            "sources": [{"kind": "folder", "dataset": d, "root": "."} for d in datasets],
            "triplets": {"top_k": TOP_K, "val_ratio": 0.3},
        }
    )
    pools, views = {}, {}
    for d in datasets:
        pools[d] = load_pool(build, config, d)
        ids = {r["product_id"] for r in pools[d].rows}
        views[d] = build.kept_views(d, products=ids)
    distinct = {
        hashlib.sha256(v["bytes"]).hexdigest(): v["bytes"] for d in datasets for vs in views[d].values() for v in vs
    }
    images = list(distinct.items())
    results = []
    for label, settings in ENCODERS:
        encoder = image_encoder(ImageEncoderConfig(**settings), threads=1)
        encoder.encode([images[0][1]])  # warm-up: load and first call outside the timing
        start = time.perf_counter()
        vectors = dict(zip([h for h, _ in images], encoder.encode([data for _, data in images]), strict=True))
        seconds = time.perf_counter() - start
        row = {"encoder": label, "images_per_s_per_core": round(len(images) / seconds, 1)}
        counts = {"image": [0, 0], "union": [0, 0]}
        for d in datasets:
            pool = pools[d]
            image = []
            for r in pool.rows:
                hashes = [hashlib.sha256(v["bytes"]).hexdigest() for v in views[d][r["product_id"]]]
                image.append(product_vector([vectors[h] for h in hashes]))
            pool = replace(pool, image=np.stack(image))
            pairs = sibling_pairs(truth, TRUTH_IDS[d])
            for path, image_only in (("image", True), ("union", False)):
                found, total = recall(pool, config, pairs, image_only)
                counts[path][0] += found
                counts[path][1] += total
        row |= {f"{path}_found": c[0] for path, c in counts.items()}
        row |= {f"{path}_total": c[1] for path, c in counts.items()}
        results.append(row)
    return results


def main(smoke: bool = False, build_dir: Path | None = None, catalogue: Path | None = None) -> list[dict]:
    """The sample's ground-truth build (`make truth-triplets`); without one, or for a smoke run, the 100-product
    deepfashion one that bench_learns builds (and reuses)."""
    build_dir = build_dir or ROOT / "build" / "truth"
    catalogue = catalogue or ROOT / "build" / "sample-catalogue"
    if smoke or not (build_dir / "embed").is_dir() or not (catalogue / "ground_truth.json").exists():
        from benchmarks.bench_learns import ground_truth_build

        folder = ROOT / "build" / "bench-learns" / "100"
        print(f"encoders: using the 100-product ground-truth build in {folder}")
        ground_truth_build(folder, 100)
        build_dir, catalogue = folder / "build", folder / "catalogue"
    results = measure(build_dir, catalogue)
    print(f"image encoders: planted siblings among the top {TOP_K} mined in their split ({build_dir})")
    print(f"  {'encoder':<32} {'image path':>12} {'3-path union':>13} {'img/s/core':>11}")
    for r in results:
        image = f"{r['image_found']}/{r['image_total']}"
        union = f"{r['union_found']}/{r['union_total']}"
        print(f"  {r['encoder']:<32} {image:>12} {union:>13} {r['images_per_s_per_core']:>11}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--build", type=Path, default=None, help="a ground-truth build (default build/truth)")
    parser.add_argument("--catalogue", type=Path, default=None, help="its catalogue (default build/sample-catalogue)")
    args = parser.parse_args()
    main(args.smoke, args.build, args.catalogue)
