from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 80), quality: int = 90) -> bytes:
    """A small JPEG with content that differs per seed (so perceptual hashes differ too)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def make_jpeg():
    return jpeg_bytes
