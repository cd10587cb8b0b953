"""The ProCIR model wrapper on a tiny random-weight Qwen3.5 (CPU): prompts, `<emb_all>`, pooling, prefix property."""

import numpy as np
import pytest
import torch
from PIL import Image

from fashionmv_builder.procir.model import (
    EMB_TOKEN,
    ProCIREncoder,
    doc_messages,
    ensure_emb_token,
    first_and_last,
    load_processor,
    patch_think,
    query_messages,
    render,
    single_turn_messages,
    text_messages,
)

IMG = "<|vision_start|><|image_pad|><|vision_end|>"  # one image before the processor expands <|image_pad|>


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    torch.manual_seed(0)
    return ProCIREncoder.from_pretrained(tiny_dir).eval()


def _images(seed: int, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_rendered_prompts_match_reference_layout(encoder):
    # The layouts of FashionMV's released ProCIR code, rendered with the tiny model's stand-in template.
    # Unverified against the real Qwen3.5 tokenizer and chat template, which are not reachable here.
    think = "<think>\n\n</think>\n\n"
    doc = f"<|im_start|>user\n{IMG}{IMG}<|im_end|>\n<|im_start|>assistant\n{think}<emb_all><|im_end|>\n"
    assert render(encoder.processor, doc_messages(2)) == doc
    assert render(encoder.processor, query_messages(2, "Make it red.")) == (
        doc + f"<|im_start|>user\nMake it red.<|im_end|>\n<|im_start|>assistant\n{think}<emb_all><|im_end|>\n"
    )
    assert render(encoder.processor, single_turn_messages(1, "Make it red.")) == (
        f"<|im_start|>user\n{IMG}Make it red.<|im_end|>\n<|im_start|>assistant\n{think}<emb_all><|im_end|>\n"
    )
    assert render(encoder.processor, text_messages("a red coat")) == (
        f"<|im_start|>user\na red coat<|im_end|>\n<|im_start|>assistant\n{think}<emb_all><|im_end|>\n"
    )


def test_patch_think_fills_every_assistant_turn_and_keeps_cot_blocks():
    bare = "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<emb_all><|im_end|>\n"
    cot = "<|im_start|>assistant\n<think>\na long caption\n</think>\n\n<emb_all><|im_end|>\n"
    assert patch_think(bare + cot) == bare.replace("<emb_all>", "<think>\n\n</think>\n\n<emb_all>") + cot
    assert patch_think(patch_think(bare)) == patch_think(bare)


def test_emb_token_is_added_once_without_shrinking_the_matrix(tiny_dir):
    from transformers import Qwen3_5ForConditionalGeneration

    processor = load_processor(tiny_dir)
    vlm = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_dir)
    tokens, rows = len(processor.tokenizer), vlm.get_input_embeddings().num_embeddings
    assert EMB_TOKEN not in processor.tokenizer.get_vocab()  # like the base Qwen3.5
    assert rows > tokens + 1
    token_id = ensure_emb_token(processor, vlm)
    assert token_id == tokens and len(processor.tokenizer) == tokens + 1
    assert ensure_emb_token(processor, vlm) == token_id and len(processor.tokenizer) == tokens + 1
    assert vlm.get_input_embeddings().num_embeddings == rows
    assert processor.tokenizer(f"a{EMB_TOKEN}b", add_special_tokens=False)["input_ids"].count(token_id) == 1


def test_emb_token_grows_a_matrix_without_spare_rows(tiny_dir):
    from transformers import Qwen3_5ForConditionalGeneration

    processor = load_processor(tiny_dir)
    vlm = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_dir)
    vlm.resize_token_embeddings(len(processor.tokenizer))
    token_id = ensure_emb_token(processor, vlm)
    assert vlm.get_input_embeddings().num_embeddings == token_id + 1


def test_saved_model_keeps_its_emb_token(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    reloaded = ProCIREncoder.from_pretrained(tmp_path)
    assert reloaded.emb_token_id == encoder.emb_token_id
    assert len(reloaded.processor.tokenizer) == len(encoder.processor.tokenizer)


def test_emb_token_positions(encoder):
    views = _images(0, [(64, 64), (96, 64)])
    doc = encoder.prepare_docs([views])["input_ids"][0]
    query = encoder.prepare_queries([views], ["shorter sleeves"])["input_ids"][0]
    emb, im_end = encoder.emb_token_id, encoder.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    [doc_pos] = (doc == emb).nonzero().flatten().tolist()
    query_pos = (query == emb).nonzero().flatten().tolist()
    assert len(query_pos) == 2
    # <emb_all> is not the last token: <|im_end|> and a newline follow it.
    assert doc_pos == len(doc) - 3 and doc[doc_pos + 1] == im_end
    # Turn 1 of the query is token-identical to the document prompt, up to and including the first <emb_all>.
    assert query_pos[0] == doc_pos and torch.equal(query[: doc_pos + 1], doc[: doc_pos + 1])
    first, last = first_and_last(torch.stack([query]), emb)
    assert (first.item(), last.item()) == (query_pos[0], query_pos[1])


def test_pooling_needs_the_emb_token():
    with pytest.raises(ValueError):
        first_and_last(torch.tensor([[1, 2, 3], [4, 7, 6]]), 7)


def test_views_and_pixels_are_bounded(encoder):
    tiny, huge = _images(1, [(40, 40), (2000, 1500)])
    grids = encoder.prepare_docs([[tiny] * 6, [huge]])["image_grid_thw"]
    assert len(grids) == 6  # five views of the first product, one of the second
    pixels = grids[:, 1] * grids[:, 2] * 16 * 16
    assert int(pixels[0]) == 128 * 128 and 128 * 128 <= int(pixels[-1]) <= 512 * 512


@torch.no_grad()
def test_source_embedding_equals_document_embedding(encoder):
    """s of a two-turn query equals d of the same product (the prefix property), alone or in a padded batch."""
    short, long_ = _images(2, [(64, 64)]), _images(3, [(64, 96), (96, 64), (64, 64)])
    d = encoder.embed_docs([short, long_])
    s, q = encoder.embed_queries([long_, short], ["a longer hem with a wide belt", "red"])
    torch.testing.assert_close(s, d.flip(0), atol=1e-5, rtol=0)
    assert (q - s).abs().max() > 1e-3  # q does see the text
    [s_alone], _ = encoder.embed_queries([short], ["red"])
    torch.testing.assert_close(s_alone, d[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_embeddings_do_not_depend_on_the_batch(encoder):
    a, b = _images(4, [(64, 64)]), _images(5, [(128, 96), (96, 128)])
    alone = encoder.embed_docs([a])[0]
    batched = encoder.embed_docs([b, a])[1]  # `a` is right-padded here
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)
    texts = encoder.embed_texts(["a red coat", "a blue knit sweater with long sleeves and buttons"])
    assert texts.shape == (2, encoder.hidden_size)


def test_embeddings_are_differentiable(tiny_dir):
    encoder = ProCIREncoder.from_pretrained(tiny_dir).train()
    views = _images(6, [(64, 64)])
    d = encoder.embed_docs([views])
    s, q = encoder.embed_queries([views], ["red"])
    (d.sum() + q.sum() + s.sum()).backward()
    grads = {n: p.grad for n, p in encoder.vlm.named_parameters()}
    assert grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["model.language_model.embed_tokens.weight"][encoder.emb_token_id].abs().sum() > 0
