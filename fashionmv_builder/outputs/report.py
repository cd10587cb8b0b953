"""`fashionmv report`: what a build produced and how good it looks, as JSON and Markdown (HTML: report_html.py).

The funnel of products through every stage with each stage's reject reasons, views per product, caption and
modification-text length histograms, counts per split and dataset, triplets per source, the `views_involved`
distribution and the share of triplets that span at least two views (FashionMV: 99.83%), the verifier's removal rate,
tokens and GPU-hours per LMM stage, and a modality-redundancy check on the val split: R@1/5/10 of text-only
(modification text against the gallery's short captions), image-only (source against gallery images) and composed
(image and text cosines averaged) retrieval with the baseline embedders, computed by the ProCIR evaluator's recall
code. A good CIR set needs both modalities: if text-only or image-only already retrieves the target, the modification
text or the source is redundant. Per triplet, too: the discriminate stage's flags say whether the text alone or the
source image alone already ranks the target first among the shown candidates; the report gives their shares, the
number of short texts (paraphrases) per triplet, and the discriminability check's rejection rate and tokens.

Missing data never fails the report: a stage without stats has `None` counts, a distribution without data is empty.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from fashionmv_builder.core.build import (
    CAPTIONS,
    DEDUPE_PRODUCTS,
    EMBEDDINGS,
    HARD_NEGATIVES,
    INGEST_PRODUCTS,
    SPLIT_PRODUCTS,
    TRIPLETS,
    VERDICTS,
    Build,
    TableRef,
    rejects,
)
from fashionmv_builder.core.config import LmmPrice, RunConfig
from fashionmv_builder.core.stage import Work
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.pipeline import PIPELINE
from fashionmv_builder.procir.recall import l2_normalise, recall_at_k
from fashionmv_builder.stages.embed import encode_texts

MEANINGFUL_GALLERY = 200
LMM_STAGES = tuple(cls.name for cls in PIPELINE if cls.work is Work.LMM)
# Every stage a product passes, in pipeline order (candidates is where the train/val split happens).
FUNNEL_STAGES = tuple(cls.name for cls in PIPELINE)
MAX_BINS = 30
# The columns the report reads (a table without one of them counts as empty).
TRIPLET_COLUMNS = [
    "split",
    "source_id",
    "target_id",
    "views_involved",
    "modification_text_short",
    "modification_text_long",
]
# The columns of issue #20 (paraphrases, redundancy flags), read apart: a build from before them has triplets too.
FLAG_COLUMNS = ["modification_texts_short", "text_alone_ranks_target_first", "image_alone_ranks_target_first"]


def histogram(values: Iterable[int], max_bins: int = MAX_BINS) -> dict:
    """Integer-width bins over whole numbers: bin i counts edges[i] <= v < edges[i + 1] (no bin is ever empty of
    meaning: the width is the smallest integer that fits the range into `max_bins`)."""
    numbers = pd.Series(values, dtype="int64")
    if numbers.empty:
        return {"edges": [], "counts": []}
    low, high = int(numbers.min()), int(numbers.max())
    width = max(1, math.ceil((high - low + 1) / max_bins))
    bins = (high - low) // width + 1
    counts = ((numbers - low) // width).value_counts().reindex(range(bins), fill_value=0)
    return {"edges": [low + i * width for i in range(bins + 1)], "counts": counts.tolist()}


def _words(texts: pd.Series) -> dict:
    """Word-count summary and histogram; empty when there are no texts."""
    lengths = texts.dropna().str.split().str.len()
    if lengths.empty:
        return {}
    return {
        "mean": round(float(lengths.mean()), 1),
        "median": float(lengths.median()),
        "max": int(lengths.max()),
        "histogram": histogram(lengths),
    }


def _most_common(values: pd.Series) -> dict[str, int]:
    """Counts, most frequent first; ties in order of first appearance."""
    counts = values.value_counts(sort=False).sort_values(ascending=False, kind="stable")
    return {str(k): int(n) for k, n in counts.items()}


def count_rejects(rows: list[dict] | pd.DataFrame) -> dict[str, dict[str, int]]:
    """Reject rows counted per level (product or view) and reason, most frequent first."""
    frame = pd.DataFrame(rows, columns=["level", "reason"]).fillna({"level": "product", "reason": "unknown"})
    return {str(level): _most_common(group["reason"]) for level, group in frame.groupby("level", sort=True)}


def _count(values: pd.Series) -> dict[str, int]:
    """A distribution with string keys in numeric order (so it survives a JSON round trip unchanged)."""
    return {str(k): int(n) for k, n in values.value_counts().sort_index().items()}


def _frame(build: Build, ref: TableRef, dataset: str, columns: list[str]) -> pd.DataFrame:
    """Only these columns; none of the rows when the table or a column is missing (a stage that never wrote it)."""
    try:
        return build.frame(ref, dataset, columns=columns)
    except (pa.ArrowInvalid, KeyError):
        return pd.DataFrame(columns=columns)


def _funnel(build: Build, dataset: str) -> dict:
    funnel = {}
    for stage in FUNNEL_STAGES:
        stats = build.stats(stage, dataset)
        counts = (stats or {}).get("counts", {})
        rows = _frame(build, rejects(stage), dataset, ["level", "reason"]) if stats else []
        funnel[stage] = {
            "in": counts.get("products_in") if stats else None,
            "out": counts.get("products_out") if stats else None,
            "rejects": count_rejects(rows),
        }
    return funnel


def _verifier(config: RunConfig, build: Build, dataset: str) -> dict:
    """Share of products the verifier judged hallucinated; with `verify.remove: false` they were only recorded."""
    counts = build.counts(VERDICTS.stage, dataset)
    products = counts.get("products_in", 0)
    if not products:
        return {"note": "no data"}
    removed = counts.get("verdicts_remove", 0)
    result: dict = {"products_in": products, "verdicts_remove": removed, "removal_rate": round(removed / products, 4)}
    result["removes"] = config.verify.remove
    if not config.verify.remove:
        result["note"] = "verify.remove is false: these products were only recorded, not removed"
    return result


def _discriminability(config: RunConfig, build: Build, dataset: str) -> dict:
    """Share of selected triplets whose text did not lead the check back to their target, and what the check cost."""
    counts = build.counts(TRIPLETS.stage, dataset)
    checked = counts.get("check_passed", 0) + counts.get("check_failed", 0)
    if not checked:
        return {"enabled": config.discriminability.enabled, "note": "no triplet was checked"}
    rejected = counts.get(f"rejected.{RejectReason.TEXT_NOT_DISCRIMINATIVE}", 0)
    result: dict = {
        "enabled": config.discriminability.enabled,
        "checked": checked,
        "failed": counts.get("check_failed", 0),
        "rejected": rejected,
        "rejection_rate": round(rejected / checked, 4),
        "tokens_in": counts.get("tokens_in", 0),
        "tokens_out": counts.get("tokens_out", 0),
    }
    if not config.discriminability.reject:
        result["note"] = "discriminability.reject is false: failed triplets were only recorded, not rejected"
    return result


def _flags(flags: pd.DataFrame) -> dict:
    """Paraphrases per triplet and the shares of triplets the text alone or the image alone already solves."""
    texts = flags["modification_texts_short"].dropna().map(len)
    known = flags.dropna(subset=["text_alone_ranks_target_first", "image_alone_ranks_target_first"])
    text, image = (
        known["text_alone_ranks_target_first"].astype(bool),
        known["image_alone_ranks_target_first"].astype(bool),
    )
    shares = (
        {
            "text_alone_first": round(float(text.mean()), 4),
            "image_alone_first": round(float(image.mean()), 4),
            "either_first": round(float((text | image).mean()), 4),
        }
        if len(known)
        else {}
    )
    return {
        "paraphrases_per_triplet": round(float(texts.mean()), 2) if len(texts) else None,
        "redundancy_flags": {"triplets": len(known), **shares},
    }


def _lmm_cost(config: RunConfig, build: Build) -> dict:
    """Tokens summed over datasets; GPU-hours per stage. Every dataset of a stage runs on the same server at the
    same time, so a stage's server-seconds are the largest of its datasets', not their sum."""
    cost = {}
    for stage in LMM_STAGES:
        tokens_in = tokens_out = 0
        seconds = None
        models, price = set(), LmmPrice()
        for source in config.sources:
            stats = build.stats(stage, source.dataset) or {}
            tokens_in += stats.get("counts", {}).get("tokens_in", 0)
            tokens_out += stats.get("counts", {}).get("tokens_out", 0)
            if stats.get("server_seconds") is not None:
                seconds = max(seconds or 0.0, stats["server_seconds"])
            if stats.get("model"):
                models.add(
                    f"{stats['model']}@{stats['model_revision']}" if stats.get("model_revision") else stats["model"]
                )
                price = LmmPrice(**stats.get("price", {}))
        cost[stage] = {
            "model": ", ".join(sorted(models)) or None,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "server_seconds": seconds,
            "gpu_hours": round(seconds / 3600, 4) if seconds is not None else None,
            "cost": price.cost(tokens_in, tokens_out, seconds),
            "currency": price.currency,
        }
    return cost


def _redundancy(config: RunConfig, build: Build, dataset: str, triplets: pd.DataFrame) -> dict:
    """Recall of text-only, image-only and composed retrieval on the val split of one dataset."""
    val = triplets[triplets["split"] == "val"]
    if val.empty:
        return {"note": "no val triplets"}
    gallery = sorted(set(val["source_id"]) | set(val["target_id"]))
    position = {pid: i for i, pid in enumerate(gallery)}
    embeddings = {r["product_id"]: r for r in build.rows(EMBEDDINGS, dataset)}
    if any(p not in embeddings for p in gallery):
        return {"note": "no embeddings for some val products (candidates stage missing or stale)"}
    image = l2_normalise(np.asarray([embeddings[p]["image"] for p in gallery], dtype=np.float32))
    caption = l2_normalise(np.asarray([embeddings[p]["short_caption"] for p in gallery], dtype=np.float32))
    text = encode_texts(val["modification_text_short"].tolist(), config.triplets.text_model)
    source_image = image[val["source_id"].map(position).to_numpy()]
    targets = val["target_id"].map(position).to_numpy()
    runs = {
        "text_only": (text, caption),
        "image_only": (source_image, image),
        # The two unit vectors side by side: the cosine is the mean of the image and the text cosines (the
        # embedders' dimensions differ, so they cannot be summed).
        "composed": (np.hstack([source_image, text]), np.hstack([image, caption])),
    }
    result: dict = {"gallery": len(gallery), "queries": len(val)}
    for name, (queries, items) in runs.items():
        result[name] = {f"R@{k}": round(v, 2) for k, v in recall_at_k(queries, items, targets).items()}
    if len(gallery) < MEANINGFUL_GALLERY:
        result["note"] = (
            f"gallery of {len(gallery)} products (< {MEANINGFUL_GALLERY}): these figures are not meaningful"
        )
    return result


RUNS_SHOWN = 10
RUN_HEADER = ["finished", "dataset", "products +added / −withdrawn", "shards rewritten"] + [
    f"{stage}: sent / replayed / carried over" for stage in LMM_STAGES
]


def run_rows(runs: list[dict]) -> list[list[object]]:
    """The build's recent runs, one row per run and dataset: what changed and what the LMM stages were asked."""
    rows: list[list[object]] = []
    for run in runs:
        stages = run.get("stages", {})
        for dataset, ingest in stages.get(INGEST_PRODUCTS.stage, {}).items():
            change = ingest.get("change", {})
            rewritten = sum(s.get(dataset, {}).get("shards_rewritten", 0) for s in stages.values())
            row: list[object] = [
                run["finished"],
                dataset,
                f"+{change.get('added', 0)} / −{change.get('withdrawn', 0)}",
                rewritten,
            ]
            for stage in LMM_STAGES:
                s = stages.get(stage, {}).get(dataset, {})
                row.append(
                    f"{s.get('requests_sent', 0)} / {s.get('answers_replayed', 0)} / {s.get('answers_carried_over', 0)}"
                )
            rows.append(row)
    return rows


