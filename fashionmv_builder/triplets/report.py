"""`fashionmv report`: what a build produced and how good it looks, as JSON and Markdown.

Counts per split and dataset, triplets per source, the `views_involved` distribution and the share of triplets that
span at least two views (FashionMV: 99.83%), modification-text lengths, tokens and server-seconds per LMM stage, and a
modality-redundancy check on the val split: R@1/5/10 of text-only (modification text against the gallery's short
captions), image-only (source against gallery images) and composed (image and text cosines averaged) retrieval with
the baseline embedders, computed by the ProCIR evaluator's recall code. A good CIR set needs both modalities: if
text-only or image-only already retrieves the target, the modification text or the source is redundant.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from fashionmv_builder.config import RunConfig
from fashionmv_builder.procir.recall import l2_normalise, recall_at_k
from fashionmv_builder.shards import ShardStore
from fashionmv_builder.triplets.embed import encode_texts

MEANINGFUL_GALLERY = 200
LMM_STAGES = ("caption", "verify", "triplets")


def _words(texts: list[str]) -> dict:
    lengths = [len(t.split()) for t in texts]
    if not lengths:
        return {}
    return {"mean": round(statistics.mean(lengths), 1), "median": statistics.median(lengths), "max": max(lengths)}


def _redundancy(config: RunConfig, dataset: str, triplets: list[dict]) -> dict:
    """Recall of text-only, image-only and composed retrieval on the val split of one dataset."""
    val = [t for t in triplets if t["split"] == "val"]
    if not val:
        return {"note": "no val triplets"}
    gallery = sorted({pid for t in val for pid in (t["source_id"], t["target_id"])})
    position = {pid: i for i, pid in enumerate(gallery)}
    embeddings = {
        r["product_id"]: r for r in ShardStore(config.output_dir, "embed", dataset).read_table("embeddings").to_pylist()
    }
    image = l2_normalise(np.asarray([embeddings[p]["image"] for p in gallery], dtype=np.float32))
    caption = l2_normalise(np.asarray([embeddings[p]["short_caption"] for p in gallery], dtype=np.float32))
    text = encode_texts([t["modification_text_short"] for t in val], config.triplets.text_model)
    source_image = image[[position[t["source_id"]] for t in val]]
    targets = np.asarray([position[t["target_id"]] for t in val])
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


def build_report(config: RunConfig) -> dict:
    report: dict = {"output_dir": config.output_dir, "config_hash": config.config_hash(), "datasets": {}}
    for source in config.sources:
        dataset = source.dataset
        triplets = ShardStore(config.output_dir, "triplets", dataset).read_table("triplets").to_pylist()
        products = ShardStore(config.output_dir, "candidates", dataset).read_table("products").to_pylist()
        if not products:
            continue
        views = Counter("+".join(t["views_involved"]) for t in triplets)
        sources = Counter(t["source_id"] for t in triplets)
        entry = {
            "products": dict(Counter(p["split"] for p in products)),
            "triplets": dict(Counter(t["split"] for t in triplets)),
            "triplets_per_source": round(len(triplets) / len(sources), 2) if sources else 0,
            "views_involved": dict(views.most_common()),
            "share_multi_view": round(sum(len(t["views_involved"]) >= 2 for t in triplets) / len(triplets), 4)
            if triplets
            else None,
            "words_short": _words([t["modification_text_short"] for t in triplets]),
            "words_long": _words([t["modification_text_long"] for t in triplets]),
            "hard_negatives": ShardStore(config.output_dir, "triplets", dataset).read_table("hard_negatives").num_rows,
            "lmm_cost": {},
            "funnel": {},
        }
        for stage in ("ingest", "dedupe", *LMM_STAGES):
            stats = ShardStore(config.output_dir, stage, dataset).read_stats() or {}
            counts = stats.get("counts", {})
            entry["funnel"][stage] = {"in": counts.get("products_in", 0), "out": counts.get("products_out", 0)}
            if stage in LMM_STAGES:
                entry["lmm_cost"][stage] = {
                    "tokens_in": counts.get("tokens_in", 0),
                    "tokens_out": counts.get("tokens_out", 0),
                    "server_seconds": stats.get("server_seconds"),
                }
        entry["modality_redundancy"] = _redundancy(config, dataset, triplets)
        report["datasets"][dataset] = entry
    return report


def to_markdown(report: dict) -> str:
    lines = [f"# Build report: {report['output_dir']}", "", f"config hash `{report['config_hash'][:12]}`", ""]
    for dataset, d in report["datasets"].items():
        lines += [f"## {dataset}", ""]
        lines += ["| stage | products in | out |", "|---|---:|---:|"]
        lines += [f"| {s} | {f['in']} | {f['out']} |" for s, f in d["funnel"].items()]
        lines += ["", f"- products per split: {d['products']}; triplets per split: {d['triplets']}"]
        lines += [f"- triplets per source: {d['triplets_per_source']}; hard negatives: {d['hard_negatives']}"]
        lines += [f"- share of triplets spanning >= 2 views: {d['share_multi_view']} (FashionMV: 0.9983)"]
        lines += [f"- words, short text: {d['words_short']}; long text: {d['words_long']}"]
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
    return "\n".join(lines)


def write_report(config: RunConfig, out: Path) -> dict:
    report = build_report(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    return report
