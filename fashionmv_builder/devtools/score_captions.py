"""Score Stage 1 captions and Stage 2 verdicts against the sample catalogue's ground truth.

For choosing captioning and verifier models and prompts by numbers, not by eye. Per product:

- orientation: for each front and back view, whether the caption puts the wearer's left on the right side of the
  image (front: the image's right; back: the image's left). This is the claim FashionMV's verifier checks.
- pocket: where the product has a chest pocket, whether the long caption names the pocket and the wearer's side
  (and not the other side); colour, category and back detail: whether the captions name them; is_clothing: whether
  the answer agrees.
- the verifier, in FashionMV's terms: a product "has a left/right error" when any scored orientation claim is
  wrong; precision and recall of `remove` on those products.

With the random-weight test model expect chance; what the tests check is that the scorer is right.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_VIEWS, VERDICTS, Build, rejects
from fashionmv_builder.core.config import RunConfig

LAYOUT_OF_KIND = {
    "deepfashion": "deepfashion",
    "fashion200k": "fashion200k",
    "fashiongen": "fashiongen",
    "folder": "folder",
    "manifest": "manifest",
}
EXPECTED_WEARER_LEFT = {"front": "image_right", "back": "image_left"}
CATEGORY_WORDS = {
    "tee": ("tee", "t-shirt", "tshirt", "t shirt"),
    "shirt": ("shirt", "blouse"),
    "dress": ("dress",),
    "skirt": ("skirt",),
    "trousers": ("trousers", "pants", "jeans"),
    "jacket": ("jacket", "coat"),
    "bag": ("bag", "handbag"),
    "shoe": ("shoe", "sneaker", "boot"),
}


def _mentions(text: str, words: Iterable[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


def score_product(truth: dict, layout: str, caption: dict, views: list[dict]) -> dict:
    """Scores for one product; `views` are its view references (file_name per view_index)."""
    files = truth["files"].get(layout) or []
    # Where a layout could not hold a planted fault file, its file list is shorter and cannot be aligned: skip.
    label_of_file = dict(zip(files, truth["views"], strict=True)) if len(files) == len(truth["views"]) else {}
    file_of_view = {v["view_index"]: v["file_name"] for v in views}
    claims = []
    for vc in caption["view_captions"]:
        label = label_of_file.get(file_of_view.get(vc["view_index"], ""))
        if label in EXPECTED_WEARER_LEFT:
            claims.append(vc["wearer_left_on_image"] == EXPECTED_WEARER_LEFT[label])
    text = f"{caption['long_caption']} {caption['short_caption']}".lower()
    scores: dict = {
        "orientation_claims": len(claims),
        "orientation_correct": sum(claims),
        "left_right_error": not all(claims),
        "colour": _mentions(text, [truth["colour"]]),
        "category": _mentions(f"{caption['category']} {text}".lower(), CATEGORY_WORDS.get(truth["category"], ())),
        "is_clothing": caption["is_clothing"] == truth["is_clothing"],
    }
    if truth["pocket"] in ("left", "right"):
        other = "right" if truth["pocket"] == "left" else "left"
        scores["pocket"] = "pocket" in text and _mentions(text, [truth["pocket"]]) and not _mentions(text, [other])
    if truth["back_detail"] not in (None, "none"):
        scores["back_detail"] = _mentions(text, [truth["back_detail"].replace("-", " "), truth["back_detail"]])
    return scores


def summarise(per_product: list[dict], verdicts: dict[str, str]) -> dict:
    """Rates over products, and the verifier's precision/recall of `remove` on left/right errors."""
    n = len(per_product)
    summary: dict = {"products": n}
    claims = sum(p["orientation_claims"] for p in per_product)
    summary["orientation_accuracy"] = sum(p["orientation_correct"] for p in per_product) / claims if claims else None
    for key in ("colour", "category", "is_clothing", "pocket", "back_detail"):
        scored = [p[key] for p in per_product if key in p]
        summary[f"{key}_accuracy"] = sum(scored) / len(scored) if scored else None
    judged = [p for p in per_product if p["product_id"] in verdicts]
    removed = [p for p in judged if verdicts[p["product_id"]] == "remove"]
    errors = [p for p in judged if p["left_right_error"]]
    true_removed = [p for p in removed if p["left_right_error"]]
    summary["left_right_error_rate"] = len(errors) / len(judged) if judged else None
    summary["verifier_precision"] = len(true_removed) / len(removed) if removed else None
    summary["verifier_recall"] = len(true_removed) / len(errors) if errors else None
    return summary


def score_build(config: RunConfig, truth: dict) -> dict[str, dict]:
    """Per dataset of a build of the sample catalogue: the summary of its captions and verdicts."""
    build = Build(config.output_dir)
    results = {}
    for source in config.sources:
        layout = LAYOUT_OF_KIND[source.kind]
        by_id = {p["ids"][layout]: p for p in truth["products"] if p["ids"].get(layout) is not None}
        captions = build.rows(CAPTIONS, source.dataset)
        if not captions:
            continue
        views: dict[str, list[dict]] = {}
        for v in build.rows(DEDUPE_VIEWS, source.dataset):
            views.setdefault(v["product_id"], []).append(v)
        verdicts = {r["product_id"]: r["verdict"] for r in build.rows(VERDICTS, source.dataset)}
        for r in build.rows(rejects(VERDICTS.stage), source.dataset):
            if r["reason"] == "removed_by_verifier":
                verdicts[r["product_id"]] = "remove"
        per_product = []
        for row in captions:
            truth_row = by_id.get(row["product_id"])
            if truth_row is not None:
                scored = score_product(truth_row, layout, row, views.get(row["product_id"], []))
                per_product.append({"product_id": row["product_id"], **scored})
        results[source.dataset] = summarise(per_product, verdicts)
    return results
