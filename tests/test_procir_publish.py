"""`fashionmv publish-model` against the Hub-compatible endpoint (tests/hub_server.py) with the real huggingface_hub
client: the checkpoint and its card go up, a rerun uploads nothing, and the downloaded snapshot gives the same
embeddings as the local folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub, serve_hub
from PIL import Image
from typer.testing import CliRunner

from fashionmv_builder.cli import app
from fashionmv_builder.procir.model import ProCIREncoder
from fashionmv_builder.procir.train import TrainConfig, train
from fashionmv_builder.procir.train_data import load_fashionmv_train

TOKEN = "hf_fixtureSECRET0123456789abcdef"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    with serve_hub(TOKEN) as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        # Downloads build their URLs from this template, made from the endpoint at import time.
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield fake


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> Path:
    """Two steps of training on four products, then eval results beside the model as `fashionmv evaluate` writes."""
    root = tmp_path_factory.mktemp("publish-model")
    for i in range(4):
        folder = root / "images" / "f200k" / str(10 + i)
        folder.mkdir(parents=True)
        Image.new("RGB", (40 + 8 * i, 48), (60 * i, 20, 200)).save(folder / "0.jpg")
    data = root / "data"
    data.mkdir()
    rows = [{"source_id": 10 + i, "target_id": 10 + (i + 1) % 4, "dataset": "f200k"} for i in range(4)]
    (data / "train_triplets.jsonl").write_text(
        "".join(json.dumps(r | {"modification_text_short": f"change {i}"}) + "\n" for i, r in enumerate(rows))
    )
    (data / "train_captions.jsonl").write_text(
        "".join(
            json.dumps({"product_id": 10 + i, "dataset": "f200k", "short_caption": f"top {i}"}) + "\n" for i in range(4)
        )
    )
    out = root / "model"
    provenance = {"base_model": "Qwen/Qwen3.5-0.8B", "data": "FashionMV-layout files"}
    cfg = TrainConfig(batch_size=2, max_steps=2)
    train(ProCIREncoder.from_pretrained(tiny_dir), load_fashionmv_train(data, root / "images"), cfg, out, provenance)
    results = {"Fashion200K_R@1": 25.0, "Fashion200K_R@5": 75.0, "Fashion200K_R@10": 100.0, "dtype": "bf16"}
    (out / "eval_results.json").write_text(json.dumps(results))
    return out


def _publish(*extra: str) -> str:
    result = CliRunner().invoke(app, ["publish-model", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_publish_model_uploads_checkpoint_and_card_and_resumes(hub, trained, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download

    args = [str(trained), "--repo-id", "org/procir-tiny", "--data-repo", "org/fashionmv-sample"]
    first = _publish(*args, "--data-revision", "v1")
    assert "0 unchanged" in first and "1 commit(s)" in first
    repo = hub.state.repos["model/org/procir-tiny"]
    tree = repo.resolve("main").tree
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= set(tree)
    assert "train_summary.json" in tree and "results/model/eval_results.json" in tree
    assert "train_log.jsonl" not in tree and not any(p.startswith(".publish") for p in tree)

    again = _publish(*args, "--data-revision", "v1")  # the same inputs: nothing to send
    assert "0 file(s) uploaded" in again and "0 commit(s)" in again

    snapshot = Path(snapshot_download("org/procir-tiny", cache_dir=tmp_path / "cache", endpoint=hub.url))
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == "Qwen/Qwen3.5-0.8B" and card.data.datasets == ["org/fashionmv-sample"]
    assert (
        "at revision `v1`" in card.text
        and "| results/model/eval_results.json | bf16 | Fashion200K_R@5 | 75.0 |" in card.text
    )
    assert "`hard_negatives`" in card.text and "`dtype` | `bf16`" in card.text

    views = [[Image.new("RGB", (64, 64), (10, 200, 30))]]
    with torch.no_grad():
        local = ProCIREncoder.from_pretrained(trained).eval().embed_docs(views)
        downloaded = ProCIREncoder.from_pretrained(snapshot).eval().embed_docs(views)
    torch.testing.assert_close(local, downloaded, rtol=0, atol=0)


def test_publish_model_refuses_a_folder_without_weights(hub, tmp_path):
    result = CliRunner().invoke(app, ["publish-model", str(tmp_path), "--repo-id", "org/empty"])
    assert result.exit_code != 0 and "not a model folder" in result.output
    assert "model/org/empty" not in hub.state.repos
