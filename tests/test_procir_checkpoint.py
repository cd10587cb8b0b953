"""Model folders are ordinary Qwen3.5 checkpoints: stock transformers resolve their processor classes, and a trained
checkpoint read the way FashionMV's evaluate.py reads it (tests/fashionmv_protocol.py, with a torchvision on the
path) gives our encoder's embeddings and `fashionmv evaluate --dtype bf16`'s R@1/5/10."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.models.auto.video_processing_auto import video_processor_class_from_name

from fashionmv_builder.procir.model import ProCIREncoder
from fashionmv_builder.procir.train import TrainConfig, train
from fashionmv_builder.procir.train_data import load_fashionmv_train

REPO = Path(__file__).resolve().parents[1]
TORCHVISION_OVERLAY = REPO / "build" / "torchvision-cpu"  # make's torchvision-overlay stamp
DATASETS = ("deepfashion", "f200k")
PER_DATASET = 14


def _pid(dataset: str, i: int) -> str:
    return f"WOMEN/Dresses/id_{i:08d}/01" if dataset == "deepfashion" else str(90456800 + i)


def _write_fixture(root: Path) -> tuple[Path, Path]:
    """Two datasets of 14 products (1–3 views, one large enough to be scaled down), 24 val queries (one whose target
    has no images), and train files for a short training run."""
    rng = np.random.default_rng(3)
    images = root / "images"
    for dataset in DATASETS:
        for i in range(PER_DATASET):
            folder = images / dataset / _pid(dataset, i)
            folder.mkdir(parents=True)
            for view in range(1 + i % 3):
                h, w = (900, 620) if i == 5 and view == 0 else (40 + 8 * (i % 5), 48 + 16 * view)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{view}.jpg")
    data = root / "data"
    data.mkdir()
    val, train_rows, captions = [], [], []
    for dataset in DATASETS:
        for i in range(12):
            target = _pid(dataset, (5 * i + 3) % PER_DATASET)
            val.append(
                {
                    "source_id": _pid(dataset, i),
                    "target_id": target,
                    "dataset": dataset,
                    "modification_text_short": f"make it colour {i} with a collar",
                }
            )
            train_rows.append({**val[-1], "target_id": _pid(dataset, (i + 1) % PER_DATASET)})
        captions += [
            {"product_id": _pid(dataset, i), "dataset": dataset, "short_caption": f"dress {i}", "long_caption": "x"}
            for i in range(PER_DATASET)
        ]
    val.append({**val[0], "target_id": "99999999", "dataset": "f200k", "source_id": _pid("f200k", 1)})
    for name, rows in (("val_triplets", val), ("train_triplets", train_rows), ("train_captions", captions)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, images


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return _write_fixture(tmp_path_factory.mktemp("fashionmv-layout"))


@pytest.fixture(scope="module")
def trained_dir(tiny_dir, fixture_dirs, tmp_path_factory) -> Path:
    """A checkpoint as `fashionmv train` saves it (a few steps at a large learning rate, so the weights move)."""
    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(batch_size=4, max_steps=3, lr=1e-3)
    train(ProCIREncoder.from_pretrained(tiny_dir), load_fashionmv_train(*fixture_dirs), cfg, out)
    return out


@pytest.mark.parametrize("which", ["backbone", "trained"])
def test_model_folders_name_stock_processor_classes(which, tiny_dir, trained_dir):
    folder = tiny_dir if which == "backbone" else trained_dir
    config = json.loads((folder / "processor_config.json").read_text())
    assert processor_class_from_name(config["processor_class"]).__module__.startswith("transformers.models.")
    # Without torchvision the stock video class is a placeholder, but its name is the one transformers maps.
    assert video_processor_class_from_name(config["video_processor"]["video_processor_type"]) is not None
    assert config["video_processor"]["patch_size"] == config["image_processor"]["patch_size"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["processor_class"] == config["processor_class"]
    written = " ".join(p.read_text() for p in folder.iterdir() if p.suffix in (".json", ".jinja"))
    assert "ImageOnly" not in written


def _overlay_env() -> dict[str, str]:
    if not (TORCHVISION_OVERLAY / "torchvision").is_dir():
        pytest.skip(f"no torchvision overlay in {TORCHVISION_OVERLAY}: run `make build/.stamps/torchvision-overlay`")
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(TORCHVISION_OVERLAY), str(REPO)])}


def _run(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


OURS = """
import json, sys
from pathlib import Path
import torch
from transformers import Qwen3VLProcessor
from transformers.utils import is_torchvision_available
from fashionmv_builder.procir.data import load_eval_data
from fashionmv_builder.procir.evaluate import encode_gallery, encode_queries
from fashionmv_builder.procir.model import ProCIREncoder
model, data_dir, images, out = sys.argv[1:5]
assert is_torchvision_available()
encoder = ProCIREncoder.from_pretrained(model, dtype=torch.bfloat16).eval()
data = load_eval_data(Path(data_dir), Path(images), ("deepfashion", "f200k"))
docs = encode_gallery(encoder, data.gallery, data.views, 1, 0)
queries, sources = encode_queries(encoder, data.queries, data.views, 1, 0)
Path(out).write_text(json.dumps({
    "docs": {key[1]: v.tolist() for key, v in docs.items()},
    "queries": [[sources[(q.dataset, q.source_id)].tolist(), q.embedding.tolist()] for q in queries],
}))
"""


@pytest.mark.slow
def test_stock_transformers_read_a_trained_checkpoint_as_fashionmv_does(trained_dir, fixture_dirs, tmp_path):
    env = _overlay_env()
    data, images = fixture_dirs
    protocol = str(REPO / "tests" / "fashionmv_protocol.py")
    # One sample per forward: bf16 sums depend on the batch's shape, so only unbatched vectors can be bit-identical.
    _run([protocol, "1", str(trained_dir), str(data), str(images), str(tmp_path / "unbatched.json")], env)
    ref = json.loads((tmp_path / "unbatched.json").read_text())

    ours = tmp_path / "ours.json"
    _run(["-c", OURS, str(trained_dir), str(data), str(images), str(ours)], env)
    got = json.loads(ours.read_text())
    assert sorted(got["docs"]) == sorted(ref["embeddings"]["docs"])
    for pid, vector in ref["embeddings"]["docs"].items():
        np.testing.assert_array_equal(np.array(got["docs"][pid]), np.array(vector), err_msg=pid)
    np.testing.assert_array_equal(np.array(got["queries"]), np.array(ref["embeddings"]["queries"]))

    # The authors' default batch of 10, against ours at two batch sizes: the same R@1/5/10.
    _run([protocol, "10", str(trained_dir), str(data), str(images), str(tmp_path / "batched.json")], env)
    ref = json.loads((tmp_path / "batched.json").read_text())

    cli = "from fashionmv_builder.cli import app; app()"
    out = tmp_path / "ours"
    for batch_size in (10, 3):
        args = ["evaluate", "--model", str(trained_dir), "--data-dir", str(data), "--image-root", str(images)]
        args += ["--datasets", ",".join(DATASETS), "--output-dir", str(out / str(batch_size)), "--dtype", "bf16"]
        _run(["-c", cli, *args, "--batch-size", str(batch_size)], env)
        results = json.loads((out / str(batch_size) / "eval_results.json").read_text())
        assert results.pop("dtype") == "bf16"
        assert results == ref["results"], batch_size
