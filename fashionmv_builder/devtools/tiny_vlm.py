"""Build the tiny random-weight Qwen2.5-VL (or Qwen2-VL) that tests and the sample serve with vLLM (no download).

Run with the vLLM venv's interpreter: `.venv-vllm/bin/python scripts/build_tiny_vlm.py OUT_DIR`. The weights are
random, so its answers are noise; but it has a real tokenizer, chat template and vision tower, so every request,
structured-output and parsing path runs for real. CPU attention in vLLM needs head_dim >= 64.
"""

import sys
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "A red cotton t-shirt with a crew neck, short sleeves and a chest pocket on the wearer's left.",
    "The back shows a zip; the side view shows a straight hem. Blue denim trousers, slim fit.",
    "Same dress, but with a deep V-neck at the front and criss-cross straps at the back.",
    "front back side detail full image left right not visible men women unisex tee shirt dress skirt jacket bag shoe",
    '{"views": [{"image": 1, "view_type": "front", "caption": "a red tee"}], "long_caption": "", "short_caption": ""}',
    '{"verdict": "pass", "reason": "", "wrong_claims": [], "choices": [{"candidate": 3, "views_involved": ["back"]}]}',
]


def build(out: Path, arch: str = "qwen2.5-vl") -> None:
    tokenizer_model = Tokenizer(models.BPE())
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer_model.train_from_iterator(CORPUS * 40, trainer)
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    token = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32768,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": token("<|endoftext|>"),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]},
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    tokens = {
        "image_token_id": token("<|image_pad|>"),
        "video_token_id": token("<|video_pad|>"),
        "vision_start_token_id": token("<|vision_start|>"),
        "vision_end_token_id": token("<|vision_end|>"),
    }
    if arch == "qwen2-vl":
        # Qwen2-VL's vision tower: no window attention, `embed_dim` inside and `hidden_size` out (the text width)
        qwen2_vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2}
        config = tf.Qwen2VLConfig(
            text_config=text_config, vision_config=qwen2_vision, tie_word_embeddings=True, **tokens
        )
        torch.manual_seed(1)
        model = tf.Qwen2VLForConditionalGeneration(config).eval()
        processor_class = tf.Qwen2VLProcessor
    else:
        config = tf.Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **tokens
        )
        torch.manual_seed(0)
        model = tf.Qwen2_5_VLForConditionalGeneration(config).eval()
        processor_class = tf.Qwen2_5_VLProcessor
    processor = processor_class(
        image_processor=tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=320 * 320),
        tokenizer=tokenizer,
        video_processor=tf.Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"tiny {arch} ({sum(p.numel() for p in model.parameters())} parameters) written to {out}")


if __name__ == "__main__":
    # OUT_DIR [qwen2.5-vl|qwen2-vl]: the second architecture lets tests serve two different models at once
    build(Path(sys.argv[1]), *sys.argv[2:3])
