"""Stage 3 on the sample catalogue with the real vLLM server: split, mining, listwise selection, export."""

import json
from collections import Counter

import pytest

from fashionmv_builder.core.build import (
    CANDIDATES,
    DEDUPE_VIEWS,
    HARD_NEGATIVES,
    SELECTED_NEGATIVES,
    SELECTED_TRIPLETS,
    SPLIT_PRODUCTS,
    TRIPLETS,
    Build,
    TableRef,
    rejects,
)
from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.outputs.export import export_fashionmv
from fashionmv_builder.procir.data import list_views, read_captions, read_triplets
from fashionmv_builder.stages.split import split_of

pytestmark = pytest.mark.slow


def _table(config: RunConfig, ref: TableRef) -> list[dict]:
    return Build(config.output_dir).rows(ref, "deepfashion")


def test_split_is_by_group_and_stable():
    assert split_of("WOMEN/Dresses/id_00000001", "val", 0.5, 0) == "val"  # an official split wins
    keys = [f"item{i}" for i in range(2000)]
    share = sum(split_of(k, None, 0.3, 7) == "val" for k in keys) / len(keys)
    assert 0.25 < share < 0.35
    assert [split_of(k, None, 0.3, 7) for k in keys] == [split_of(k, None, 0.3, 7) for k in keys]


def test_triplets_respect_splits_and_products(stage3_build):
    products = _table(stage3_build, SPLIT_PRODUCTS)
    split = {p["product_id"]: p["split"] for p in products}
    groups: dict[str, set[str]] = {}
    for p in products:
        groups.setdefault(p["group_key"], set()).add(p["split"])
    assert all(len(s) == 1 for s in groups.values()), "a group was cut across splits"
    triplets = _table(stage3_build, TRIPLETS)
    per_split = Counter(t["split"] for t in triplets)
    assert per_split["train"] >= 50 and per_split["val"] >= 50, per_split
    for t in triplets:
        assert split[t["source_id"]] == split[t["target_id"]] == t["split"]
        assert t["source_id"] != t["target_id"]
        assert t["target_id"] in t["candidate_ids"]
        assert t["views_involved"] == sorted(set(t["views_involved"])) and len(t["views_involved"]) >= 2
    negatives = _table(stage3_build, HARD_NEGATIVES)
    target_of = {t["triplet_id"]: t["target_id"] for t in triplets}
    assert negatives and all(n["negative_id"] != target_of[n["triplet_id"]] for n in negatives)
    chosen = {(t["source_id"], t["target_id"]) for t in triplets}
    assert all((n["source_id"], n["negative_id"]) not in chosen for n in negatives)


def test_counts_conserve(stage3_build):
    for stage in (CANDIDATES.stage, SELECTED_TRIPLETS.stage, TRIPLETS.stage):
        c = Build(stage3_build.output_dir).counts(stage, "deepfashion")
        assert c["products_in"] == c["products_out"] + c["products_rejected"], stage
    sources = {t["source_id"] for t in _table(stage3_build, SELECTED_TRIPLETS)}
    rejected = {r["product_id"] for r in _table(stage3_build, rejects(SELECTED_TRIPLETS.stage))}
    assert sources | rejected == {c["product_id"] for c in _table(stage3_build, CANDIDATES)}
    # the discriminability check counts triplets: each one selected is kept or rejected by id
    checked = {t["triplet_id"] for t in _table(stage3_build, TRIPLETS)}
    dropped = {r["product_id"] for r in _table(stage3_build, rejects(TRIPLETS.stage))}
    assert checked | dropped == {t["triplet_id"] for t in _table(stage3_build, SELECTED_TRIPLETS)}
    assert not checked & dropped


def test_selection_writes_distinct_paraphrases_and_the_check_records_its_pick(stage3_build):
    k = stage3_build.triplets.paraphrases
    selected = _table(stage3_build, SELECTED_TRIPLETS)
    low, high = stage3_build.lmm.words.modification_short
    for t in selected:
        texts = t["modification_texts_short"]
        assert len(texts) == len(set(texts)) == k and texts[0] == t["modification_text_short"], t["triplet_id"]
        assert all(low <= len(text.split()) <= high for text in texts)
        assert t["check_picked_id"] is None and t["text_alone_ranks_target_first"] is None  # select leaves them
    # discriminability.reject is false for the random-weight model: every triplet is kept, with the pick recorded
    kept = _table(stage3_build, TRIPLETS)
    assert len(kept) == len(selected)
    counts = Build(stage3_build.output_dir).counts(TRIPLETS.stage, "deepfashion")
    assert counts["check_passed"] + counts["check_failed"] == len(kept) and counts["requests_sent"] > 0
    assert counts["check_passed"] == sum(t["check_picked_id"] == t["target_id"] for t in kept)
    for t in kept:
        assert 0 <= t["check_text_index"] < k and t["check_picked_id"] in t["candidate_ids"]
        assert isinstance(t["text_alone_ranks_target_first"], bool) and isinstance(
            t["image_alone_ranks_target_first"], bool
        )
    negatives = {(n["triplet_id"], n["negative_id"]) for n in _table(stage3_build, HARD_NEGATIVES)}
    assert negatives == {(n["triplet_id"], n["negative_id"]) for n in _table(stage3_build, SELECTED_NEGATIVES)}


