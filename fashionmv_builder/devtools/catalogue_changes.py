"""Change a sample catalogue the way a shop's catalogue changes, for the incremental-build test and benchmark: set
products aside (they are "not listed yet" or "withdrawn") and bring them back. A development tool: it moves folders
of the sample's `folder` layout, nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.devtools.ground_truth_server import MODEL_NAME, TRUTH_WORDS


def folder_products(root: Path) -> list[str]:
    """The well-formed product folders of a `folder` layout, sorted (the sample also plants a bad id)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isalnum())


def interleaved(products: list[str], share: float) -> list[str]:
    """About `share` of the products, spread evenly over the sorted ids: new ids fall between existing ones."""
    step = max(1, round(1 / share))
    return products[step // 2 :: step]


def set_aside(root: Path, aside: Path, names: list[str]) -> None:
    aside.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.move(root / name, aside / name)


def bring_back(root: Path, aside: Path, names: list[str]) -> None:
    for name in names:
        shutil.move(aside / name, root / name)


def truth_config(root: Path, out: Path, url: str, **triplets: object) -> RunConfig:
    """A build of a `folder` layout answered by the ground-truth server at `url`, in shards of 25."""
    return validate_config(
        {
            "name": "incremental",
            "output_dir": str(out),
            "shard_size": 25,
            "workers": 2,
            "sources": [{"kind": "folder", "dataset": "folder", "root": str(root)}],
            "lmm": {"endpoints": [url], "model": MODEL_NAME, "words": TRUTH_WORDS, "breaker_min_products": 50},
            "triplets": {"val_ratio": 0.3, "top_k": 4, **triplets},
        }
    )
