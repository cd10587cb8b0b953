"""The optional SFT stage before contrastive training (FashionMV, arXiv 2604.10297): knowledge injection by
next-token cross-entropy on assistant tokens only, over two tasks built from the train split.

1. Caption generation, one turn: the product's views -> `<think>`per-view captions`</think>` then a JSON object with
   the long and the short caption.
2. Triplet generation, three turns: the source's views -> `<think>`source captions`</think><emb_all>`; the target's
   views -> `<think>`target captions`</think><emb_all>`; then the modification text as JSON.

The paper does not print the frames. Assumptions (ours): turn 3 is asked by a fixed user instruction
(`TRIPLET_INSTRUCTION`); the think blocks hold the per-view captions where the data has them and the long caption
otherwise (FashionMV's release may lack per-view captions); the JSON keys are our table's column names.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BatchFeature, Qwen3VLProcessor

from fashionmv_builder.procir.data import Triplet, load_views
from fashionmv_builder.procir.model import (
    ASSISTANT_OPEN,
    MAX_VIEWS,
    Message,
    doc_messages,
    tokenize,
)
from fashionmv_builder.procir.recall import ProductKey
from fashionmv_builder.procir.train_data import TrainSet

TRIPLET_INSTRUCTION = "Write the modification text that turns the first product into the second."
IGNORE = -100  # the label torch's cross-entropy skips


@dataclass(frozen=True)
class SftSample:
    """One conversation: its messages, the think text of each assistant turn, and the images in order."""

    messages: list[Message]
    thinks: tuple[str, ...]
    views: tuple[Path, ...]


def _answer(content: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": content}]}


def _think_text(data: TrainSet, key: ProductKey, count: int) -> str:
    per_view = data.view_captions.get(key, [])[:count]
    return "\n".join(per_view) if per_view else data.captions[key].long_caption or data.captions[key].short_caption


def caption_sample(data: TrainSet, key: ProductKey) -> SftSample:
    views = data.views[key][:MAX_VIEWS]
    caption = data.captions[key]
    answer = json.dumps({"long_caption": caption.long_caption or "", "short_caption": caption.short_caption})
    messages = [doc_messages(len(views))[0], _answer(answer)]
    return SftSample(messages, (_think_text(data, key, len(views)),), tuple(views))


def triplet_sample(data: TrainSet, t: Triplet) -> SftSample:
    source, target = (t.dataset, t.source_id), (t.dataset, t.target_id)
    src_views, tgt_views = data.views[source][:MAX_VIEWS], data.views[target][:MAX_VIEWS]
    texts = {"modification_text_short": t.modification_text_short}
    if t.modification_text_long:
        texts["modification_text_long"] = t.modification_text_long
    messages = [
        *doc_messages(len(src_views)),
        *doc_messages(len(tgt_views)),
        {"role": "user", "content": [{"type": "text", "text": TRIPLET_INSTRUCTION}]},
        _answer(json.dumps(texts)),
    ]
    thinks = (_think_text(data, source, len(src_views)), _think_text(data, target, len(tgt_views)), "")
    return SftSample(messages, thinks, (*src_views, *tgt_views))


def sft_samples(data: TrainSet, seed: int) -> list[SftSample]:
    """One caption sample per product and one triplet sample per triplet, shuffled."""
    samples = [caption_sample(data, key) for key in data.products()]
    samples += [triplet_sample(data, t) for t in data.triplets]
    random.Random(seed).shuffle(samples)
    return samples


def assistant_labels(input_ids: torch.Tensor, processor: Qwen3VLProcessor) -> torch.Tensor:
    """Labels equal to the ids inside assistant turns (after `<|im_start|>assistant\\n`, up to and including
    `<|im_end|>`), IGNORE elsewhere: user turns, images and padding carry no loss."""
    tokenizer = processor.tokenizer
    header = tokenizer.encode(ASSISTANT_OPEN, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, IGNORE)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for i, token in enumerate(ids):
            if not inside and i + 1 >= len(header) and ids[i + 1 - len(header) : i + 1] == header:
                inside = True
            elif inside:
                labels[row, i] = token
                inside = token != end
    return labels


def prepare_sft(processor: Qwen3VLProcessor, samples: Sequence[SftSample]) -> tuple[BatchFeature, torch.Tensor]:
    inputs = tokenize(
        processor,
        [s.messages for s in samples],
        [load_views(s.views) for s in samples],
        [s.thinks for s in samples],
    )
    return inputs, assistant_labels(inputs["input_ids"], processor)
