"""FashionMV's released files: the JSONL records and the `images/<dataset>/<product_id>/` folders.

Record fields follow FashionMV's released ProCIR code: ids may be JSON ints or strings and are always used as
strings; unknown keys are ignored; `modification_text_long` and `views_involved` are optional (val has neither).
Views are listed exactly as the reference does (§2), because the first five by plain string sort are what it encodes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fashionmv_builder.procir.recall import ProductKey

MAX_VIEWS = 5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TRIPLETS_FILE = "val_triplets.jsonl"
VAL_DATASETS = ("deepfashion", "f200k", "fashiongen_val")


@dataclass(frozen=True)
class Triplet:
    index: int  # position among the file's records: identifies a query across processes
    dataset: str
    source_id: str
    target_id: str
    modification_text_short: str
    modification_text_long: str | None = None
    views_involved: tuple[str, ...] | None = None
    # every short text of the triplet (ours: triplets.paraphrases of them; FashionMV's release: none beyond the one)
    paraphrases: tuple[str, ...] = ()

    def short_text(self, rng: random.Random) -> str:
        """One of the triplet's short texts, drawn with `rng` (the one text when it has no paraphrases)."""
        return rng.choice(self.paraphrases) if self.paraphrases else self.modification_text_short


@dataclass(frozen=True)
class Caption:
    dataset: str
    product_id: str
    short_caption: str
    long_caption: str | None = None


def _records(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            yield record


def _optional_text(value: object) -> str | None:
    return str(value) if value else None  # absent, null and "" all mean "not given"


def read_triplets(path: Path, datasets: Sequence[str] | None = None) -> list[Triplet]:
    """Triplets in file order, optionally only some dataset tags; `index` counts every record of the file."""
    triplets = []
    for index, r in enumerate(_records(path)):
        if datasets is not None and r["dataset"] not in datasets:
            continue
        views = r.get("views_involved")
        triplets.append(
            Triplet(
                index=index,
                dataset=str(r["dataset"]),
                source_id=str(r["source_id"]),
                target_id=str(r["target_id"]),
                modification_text_short=str(r["modification_text_short"]),
                modification_text_long=_optional_text(r.get("modification_text_long")),
                views_involved=tuple(str(v) for v in views) if views else None,
            )
        )
    return triplets


def read_captions(path: Path) -> dict[tuple[str, str], Caption]:
    """One caption record per product, keyed by (dataset, product_id); the first record of a product wins."""
    captions: dict[tuple[str, str], Caption] = {}
    for r in _records(path):
        caption = Caption(
            dataset=str(r["dataset"]),
            product_id=str(r["product_id"]),
            short_caption=str(r.get("short_caption") or ""),
            long_caption=_optional_text(r.get("long_caption")),
        )
        captions.setdefault((caption.dataset, caption.product_id), caption)
    return captions


def product_dir(image_root: Path, dataset: str, product_id: str) -> Path:
    # The dataset tag is the sub-folder for every tag, known or not (the reference's mapping is the identity).
    return image_root / dataset / product_id


def list_views(image_root: Path, dataset: str, product_id: str, max_views: int = MAX_VIEWS) -> list[Path]:
    """The product's first `max_views` image files by plain string sort of the full path; [] if there are none."""
    folder = product_dir(image_root, dataset, product_id)
    if not folder.is_dir():
        return []
    paths = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    # Plain string order, so "1000.jpg" < "999.jpg" exactly as in the reference; not a natural sort.
    return sorted(paths, key=str)[:max_views]


def load_views(paths: Sequence[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


@dataclass(frozen=True)
class EvalData:
    views: dict[ProductKey, list[Path]]  # every selected product with at least one image
    gallery: list[ProductKey]  # sorted
    queries: list[Triplet]  # file order; source and target both have images


def load_eval_data(data_dir: Path, image_root: Path, datasets: Sequence[str] = VAL_DATASETS) -> EvalData:
    """The gallery and the queries of an evaluation (reference §5).

    A product with images is in the gallery even when its partner in a triplet has none; a query needs images for
    both its source and its target.
    """
    triplets = read_triplets(data_dir / TRIPLETS_FILE, datasets)
    products = sorted({(t.dataset, pid) for t in triplets for pid in (t.source_id, t.target_id)})
    views = {key: paths for key in products if (paths := list_views(image_root, *key))}
    queries = [t for t in triplets if (t.dataset, t.source_id) in views and (t.dataset, t.target_id) in views]
    return EvalData(views=views, gallery=sorted(views), queries=queries)
