"""What a build MEANS, checked against the sample's ground truth: one build of the sample through the Prefect flow
with the ground-truth answering server (devtools/ground_truth_server.py) as the LMM.

The server recognises each product only by the bytes of the images it is sent and answers from the truth, so the
checks below hold only if every stage hands the right images, captions, candidates and texts to the right products:
captions are filed under the product and view they describe, the verifier removes exactly the planted wrong claims,
every triplet joins true siblings with a text naming the target's differences and the views they show in, and the
FashionMV export and the published dataset carry each product's own images in order.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hub_server import serve_hub

from fashionmv_builder.core.build import (
    CANDIDATES,
    CAPTIONS,
    HARD_NEGATIVES,
    SELECTED_NEGATIVES,
    SELECTED_TRIPLETS,
    TRIPLETS,
    VERDICTS,
    Build,
    rejects,
)
from fashionmv_builder.core.config import RunConfig, load_config
from fashionmv_builder.devtools.ground_truth_server import (
    DETAILS,
    EVERY_VIEW,
    MODEL_NAME,
    TRUTH_WORDS,
    VIEW_OF_RENDER,
    Answerer,
    difference_views,
    differences,
    planted_wrong,
    serve_ground_truth,
    wearer_left,
)
from fashionmv_builder.devtools.sample_catalogue import generate_sample
from fashionmv_builder.stages.ingest.images import encode_jpeg

pytestmark = pytest.mark.slow

LAYOUT = {"deepfashion": "deepfashion", "fashiongen_val": "fashiongen"}  # dataset → the sample layout it reads
WRONG_SHARE = 0.1
PRODUCTS = 400
TOKEN = "hf_semanticsSECRET0123456789abcdef"
TINY_PROCIR = Path(__file__).resolve().parents[1] / "build" / "models" / "tiny-procir"


@pytest.fixture(scope="module")
def sample_catalogue(tmp_path_factory) -> Path:
    """A sample catalogue twice the default size, so the trainer has enough triplets to learn from."""
    folder = tmp_path_factory.mktemp("catalogue")
    generate_sample(folder, products=PRODUCTS, seed=0)
    return folder


@pytest.fixture(scope="module")
def truth_build(sample_catalogue: Path, tmp_path_factory) -> Iterator[tuple[RunConfig, Answerer]]:
    """The sample's deepfashion and FashionGen-val layouts built by the Prefect flow, answered from the truth."""
    from prefect.testing.utilities import prefect_test_harness

    from fashionmv_builder.flows.build_fashionmv import build_fashionmv

    base = tmp_path_factory.mktemp("truth-build")
    with serve_ground_truth(sample_catalogue, media_root=base, wrong_share=WRONG_SHARE) as (url, answerer):
        config = {
            "name": "truth",
            "output_dir": str(base / "out"),
            "shard_size": 25,
            "workers": 2,
            "sources": [
                {"kind": "deepfashion", "dataset": "deepfashion", "root": str(sample_catalogue / "deepfashion")},
                {
                    "kind": "fashiongen",
                    "dataset": "fashiongen_val",
                    "path": str(sample_catalogue / "fashiongen" / "fashiongen_256_256_validation.h5"),
                    "split": "val",
                },
            ],
            "lmm": {"endpoints": [url], "model": MODEL_NAME, "words": TRUTH_WORDS, "breaker_min_products": 50},
            "triplets": {"val_ratio": 0.3, "top_k": 4},  # narrow mining: siblings are shown (configs/ground-truth.yaml)
        }
        path = base / "truth.yaml"
        path.write_text(json.dumps(config))
        with prefect_test_harness(server_startup_timeout=180):
            reports = build_fashionmv(str(path))
        assert sorted(r["dataset"] for r in reports["select"]) == [
            "deepfashion",
            "fashiongen_val",
        ]  # it raises on errors
        yield load_config(path), answerer


@pytest.fixture(scope="module")
def truth(sample_catalogue: Path) -> dict:
    return json.loads((sample_catalogue / "ground_truth.json").read_text())


