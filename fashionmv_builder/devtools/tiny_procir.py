"""A tiny random-weight Qwen3.5 with an offline tokenizer and chat template: the ProCIR backbone for tests on CPU.

Same architecture family as Qwen3.5-0.8B (hybrid Gated-DeltaNet + full attention, M-RoPE, ViT with 2×2 merge, one
visual token per 32×32 px) at ~1.2M parameters, built offline (no weights can be downloaded here). Like the base
Qwen3.5 it has no `<emb_all>` token yet and spare embedding rows, so loading it exercises the add-without-shrinking
path.

The chat template renders what the wrapper relies on from Qwen3.5's: no default system turn, an image item as
`<|vision_start|><|image_pad|><|vision_end|>`, and an empty think block only in assistant turns after the last user
message. It is a stand-in, not the real template, which is not reachable here.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2VLImageProcessorPil, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5Tokenizer

from fashionmv_builder.procir.model import MAX_PIXELS, MIN_PIXELS, ImageOnlyQwen3VLProcessor

# Qwen's special tokens, in Qwen's order (the ids differ from the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PLAIN_ADDED_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
# Qwen's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_VOCAB = 800
_SPARE_ROWS = 64  # embedding rows beyond the tokenizer, as in the base Qwen3.5 (room for <emb_all>)

CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and loop.index0 > ns.last_user %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    """Fixed garment sentences, so the trained vocabulary is the same on every machine."""
    colours = ["red", "blue", "black", "white", "green", "beige", "navy", "grey", "pink", "brown"]
    materials = ["cotton", "denim", "leather", "wool", "silk", "linen", "knit", "satin"]
    garments = ["shirt", "dress", "jacket", "skirt", "trousers", "sweater", "coat", "blouse", "shorts", "top"]
    details = ["with long sleeves", "with a round neck", "with buttons", "with a zip", "with pockets", "sleeveless"]
    lines = [
        f"A {c} {m} {g} {d}. Change it to a {c2} {g} without the pattern, 0123456789."
        for (c, m, g, d), c2 in zip(
            itertools.product(colours, materials, garments, details), itertools.cycle(reversed(colours)), strict=False
        )
    ]
    return lines


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    # Qwen3_5Tokenizer wants merges as pairs; the serialised form may hold "a b" strings or [a, b] lists.
    raw = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw]
    return bpe.get_vocab(), merges


def build_tokenizer() -> Qwen3_5Tokenizer:
    vocab, merges = _train_bpe()
    tokenizer = Qwen3_5Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Qwen3_5Tokenizer) -> ImageOnlyQwen3VLProcessor:
    # The PIL backend, so the saved folder loads with or without torchvision.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


# Qwen3.5-0.8B's published shape (FashionMV, arXiv 2604.10297), for speed and memory figures on a GPU with
# random weights. The linear-attention head split and the ViT's MLP width are not published: ours are assumptions.
FULL_SIZE_TEXT = {
    "vocab_size": 248_320,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 24,  # 18 Gated-DeltaNet + 6 full-attention layers (full_attention_interval 4)
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 32_768,
    "mrope_section": [11, 11, 10],  # 0.25 × 256 = 64 rotary dims = 32 frequencies
}
FULL_SIZE_VISION = {
    "depth": 12,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_heads": 12,
    "out_hidden_size": 1024,
}


def build_config(tokenizer: Qwen3_5Tokenizer, full_size: bool = False) -> Qwen3_5Config:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_rows = -(-(len(tokenizer) + _SPARE_ROWS) // 64) * 64
    text_config = {
        "vocab_size": vocab_rows,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,  # three Gated-DeltaNet layers, then one full-attention layer
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "max_position_embeddings": 4096,
        # 0.25 × head_dim 32 = 8 rotary dims = 4 frequencies; mrope_section must sum to 4 or it is clipped silently.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": full_size,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 128,  # = the text hidden size
        "num_position_embeddings": 256,
    }
    if full_size:
        mrope_section = FULL_SIZE_TEXT["mrope_section"]
        text_config |= {k: v for k, v in FULL_SIZE_TEXT.items() if k != "mrope_section"}
        text_config["rope_parameters"] = text_config["rope_parameters"] | {"mrope_section": mrope_section}
        vision_config |= FULL_SIZE_VISION
    return Qwen3_5Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=full_size,  # the 0.8B model ties its 248K-row embedding and LM head
    )


def build_tiny_procir(out: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Write a loadable tiny Qwen3.5 (weights, config, tokenizer, processor, chat template) into `out`; with
    `full_size`, the same with Qwen3.5-0.8B's layer sizes (random weights, our tiny tokenizer)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(build_config(tokenizer, full_size))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    build_processor(tokenizer).save_pretrained(str(out))
    return out
