"""The embed stage's image encoders: the real EfficientNet-Lite0 weights, the content-hash cache, the stage's stats."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image

from fashionmv_builder.core.build import EMBEDDINGS, Build
from fashionmv_builder.core.config import ConfigError, ImageEncoderConfig, validate_config
from fashionmv_builder.stages.embed.cache import VectorCache
from fashionmv_builder.stages.embed.encoders import image_encoder

SKLEARN_IMAGES = Path(sklearn.__file__).parent / "datasets" / "images"  # china.jpg, flower.jpg: real photographs


def _jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def lite0():
    return image_encoder(ImageEncoderConfig(backend="efficientnet-lite0"), threads=2)


def test_lite0_has_the_real_imagenet_weights(lite0):
    """Through the encoder's own preprocessing, the checkpoint's classifier calls the flower a daisy (ImageNet 985)
    and the Summer Palace photograph a palace, dome or bell cote: random weights would not."""
    import torch

    for name, classes in (("flower.jpg", {985}), ("china.jpg", {442, 538, 698})):
        pixels = lite0._pixels((SKLEARN_IMAGES / name).read_bytes())
        x = (torch.from_numpy(np.array(pixels[None])).permute(0, 3, 1, 2).float() / 255 - 0.498) / 0.502
        with torch.inference_mode():
            logits = lite0.model._fc(lite0.model.extract_features(x).mean(dim=(2, 3)))
        assert int(logits.argmax()) in classes, name


def test_lite0_vectors_are_unit_and_follow_content(lite0):
    flower = Image.open(SKLEARN_IMAGES / "flower.jpg")
    china = Image.open(SKLEARN_IMAGES / "china.jpg")
    w, h = flower.size
    cropped = flower.crop((round(0.03 * w), round(0.03 * h), round(0.97 * w), round(0.97 * h)))
    vectors = lite0.encode([_jpeg(flower), _jpeg(cropped), _jpeg(china)])
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.9 > vectors[0] @ vectors[2]
    assert lite0.encode([]).shape == (0, 1280)


def test_endpoint_backend_needs_its_server_named():
    with pytest.raises(ConfigError, match="endpoint backend needs endpoint and model"):
        validate_config(
            {
                "output_dir": "/tmp/x",
                "sources": [{"kind": "folder", "dataset": "d", "root": "."}],
                "embed": {"image": {"backend": "endpoint"}},
            }
        )
    with pytest.raises(ConfigError, match=r"embed\.image\.backend"):
        validate_config(
            {
                "output_dir": "/tmp/x",
                "sources": [{"kind": "folder", "dataset": "d", "root": "."}],
                "embed": {"image": {"backend": "clip-from-the-internet"}},
            }
        )


def test_cache_returns_what_was_put_and_drops_a_file_cut_short(tmp_path):
    build = Build(str(tmp_path))
    cache = VectorCache(*build.image_vector_cache(None), {"encoder": "x", "revision": "1"})
    vectors = {hashlib.sha256(bytes([i])).hexdigest(): np.arange(4, dtype=np.float32) + i for i in range(3)}
    cache.put(vectors)
    got = cache.get([*vectors, "0" * 64])
    assert set(got) == set(vectors) and all(np.array_equal(got[h], vectors[h]) for h in vectors)
    first = next(iter(vectors))
    path = Path(cache._path(first))
    path.write_bytes(path.read_bytes()[:-3])  # a crash mid-write
    assert set(cache.get(list(vectors))) == set(vectors) - {first}
    other = VectorCache(*build.image_vector_cache(None), {"encoder": "x", "revision": "2"})
    assert other.get(list(vectors)) == {}  # another revision never reads these vectors


@pytest.mark.slow
def test_embed_stage_encodes_each_view_once_and_records_its_speed(tmp_path):
    """A small ground-truth build up to embed, with the real EfficientNet-Lite0: every view encoded once (dedupe's
    learned pass and embed share the cache); embedding again from scratch takes every vector from the cache."""
    from fashionmv_builder.devtools.ground_truth_server import MODEL_NAME, TRUTH_WORDS, serve_ground_truth
    from fashionmv_builder.devtools.sample_catalogue import generate_sample
    from fashionmv_builder.pipeline import run_local

    catalogue = tmp_path / "catalogue"
    generate_sample(catalogue, products=30, seed=3)
    config = {
        "output_dir": str(tmp_path / "out"),
        "shard_size": 15,
        "workers": 2,
        "sources": [{"kind": "deepfashion", "dataset": "a", "root": str(catalogue / "deepfashion")}],
        "verify": {"remove": False},
    }
    with serve_ground_truth(catalogue, media_root=tmp_path) as (url, _):
        config["lmm"] = {"endpoints": [url], "model": MODEL_NAME, "words": TRUTH_WORDS, "breaker_min_products": 50}
        run_local(validate_config(config), ["ingest", "dedupe", "caption", "verify", "embed"])
        build = Build(config["output_dir"])
        stats = build.stats("embed", "a")
        views = stats["counts"]["views_in"]
        counts = stats["counts"]
        assert views > 20 and counts["image_views_encoded"] + counts["image_views_from_cache"] == views
        assert stats["image_encoder"]["encoder"] == "efficientnet-lite0"
        assert stats["image_views_per_second"] > 0 and stats["peak_rss_mb"] > 100
        vectors = np.asarray(build.read(EMBEDDINGS, "a").column("image").to_pylist())
        assert vectors.shape[1] == 1280 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

        shutil.rmtree(tmp_path / "out" / "embed")  # a rerun from scratch finds every view in the cache
        run_local(validate_config(config), ["embed"])
        again = build.stats("embed", "a")["counts"]
        assert again["image_views_encoded"] == 0 and again["image_views_from_cache"] == views
        assert build.read(EMBEDDINGS, "a").column("image").to_pylist() == vectors.tolist()

        config["embed"] = {"image": {"backend": "gradient-histogram"}}  # another encoder: its hash redoes the shards
        reports = run_local(validate_config(config), ["embed"])["embed"]
        assert all(r.skipped == 0 for r in reports)
        assert len(build.read(EMBEDDINGS, "a").column("image")[0]) == 144


@pytest.mark.slow
def test_endpoint_backend_against_a_real_vllm_embedding_server(tmp_path):
    """The `endpoint` backend against vLLM serving the tiny random-weight CLIP (make's tiny-clip stamp) as a pooling
    model: one unit vector per image, the same image gives the same vector, and the encoder names its model."""
    from conftest import REPO, VLLM_PYTHON

    from fashionmv_builder.lmm.server import ServerSpec, VllmServer, free_port

    model = REPO / "build" / "models" / "tiny-clip"
    if not VLLM_PYTHON.exists() or not (model / "config.json").exists():
        pytest.fail("the vLLM venv or tiny-clip is missing: run `make setup` (this test needs the real server)")
    spec = ServerSpec(
        python=VLLM_PYTHON,
        model=model,
        served_name="tiny-clip",
        port=free_port(),
        dtype="float32",
        max_model_len=77,
        max_images=1,  # CLIP embeds one image per request
        extra_args=("--runner", "pooling"),
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    server = VllmServer(spec, tmp_path / "vllm-server-tiny-clip")
    server.start(timeout_s=600)
    try:
        encoder = image_encoder(
            ImageEncoderConfig(backend="endpoint", endpoint=server.spec.url, model="tiny-clip", revision="r1")
        )
        flower, china = (SKLEARN_IMAGES / "flower.jpg").read_bytes(), (SKLEARN_IMAGES / "china.jpg").read_bytes()
        png = io.BytesIO()
        Image.open(SKLEARN_IMAGES / "china.jpg").save(png, "PNG")
        vectors = encoder.encode([flower, china, flower, png.getvalue()])
        assert vectors.shape == (4, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(vectors[0], vectors[1], atol=1e-3)
        assert vectors[1] @ vectors[3] > 0.99  # a PNG is sent re-encoded as JPEG: the same picture
        assert encoder.identity == {"encoder": "endpoint", "revision": "r1", "model": "tiny-clip"}
    finally:
        server.stop()


def test_transformers_backend_runs_a_clip_image_tower_and_a_dinov2_backbone(tmp_path):
    """The `transformers` backend on two tiny random-weight models built here, one of each kind it handles: a CLIP
    (projected image features) and a DINOv2 backbone (pooled output), each through its own image processor."""
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    clip, dino = tmp_path / "tiny-clip", tmp_path / "tiny-dinov2"
    vision = {**small, "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=small, vision_config=vision, projection_dim=24)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    Dinov2Model(Dinov2Config(**small, image_size=28, patch_size=14)).save_pretrained(dino)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)

    flower, china = (SKLEARN_IMAGES / "flower.jpg").read_bytes(), (SKLEARN_IMAGES / "china.jpg").read_bytes()
    for model, dim in ((clip, 24), (dino, 32)):
        encoder = image_encoder(ImageEncoderConfig(backend="transformers", model=str(model), batch_size=2), threads=2)
        vectors = encoder.encode([flower, china, flower])
        assert vectors.shape == (3, dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(vectors[0], vectors[1], atol=1e-3)
        assert encoder.identity == {"encoder": "transformers", "revision": "", "model": str(model)}
    with pytest.raises(ConfigError, match="transformers backend needs model"):
        validate_config(
            {
                "output_dir": "/tmp/x",
                "sources": [{"kind": "folder", "dataset": "d", "root": "."}],
                "embed": {"image": {"backend": "transformers"}},
            }
        )