class Catalogue:
    """The ground truth of the products a dataset holds, by the dataset's product ids and file names."""

    def __init__(self, truth: dict, root: Path) -> None:
        self.root = root
        self.by_id = {
            (dataset, str(p["ids"][layout])): p
            for dataset, layout in LAYOUT.items()
            for p in truth["products"]
            if p["ids"].get(layout) is not None
        }

    def product(self, dataset: str, product_id: str) -> dict:
        return self.by_id[(dataset, product_id)]

    def _files(self, dataset: str, p: dict) -> list[str]:
        return p["files"][LAYOUT[dataset]]

    def render(self, dataset: str, p: dict, file_name: str) -> str:
        """What the view stored under `file_name` shows."""
        renders = p["fashiongen_renders"] if LAYOUT[dataset] == "fashiongen" else p["renders"]
        return renders[self._files(dataset, p).index(file_name)]

    def image(self, dataset: str, p: dict, file_name: str) -> bytes:
        """The bytes the catalogue holds for that view (FashionGen: its h5 row, JPEG-encoded as the reader does)."""
        layout = LAYOUT[dataset]
        if layout != "fashiongen":
            return (self.root / p["paths"][layout][self._files(dataset, p).index(file_name)]).read_bytes()
        import h5py

        with h5py.File(self.root / "fashiongen" / "fashiongen_256_256_validation.h5", "r") as h5:
            return encode_jpeg(np.asarray(h5["input_image"][int(file_name.split(".")[0])]))


@pytest.fixture(scope="module")
def catalogue(truth: dict, sample_catalogue: Path) -> Catalogue:
    return Catalogue(truth, sample_catalogue)


def _datasets(config: RunConfig) -> list[str]:
    return [s.dataset for s in config.sources]


def _family(p: dict) -> int | None:
    return p["sibling_of"] if p["role"] == "sibling" else p["index"] if p["role"] == "base" else None


# -- Stage 1 ----------------------------------------------------------------------------------------------------


def test_every_caption_describes_the_product_and_view_it_is_filed_under(truth_build, catalogue):
    config, answerer = truth_build
    build = Build(config.output_dir)
    checked = 0
    for dataset in _datasets(config):
        views = build.kept_views(dataset, with_bytes=False)
        for row in build.rows(CAPTIONS, dataset):
            p = catalogue.product(dataset, row["product_id"])
            wrong = planted_wrong(p["index"], 0, WRONG_SHARE)
            assert (row["category"], row["gender"]) == (p["category"], p["gender"]), row["product_id"]
            kept = views[row["product_id"]]
            assert [v["view_index"] for v in row["view_captions"]] == [v["view_index"] for v in kept]
            for caption, view in zip(row["view_captions"], kept, strict=True):
                render = catalogue.render(dataset, p, view["file_name"])
                where = f"{dataset}/{row['product_id']}/{view['file_name']}"
                assert caption["view_type"] == VIEW_OF_RENDER[render], where
                expected_side = wearer_left(render)
                if wrong and expected_side == "image_right":
                    expected_side = "image_left"  # the planted wrong claim
                assert caption["wearer_left_on_image"] == expected_side, where
                words = caption["caption"].split()
                assert words[:3] == [p["colour"], p["pattern"], p["category"]], where
                for word in words[3:]:
                    attr, _, value = word.partition("=")
                    mirrored = {"left": "right", "right": "left"}.get(p[attr], p[attr]) if attr == "pocket" else None
                    assert value == (mirrored if wrong and attr == "pocket" else p[attr]), f"{where}: {word}"
                checked += 1
    assert checked > 300
    assert answerer.unrecognised == 0 and answerer.foreign == 0


# -- Stage 2 ----------------------------------------------------------------------------------------------------


def test_the_verifier_removes_exactly_the_planted_wrong_captions(truth_build, catalogue):
    config, _ = truth_build
    build = Build(config.output_dir)
    planted_total = 0
    for dataset in _datasets(config):
        captioned = {r["product_id"] for r in build.rows(CAPTIONS, dataset)}
        planted = {pid for pid in captioned if planted_wrong(catalogue.product(dataset, pid)["index"], 0, WRONG_SHARE)}
        removed = {r["product_id"] for r in build.rows(rejects("verify"), dataset)}
        verdicts = build.rows(VERDICTS, dataset)
        assert removed == planted, dataset
        assert {r["product_id"] for r in verdicts} == captioned - planted
        assert {r["verdict"] for r in verdicts} == {"pass"}
        planted_total += len(planted)
    assert planted_total >= 10


# -- Stage 3 ----------------------------------------------------------------------------------------------------


