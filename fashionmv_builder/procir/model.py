"""The ProCIR embedding model: a Qwen3.5 vision-language backbone pooled at the `<emb_all>` token.

Follows FashionMV's released ProCIR code. Only the backbone (`vlm.model`) runs; the embedding is its
last-layer hidden state at `<emb_all>`, with no head and no normalisation (scoring normalises). Prompts have no system
turn and no instruction:

- document: user = the product's views; assistant = `<emb_all>`                          -> d (the last `<emb_all>`)
- two-turn query: user = source views; assistant = `<emb_all>`; user = modification text;
  assistant = `<emb_all>`                                                                 -> s (first), q (last)
- single-turn query: user = source views + modification text; assistant = `<emb_all>`    -> q
- text: user = text; assistant = `<emb_all>`                                              -> t (caption alignment)

Every assistant turn starts with an empty think block, which the Qwen3.5 chat template writes only after the last
user message, so it is patched in. Turn 1 of a query renders byte-identically to the document prompt, so s(P) = d(P)
for the causal model (the prefix property).

Images are resized by the processor to 128²–512² pixels, at most five views per product. Without torchvision the
image processor is the PIL variant, whose pixel values differ from the torchvision one by at most one 8-bit level:
exact reproduction of published numbers needs torchvision installed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import AutoProcessor, BatchFeature, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

EMB_TOKEN = "<emb_all>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
ASSISTANT_OPEN = "<|im_start|>assistant\n"
MIN_PIXELS = 128 * 128
MAX_PIXELS = 512 * 512
MAX_VIEWS = 5
# `--dtype` names; bf16 is the reference's precision for the whole model, in evaluation and training.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_LEADING_THINK = re.compile(r"^<think>.*?</think>\n\n", re.DOTALL)

Message = dict[str, object]
Images = Sequence[Image.Image]


# What a saved model folder names, so stock transformers (and FashionMV's evaluate.py) load their own classes.
STOCK_PROCESSOR = "Qwen3VLProcessor"
STOCK_VIDEO_PROCESSOR = "Qwen3VLVideoProcessor"
_SHARED_WITH_VIDEO = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without the video slot: the video processor needs torchvision, which we don't install.

    It only ever loads: a saved folder names the stock Qwen3VLProcessor and carries a video processor section (the
    stock class's defaults, with the image processor's geometry and normalisation), so it is an ordinary Qwen3.5
    checkpoint for transformers, the Hub and FashionMV's code wherever torchvision is installed.
    """

    # ProcessorMixin takes its sub-processors from this signature, so the video_processor=None passed on is dropped.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    def to_dict(self) -> dict:
        out = super().to_dict()
        image = out.get("image_processor", {})
        video = {key: image[key] for key in _SHARED_WITH_VIDEO if key in image}
        return out | {
            "processor_class": STOCK_PROCESSOR,
            "video_processor": {"video_processor_type": STOCK_VIDEO_PROCESSOR, **video},
        }

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        saved = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        # The base class stamps our class name into tokenizer_config.json; the stock name replaces it.
        self.tokenizer._set_processor_class(STOCK_PROCESSOR)
        self.tokenizer.save_pretrained(save_directory)
        return saved


AutoProcessor.register(Qwen3_5Config, ImageOnlyQwen3VLProcessor, exist_ok=True)


# ---- prompts -------------------------------------------------------------------------------------------------------


def _image_items(count: int) -> list[Message]:
    return [{"type": "image"} for _ in range(count)]


def _emb_turn() -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": EMB_TOKEN}]}


def doc_messages(num_images: int) -> list[Message]:
    return [{"role": "user", "content": _image_items(num_images)}, _emb_turn()]


def query_messages(num_images: int, text: str) -> list[Message]:
    """Two turns: the source views, then the modification text verbatim, each answered by `<emb_all>`."""
    return [*doc_messages(num_images), {"role": "user", "content": [{"type": "text", "text": text}]}, _emb_turn()]


def single_turn_messages(num_images: int, text: str) -> list[Message]:
    return [{"role": "user", "content": [*_image_items(num_images), {"type": "text", "text": text}]}, _emb_turn()]


