"""The audit sample and its labels file: pure functions, so sampling and resume are easy to test.

The labels file is one JSON document, rewritten whole and atomically (`atomic_write`: temp file + os.replace) after
every answer:

    {"format": "fashionmv-audit/1", "seed": 0, "sample": 1000, "datasets": [...], "output_dir": "...",
     "items": [{"dataset": "...", "product_id": "..."}, ...],          the drawn sample, in the order shown
     "labels": {"<dataset>": {"<product_id>": {"label": "ok", "at": "2026-...Z"}}}}

The drawn items are stored, so a resumed audit shows the same products even if the build has grown since.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fashionmv_builder.core.files import atomic_write

FORMAT = "fashionmv-audit/1"

# FashionMV's audit classes: a severe error is a left/right error or another major description error.
LABELS = {
    "ok": "OK",
    "left_right": "Left/right error",
    "other_severe": "Other severe error",
    "minor": "Minor error",
}
SEVERE = ("left_right", "other_severe")


class LabelsError(ValueError):
    """The labels file cannot be used for this audit (unreadable, or drawn with other settings)."""


def draw_sample(keys: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """A seeded uniform sample of (dataset, product_id) keys, in a shuffled order (so datasets are mixed).

    The keys are sorted first: the same set of keys gives the same sample, whatever order the shards came in."""
    pool = sorted(set(keys))
    return random.Random(seed).sample(pool, min(n, len(pool)))


def new_labels(
    items: list[tuple[str, str]], *, seed: int, sample: int, datasets: list[str], output_dir: str
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "seed": seed,
        "sample": sample,
        "datasets": sorted(datasets),
        "output_dir": output_dir,
        "created_at": _now(),
        "items": [{"dataset": d, "product_id": p} for d, p in items],
        "labels": {},
    }


def check_settings(doc: dict[str, Any], *, seed: int, sample: int, datasets: list[str]) -> None:
    """A resumed audit must use the settings it was drawn with, or its sample would silently change."""
    wanted = {"seed": seed, "sample": sample, "datasets": sorted(datasets)}
    diffs = [f"{k} {doc.get(k)!r} (asked {v!r})" for k, v in wanted.items() if doc.get(k) != v]
    if diffs:
        raise LabelsError(
            "the labels file was drawn with other settings: " + ", ".join(diffs) + "; use those, or a new --labels file"
        )


def label_of(doc: dict[str, Any], index: int) -> str | None:
    item = doc["items"][index]
    entry = doc["labels"].get(item["dataset"], {}).get(item["product_id"])
    return entry["label"] if entry else None


def set_label(doc: dict[str, Any], index: int, label: str) -> dict[str, Any]:
    """The document with item `index` labelled (a new answer replaces an old one)."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}: one of {', '.join(LABELS)}")
    if not 0 <= index < len(doc["items"]):
        raise IndexError(f"no item {index}: the sample has {len(doc['items'])}")
    item = doc["items"][index]
    labels = {d: dict(by_id) for d, by_id in doc["labels"].items()}
    labels.setdefault(item["dataset"], {})[item["product_id"]] = {"label": label, "at": _now()}
    return {**doc, "labels": labels}


def first_unlabelled(doc: dict[str, Any]) -> int | None:
    """Where a restarted audit resumes: the first item without a label, None when all are done."""
    return next((i for i in range(len(doc["items"])) if label_of(doc, i) is None), None)


def labelled_items(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(dataset, product_id, label) of the labelled sample items, in sample order."""
    out = []
    for i, item in enumerate(doc["items"]):
        label = label_of(doc, i)
        if label is not None:
            out.append((item["dataset"], item["product_id"], label))
    return out


def load_labels(path: Path) -> dict[str, Any] | None:
    """The labels document, None when the file does not exist yet."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LabelsError(f"{path}: not a readable labels file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LabelsError(f"{path}: not a labels file of format {FORMAT}")
    return doc


def save_labels(path: Path, doc: dict[str, Any]) -> None:
    """Write the whole document to a temp file beside `path`, then rename: a crash never leaves half a file."""
    atomic_write(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