def test_every_triplet_joins_true_siblings_and_names_their_differences(truth_build, catalogue):
    config, _ = truth_build
    build = Build(config.output_dir)
    total = 0
    for dataset in _datasets(config):
        views = build.kept_views(dataset, with_bytes=False)
        split_of = {r["product_id"]: r["split"] for r in build.rows(CANDIDATES, dataset)}
        for row in build.rows(TRIPLETS, dataset):
            source, target = row["source_id"], row["target_id"]
            s, t = catalogue.product(dataset, source), catalogue.product(dataset, target)
            name = row["triplet_id"]
            assert _family(s) is not None and _family(s) == _family(t) and s["index"] != t["index"], name
            assert split_of[source] == split_of[target] == row["split"], name
            assert target in row["candidate_ids"], name
            changed = differences(s, t)
            named = [w.partition("=") for w in row["modification_text_short"].split() if "=" in w]
            assert named, f"{name}: the short text names no difference"
            for attr, _, value in named:
                assert attr in changed and value == t[attr], f"{name}: {attr}={value} is not a difference to the target"
            first = changed[0]
            assert f"{first} from {s[first]} to {t[first]}" in row["modification_text_long"], name
            renders = {
                pid: [catalogue.render(dataset, q, v["file_name"]) for v in views[pid]]
                for pid, q in ((source, s), (target, t))
            }
            expected = difference_views(s, renders[source], t, renders[target])
            assert row["views_involved"] == sorted(expected), name
            total += 1
    assert total >= 20


def test_hard_negatives_are_the_shown_candidates_never_the_targets(truth_build):
    config, _ = truth_build
    build = Build(config.output_dir)
    for dataset in _datasets(config):
        triplets = build.rows(TRIPLETS, dataset)
        chosen: dict[str, set[str]] = {}
        for row in triplets:
            chosen.setdefault(row["source_id"], set()).add(row["target_id"])
        shown = {row["triplet_id"]: row["candidate_ids"] for row in triplets}
        negatives = build.rows(HARD_NEGATIVES, dataset)
        assert negatives
        for n in negatives:
            assert n["negative_id"] not in chosen[n["source_id"]], n
            assert shown[n["triplet_id"]][n["rank_shown"]] == n["negative_id"], n


def _claims(text: str) -> list[tuple[str, str]]:
    return [(attr, value) for attr, _, value in (w.partition("=") for w in text.split()) if value]


def _fits(product: dict, claims: list[tuple[str, str]]) -> bool:
    """Every `attr=value` claim holds for the product (as far as 20-character schema words can say it)."""
    return all(f"{attr}={product[attr]}"[:20] == f"{attr}={value}"[:20] for attr, value in claims)


