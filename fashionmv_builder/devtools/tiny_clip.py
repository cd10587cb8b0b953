"""Build a tiny random-weight CLIP that vLLM serves as an image embedding model (no download).

Run with the vLLM venv's interpreter: `.venv-vllm/bin/python fashionmv_builder/devtools/tiny_clip.py OUT_DIR`, then
serve it with `--runner pooling`: `/v1/embeddings` takes an image in a chat-style message and returns its vector,
which is what the embed stage's `endpoint` backend sends. The weights are random, so the vectors mean nothing; the
request, the server's image processing and the answer's parsing are real. vLLM's CLIP needs the projection size to
be at least the text width, and an image prompt whose tokens are all special: the chat template renders text only.
"""

import sys
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
# image parts render to nothing: vLLM's CLIP takes an image with an empty (all special tokens) prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)
CORPUS = ["a red cotton t-shirt with a chest pocket", "blue denim trousers, slim fit, a zip at the back"]


def build(out: Path) -> None:
    tokenizer_model = Tokenizer(models.BPE())
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer_model.train_from_iterator(CORPUS * 20, trainer)
    tokenizer_model.add_special_tokens(SPECIAL)  # after the vocabulary: vLLM needs token 0 to be an ordinary one
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model,
        bos_token=SPECIAL[0],
        eos_token=SPECIAL[1],
        pad_token=SPECIAL[1],
        chat_template=CHAT_TEMPLATE,
    )
    token = tokenizer.convert_tokens_to_ids
    config = tf.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,  # head_dim 64: vLLM's CPU attention rejects smaller ones
            "max_position_embeddings": 77,
            "projection_dim": 128,  # vLLM sizes its input buffer from the text config's own projection_dim
            "bos_token_id": token(SPECIAL[0]),
            "eos_token_id": token(SPECIAL[1]),
            "pad_token_id": token(SPECIAL[1]),
        },
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
            "projection_dim": 128,
        },
        projection_dim=128,
    )
    torch.manual_seed(0)
    tf.CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    tf.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
