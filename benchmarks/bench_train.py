"""ProCIR training speed and memory: samples/s and peak memory per configuration, as ratios to the single-turn
baseline measured in the same run (the paper's cost finding: MT+Align steps cost about 1.8x single-turn ones).

CPU (default, part of `make bench`): the tiny random Qwen3.5 on a synthetic FashionMV-like train set. GPU (run by
hand when a machine is lent, see BENCHMARKS.md):

    python -m benchmarks.bench_train --full-size --device cuda --batch-size 16 --steps 8

builds Qwen3.5-0.8B's architecture with random weights and trains 16 products × 5 views at 512² per step, bf16
autocast and gradient checkpointing on. Each configuration runs in a fresh process, so its peak memory is its own;
the first step (warm-up, allocator growth) is left out of the rate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "build" / "models" / "tiny-procir"
FULL = ROOT / "build" / "models" / "procir-0.8b-random"
VARIANTS = {
    "single-turn": {"mt": False, "align": False},
    "mt": {"mt": True, "align": False},
    "mt+align": {"mt": True, "align": True},
    "mt+align+cot": {"mt": True, "align": True, "cot": True},
    # MegaPairs-style mined negatives: k of a triplet's rejected candidates as extra documents per step.
    "mt+align+hn1": {"mt": True, "align": True, "hard_negatives": 1},
    "mt+align+hn3": {"mt": True, "align": True, "hard_negatives": 3},
    "sft stage": {"sft": True},
}
WORDS = [
    "soft",
    "cotton",
    "jersey",
    "dress",
    "with",
    "a",
    "round",
    "neck",
    "short",
    "sleeves",
    "a",
    "relaxed",
    "fit",
    "and",
    "a",
    "curved",
    "hem",
    "in",
    "navy",
    "blue",
]


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def write_train_set(root: Path, products: int, size: tuple[int, int], views: int, seed: int = 0) -> tuple[Path, Path]:
    """FashionMV's train layout with caption and text lengths near the released averages (§1 of the reference)."""
    rng = np.random.default_rng(seed)
    for i in range(products):
        folder = root / "images" / "f200k" / str(1000 + i)
        folder.mkdir(parents=True)
        for view in range(views):
            blocks = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            Image.fromarray(blocks).resize(size).save(folder / f"{view}.jpg", quality=90)
    data = root / "data"
    data.mkdir()
    triplets = [
        {
            "source_id": 1000 + i,
            "target_id": 1000 + (i + 1) % products,
            "dataset": "f200k",
            "modification_text_short": _text(rng, 23),
            "modification_text_long": _text(rng, 84),
        }
        for i in range(products)
    ]
    captions = [
        {"product_id": 1000 + i, "dataset": "f200k", "short_caption": _text(rng, 40), "long_caption": _text(rng, 220)}
        for i in range(products)
    ]
    (data / "train_triplets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triplets))
    (data / "train_captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return data, root / "images"


def _run_variant(model: str, dirs: tuple[Path, Path], flags: dict, args: dict, out: Path) -> dict:
    """One configuration in this (fresh) process: its step log and peak memory."""
    import torch

    from fashionmv_builder.procir.model import ProCIREncoder
    from fashionmv_builder.procir.train import TrainConfig, iter_log, train
    from fashionmv_builder.procir.train_data import load_fashionmv_train

    device = torch.device(args["device"])
    dtype = torch.float32  # master weights; bf16 autocast on a GPU
    encoder = ProCIREncoder.from_pretrained(model, dtype=dtype).to(device)
    steps = args["steps"]
    cfg = TrainConfig(batch_size=args["batch_size"], max_steps=steps, sft_max_steps=steps, **flags)
    if cfg.sft:  # time the SFT stage alone: one contrastive step after it is part of train()
        cfg = cfg.model_copy(update={"max_steps": 1})
    data = load_fashionmv_train(*dirs)
    if cfg.hard_negatives:  # FashionMV's files have none: three other products per triplet, as a build gives
        ids = sorted({t.source_id for t in data.triplets})
        data.hard_negatives = {t.index: [ids[(t.index + j) % len(ids)] for j in (2, 3, 4)] for t in data.triplets}
    train(encoder, data, cfg, out)
    entries = [e for e in iter_log(out) if e["stage"] == ("sft" if cfg.sft else "contrastive")]
    timed = entries[1:] or entries
    return {
        "step_seconds": statistics.median(e["seconds"] for e in timed),
        "samples_per_s": statistics.median(e["samples_per_s"] for e in timed),
        "peak_memory_mb": max(e["peak_memory_mb"] for e in entries),
    }


def _in_fresh_process(*call_args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_variant, *call_args).result()


def main(smoke: bool = False, full_size: bool = False, device: str = "cpu", batch_size: int = 4, steps: int = 4):
    from fashionmv_builder.devtools.tiny_procir import build_tiny_procir

    model = FULL if full_size else TINY
    if not (model / "config.json").exists():
        build_tiny_procir(model, full_size=full_size)
    if smoke:
        batch_size, steps = 2, 2
    products, size, views = (2 * batch_size, (512, 512), 5) if full_size else (2 * batch_size, (234, 471), 3)
    args = {"device": device, "batch_size": batch_size, "steps": steps}
    variants = {"single-turn": VARIANTS["single-turn"], "mt+align": VARIANTS["mt+align"]} if smoke else VARIANTS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_train_set(Path(tmp), products, size, views)
        for name, flags in variants.items():
            results[name] = _in_fresh_process(str(model), dirs, flags, args, Path(tmp) / name.replace(" ", "-"))
    base = results["single-turn"]["step_seconds"]
    print(
        f"procir train: {'0.8B-size' if full_size else 'tiny'} random Qwen3.5 on {device}, batch {batch_size}, "
        f"{views} views of {size[0]}x{size[1]}, {steps} steps per configuration (first left out)"
    )
    for name, r in results.items():
        print(
            f"  {name:<14} {r['samples_per_s']:7.2f} samples/s  step {r['step_seconds']:.3f} s "
            f"({r['step_seconds'] / base:.2f}x single-turn)  peak memory {r['peak_memory_mb']:.0f} MB"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--full-size", action="store_true", help="Qwen3.5-0.8B's architecture (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    a = parser.parse_args()
    main(a.smoke, a.full_size, a.device, a.batch_size, a.steps)
