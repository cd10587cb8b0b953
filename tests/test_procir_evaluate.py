"""`fashionmv evaluate` end to end on a tiny FashionMV-layout fixture with the tiny random Qwen3.5 (CPU)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import run_on_two_gloo_processes
from PIL import Image
from typer.testing import CliRunner

from fashionmv_builder.cli import app
from fashionmv_builder.procir.data import load_eval_data
from fashionmv_builder.procir.evaluate import QUERY_MODES, encode_gallery, join_views, run_evaluation, split_views
from fashionmv_builder.procir.model import ProCIREncoder
from fashionmv_builder.procir.recall import results_json

DATASETS = ("deepfashion", "f200k", "fashiongen_val")
# (dataset, product id as written in the JSONL, views); ids are paths for DeepFashion, numbers elsewhere.
PRODUCTS = [
    ("deepfashion", "WOMEN/Dresses/id_00000001/01", 2),
    ("deepfashion", "WOMEN/Dresses/id_00000001/02", 3),
    ("deepfashion", "MEN/Tees_Tanks/id_00000002/01", 1),
    ("f200k", 90456812, 2),
    ("f200k", 90456813, 1),
    ("f200k", 90456814, 2),
    ("fashiongen_val", 95636, 6),  # more than five views: the first five by name count
    ("fashiongen_val", 95637, 2),
]
TRIPLETS = [
    ("deepfashion", "WOMEN/Dresses/id_00000001/01", "WOMEN/Dresses/id_00000001/02", "make it longer"),
    ("deepfashion", "WOMEN/Dresses/id_00000001/02", "MEN/Tees_Tanks/id_00000002/01", "a plain tee"),
    ("f200k", 90456812, 90456813, "switch to blue"),
    ("f200k", 90456813, 90456814, "add a collar"),
    ("f200k", 90456814, 99999999, "no images for this target"),
    ("fashiongen_val", 95636, 95637, "shorter sleeves"),
    ("deepfashion", "WOMEN/Dresses/id_00000001/02", "WOMEN/Dresses/id_00000001/01", "make it shorter"),
]
EXPECTED_KEYS = [f"{name}_R@{k}" for name in ("DeepFashion", "Fashion200K", "FashionGen-val") for k in (1, 5, 10)] + [
    "Average_R@5",
    "Average_R@10",
]


def _write_fixture(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images = root / "images"
    for dataset, pid, views in PRODUCTS:
        folder = images / dataset / str(pid)
        folder.mkdir(parents=True)
        for view in range(views):
            pixels = rng.integers(0, 256, (48 + 16 * view, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{1000 - view}.jpg")
    data = root / "data"
    data.mkdir()
    lines = [
        {"source_id": s, "target_id": t, "dataset": ds, "modification_text_short": text, "views_involved": ["front"]}
        for ds, s, t, text in TRIPLETS
    ]
    (data / "val_triplets.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data, images


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    return _write_fixture(tmp_path_factory.mktemp("fashionmv"))


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return ProCIREncoder.from_pretrained(tiny_dir).eval()


def test_evaluate_cli_writes_the_reference_keys(tiny_dir, fixture_dirs, tmp_path):
    data, images = fixture_dirs
    args = ["evaluate", "--model", str(tiny_dir), "--data-dir", str(data), "--image-root", str(images)]
    result = CliRunner().invoke(app, [*args, "--output-dir", str(tmp_path), "--batch-size", "3", "--workers", "1"])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval_results.json").read_text())
    assert scores.pop("dtype") == "bf16"  # the reference's precision unless --dtype fp32
    assert list(scores) == EXPECTED_KEYS
    assert all(0 <= v <= 100 for v in scores.values())
    # The query whose target has no images is dropped; the gallery still holds its source.
    assert "Fashion200K: " in result.output and "(queries=2, gallery=3)" in result.output
    assert "(queries=3, gallery=3)" in result.output  # DeepFashion


def test_results_do_not_depend_on_batch_size(encoder, fixture_dirs):
    data = load_eval_data(*fixture_dirs, DATASETS)
    one = run_evaluation(encoder, data, DATASETS, batch_size=1)
    four = run_evaluation(encoder, data, DATASETS, batch_size=4)
    assert results_json(one) == results_json(four)
    # Batched gallery embeddings equal per-sample ones (right padding, causal model).
    keys = data.gallery
    batched, single = encode_gallery(encoder, keys, data.views, 8, 0), encode_gallery(encoder, keys, data.views, 1, 0)
    for key in keys:
        np.testing.assert_allclose(batched[key], single[key], atol=1e-5)


def test_sources_from_queries_give_the_same_results(encoder, fixture_dirs, caplog):
    data = load_eval_data(*fixture_dirs, DATASETS)
    with caplog.at_level(logging.INFO, logger="fashionmv"):
        reused = run_evaluation(encoder, data, DATASETS, batch_size=3, sources_from_queries=True)
    assert "(5 added by source reuse)" in caplog.text  # five distinct sources skip the document pass
    assert results_json(reused) == results_json(run_evaluation(encoder, data, DATASETS, batch_size=3))


@pytest.mark.parametrize("mode", [m for m in QUERY_MODES if m != "two-turn"])
def test_other_query_modes_run(encoder, fixture_dirs, mode):
    data = load_eval_data(*fixture_dirs, ["f200k"])
    [result] = run_evaluation(encoder, data, ["f200k"], batch_size=2, mode=mode)
    assert (result.queries, result.gallery) == (2, 3)
    if mode == "image-only":
        # The query is the source's own document embedding, so the source always ranks first.
        assert result.recall[1] == 0.0


def _evaluate_share(rank: int, tiny_dir: Path, fixture_dirs: tuple[Path, Path]):
    encoder = ProCIREncoder.from_pretrained(tiny_dir).eval()
    results = run_evaluation(encoder, load_eval_data(*fixture_dirs, DATASETS), DATASETS, batch_size=2)
    return results and ([(r.dataset, r.queries, r.gallery) for r in results], results_json(results))


def test_two_processes_match_one(encoder, tiny_dir, fixture_dirs):
    """Two gloo processes each encode half; the merged result counts every product and query once."""
    got = run_on_two_gloo_processes(_evaluate_share, tiny_dir, fixture_dirs, timeout=60)
    single = run_evaluation(encoder, load_eval_data(*fixture_dirs, DATASETS), DATASETS, batch_size=2)
    assert got[1] is None  # only rank 0 scores
    assert got[0] == ([(r.dataset, r.queries, r.gallery) for r in single], results_json(single))


@pytest.mark.parametrize("encoding", ["meanpool", "maxsim"])
def test_view_wise_encodings_score_every_product_and_query_once(encoder, fixture_dirs, encoding):
    data = load_eval_data(*fixture_dirs, DATASETS)
    joint = run_evaluation(encoder, data, DATASETS, batch_size=4)
    got = run_evaluation(encoder, data, DATASETS, batch_size=4, encoding=encoding)
    assert [(r.dataset, r.queries, r.gallery) for r in got] == [(r.dataset, r.queries, r.gallery) for r in joint]


def test_view_wise_split_and_join_round_trip(encoder, fixture_dirs):
    data = load_eval_data(*fixture_dirs, DATASETS)
    views = split_views(data)
    assert len(views.gallery) == sum(len(p) for p in data.views.values())
    assert len(views.queries) == sum(len(data.views[(t.dataset, t.source_id)]) for t in data.queries)
    gallery = encode_gallery(encoder, views.gallery, views.views, batch_size=4, workers=0)
    pooled, _ = join_views(gallery, [], "meanpool")
    assert sorted(pooled) == data.gallery
    # A one-view product's mean-pooled vector is its document embedding, normalised.
    one_view = ("f200k", "90456813")
    doc = encode_gallery(encoder, [one_view], data.views, batch_size=1, workers=0)[one_view]
    np.testing.assert_allclose(pooled[one_view], doc / np.linalg.norm(doc), rtol=1e-4, atol=1e-5)
    stacked, _ = join_views(gallery, [], "maxsim")
    assert stacked[("fashiongen_val", "95636")].shape[0] == 5  # its first five views, one row each
