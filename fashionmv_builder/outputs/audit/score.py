"""Audit labels against the verifier's verdicts, in FashionMV's terms.

FashionMV hand-labelled 1,000 products: 6.2% severe hallucinations (5.0% left/right, 1.2% other), and on left/right
errors its verifier had precision 42.9% (share of the removed audited products that have a left/right error) and
recall 36.0% (share of the left/right-error products that it removed). Every rate comes with its counts and a 95%
Wilson interval, which stays inside [0, 1] and behaves for the small counts an audit gives.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from fashionmv_builder.outputs.audit.labels import LABELS, SEVERE

# The paper's audit, for comparison (FashionMV, arXiv 2604.10297).
FASHIONMV = {
    "severe": 0.062,
    "left_right": 0.050,
    "other_severe": 0.012,
    "verifier.left_right.precision": 0.429,
    "verifier.left_right.recall": 0.360,
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials; None when n is 0."""
    if n == 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": wilson(k, n)}


def score_labels(labelled: list[tuple[str, str, str]], verdicts: dict[tuple[str, str], str]) -> dict[str, Any]:
    """Rates over the labelled items and the verifier's precision/recall on them.

    `labelled` is (dataset, product_id, label); `verdicts` maps (dataset, product_id) to "pass"/"remove". Items the
    verifier never judged are counted apart and left out of precision and recall."""
    key = ["dataset", "product_id"]
    judgements = pd.DataFrame([(*k, v) for k, v in verdicts.items()], columns=[*key, "verdict"])
    items = pd.DataFrame(labelled, columns=[*key, "label"]).merge(judgements, on=key, how="left")
    n = len(items)
    per_label = items["label"].value_counts().reindex(list(LABELS), fill_value=0)
    counts = {label: int(k) for label, k in per_label.items()}
    judged = items[items["verdict"].notna()]
    removed = judged[judged["verdict"] == "remove"]
    verifier: dict[str, Any] = {
        "judged": len(judged),
        "no_verdict": n - len(judged),
        "removed": len(removed),
        "removal_rate": proportion(len(removed), len(judged)),
    }
    for name, positive in (("left_right", ("left_right",)), ("severe", SEVERE)):
        hits = int(removed["label"].isin(positive).sum())
        errors = int(judged["label"].isin(positive).sum())
        verifier[name] = {"precision": proportion(hits, len(removed)), "recall": proportion(hits, errors)}
    severe = counts["left_right"] + counts["other_severe"]
    return {
        "labelled": n,
        "counts": counts,
        "rates": {
            "severe": proportion(severe, n),
            "left_right": proportion(counts["left_right"], n),
            "other_severe": proportion(counts["other_severe"], n),
            "minor": proportion(counts["minor"], n),
            "ok": proportion(counts["ok"], n),
        },
        "verifier": verifier,
        "fashionmv": FASHIONMV,
    }


def score_rows(score: dict[str, Any]) -> list[tuple[str, dict[str, Any], float | None]]:
    """(metric, proportion, FashionMV's number) in the order a table shows them."""
    rates, verifier = score["rates"], score["verifier"]

    def paper(name: str) -> float:
        return FASHIONMV[f"verifier.left_right.{name}"]

    return [
        ("severe errors (left/right + other)", rates["severe"], FASHIONMV["severe"]),
        ("  left/right errors", rates["left_right"], FASHIONMV["left_right"]),
        ("  other severe errors", rates["other_severe"], FASHIONMV["other_severe"]),
        ("minor errors", rates["minor"], None),
        ("ok", rates["ok"], None),
        ("verifier removal rate", verifier["removal_rate"], None),
        ("verifier precision, left/right", verifier["left_right"]["precision"], paper("precision")),
        ("verifier recall, left/right", verifier["left_right"]["recall"], paper("recall")),
        ("verifier precision, any severe", verifier["severe"]["precision"], None),
        ("verifier recall, any severe", verifier["severe"]["recall"], None),
    ]
