"""The LMM image cache: resized once, stored by content, safe when shards prepare the same image at once, and the
same bytes (hence the same request keys) as before it cached anything."""

import hashlib
import io
import math
import threading

import numpy as np
import pytest
from PIL import Image

from fashionmv_builder.core.config import validate_config
from fashionmv_builder.lmm.harness import run_budgets
from fashionmv_builder.lmm.media import MediaCache, fit_to_pixels, prepare_views, warm
from fashionmv_builder.stages.caption import CaptionStage

CAPTION, CANDIDATE = 256 * 320, 128 * 160  # the default budgets


def _jpeg(size: tuple[int, int], seed: int | None = None) -> bytes:
    buf = io.BytesIO()
    if seed is None:
        Image.new("RGB", size, (200, 10, 10)).save(buf, format="JPEG")
    else:  # a photo-like image: a gradient with texture, so that resampling differences show in the bytes
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0 : size[1], 0 : size[0]]
        pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1) + rng.normal(
            0, 12, (*y.shape, 3)
        )
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _full_decode(data: bytes, max_pixels: int) -> bytes:
    """Images as prepared before the cache (full decode, bicubic resize): the bytes stored answers are keyed on."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        scale = math.sqrt(max_pixels / (img.width * img.height))
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90)
        return out.getvalue()


def test_resized_to_the_budget_and_stored_by_content(tmp_path):
    data = _jpeg((400, 400))
    prepared = MediaCache(tmp_path, 100 * 100, share_disk=True).prepare(data)
    path = tmp_path / "10000px" / hashlib.sha256(data).hexdigest()[:2] / f"{hashlib.sha256(data).hexdigest()}.jpg"
    assert prepared.url == path.as_uri()
    assert prepared.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Image.open(path).size == (100, 100)
    assert MediaCache(tmp_path, 100 * 100, share_disk=False).prepare(data).url.startswith("data:")
    assert MediaCache(None, 100 * 100, share_disk=True).prepare(data) == MediaCache(
        tmp_path, 100 * 100, share_disk=False
    ).prepare(data)


@pytest.mark.parametrize(
    "size,budget",
    [
        ((256, 320), CAPTION),  # the sample's views: re-encoded only
        ((256, 320), CANDIDATE),  # halved: no reduced decode below a 2× margin
        ((300, 500), CANDIDATE),
        ((1000, 1250), 327_680),  # a 1.25 MP photo at a 7B captioner's budget
        ((1264, 1580), 327_680),  # 2 MP
    ],
)
def test_the_bytes_are_those_of_a_full_decode_where_the_shrink_is_at_most_2x_per_side(size, budget):
    data = _jpeg(size, seed=1)
    assert fit_to_pixels(data, budget) == _full_decode(data, budget)


def test_a_large_shrink_decodes_at_reduced_size_and_looks_the_same():
    data = _jpeg((1000, 1250), seed=2)
    fast, full = fit_to_pixels(data, CANDIDATE), _full_decode(data, CANDIDATE)
    assert fast != full  # DCT-scaled decode: other bytes
    a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16) for x in (fast, full))
    assert a.shape == b.shape == (160, 128, 3)
    assert np.abs(a - b).mean() < 1.5  # measured 0.54 on 1–2 MP photos


def test_one_decode_gives_each_budget_the_bytes_it_would_get_alone(tmp_path):
    data = _jpeg((1000, 1250), seed=3)
    budgets = [327_680, CAPTION, CANDIDATE]
    assert prepare_views(data, budgets) == {b: fit_to_pixels(data, b) for b in budgets}
    caches = [MediaCache(tmp_path, b, share_disk=True) for b in budgets]
    warm(caches, data)
    for cache in caches:
        stored = cache.path(hashlib.sha256(data).hexdigest()).read_bytes()
        assert stored == fit_to_pixels(data, cache.max_pixels)
        assert cache.prepare(data).sha256 == hashlib.sha256(stored).hexdigest()


def test_concurrent_writers_of_one_image_never_fail(tmp_path):
    data, errors = _jpeg((300, 300)), []

    def prepare_many() -> None:
        try:
            for _ in range(30):
                MediaCache(tmp_path, 128 * 128, share_disk=True).prepare(data)
                warm([MediaCache(tmp_path, b, share_disk=True) for b in (128 * 128, 64 * 64)], data)
        except Exception as err:  # what the test is looking for
            errors.append(err)

    threads = [threading.Thread(target=prepare_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.suffix for p in tmp_path.rglob("*") if p.is_file()] == [".jpg", ".jpg"]  # no temporary file left behind


def test_the_run_prepares_every_pixel_budget_its_lmm_stages_send(tmp_path):
    config = validate_config(
        {
            "output_dir": str(tmp_path),
            "sources": [{"kind": "folder", "dataset": "d", "root": str(tmp_path)}],
            "lmm": {"endpoints": ["http://127.0.0.1:9"], "image_max_pixels": 327_680},
            "verify": {"lmm": {"image_max_pixels": 200_000}},
            "triplets": {"candidate_max_pixels": 40_000},
        }
    )
    caches = run_budgets(CaptionStage(config))
    assert [c.max_pixels for c in caches] == [327_680, 200_000, 40_000]
    assert {c.folder for c in caches} == {tmp_path / "lmm-images"}
    captions_only = config.model_copy(
        update={"triplets": config.triplets.model_copy(update={"candidates_as": "captions"})}
    )
    assert [c.max_pixels for c in run_budgets(CaptionStage(captions_only))] == [327_680, 200_000]
