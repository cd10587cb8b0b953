"""`fashionmv ingest` on each of the sample catalogue's five layouts gives the ground truth's counts and reasons."""

import json
from collections import Counter

import pytest

from fashionmv_builder.core.build import Build, TableRef
from fashionmv_builder.core.config import validate_config
from fashionmv_builder.pipeline import run_local

pytestmark = pytest.mark.slow


def _sources(layout: str, root, base_url: str) -> list[dict]:
    licence = {"licence": "sample"}
    match layout:
        case "deepfashion":
            return [{"kind": "deepfashion", "dataset": "deepfashion", "root": str(root / "deepfashion"), **licence}]
        case "fashion200k":
            return [{"kind": "fashion200k", "dataset": "f200k", "root": str(root / "fashion200k"), **licence}]
        case "fashiongen":
            h5 = root / "fashiongen"
            return [
                {
                    "kind": "fashiongen",
                    "dataset": "fg_train",
                    "split": "train",
                    "path": str(h5 / "fashiongen_256_256_train.h5"),
                },
                {
                    "kind": "fashiongen",
                    "dataset": "fg_val",
                    "split": "val",
                    "path": str(h5 / "fashiongen_256_256_validation.h5"),
                },
            ]
        case "folder":
            return [{"kind": "folder", "dataset": "folder", "root": str(root / "folder"), **licence}]
        case "manifest":
            path = str(root / "manifest" / "manifest.jsonl")
            return [{"kind": "manifest", "dataset": "manifest", "path": path, "base_url": base_url, **licence}]
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["deepfashion", "fashion200k", "fashiongen", "folder", "manifest"])
def test_ingest_matches_ground_truth(layout, sample_catalogue, static_http_server, tmp_path):
    truth = json.loads((sample_catalogue / "ground_truth.json").read_text())
    base_url = static_http_server(sample_catalogue / "manifest") if layout == "manifest" else ""
    config = validate_config(
        {
            "output_dir": str(tmp_path / "out"),
            "shard_size": 25,
            "workers": 2,
            "sources": _sources(layout, sample_catalogue, base_url),
            "http": {"allow_private_addresses": True},  # the test server is on localhost
        }
    )
    reports = run_local(config, ["ingest"])["ingest"]
    counts: Counter[str] = Counter()
    rejects = []
    for report in reports:
        assert report.error is None
        counts.update(report.stats["counts"])
        rejects += Build(config.output_dir).read(TableRef("ingest", "rejects"), report.dataset).to_pylist()

    expected = truth["expected_ingest"][layout]
    for key in ("products_in", "products_out", "views_in", "views_out"):
        assert counts[key] == expected[key], key
    assert {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("rejected.")} == expected["rejects"]
    assert counts["products_in"] == counts["products_out"] + counts["products_rejected"]
    assert counts["views_in"] == counts["views_out"] + counts["views_rejected"] + counts["views_dropped_with_product"]

    found = {(r["product_id"], r["file_name"] if r["level"] == "view" else None): r["reason"] for r in rejects}
    planted = [f for f in truth["faults"] if f["stage"] == "ingest" and layout in f["where"]]
    for fault in planted:
        where = fault["where"][layout]
        key = (where["product_id"], where.get("file_name") if fault["level"] == "view" else None)
        assert found.get(key) == fault["reason"], fault["fault"]
    if layout not in ("fashiongen",):
        assert planted, "every file layout carries ingest faults"