def text_messages(text: str) -> list[Message]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}, _emb_turn()]


def patch_think(rendered: str) -> str:
    """Give every assistant turn an empty think block unless it already starts with one (the CoT hook)."""
    head, *turns = rendered.split(ASSISTANT_OPEN)
    patched = [turn if turn.startswith("<think>") else EMPTY_THINK + turn for turn in turns]
    return ASSISTANT_OPEN.join([head, *patched])


def think_block(text: str = "") -> str:
    """A think block: empty at inference (`think_block() == EMPTY_THINK`), the kept caption words in CoT training."""
    return f"<think>\n{text}\n</think>\n\n"


def fill_think(rendered: str, thinks: Sequence[str | None]) -> str:
    """Replace the think block of assistant turn k with `think_block(thinks[k])` where that is not None."""
    head, *turns = rendered.split(ASSISTANT_OPEN)
    for k, text in enumerate(thinks[: len(turns)]):
        if text is not None:
            turns[k] = think_block(text) + _LEADING_THINK.sub("", turns[k], count=1)
    return ASSISTANT_OPEN.join([head, *turns])


def render(processor: Qwen3VLProcessor, messages: list[Message], thinks: Sequence[str | None] = ()) -> str:
    """The chat template's prompt with a think block in every assistant turn; `thinks` fills some (CoT)."""
    rendered = patch_think(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    return fill_think(rendered, thinks) if thinks else rendered


# ---- loading -------------------------------------------------------------------------------------------------------


def load_processor(path: Path | str) -> ImageOnlyQwen3VLProcessor:
    return ImageOnlyQwen3VLProcessor.from_pretrained(str(path))


def ensure_emb_token(processor: Qwen3VLProcessor, vlm: Qwen3_5ForConditionalGeneration) -> int:
    """The id of `<emb_all>`, added to the tokenizer if missing; the embedding matrix only ever grows.

    The base Qwen3.5 matrix has more rows than the tokenizer has tokens, so the new id usually fits already;
    resizing to len(tokenizer), as the reference code does, would shrink it.
    """
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(EMB_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        tokenizer.add_tokens([AddedToken(EMB_TOKEN, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(EMB_TOKEN)
    if token_id >= vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(token_id + 1)
    return token_id


def first_and_last(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions of the first and the last occurrence of `token_id`; every row must have one."""
    hits = input_ids == token_id
    if not bool(hits.any(dim=1).all()):
        raise ValueError(f"a prompt has no {EMB_TOKEN} token")
    first = hits.int().argmax(dim=1)
    last = input_ids.shape[1] - 1 - hits.flip(1).int().argmax(dim=1)
    return first, last


def tokenize(
    processor: Qwen3VLProcessor,
    conversations: Sequence[list[Message]],
    images: Sequence[Images],
    thinks: Sequence[Sequence[str | None]] | None = None,
) -> BatchFeature:
    """Render and tokenize a batch, right-padded; `images[i]` are the images of conversation i, in order, and
    `thinks[i]` the think texts of its assistant turns (None: empty)."""
    thinks = thinks or [()] * len(conversations)
    prompts = [render(processor, messages, think) for messages, think in zip(conversations, thinks, strict=True)]
    flat = [img for views in images for img in views]
    return processor(
        text=prompts,
        images=flat or None,
        padding=True,
        padding_side="right",  # pads after the last real token: causal layers never see them
        return_tensors="pt",
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )


def _first_turn(cot: Sequence[str] | None, count: int) -> list[tuple[str | None, ...]] | None:
    """Think texts per conversation: the CoT text in the first assistant turn only (the paper: no CoT in turn 2)."""
    return None if cot is None else [(text,) for text in cot[:count]]


def prepare_docs(
    processor: Qwen3VLProcessor, products: Sequence[Images], cot: Sequence[str] | None = None
) -> BatchFeature:
    """Document prompts; like the reference, only the first five views of a product are used. `cot[i]` fills the
    think block of product i (training with chain-of-thought guidance)."""
    products = [views[:MAX_VIEWS] for views in products]
    conversations = [doc_messages(len(views)) for views in products]
    return tokenize(processor, conversations, products, _first_turn(cot, len(products)))


def prepare_queries(
    processor: Qwen3VLProcessor,
    sources: Sequence[Images],
    texts: Sequence[str],
    two_turn: bool = True,
    cot: Sequence[str] | None = None,
) -> BatchFeature:
    sources = [views[:MAX_VIEWS] for views in sources]
    frame = query_messages if two_turn else single_turn_messages
    conversations = [frame(len(views), text) for views, text in zip(sources, texts, strict=True)]
    return tokenize(processor, conversations, sources, _first_turn(cot, len(sources)))


def prepare_texts(processor: Qwen3VLProcessor, texts: Sequence[str]) -> BatchFeature:
    return tokenize(processor, [text_messages(text) for text in texts], [[] for _ in texts])


class ProCIREncoder(torch.nn.Module):
    """Embeddings of documents, queries and texts from one shared backbone; differentiable (wrap in no_grad to eval)."""

    def __init__(self, vlm: Qwen3_5ForConditionalGeneration, processor: Qwen3VLProcessor) -> None:
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.emb_token_id = ensure_emb_token(processor, vlm)

    @classmethod
    def from_pretrained(cls, path: Path | str, dtype: torch.dtype = torch.float32) -> ProCIREncoder:
        vlm = Qwen3_5ForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
        return cls(vlm, load_processor(path))

    def save_pretrained(self, path: Path | str) -> None:
        self.vlm.save_pretrained(str(path))
        self.processor.save_pretrained(str(path))

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def hidden_size(self) -> int:
        return self.vlm.config.text_config.hidden_size

    # -- inputs (module-level functions below, so data-loader workers can run them without the model) --

    def prepare_docs(self, products: Sequence[Images]) -> BatchFeature:
        return prepare_docs(self.processor, products)

    def prepare_queries(self, sources: Sequence[Images], texts: Sequence[str], two_turn: bool = True) -> BatchFeature:
        return prepare_queries(self.processor, sources, texts, two_turn)

    def prepare_texts(self, texts: Sequence[str]) -> BatchFeature:
        return prepare_texts(self.processor, texts)

    # -- forward --

    def _run(self, module: torch.nn.Module, inputs: BatchFeature, **extra: torch.Tensor):
        tensors = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(self.vlm.dtype)
        # M-RoPE deltas are cached on the backbone; a stale value from another batch would shift positions.
        self.vlm.model.rope_deltas = None
        try:
            return module(**tensors, **extra, use_cache=False)
        finally:
            self.vlm.model.rope_deltas = None

    def hidden_states(self, inputs: BatchFeature) -> torch.Tensor:
        """Last-layer hidden states of the backbone (no LM head), [batch, seq, hidden]."""
        return self._run(self.vlm.model, inputs).last_hidden_state

    def lm_loss(self, inputs: BatchFeature, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the full model (LM head included) where `labels` is not -100 (SFT)."""
        return self._run(self.vlm, inputs, labels=labels.to(self.device)).loss

    def pooled(self, inputs: BatchFeature) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at the first and the last `<emb_all>` of each row: (s, q) for queries, (d, d) for docs."""
        hidden = self.hidden_states(inputs)
        first, last = first_and_last(inputs["input_ids"].to(hidden.device), self.emb_token_id)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, first], hidden[rows, last]

    def embed_docs(self, products: Sequence[Images]) -> torch.Tensor:
        return self.pooled(self.prepare_docs(products))[1]

    def embed_queries(self, sources: Sequence[Images], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, q) of two-turn queries from one forward pass."""
        return self.pooled(self.prepare_queries(sources, texts))

    def embed_single_turn(self, sources: Sequence[Images], texts: Sequence[str]) -> torch.Tensor:
        return self.pooled(self.prepare_queries(sources, texts, two_turn=False))[1]

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.pooled(self.prepare_texts(texts))[1]