def test_the_discriminability_check_keeps_true_triplets_and_rejects_a_planted_wrong_one(truth_build, catalogue):
    """Every selected triplet is kept unless its text fits another shown candidate as well as its target (the
    checker picks that one); then a triplet given another source's texts is rejected, and only it is asked again."""
    from fashionmv_builder.data_schema import tables
    from fashionmv_builder.pipeline import run_local
    from fashionmv_builder.stages.discriminate import DiscriminateStage

    config, answerer = truth_build
    build = Build(config.output_dir)
    stage = DiscriminateStage(config)
    selected_total = kept_total = 0
    for dataset in _datasets(config):
        selected = {r["triplet_id"]: r for r in build.rows(SELECTED_TRIPLETS, dataset)}
        kept = {r["triplet_id"] for r in build.rows(TRIPLETS, dataset)}
        dropped = build.rows(rejects(TRIPLETS.stage), dataset)
        assert kept | {r["product_id"] for r in dropped} == set(selected)
        for r in dropped:
            row = selected[r["product_id"]]
            assert r["reason"] == "text_not_discriminative" and r["related_id"] != row["target_id"], r
            text = row["modification_texts_short"][stage.text_index(row)]
            assert _fits(catalogue.product(dataset, r["related_id"]), _claims(text)), r  # ambiguous, truly
        selected_total += len(selected)
        kept_total += len(kept)
    assert selected_total >= 20 and kept_total >= 0.8 * selected_total, (kept_total, selected_total)
    counts = build.counts(TRIPLETS.stage, "deepfashion")
    assert counts["check_passed"] + counts.get("check_failed", 0) == counts["products_in"] > 0

    # Plant: a copy of the build where one triplet carries the texts of another source's triplet that do not fit
    # its target.
    dataset = "deepfashion"
    out = Path(config.output_dir).parent / "planted"
    shutil.copytree(config.output_dir, out)
    planted_config = config.model_copy(update={"output_dir": str(out)})
    planted = Build(str(out))
    kept = {r["triplet_id"] for r in build.rows(TRIPLETS, dataset)}
    rows = build.rows(SELECTED_TRIPLETS, dataset)

    def misleads(a: dict, b: dict) -> bool:
        """b's texts, applied to a's source, describe another of a's shown candidates better than a's target."""
        described = {**catalogue.product(dataset, a["source_id"]), **dict(_claims(b["modification_text_short"]))}
        attrs = [*EVERY_VIEW, *DETAILS]

        def score(pid: str) -> int:
            return sum(f"{x}={catalogue.product(dataset, pid)[x]}"[:20] == f"{x}={described[x]}"[:20] for x in attrs)

        return max(score(c) for c in a["candidate_ids"] if c != a["target_id"]) > score(a["target_id"])

    victim, donor = next(
        (a, b)
        for a in rows
        for b in rows
        if a["triplet_id"] in kept and a["source_id"] != b["source_id"] and misleads(a, b)
    )
    shard = next(
        m.shard
        for m in planted.markers(SELECTED_TRIPLETS, dataset)
        if victim["triplet_id"] in planted.read_shard(SELECTED_TRIPLETS, dataset, m.shard)["triplet_id"].to_pylist()
    )
    marker = planted.marker(SELECTED_TRIPLETS, dataset, shard)
    written = planted.read_shard(SELECTED_TRIPLETS, dataset, shard).to_pylist()
    for r in written:
        if r["triplet_id"] == victim["triplet_id"]:
            r["modification_text_short"] = donor["modification_text_short"]
            r["modification_texts_short"] = donor["modification_texts_short"]
    shard_tables = {
        SELECTED_TRIPLETS.table: pa.Table.from_pylist(written, schema=tables.TRIPLETS),
        SELECTED_NEGATIVES.table: planted.read_shard(SELECTED_NEGATIVES, dataset, shard),
        "rejects": planted.read_shard(rejects(SELECTED_TRIPLETS.stage), dataset, shard),
    }
    planted.write_shard(
        SELECTED_TRIPLETS.stage,
        dataset,
        shard,
        shard_tables,
        config_hash=marker.config_hash,
        fingerprint=marker.input_fingerprint,
        counts=marker.counts,
        metadata={},
    )
    asked = answerer.requests["discriminate"]
    run_local(planted_config, [TRIPLETS.stage], [dataset])
    assert answerer.requests["discriminate"] == asked + 1  # the planted text only: the rest is replayed or kept
    [reject] = [r for r in planted.rows(rejects(TRIPLETS.stage), dataset) if r["product_id"] == victim["triplet_id"]]
    assert reject["reason"] == "text_not_discriminative" and reject["related_id"] != victim["target_id"]
    assert {r["triplet_id"] for r in planted.rows(TRIPLETS, dataset)} == (
        {r["triplet_id"] for r in build.rows(TRIPLETS, dataset)} - {victim["triplet_id"]}
    )
    # its target joins the hard negatives of the source's kept triplets
    siblings = [r for r in planted.rows(TRIPLETS, dataset) if r["source_id"] == victim["source_id"]]
    negatives = {(n["triplet_id"], n["negative_id"]) for n in planted.rows(HARD_NEGATIVES, dataset)}
    assert all((r["triplet_id"], victim["target_id"]) in negatives for r in siblings)

    # A run killed after the check's answers came back but before its shards were committed (their markers gone)
    # resumes without asking again: the answers are replayed from the store, the same triplets come out.
    before = {r["triplet_id"] for r in planted.rows(TRIPLETS, dataset)}
    store = planted.store(TRIPLETS.stage, dataset)
    for marker in store.markers():
        store.fs.rm_file(store.marker_path(marker.shard))
    asked = answerer.requests["discriminate"]
    [report] = run_local(planted_config, [TRIPLETS.stage], [dataset])[TRIPLETS.stage]
    assert answerer.requests["discriminate"] == asked
    assert report.run["counts"]["answers_replayed"] > 0 and report.run["counts"]["requests_sent"] == 0
    assert {r["triplet_id"] for r in planted.rows(TRIPLETS, dataset)} == before


# -- outputs ----------------------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _own_images(build: Build, catalogue: Catalogue, dataset: str, product_id: str) -> list[str]:
    """The sha256 of the catalogue's images of the product's kept views, in the build's view order."""
    p = catalogue.product(dataset, product_id)
    kept = build.kept_views(dataset, with_bytes=False)[product_id]
    return [_sha(catalogue.image(dataset, p, v["file_name"])) for v in kept]