def test_megapairs_export_loads_with_datasets_and_redundant_triplets_can_be_dropped(stage3_build, tmp_path):
    from datasets import load_dataset

    from fashionmv_builder.outputs.export import export_megapairs

    counts = export_megapairs(stage3_build, tmp_path)
    triplets = {t["triplet_id"]: t for t in _table(stage3_build, TRIPLETS)}
    negatives = Counter(n["triplet_id"] for n in _table(stage3_build, HARD_NEGATIVES))
    files = {s: str(tmp_path / "megapairs" / f"{s}.jsonl") for s in ("train", "val")}
    loaded = load_dataset("json", data_files=files)
    assert {s: loaded[s].num_rows for s in files} == {s: counts[f"{s}_triplets"] for s in files}
    assert sum(counts[f"{s}_triplets"] for s in files) == len(triplets)
    for split in files:
        for row in loaded[split]:
            t = triplets[row["triplet_id"]]
            assert row["texts"] == t["modification_texts_short"] and t["split"] == split
            assert len(row["negative_ids"]) == len(row["negative_images"]) == negatives[row["triplet_id"]]
            for path in [
                *row["source_images"],
                *row["target_images"],
                *(p for views in row["negative_images"] for p in views),
            ]:
                assert (tmp_path / path).is_file(), path
    redundant = sum(bool(t["text_alone_ranks_target_first"]) for t in triplets.values())
    kept = export_megapairs(stage3_build, tmp_path / "no-text", drop_redundant="text")
    assert kept["train_triplets"] + kept["val_triplets"] == len(triplets) - redundant
    either = sum(t["text_alone_ranks_target_first"] or t["image_alone_ranks_target_first"] for t in triplets.values())
    kept = export_fashionmv(stage3_build, tmp_path / "fashionmv", drop_redundant="both")
    assert kept["train_triplets"] + kept["val_triplets"] == len(triplets) - either


def test_planted_siblings_are_mined(stage3_build, sample_catalogue):
    truth = json.loads((sample_catalogue / "ground_truth.json").read_text())
    union = {c["product_id"]: (c["split"], set(c["union_ids"])) for c in _table(stage3_build, CANDIDATES)}
    found = total = 0
    for p in truth["products"]:
        if p["role"] != "sibling" or p["ids"].get("deepfashion") is None:
            continue
        source, base = p["ids"]["deepfashion"], truth["products"][p["sibling_of"]]["ids"]["deepfashion"]
        if source in union and base in union and union[source][0] == union[base][0]:
            total += 1
            found += base in union[source][1]
    assert total >= 30
    assert found / total >= 0.8, (found, total)


def test_fashionmv_export_round_trips(stage3_build, tmp_path):
    counts = export_fashionmv(stage3_build, tmp_path)
    triplets = _table(stage3_build, TRIPLETS)
    views = {}
    for v in _table(stage3_build, DEDUPE_VIEWS):
        views.setdefault(v["product_id"], []).append(v["file_name"])
    for split in ("train", "val"):
        ours = sorted(
            (t["source_id"], t["target_id"], t["modification_text_short"], tuple(t["views_involved"]))
            for t in triplets
            if t["split"] == split
        )
        back = read_triplets(tmp_path / f"{split}_triplets.jsonl")
        assert sorted((t.source_id, t.target_id, t.modification_text_short, t.views_involved) for t in back) == ours
        assert all((t.modification_text_long is not None) == (split == "train") for t in back)
        captions = read_captions(tmp_path / f"{split}_captions.jsonl")
        gallery = {pid for t in back for pid in (t.source_id, t.target_id)}
        assert {pid for _, pid in captions} == gallery
        for pid in gallery:  # FashionMV's view rule (plain sort, first 5) gives our kept views
            listed = [p.name for p in list_views(tmp_path / "images", "deepfashion", pid)]
            assert listed == sorted(views[pid])[:5]
    assert counts["val_triplets"] + counts["train_triplets"] == len(triplets)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.jpg")}
    export_fashionmv(stage3_build, tmp_path)  # a rerun rewrites no image
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.jpg")} == before


def test_report_runs_on_the_build(stage3_build, tmp_path):
    from fashionmv_builder.outputs.report import write_report

    report = write_report(stage3_build, tmp_path)
    d = report["datasets"]["deepfashion"]
    assert d["share_multi_view"] == 1.0  # the schema asks for at least two views
    assert d["funnel"]["ingest"]["in"] >= d["funnel"]["select"]["in"] > 0
    m = d["modality_redundancy"]
    assert m["gallery"] < 200 and "not meaningful" in m["note"]
    assert set(m) >= {"text_only", "image_only", "composed"}
    assert (tmp_path / "report.md").read_text().startswith("# Build report")
