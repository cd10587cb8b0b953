"""The ProCIR trainer on CPU with the tiny random Qwen3.5: losses by hand, schedules, SFT labels, all 16
configurations, and a 2-process (gloo) step that must equal a 1-process step on the same global batch."""

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_on_two_gloo_processes
from PIL import Image

from fashionmv_builder.procir.losses import StepEmbeddings, duplicate_mask, procir_loss, sym_info_nce
from fashionmv_builder.procir.model import EMB_TOKEN, ProCIREncoder, prepare_docs, prepare_queries, render
from fashionmv_builder.procir.schedule import cot_keep_ratio, keep_words
from fashionmv_builder.procir.sft import IGNORE, caption_sample, prepare_sft, triplet_sample
from fashionmv_builder.procir.train import (
    TrainConfig,
    all_configurations,
    average_gradients,
    contrastive_loss,
    iter_log,
    prepare_contrastive,
    step_indices,
    train,
)
from fashionmv_builder.procir.train_data import load_fashionmv_train

PRODUCTS = 8


def _write_train_fixture(root: Path) -> tuple[Path, Path]:
    """Eight f200k products with two views each, a ring of triplets, captions for all but product 107."""
    rng = np.random.default_rng(0)
    for i in range(PRODUCTS):
        folder = root / "images" / "f200k" / str(100 + i)
        folder.mkdir(parents=True)
        for view in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(folder / f"{view}.jpg")
    data = root / "data"
    data.mkdir()
    triplets = [
        {
            "source_id": 100 + i,
            "target_id": 100 + (i + 1) % PRODUCTS,
            "dataset": "f200k",
            "modification_text_short": f"make it colour {i}",
            "modification_text_long": f"make it colour {i}, keep the cut and add a longer hem",
        }
        for i in range(PRODUCTS)
    ]
    triplets.append({**triplets[0], "target_id": 999, "modification_text_short": "no images for this target"})
    captions = [
        {"product_id": 100 + i, "dataset": "f200k", "short_caption": f"shirt {i}", "long_caption": f"a long shirt {i}"}
        for i in range(PRODUCTS - 1)
    ]
    (data / "train_triplets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triplets))
    (data / "train_captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return data, root / "images"


@pytest.fixture(scope="module")
def train_dirs(tmp_path_factory):
    return _write_train_fixture(tmp_path_factory.mktemp("fashionmv-train"))


@pytest.fixture(scope="module")
def train_set(train_dirs):
    return load_fashionmv_train(*train_dirs)


@pytest.fixture(scope="module")
def negatives_set(train_set):
    """The same triplets, each with the hard negatives a build would give it: three other captioned products."""
    captioned = sorted(pid for _, pid in train_set.captions)
    negatives = {
        t.index: [pid for pid in captioned if pid not in (t.source_id, t.target_id)][t.index % 3 :][:3]
        for t in train_set.triplets
    }
    return dataclasses.replace(train_set, hard_negatives=negatives)


# ---- losses ---------------------------------------------------------------------------------------------------------


def _info_nce_by_hand(
    x: np.ndarray,
    y: np.ndarray,
    tau: float,
    masked: set[tuple[int, int]],
    extra: np.ndarray | None = None,
    extra_masked: set[tuple[int, int]] = frozenset(),
) -> float:
    """Extra rows are further candidates of the x→y direction (hard negatives); `extra_masked` holds (i, extra j)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    sims = x @ y.T / tau
    hard = x @ (extra / np.linalg.norm(extra, axis=1, keepdims=True)).T / tau if extra is not None else None

    def direction(s: np.ndarray, mask: set[tuple[int, int]], more: np.ndarray | None) -> float:
        losses = []
        for i in range(len(s)):
            kept = [math.exp(s[i, j]) for j in range(len(s)) if (i, j) not in mask]
            if more is not None:
                kept += [math.exp(more[i, j]) for j in range(more.shape[1]) if (i, j) not in extra_masked]
            losses.append(-math.log(math.exp(s[i, i]) / sum(kept)))
        return sum(losses) / len(losses)

    return (direction(sims, masked, hard) + direction(sims.T, {(j, i) for i, j in masked}, None)) / 2


X = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
Y = np.array([[0.9, 0.1], [0.0, 1.0], [-1.0, 1.0]])


def test_sym_info_nce_equals_the_hand_computed_value():
    got = sym_info_nce(torch.tensor(X), torch.tensor(Y), tau=0.07)
    assert got.item() == pytest.approx(_info_nce_by_hand(X, Y, 0.07, set()), rel=1e-5)


def test_duplicate_products_are_not_negatives():
    keys = ["a", "b", "b"]  # rows 1 and 2 stand for the same product (x2 is closer to y1 than to y2)
    assert duplicate_mask(keys).tolist() == [[False, False, False], [False, False, True], [False, True, False]]
    got = sym_info_nce(torch.tensor(X), torch.tensor(Y), keys, tau=0.07)
    assert got.item() == pytest.approx(_info_nce_by_hand(X, Y, 0.07, {(1, 2), (2, 1)}), rel=1e-5)
    assert got.item() != pytest.approx(_info_nce_by_hand(X, Y, 0.07, set()), rel=1e-3)


def test_hard_negatives_are_extra_documents_of_the_query_side_only():
    keys = ["a", "b", "c"]
    extra = np.array([[0.5, 0.5], [1.0, -1.0], [0.1, 0.9], [7.0, 7.0]])
    extra_keys = ["n1", "b", None, "n1"]  # "b" is row 1's own target; None is an empty slot
    got = sym_info_nce(torch.tensor(X), torch.tensor(Y), keys, 0.07, torch.tensor(extra), extra_keys)
    masked = {(1, 1)} | {(i, 2) for i in range(3)}
    want = _info_nce_by_hand(X, Y, 0.07, set(), extra, masked)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert got.item() > sym_info_nce(torch.tensor(X), torch.tensor(Y), keys, 0.07).item()  # harder, not easier
    assert got.item() != pytest.approx(_info_nce_by_hand(X, Y, 0.07, set(), extra), rel=1e-3)  # the mask matters


def test_total_loss_weights_doc_and_source_alignment_by_a_quarter():
    rng = np.random.default_rng(1)
    q, d, s, t_tgt, t_src = (torch.tensor(rng.normal(size=(3, 4))) for _ in range(5))
    e = StepEmbeddings(q, d, ["t1", "t2", "t3"], ["s1", "s2", "s3"], s, t_tgt, t_src)
    parts = procir_loss(e)
    hand = {
        "cir": _info_nce_by_hand(q.numpy(), d.numpy(), 0.07, set()),
        "doc": _info_nce_by_hand(d.numpy(), t_tgt.numpy(), 0.07, set()),
        "src": _info_nce_by_hand(s.numpy(), t_src.numpy(), 0.07, set()),
    }
    for name, value in hand.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5)
    assert parts["total"].item() == pytest.approx(hand["cir"] + 0.25 * hand["doc"] + 0.25 * hand["src"], rel=1e-5)
    no_align = procir_loss(StepEmbeddings(q, d, ["t1", "t2", "t3"], ["s1", "s2", "s3"], s))
    assert set(no_align) == {"cir", "total"} and no_align["total"].item() == pytest.approx(hand["cir"], rel=1e-5)


# ---- schedules and batches ------------------------------------------------------------------------------------------


def test_cot_keep_ratio_falls_linearly_to_zero_at_half_of_training():
    assert [cot_keep_ratio(t, 100) for t in (0, 25, 50, 75, 99)] == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_keep_words_keeps_the_ceiling_in_order():
    text = "one two three four five six seven"
    kept = keep_words(text, 0.5, random.Random(0)).split()
    assert len(kept) == 4  # ⌈0.5·7⌉
    assert kept == [w for w in text.split() if w in kept]  # original order
    assert keep_words(text, 1.0, random.Random(0)) == text and keep_words(text, 0.0, random.Random(0)) == ""


def test_each_pass_covers_every_triplet_once_and_ranks_split_the_global_batch():
    first_pass = [i for step in range(3) for i in step_indices(12, 4, step, seed=0)]
    assert sorted(first_pass) == list(range(12))
    assert step_indices(12, 4, 3, seed=0) != step_indices(12, 4, 0, seed=0)  # a new shuffle for the next pass
    assert len(step_indices(5, 4, 7, seed=0)) == 4  # batches stay full across pass boundaries


def test_cot_fills_the_document_and_turn_one_only(encoder):
    views = [[Image.new("RGB", (64, 64))]]
    doc = encoder.processor.tokenizer.decode(prepare_docs(encoder.processor, views, cot=["red silk"])["input_ids"][0])
    assert "<think>\nred silk\n</think>" in doc
    query = prepare_queries(encoder.processor, views, ["make it blue"], cot=["red silk"])["input_ids"][0]
    rendered = encoder.processor.tokenizer.decode(query)
    assert rendered.count("<think>\nred silk\n</think>") == 1
    assert rendered.index("red silk") < rendered.index(EMB_TOKEN) < rendered.index("make it blue")
    assert rendered.endswith(f"<think>\n\n</think>\n\n{EMB_TOKEN}<|im_end|>\n")  # turn 2 has an empty block


def test_training_data_skips_triplets_without_images_or_captions(train_set):
    assert len(train_set.triplets) == PRODUCTS - 2  # 106->107 and 107->100 lack a caption; 100->999 has no images
    assert dict(train_set.skipped) == {"target_no_caption": 1, "source_no_caption": 1, "target_no_images": 1}


# ---- SFT ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return ProCIREncoder.from_pretrained(tiny_dir)


def test_sft_labels_cover_assistant_tokens_only(encoder, train_set):
    tokenizer = encoder.processor.tokenizer
    samples = [caption_sample(train_set, ("f200k", "101")), triplet_sample(train_set, train_set.triplets[0])]
    inputs, labels = prepare_sft(encoder.processor, samples)
    caption_answer = tokenizer.decode([t for t in labels[0].tolist() if t != IGNORE])
    assert '"short_caption": "shirt 1"' in caption_answer and "<think>\na long shirt 1\n</think>" in caption_answer
    assert "image_pad" not in caption_answer and "user" not in caption_answer
    triplet_answer = tokenizer.decode([t for t in labels[1].tolist() if t != IGNORE])
    assert triplet_answer.count(EMB_TOKEN) == 2 and "modification_text_short" in triplet_answer
    assert "Write the modification text" not in triplet_answer  # the user's instruction carries no loss
    assert (labels[inputs["attention_mask"] == 0] == IGNORE).all()
    rendered = render(encoder.processor, samples[1].messages, samples[1].thinks)
    assert rendered.count("<|im_start|>assistant\n<think>") == 3


# ---- training -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", all_configurations(batch_size=3, max_steps=2, sft_max_steps=2), ids=lambda c: c.variant)
def test_every_configuration_trains_two_steps(cfg, tiny_dir, train_set, tmp_path):
    encoder = ProCIREncoder.from_pretrained(tiny_dir)
    before = [p.detach().clone() for p in encoder.vlm.parameters()]
    summary = train(encoder, train_set, cfg, tmp_path)
    entries = list(iter_log(tmp_path))
    assert [e["stage"] for e in entries] == ["sft"] * 2 * cfg.sft + ["contrastive"] * 2
    losses = {k for k in entries[-1] if k.startswith("loss_")}
    expected = {"loss_cir", "loss_total"} | ({"loss_doc"} if cfg.align else set())
    assert losses == expected | ({"loss_src"} if cfg.align and cfg.mt else set())
    assert all(math.isfinite(e["loss_total"]) for e in entries)
    assert entries[0]["lr"] == 1e-5 and entries[-1]["lr"] < 1e-5  # cosine decay, no warm-up
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.vlm.parameters(), strict=True))
    assert summary["variant"] == cfg.variant and (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("cfg", all_configurations(batch_size=3, max_steps=2, sft_max_steps=2), ids=lambda c: c.variant)
def test_every_configuration_trains_with_hard_negatives(cfg, tiny_dir, negatives_set, train_set, tmp_path):
    assert cfg.negatives_per_triplet(negatives_set) == 1 and cfg.negatives_per_triplet(train_set) == 0
    cfg = cfg.model_copy(update={"hard_negatives": 2})
    batch = prepare_contrastive(ProCIREncoder.from_pretrained(tiny_dir).processor, negatives_set, cfg, 0, 2, 0, 1)
    assert len(batch.negative_keys) == 2 * cfg.batch_size
    assert batch.negatives["input_ids"].shape[0] == 2 * cfg.batch_size
    for i, target in enumerate(batch.target_keys):  # each triplet's own negatives, never its target
        assert target not in batch.negative_keys[2 * i : 2 * i + 2]
    summary = train(ProCIREncoder.from_pretrained(tiny_dir), negatives_set, cfg, tmp_path)
    assert summary["hard_negatives"] == {"per_triplet": 2, "triplets_with_some": len(negatives_set.triplets)}
    entries = list(iter_log(tmp_path))
    assert len([e for e in entries if e["stage"] == "contrastive"]) == 2
    assert all(math.isfinite(e["loss_total"]) for e in entries)


def test_hard_negatives_raise_the_loss_of_the_same_step(tiny_dir, negatives_set):
    """The same step with and without the extra documents: more candidates, a larger L_cir; the rest unchanged."""
    encoder = ProCIREncoder.from_pretrained(tiny_dir).eval()
    parts = {}
    for k in (0, 3):
        cfg = TrainConfig(batch_size=4, hard_negatives=k, dtype="fp32")
        with torch.no_grad():
            batch = prepare_contrastive(encoder.processor, negatives_set, cfg, 0, 4, 0, 1)
            parts[k] = contrastive_loss(encoder, batch, cfg)
    assert parts[3]["cir"] > parts[0]["cir"]
    assert parts[3]["doc"] == parts[0]["doc"] and parts[3]["src"] == parts[0]["src"]


def test_loader_workers_prepare_the_same_batches(tiny_dir, train_set, tmp_path):
    """Batches prepared in a data-loader process train exactly like batches prepared in the loop."""
    losses = {}
    for workers in (0, 1):
        cfg = TrainConfig(batch_size=3, epochs=2, max_steps=3, cot=True, workers=workers)
        train(ProCIREncoder.from_pretrained(tiny_dir), train_set, cfg, tmp_path / str(workers))
        losses[workers] = [
            (e["loss_total"], e["cot_keep_ratio"], e["long_text"]) for e in iter_log(tmp_path / str(workers))
        ]
    assert losses[0] == losses[1] and len(losses[0]) == 3


@pytest.mark.parametrize("negatives", [False, True], ids=["in-batch", "hard-negatives"])
def test_an_interrupted_run_resumes_from_its_checkpoint_exactly(
    negatives, tiny_dir, train_set, negatives_set, tmp_path, monkeypatch
):
    import fashionmv_builder.procir.train as train_module

    cfg = TrainConfig(batch_size=3, epochs=2, max_steps=4, sft=True, sft_max_steps=2, save_every=2)
    train_set = negatives_set if negatives else train_set
    straight = ProCIREncoder.from_pretrained(tiny_dir)
    train(straight, train_set, cfg, tmp_path / "straight")

    real_loss, calls = train_module.contrastive_loss, []

    def crash_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine goes away mid-run
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "contrastive_loss", crash_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(ProCIREncoder.from_pretrained(tiny_dir), train_set, cfg, tmp_path / "resumed")
    monkeypatch.setattr(train_module, "contrastive_loss", real_loss)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="another configuration"):
        train(
            ProCIREncoder.from_pretrained(tiny_dir),
            train_set,
            cfg.model_copy(update={"lr": 2e-5}),
            tmp_path / "resumed",
        )

    resumed = ProCIREncoder.from_pretrained(tiny_dir)  # a new process: weights come from the checkpoint
    train(resumed, train_set, cfg, tmp_path / "resumed")
    for a, b in zip(straight.vlm.parameters(), resumed.vlm.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [(e["stage"], e["step"]) for e in iter_log(tmp_path / "resumed")]
    assert steps == [("sft", 0), ("sft", 1)] + [("contrastive", i) for i in range(4)]
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_configuration_names_cover_the_papers_table():
    names = {c.variant for c in all_configurations()}
    assert len(names) == 16 and "sft+mt+align" in names and "pretrained+single-turn" in names


def _one_step(encoder: ProCIREncoder, train_set, cfg: TrainConfig, rank: int, world: int) -> tuple[float, torch.Tensor]:
    batch = prepare_contrastive(encoder.processor, train_set, cfg, step=0, steps=4, rank=rank, world=world)
    loss = contrastive_loss(encoder, batch, cfg)["total"]
    loss.backward()
    average_gradients(encoder.vlm.parameters())
    grads = torch.cat([p.grad.flatten() for p in encoder.vlm.parameters() if p.grad is not None])
    return loss.item(), grads


def _step_share(rank: int, tiny_dir: Path, train_set, cfg: TrainConfig) -> tuple[float, np.ndarray]:
    loss, grads = _one_step(ProCIREncoder.from_pretrained(tiny_dir), train_set, cfg, rank, 2)
    # A numpy copy travels by value; a tensor would travel as a shared-memory handle that dies with this process.
    return loss, grads.numpy()


def test_two_processes_gather_negatives_like_one_process(tiny_dir, train_set):
    """Batch 2 on each of 2 gloo processes = batch 4 on one: same loss and same gradients. Without the gather a
    process would score against 2 candidates, not 4 (a loss near 1.5·log 2 instead of 1.5·log 4)."""
    cfg = TrainConfig(batch_size=2, mt=True, align=True, cot=True)
    got = run_on_two_gloo_processes(_step_share, tiny_dir, train_set, cfg)
    single_loss, single_grads = _one_step(
        ProCIREncoder.from_pretrained(tiny_dir), train_set, cfg.model_copy(update={"batch_size": 4}), 0, 1
    )
    for rank in (0, 1):
        loss, grads = got[rank]
        assert loss == pytest.approx(single_loss, rel=1e-4)
        torch.testing.assert_close(torch.from_numpy(grads), single_grads, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_training_reads_a_builds_parquet_shards(stage3_build, tiny_dir, tmp_path):
    """The train split of a real build (Stage 3 with the vLLM server): triplets and captions from Parquet, kept views
    written once as files, per-view captions for SFT; then SFT and contrastive steps on it."""
    from fashionmv_builder.core.build import HARD_NEGATIVES, TRIPLETS, Build
    from fashionmv_builder.procir.train_data import load_build_train

    triplets = Build(stage3_build.output_dir).rows(TRIPLETS, "deepfashion")
    train_rows = [t for t in triplets if t["split"] == "train"]
    data = load_build_train(stage3_build, tmp_path / "images")
    skipped = sum(n for reason, n in data.skipped.items() if not reason.startswith("negative_"))
    assert len(data.triplets) + skipped == len(train_rows)
    # Each triplet's hard negatives are the rejected candidates the build recorded for it, in shown order.
    shown = {}
    for r in sorted(Build(stage3_build.output_dir).rows(HARD_NEGATIVES, "deepfashion"), key=lambda r: r["rank_shown"]):
        shown.setdefault((r["source_id"], r["triplet_id"]), []).append(r["negative_id"])
    by_pair = {(t["source_id"], t["target_id"]): t["triplet_id"] for t in train_rows}
    assert data.hard_negatives
    for t in data.triplets:
        recorded = shown.get((t.source_id, by_pair[(t.source_id, t.target_id)]), [])
        assert set(data.hard_negatives.get(t.index, [])) <= set(recorded)
    assert {(t.source_id, t.target_id) for t in data.triplets} <= {(t["source_id"], t["target_id"]) for t in train_rows}
    texts = {(t["source_id"], t["target_id"]): tuple(t["modification_texts_short"]) for t in train_rows}
    assert all(t.paraphrases == texts[(t.source_id, t.target_id)] and len(t.paraphrases) == 3 for t in data.triplets)
    key = (data.triplets[0].dataset, data.triplets[0].source_id)
    assert data.views[key] and all(p.is_file() for p in data.views[key])
    assert data.view_captions[key] and data.captions[key].long_caption
    files = sorted(p for p in (tmp_path / "images").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    load_build_train(stage3_build, tmp_path / "images")  # a rerun rewrites no image
    assert [p.stat().st_mtime_ns for p in files] == stamps
    cfg = TrainConfig(batch_size=2, max_steps=1, sft=True, sft_max_steps=1)
    summary = train(ProCIREncoder.from_pretrained(tiny_dir), data, cfg, tmp_path / "model")
    assert math.isfinite(summary["sft"]["loss_total"]) and math.isfinite(summary["contrastive"]["loss_total"])
    assert summary["hard_negatives"]["per_triplet"] == 1  # on by default: the build provides them