def test_the_fashionmv_export_puts_each_products_own_images_under_its_id_in_order(truth_build, catalogue, tmp_path):
    from fashionmv_builder.outputs.export import export_fashionmv
    from fashionmv_builder.procir.data import list_views

    config, _ = truth_build
    build = Build(config.output_dir)
    export_fashionmv(config, tmp_path)
    records = [json.loads(line) for s in ("train", "val") for line in (tmp_path / f"{s}_triplets.jsonl").open()]
    assert records
    products = {(r["dataset"], pid) for r in records for pid in (r["source_id"], r["target_id"])}
    for dataset, pid in sorted(products):
        # read exactly as the evaluator reads a product: its folder's files in plain string order
        found = [_sha(path.read_bytes()) for path in list_views(tmp_path / "images", dataset, pid)]
        assert found == _own_images(build, catalogue, dataset, pid), f"{dataset}/{pid}"


def test_the_published_dataset_loads_back_with_each_products_own_images(truth_build, catalogue, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from fashionmv_builder.outputs.publish import PublishOptions, publish
    from fashionmv_builder.outputs.report import write_report

    config, _ = truth_build
    build = Build(config.output_dir)
    write_report(config, Path(config.output_dir) / "report")
    with serve_hub(TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        publish(config, PublishOptions("org/truth", endpoint=hub.url, with_images=True), root=tmp_path / "publish")
        script = """
import hashlib, json, sys
from datasets import Image, List, load_dataset
out = {}
for split, rows in load_dataset("org/truth", "products").items():
    rows = rows.cast_column("images", List(Image(decode=False)))
    out[split] = [[r["dataset"], r["product_id"], [hashlib.sha256(i["bytes"]).hexdigest() for i in r["images"]]]
                  for r in rows]
out["triplets"] = {s: d.to_list() for s, d in load_dataset("org/truth", "triplets").items()}
json.dump(out, sys.stdout)
"""
        env = {
            "PATH": "/usr/bin:/bin",
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1",
        }
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout)
    checked = 0
    for split in ("train", "val"):
        for dataset, pid, images in loaded[split]:
            assert images == _own_images(build, catalogue, dataset, pid), f"{dataset}/{pid}"
            checked += 1
    assert checked > 100
    for split, rows in loaded["triplets"].items():
        for row in rows:
            s = catalogue.product(row["dataset"], row["source_id"])
            t = catalogue.product(row["dataset"], row["target_id"])
            assert row["split"] == split and _family(s) == _family(t), row["triplet_id"]
    published = sorted(r["triplet_id"] for rows in loaded["triplets"].values() for r in rows)
    assert published == sorted(r["triplet_id"] for d in _datasets(config) for r in build.rows(TRIPLETS, d))


# -- training on the build --------------------------------------------------------------------------------------


def test_training_on_the_build_learns_from_its_modification_texts(truth_build, tmp_path):
    """The tiny ProCIR model from its random start, trained on the build's train split (60 steps, FashionMV's
    losses), retrieves its val targets better than before; trained on the same triplets with their texts shuffled, it
    gains less (what the images alone teach) and its R@1 does not rise above the untrained model's. Figures of the
    same run on a larger build are in BENCHMARKS.md (benchmarks/bench_learns.py)."""
    from fashionmv_builder.outputs.export import export_fashionmv
    from fashionmv_builder.procir.learning_check import measure, shrink_images
    from fashionmv_builder.procir.train import TrainConfig
    from fashionmv_builder.procir.train_data import load_fashionmv_train

    config, _ = truth_build
    export_fashionmv(config, tmp_path, ["deepfashion"])
    shrink_images(tmp_path / "images", 160)
    data = load_fashionmv_train(tmp_path, tmp_path / "images")
    assert len(data.triplets) >= 60
    cfg = TrainConfig(dtype="fp32", lr=1e-3, batch_size=16, max_steps=60, epochs=1e6, seed=0)
    result = measure(TINY_PROCIR, tmp_path, data, cfg, ["deepfashion"])
    print(result)
    before, true, shuffled = (result[k] for k in ("before", "true", "shuffled"))
    assert true["deepfashion_R@10"] >= before["deepfashion_R@10"] + 20, result
    assert true["deepfashion_R@10"] >= shuffled["deepfashion_R@10"] + 10, result
    assert true["deepfashion_R@1"] >= shuffled["deepfashion_R@1"] + 8, result
    assert shuffled["deepfashion_R@1"] <= before["deepfashion_R@1"] + 5, result
