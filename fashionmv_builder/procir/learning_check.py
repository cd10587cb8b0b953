"""Does training on a build learn from its modification texts? Recall on the val split before training, after
training on the true texts, and after training on the same triplets with their texts shuffled across triplets.

The shuffle is the control: same seed, steps, images and pairs; only which text goes with which pair changes. Part
of a gain survives it, because a source and its target look alike (the model learns "find the similar product"); the
margin of the true texts over the shuffled ones is what the texts teach. On a small val gallery R@10 saturates, so
R@1 and R@5 say more there.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from fashionmv_builder.procir.data import IMAGE_SUFFIXES, load_eval_data
from fashionmv_builder.procir.evaluate import run_evaluation
from fashionmv_builder.procir.model import ProCIREncoder
from fashionmv_builder.procir.train import TrainConfig, iter_log, train
from fashionmv_builder.procir.train_data import TrainSet


def shrink_images(image_root: Path, max_side: int) -> int:
    """Shrink every image under `image_root` to at most `max_side` pixels a side, in place (JPEG quality 92): fewer
    visual tokens per view, so a CPU run takes minutes. Returns how many were shrunk."""
    shrunk = 0
    for path in sorted(image_root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        with Image.open(path) as img:
            if max(img.size) <= max_side:
                continue
            small = img.convert("RGB")
        small.thumbnail((max_side, max_side))
        small.save(path, format="JPEG", quality=92)
        shrunk += 1
    return shrunk


def shuffled_texts(data: TrainSet, seed: int = 0) -> TrainSet:
    """The same triplets with their (short, paraphrases, long) modification texts permuted across triplets."""
    texts = [(t.modification_text_short, t.paraphrases, t.modification_text_long) for t in data.triplets]
    random.Random(f"{seed}:shuffle-texts").shuffle(texts)
    triplets = [
        dataclasses.replace(t, modification_text_short=short, paraphrases=paraphrases, modification_text_long=long)
        for t, (short, paraphrases, long) in zip(data.triplets, texts, strict=True)
    ]
    return dataclasses.replace(data, triplets=triplets)


def recall(encoder: ProCIREncoder, export: Path, datasets: Sequence[str]) -> dict[str, float]:
    """R@K in percent per dataset with FashionMV's protocol, keyed `<dataset>_R@K`."""
    encoder.eval()  # train() leaves the model in training mode
    data = load_eval_data(export, export / "images", datasets)
    results = run_evaluation(encoder, data, datasets) or []
    return {f"{r.dataset}_R@{k}": round(v, 2) for r in results for k, v in r.recall.items()}


def trained_recall(
    model: Path, data: TrainSet, cfg: TrainConfig, export: Path, datasets: Sequence[str]
) -> tuple[dict[str, float], dict]:
    """Train a fresh copy of `model` on `data`, then score it; with the first and last losses and the time."""
    encoder = ProCIREncoder.from_pretrained(model)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(encoder, data, cfg, Path(out))
        log = list(iter_log(Path(out)))
    info = {"steps": len(log), "train_s": round(time.perf_counter() - started, 1)}
    info |= {"loss_first": log[0]["loss_total"], "loss_last": log[-1]["loss_total"]}
    return recall(encoder, export, datasets), info


def measure(model: Path, export: Path, data: TrainSet, cfg: TrainConfig, datasets: Sequence[str]) -> dict:
    """Recall before training, after training on the true texts, and after training on shuffled ones."""
    before = recall(ProCIREncoder.from_pretrained(model), export, datasets)
    true_after, true_info = trained_recall(model, data, cfg, export, datasets)
    shuffled_after, shuffled_info = trained_recall(model, shuffled_texts(data, cfg.seed), cfg, export, datasets)
    return {
        "config": cfg.model_dump(include={"lr", "batch_size", "max_steps", "mt", "align", "seed"}),
        "train_triplets": len(data.triplets),
        "before": before,
        "true": true_after | true_info,
        "shuffled": shuffled_after | shuffled_info,
    }