def build_report(config: RunConfig) -> dict:
    build = Build(config.output_dir)
    report: dict = {
        "output_dir": config.output_dir,
        "config_hash": config.config_hash(),
        "lmm_cost": _lmm_cost(config, build),
        "runs": build.runs()[-RUNS_SHOWN:],
        "datasets": {},
    }
    for source in config.sources:
        dataset = source.dataset
        triplets = _frame(build, TRIPLETS, dataset, TRIPLET_COLUMNS)
        products = _frame(build, SPLIT_PRODUCTS, dataset, ["split"])
        kept = _frame(build, DEDUPE_PRODUCTS, dataset, ["n_views"])
        captions = _frame(build, CAPTIONS, dataset, ["long_caption", "short_caption"])
        funnel = _funnel(build, dataset)
        if all(f["in"] is None for f in funnel.values()):
            continue  # nothing of this dataset was built yet
        views_involved = triplets["views_involved"]
        view_count = views_involved.map(len)
        sources = triplets["source_id"].nunique()
        entry = {
            "products": _most_common(products["split"]),
            "triplets": _most_common(triplets["split"]),
            "triplets_per_source": round(len(triplets) / sources, 2) if sources else 0,
            "views_per_product": _count(kept["n_views"]),
            "views_involved": _most_common(views_involved.map("+".join)),
            "views_involved_count": _count(view_count),
            "share_multi_view": round(float((view_count >= 2).mean()), 4) if len(triplets) else None,
            "words_short": _words(triplets["modification_text_short"]),
            "words_long": _words(triplets["modification_text_long"]),
            "caption_words": {name: _words(captions[f"{name}_caption"]) for name in ("long", "short")},
            "hard_negatives": build.read(HARD_NEGATIVES, dataset).num_rows,
            "verifier": _verifier(config, build, dataset),
            "discriminability": _discriminability(config, build, dataset),
            **_flags(_frame(build, TRIPLETS, dataset, FLAG_COLUMNS)),
            "lmm_cost": {},
            "funnel": funnel,
        }
        for stage in LMM_STAGES:
            stats = build.stats(stage, dataset) or {}
            counts = stats.get("counts", {})
            price = LmmPrice(**stats.get("price", {}))
            entry["lmm_cost"][stage] = {
                "model": stats.get("model"),
                "tokens_in": counts.get("tokens_in", 0),
                "tokens_out": counts.get("tokens_out", 0),
                "server_seconds": stats.get("server_seconds"),
                "cost": price.cost(
                    counts.get("tokens_in", 0), counts.get("tokens_out", 0), stats.get("server_seconds")
                ),
            }
        entry["modality_redundancy"] = _redundancy(config, build, dataset, triplets)
        report["datasets"][dataset] = entry
    return report


