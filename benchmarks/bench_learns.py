"""Does ProCIR training on a build learn from its modification texts? (issue #16)

A ground-truth build of a sample catalogue (`fashionmv truth-run`: every LMM answer from the sample's truth, so each
triplet joins true siblings and its text names their differences) is exported in FashionMV's layout, its images
shrunk to 160 px a side so a CPU run takes minutes, and the tiny random-start ProCIR model is scored on the val
split with FashionMV's protocol: before training, after training on the train split, and after training on the same
triplets with their texts shuffled across triplets (the control). The peer of the true-text run is the shuffled one,
measured in the same run with the same seed, steps and images.

    python -m benchmarks.bench_learns [--products 400] [--steps 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "build" / "models" / "tiny-procir"
DATASET = "deepfashion"


def ground_truth_build(folder: Path, products: int) -> dict:
    """A sample of `products` products, built with the ground-truth answering server; the run config as a dict."""
    from fashionmv_builder.core.config import validate_config
    from fashionmv_builder.devtools.ground_truth_server import MODEL_NAME, TRUTH_WORDS, serve_ground_truth
    from fashionmv_builder.devtools.sample_catalogue import generate_sample
    from fashionmv_builder.pipeline import run_local

    catalogue = folder / "catalogue"
    if not (catalogue / "ground_truth.json").exists():
        generate_sample(catalogue, products=products, seed=0)
    with serve_ground_truth(catalogue, media_root=folder) as (url, _):
        config = {
            "name": "learns",
            "output_dir": str(folder / "build"),
            "shard_size": 50,
            "workers": 2,
            "sources": [{"kind": "deepfashion", "dataset": DATASET, "root": str(catalogue / "deepfashion")}],
            "lmm": {"endpoints": [url], "model": MODEL_NAME, "words": TRUTH_WORDS, "breaker_min_products": 50},
            "triplets": {"val_ratio": 0.3, "top_k": 4},  # narrow mining: siblings are shown (configs/ground-truth.yaml)
        }
        run_local(validate_config(config))
    return config


def main(smoke: bool = False, products: int = 400, steps: int = 60, seed: int = 0) -> dict:
    from fashionmv_builder.core.config import validate_config
    from fashionmv_builder.outputs.export import export_fashionmv
    from fashionmv_builder.procir.learning_check import measure, shrink_images
    from fashionmv_builder.procir.train import TrainConfig
    from fashionmv_builder.procir.train_data import load_fashionmv_train

    if smoke:
        products, steps = 100, 2
    folder = ROOT / "build" / "bench-learns" / str(products)
    started = time.perf_counter()
    config = validate_config(ground_truth_build(folder, products))
    built = time.perf_counter() - started
    export = folder / "export"
    shutil.rmtree(export, ignore_errors=True)
    counts = export_fashionmv(config, export, [DATASET])
    shrink_images(export / "images", 160)
    data = load_fashionmv_train(export, export / "images")
    cfg = TrainConfig(dtype="fp32", lr=1e-3, batch_size=16, max_steps=steps, epochs=1e6, seed=seed)
    result = measure(TINY, export, data, cfg, [DATASET])
    result |= {"products": products, "export": counts, "build_s": round(built, 1)}
    print(
        f"learning check: {products}-product ground-truth build, {counts['train_triplets']} train and "
        f"{counts['val_triplets']} val triplets, {steps} steps, seed {seed}"
    )
    print("| run | R@1 | R@5 | R@10 |")
    print("|---|---:|---:|---:|")
    for name in ("before", "true", "shuffled"):
        r = result[name]
        print(f"| {name} | {r[f'{DATASET}_R@1']} | {r[f'{DATASET}_R@5']} | {r[f'{DATASET}_R@10']} |")
    gain = result["true"][f"{DATASET}_R@10"] - result["shuffled"][f"{DATASET}_R@10"]
    print(f"R@10 of the true texts over the shuffled ones: {gain:+.1f} points")
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    a = parser.parse_args()
    main(a.smoke, a.products, a.steps, a.seed)
