"""FashionMV's published evaluation, re-implemented from its reading rules (our words and code, not the authors'),
with stock transformers only: no fashionmv_builder import. Tests run it in a subprocess whose PYTHONPATH holds a
torchvision, as a user of the authors' `evaluate.py` would have, and compare it with ours.

    python fashionmv_protocol.py BATCH_SIZE MODEL DATA_DIR IMAGE_ROOT OUT_JSON [DATASET ...]

Rules followed (shared/reference/procir-reference-code.md): `AutoProcessor.from_pretrained(model)`, then
`processor.tokenizer`; the whole model in bf16; ids as strings; views = the first five `.jpg/.jpeg/.png/.webp` files by
plain string sort, RGB; the chat template with an empty think block patched into every assistant turn; one processor
call per sample with min_pixels 128², max_pixels 512²; batches (10 by default there) right-padded with 0, pixel values
concatenated in bf16; the backbone's last hidden state at `<emb_all>` (document: last, query: first = s, last = q).
Gallery = every source and target with images (first dataset tag wins), queries = triplets whose source and target
both have images, sources missing from the gallery join it with s; per dataset, cosine in float32, `torch.topk`, the
source not excluded; percentages rounded to 2 decimals, averages of R@5 and R@10 over datasets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

EMB = "<emb_all>"
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DISPLAY = {"deepfashion": "DeepFashion", "f200k": "Fashion200K", "fashiongen_val": "FashionGen-val"}
OPEN = "<|im_start|>assistant\n"
THINK = "<think>\n\n</think>\n\n"


def views(root: Path, dataset: str, pid: str) -> list[Path]:
    folder = root / dataset / pid
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES), key=lambda p: p.name)[:5]


def rendered(processor, n_images: int, text: str | None) -> str:
    image_turn = {"role": "user", "content": [{"type": "image"}] * n_images}
    emb_turn = {"role": "assistant", "content": [{"type": "text", "text": EMB}]}
    messages = [image_turn, emb_turn]
    if text is not None:
        messages += [{"role": "user", "content": [{"type": "text", "text": text}]}, emb_turn]
    head, *turns = processor.apply_chat_template(messages, tokenize=False).split(OPEN)
    return OPEN.join([head, *(t if t.startswith("<think>") else THINK + t for t in turns)])


def right_padded(parts: list, key: str) -> torch.Tensor:
    width = max(p[key].shape[1] for p in parts)
    return torch.cat([F.pad(p[key], (0, width - p[key].shape[1]), value=0) for p in parts])


def encode(
    model, processor, emb_id: int, samples: list[tuple[list[Path], str | None]], batch: int
) -> list[torch.Tensor]:
    """(first, last) pooled vectors per sample, in float32."""
    out = []
    for start in range(0, len(samples), batch):
        parts = []
        for paths, text in samples[start : start + batch]:
            images = [Image.open(p).convert("RGB") for p in paths]
            parts.append(
                processor(
                    text=[rendered(processor, len(images), text)],
                    images=images,
                    return_tensors="pt",
                    min_pixels=128 * 128,
                    max_pixels=512 * 512,
                )
            )
        inputs = {
            "input_ids": right_padded(parts, "input_ids"),
            "attention_mask": right_padded(parts, "attention_mask"),
            "pixel_values": torch.cat([p["pixel_values"] for p in parts]).to(torch.bfloat16),
            "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
        }
        if "mm_token_type_ids" in parts[0]:
            inputs["mm_token_type_ids"] = right_padded(parts, "mm_token_type_ids")
        model.model.rope_deltas = None
        with torch.no_grad():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
        for row, ids in enumerate(inputs["input_ids"]):
            where = (ids == emb_id).nonzero().flatten()
            out.append(torch.stack([hidden[row, where[0]], hidden[row, where[-1]]]).float())
    return out


def main(batch: str, model_dir: str, data_dir: str, image_root: str, out_json: str, *datasets: str) -> None:
    root = Path(image_root)
    processor = AutoProcessor.from_pretrained(model_dir)
    emb_id = processor.tokenizer.convert_tokens_to_ids(EMB)
    model = Qwen3_5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    rows = [json.loads(line) for line in (Path(data_dir) / "val_triplets.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if not datasets or r["dataset"] in datasets]
    tag: dict[str, str] = {}
    for r in rows:
        for pid in (str(r["source_id"]), str(r["target_id"])):
            tag.setdefault(pid, r["dataset"])
    products = sorted(pid for pid in tag if views(root, tag[pid], pid))
    docs = encode(model, processor, emb_id, [(views(root, tag[p], p), None) for p in products], int(batch))
    gallery = {p: d[1] for p, d in zip(products, docs, strict=True)}
    queries = [r for r in rows if all(views(root, r["dataset"], str(r[k])) for k in ("source_id", "target_id"))]
    samples = [(views(root, r["dataset"], str(r["source_id"])), r["modification_text_short"]) for r in queries]
    pooled = encode(model, processor, emb_id, samples, int(batch))
    for r, (s, _) in zip(queries, pooled, strict=True):
        gallery.setdefault(str(r["source_id"]), s)
    results: dict[str, float] = {}
    averaged: dict[int, list[float]] = {5: [], 10: []}
    for ds in sorted({r["dataset"] for r in rows}):
        ids = [p for p in gallery if tag[p] == ds]
        index = {p: i for i, p in enumerate(ids)}
        mine = [
            (q[1], index[str(r["target_id"])])
            for r, q in zip(queries, pooled, strict=True)
            if r["dataset"] == ds and str(r["target_id"]) in index
        ]
        if not mine:
            continue
        g = F.normalize(torch.stack([gallery[p] for p in ids]), dim=-1)
        scores = F.normalize(torch.stack([q for q, _ in mine]), dim=-1) @ g.T
        truth = torch.tensor([t for _, t in mine])
        for k in (1, 5, 10):
            top = scores.topk(min(k, len(ids)), dim=1).indices
            value = 100.0 * (top == truth[:, None]).any(dim=1).float().mean().item()
            results[f"{DISPLAY.get(ds, ds)}_R@{k}"] = round(value, 2)
            if k in averaged:
                averaged[k].append(value)
    for k, values in averaged.items():
        if values:
            results[f"Average_R@{k}"] = round(sum(values) / len(values), 2)
    embeddings = {
        "docs": {p: d[1].tolist() for p, d in zip(products, docs, strict=True)},
        "queries": [[s.tolist(), q.tolist()] for s, q in pooled],
    }
    Path(out_json).write_text(json.dumps({"results": results, "embeddings": embeddings}))


if __name__ == "__main__":
    main(*sys.argv[1:])