def _summary(words: dict) -> str:
    return f"mean {words['mean']}, median {words['median']}, max {words['max']}" if words else "no data"


def to_markdown(report: dict) -> str:
    lines = [f"# Build report: {report['output_dir']}", "", f"config hash `{report['config_hash'][:12]}`", ""]
    for dataset, d in report["datasets"].items():
        lines += [f"## {dataset}", ""]
        lines += ["| stage | products in | out | rejects |", "|---|---:|---:|---|"]
        for stage, f in d["funnel"].items():
            rejects = ", ".join(f"{r} ({lvl}) {n}" for lvl, c in f["rejects"].items() for r, n in c.items())
            lines.append(f"| {stage} | {_cell(f['in'])} | {_cell(f['out'])} | {rejects} |")
        lines += ["", f"- products per split: {d['products']}; triplets per split: {d['triplets']}"]
        lines += [f"- triplets per source: {d['triplets_per_source']}; hard negatives: {d['hard_negatives']}"]
        lines += [f"- share of triplets spanning >= 2 views: {d['share_multi_view']} (FashionMV: 0.9983)"]
        lines += [f"- words, short text: {_summary(d['words_short'])}; long text: {_summary(d['words_long'])}"]
        captions = d["caption_words"]
        lines += [f"- caption words, long: {_summary(captions['long'])}; short: {_summary(captions['short'])}"]
        lines += [f"- views per product: {d['views_per_product']}"]
        v = d["verifier"]
        if "removal_rate" in v:
            lines += [
                f"- verifier: {v['verdicts_remove']} of {v['products_in']} judged hallucinated ({v['removal_rate']})"
            ]
        if v.get("note"):
            lines += [f"- verifier: {v['note']}"]
        lines += [f"- short texts (paraphrases) per triplet: {_cell(d.get('paraphrases_per_triplet'))}"]
        c = d.get("discriminability", {})
        if "rejection_rate" in c:
            lines += [
                f"- discriminability check: {c['rejected']} of {c['checked']} triplets rejected "
                f"({c['rejection_rate']}); {c['failed']} failed; it cost {c['tokens_in']} tokens in, "
                f"{c['tokens_out']} out"
            ]
        if c.get("note"):
            lines += [f"- discriminability check: {c['note']}"]
        f = d.get("redundancy_flags", {})
        if f.get("triplets"):
            lines += [
                f"- redundancy flags ({f['triplets']} triplets): the text alone ranks the target first among the shown "
                f"candidates for {f['text_alone_first']}, the source image alone for {f['image_alone_first']}, "
                f"either for {f['either_first']}"
            ]
        lines += [f"- views_involved: {d['views_involved']}", "", "| LMM stage | tokens in | tokens out | server-s |"]
        lines += ["|---|---:|---:|---:|"]
        lines += [
            f"| {s} | {c['tokens_in']} | {c['tokens_out']} | {c['server_seconds']} |" for s, c in d["lmm_cost"].items()
        ]
        m = d["modality_redundancy"]
        lines += ["", f"Modality redundancy on val (gallery {m.get('gallery')}, queries {m.get('queries')}):", ""]
        if "text_only" in m:
            lines += ["| retrieval | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
            for name in ("text_only", "image_only", "composed"):
                r = m[name]
                lines.append(f"| {name} | {r['R@1']} | {r['R@5']} | {r['R@10']} |")
        if "note" in m:
            lines += ["", f"**{m['note']}**"]
        lines.append("")
    if rows := run_rows(report.get("runs", [])):
        align = "|---|---|---|" + "---:|" * (len(RUN_HEADER) - 3)
        lines += ["## Recent runs", "", "| " + " | ".join(RUN_HEADER) + " |", align]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        lines.append("")
    lines += [
        "## LMM cost of the build",
        "",
        "| LMM stage | model | tokens in | tokens out | GPU-hours | cost |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for stage, c in report.get("lmm_cost", {}).items():
        money = f"{c.get('cost', 0):.4g} {c.get('currency', '')}"
        lines.append(
            f"| {stage} | {_cell(c.get('model'))} | {c['tokens_in']} | {c['tokens_out']} | {_cell(c['gpu_hours'])} "
            f"| {money} |"
        )
    lines.append("")
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "no data" if value is None else str(value)


def write_report(config: RunConfig, out: Path) -> dict:
    report = build_report(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    return report
