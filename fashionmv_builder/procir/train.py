"""`fashionmv train`: ProCIR's contrastive training, with the switches of the FashionMV paper (arXiv 2604.10297).

- MT: two-turn queries (s at the first `<emb_all>`, q at the last) instead of single-turn ones.
- Align: caption alignment by a text-only pass, L_doc = SymInfoNCE(d, t_target) and, with MT,
  L_src = SymInfoNCE(s, t_source).
- CoT: the long caption in the think block of the document and of turn 1, its words kept at ratio ρ(t) falling
  linearly to 0 at half of training.
- SFT: the SFT stage (sft.py) first, then contrastive training from its weights.
Together 2 inits × 8 variants = the paper's 16 configurations.
- Hard negatives (not in the paper; MegaPairs): k of each triplet's rejected candidates join L_cir as extra documents,
  drawn afresh every step; on by default (k = 1) only when the data has them (a build's hard_negatives table).

Each step draws the long or the short caption (one coin) and the long or the short modification text (another coin)
from a generator seeded by (seed, step), the same on every process. A global batch is `batch_size × world` triplets
from an endless stream of shuffled passes; process r takes the r-th slice, so a 2-process run sees exactly the
batches of a 1-process run with twice the batch size. Gradients are averaged across processes by hand after each
backward (no DDP wrapper: one step runs three or four forwards through the shared model).

AdamW (lr 1e-5, weight decay 0.01 on matrices only: norms and biases are not decayed, the usual transformer
practice; the paper does not say), cosine schedule without warm-up, gradient norm clipped at 1.0. With dtype bf16
(the default, the paper's precision) the forward runs under bf16 autocast with fp32 master weights: AdamW steps of
lr 1e-5 would mostly round away in bf16 weights. On a GPU gradient checkpointing is on.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import BatchFeature, Qwen3VLProcessor

from fashionmv_builder.core.files import atomic_write
from fashionmv_builder.procir.data import load_views
from fashionmv_builder.procir.evaluate import prepared, process_rank
from fashionmv_builder.procir.losses import LAMBDA_DOC, LAMBDA_SRC, TAU, StepEmbeddings, procir_loss
from fashionmv_builder.procir.model import ProCIREncoder, prepare_docs, prepare_queries, prepare_texts
from fashionmv_builder.procir.recall import ProductKey
from fashionmv_builder.procir.schedule import cosine_schedule, cot_keep_ratio, keep_words, step_rng
from fashionmv_builder.procir.sft import SftSample, prepare_sft, sft_samples
from fashionmv_builder.procir.train_data import TrainSet

log = logging.getLogger("fashionmv")

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_HARD_NEGATIVES = 1  # one extra document per triplet: ~1.5x the document pass (BENCHMARKS.md)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mt: bool = True
    align: bool = True
    cot: bool = False
    sft: bool = False
    batch_size: int = Field(16, ge=1, description="triplets per process per step (the paper: 16 × 10 GPUs)")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many contrastive steps")
    sft_epochs: float = Field(1.0, gt=0)
    sft_max_steps: int | None = Field(None, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_norm: float = Field(1.0, gt=0)
    tau: float = Field(TAU, gt=0)
    lambda_doc: float = LAMBDA_DOC
    lambda_src: float = LAMBDA_SRC
    seed: int = 0
    workers: int = Field(0, ge=0, description="data-loader processes preparing batches")
    save_every: int = Field(0, ge=0, description="write a resumable checkpoint every this many steps (0: never)")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="bf16: autocast over fp32 master weights")
    gradient_checkpointing: bool | None = Field(None, description="default on a GPU")
    hard_negatives: int | None = Field(
        None, ge=0, description="hard negatives per triplet in L_cir (None: 1 where the data has them, else 0)"
    )

    def negatives_per_triplet(self, data: TrainSet) -> int:
        if self.hard_negatives is not None:
            return self.hard_negatives
        return DEFAULT_HARD_NEGATIVES if data.hard_negatives else 0

    def run_identity(self) -> dict:
        """What a checkpoint must match to be resumed (not how batches are prepared or how often it is saved)."""
        return self.model_dump(exclude={"workers", "save_every"})

    @property
    def variant(self) -> str:
        flags = [name for name, on in (("mt", self.mt), ("align", self.align), ("cot", self.cot)) if on]
        return "+".join(["sft" if self.sft else "pretrained", *(flags or ["single-turn"])])


def all_configurations(**common: object) -> list[TrainConfig]:
    """The paper's 16 configurations: init (pretrained / SFT) × MT × Align × CoT."""
    return [
        TrainConfig(sft=sft, mt=mt, align=align, cot=cot, **common)
        for sft, mt, align, cot in itertools.product((False, True), repeat=4)
    ]


# ---- which triplets each process gets at a step ------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:pass:{epoch}").shuffle(order)
    return tuple(order)


def step_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Positions step·G … step·G+G−1 of an endless stream of shuffled passes over range(n)."""
    positions = range(step * global_batch, (step + 1) * global_batch)
    return [_permutation(n, seed, epoch)[i] for epoch, i in (divmod(p, n) for p in positions)]


def total_steps(n: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    steps = max(1, round(epochs * n / global_batch))
    return min(steps, max_steps) if max_steps else steps


# ---- one contrastive step's inputs ---------------------------------------------------------------------------------


@dataclass
class ContrastiveBatch:
    queries: BatchFeature
    docs: BatchFeature
    source_texts: BatchFeature | None
    target_texts: BatchFeature | None
    source_keys: list[ProductKey]
    target_keys: list[ProductKey]
    keep_ratio: float
    long_text: bool
    long_caption: bool
    # k slots per triplet (None: the triplet had fewer); the documents of the filled slots, in slot order.
    negative_keys: list[ProductKey | None] | None = None
    negatives: BatchFeature | None = None


def prepare_contrastive(
    processor: Qwen3VLProcessor, data: TrainSet, cfg: TrainConfig, step: int, steps: int, rank: int, world: int
) -> ContrastiveBatch:
    """Everything a step needs before the model runs (images loaded, prompts tokenized); runs in loader workers."""
    rng = step_rng(cfg.seed, step)
    long_text, long_caption = rng.random() < 0.5, rng.random() < 0.5
    ratio = cot_keep_ratio(step, steps) if cfg.cot else 0.0
    picked = step_indices(len(data.triplets), cfg.batch_size * world, step, cfg.seed)
    triplets = [data.triplets[i] for i in picked[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
    sources = [(t.dataset, t.source_id) for t in triplets]
    targets = [(t.dataset, t.target_id) for t in triplets]

    def caption(key: ProductKey, long: bool) -> str:
        c = data.captions[key]
        return c.long_caption if long and c.long_caption else c.short_caption

    def cot(keys: list[ProductKey]) -> list[str] | None:
        return [keep_words(caption(key, True), ratio, rng) for key in keys] if cfg.cot else None

    # One of each triplet's paraphrases per step, from its own generator (runs on single-text data draw as before).
    phrasing = random.Random(f"{cfg.seed}:paraphrase:{step}")
    texts = [
        t.modification_text_long if long_text and t.modification_text_long else t.short_text(phrasing) for t in triplets
    ]
    source_images = [load_views(data.views[key]) for key in sources]
    target_images = [load_views(data.views[key]) for key in targets]
    align_src = cfg.align and cfg.mt
    k = cfg.negatives_per_triplet(data)
    negative_keys: list[ProductKey | None] | None = None
    negatives = None
    if k:
        # Its own generator, so runs without hard negatives draw exactly what they drew before.
        pick = random.Random(f"{cfg.seed}:negatives:{step}")
        negative_keys = []
        for t in triplets:
            ids = data.hard_negatives.get(t.index, [])
            chosen = pick.sample(ids, k) if len(ids) > k else ids
            negative_keys += [(t.dataset, pid) for pid in chosen] + [None] * (k - len(chosen))
        filled = [key for key in negative_keys if key is not None]
        if filled:
            images = [load_views(data.views[key]) for key in filled]
            negatives = prepare_docs(processor, images, cot=cot(filled))
    return ContrastiveBatch(
        queries=prepare_queries(processor, source_images, texts, two_turn=cfg.mt, cot=cot(sources)),
        docs=prepare_docs(processor, target_images, cot=cot(targets)),
        source_texts=prepare_texts(processor, [caption(k, long_caption) for k in sources]) if align_src else None,
        target_texts=prepare_texts(processor, [caption(k, long_caption) for k in targets]) if cfg.align else None,
        source_keys=sources,
        target_keys=targets,
        keep_ratio=ratio,
        long_text=long_text,
        long_caption=long_caption,
        negative_keys=negative_keys,
        negatives=negatives,
    )


def contrastive_loss(encoder: ProCIREncoder, batch: ContrastiveBatch, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    s, q = encoder.pooled(batch.queries)
    doc = encoder.pooled(batch.docs)[1]
    negatives = None
    if batch.negative_keys is not None:
        # Every process sends k rows per triplet to the gather (same shapes everywhere); empty slots stay zero.
        negatives = doc.new_zeros(len(batch.negative_keys), doc.shape[1])
        if batch.negatives is not None:
            filled = [i for i, key in enumerate(batch.negative_keys) if key is not None]
            index = torch.tensor(filled, device=doc.device)
            negatives = negatives.index_copy(0, index, encoder.pooled(batch.negatives)[1].to(doc.dtype))
    embeddings = StepEmbeddings(
        query=q,
        doc=doc,
        target_keys=batch.target_keys,
        source_keys=batch.source_keys,
        source=s if cfg.mt else None,
        target_caption=encoder.pooled(batch.target_texts)[1] if batch.target_texts is not None else None,
        source_caption=encoder.pooled(batch.source_texts)[1] if batch.source_texts is not None else None,
        negatives=negatives,
        negative_keys=batch.negative_keys,
    )
    return procir_loss(embeddings, cfg.tau, cfg.lambda_doc, cfg.lambda_src)


# ---- the optimisation loop shared by both stages --------------------------------------------------------------------


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of each gradient over processes (every process computes the loss of the whole gathered batch)."""
    world = process_rank()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Run:
    """Where a run writes, and the checkpoint it resumes from (None: a fresh start)."""

    out_dir: Path
    record: Callable[[dict], None]
    resume: dict | None = None

    def resume_of(self, stage: str) -> dict | None:
        return self.resume if self.resume and self.resume["stage"] == stage else None


def load_checkpoint(out_dir: Path, cfg: TrainConfig) -> dict | None:
    """The checkpoint in `out_dir`, if any; one written by another configuration is an error, not a silent reuse."""
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["config"] != cfg.run_identity():
        raise ValueError(f"{path} was written by another configuration: remove it or train into another folder")
    return checkpoint


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Rank 0 writes the checkpoint whole or not at all (temporary file, then an atomic rename)."""
    if process_rank()[0] != 0:
        return
    atomic_write(out_dir / CHECKPOINT_FILE, lambda f: torch.save(state, f))


def optimise(
    encoder: ProCIREncoder,
    cfg: TrainConfig,
    stage: str,
    steps: int,
    make: Callable[[int], object],
    loss_of: Callable[[object], dict[str, torch.Tensor]],
    samples_per_step: int,
    run: Run,
) -> dict:
    """AdamW + cosine without warm-up + clipping over `steps` batches; one log record per step, a checkpoint every
    `cfg.save_every` steps, and a resumed run picks up at the checkpoint's step with its optimiser state."""
    params = [p for p in encoder.vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(encoder.vlm, cfg.weight_decay), lr=cfg.lr)
    scheduler = cosine_schedule(optimizer, steps)
    start = 0
    if resume := run.resume_of(stage):
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start = resume["step"]
    device = encoder.device
    bf16 = cfg.dtype == "bf16"
    encoder.train()
    last: dict = {}
    started = time.perf_counter()
    for step, batch in zip(range(start, steps), prepared(range(start, steps), make, cfg.workers), strict=True):
        lr = scheduler.get_last_lr()[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            parts = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        now = time.perf_counter()
        last = {
            "stage": stage,
            "step": step,
            "lr": lr,
            **{f"loss_{k}": round(float(v.detach()), 5) for k, v in parts.items()},
            "grad_norm": round(float(grad_norm), 4),
            "seconds": round(now - started, 4),
            "samples_per_s": round(samples_per_step / (now - started), 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
        }
        if isinstance(batch, ContrastiveBatch):
            last |= {"cot_keep_ratio": round(batch.keep_ratio, 4), "long_text": batch.long_text}
            last["long_caption"] = batch.long_caption
        run.record(last)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            save_checkpoint(
                run.out_dir,
                {
                    "stage": stage,
                    "step": step + 1,
                    "config": cfg.run_identity(),
                    "model": encoder.vlm.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
            )
        started = time.perf_counter()  # time spent writing a checkpoint is not the next step's
    return last


# ---- the stages -----------------------------------------------------------------------------------------------------


def run_sft(encoder: ProCIREncoder, data: TrainSet, cfg: TrainConfig, run: Run) -> dict:
    rank, world = process_rank()
    samples = sft_samples(data, cfg.seed)
    steps = total_steps(len(samples), cfg.batch_size * world, cfg.sft_epochs, cfg.sft_max_steps)

    def make(step: int) -> tuple[BatchFeature, torch.Tensor]:
        picked = step_indices(len(samples), cfg.batch_size * world, step, cfg.seed)
        mine: list[SftSample] = [samples[i] for i in picked[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
        return prepare_sft(encoder.processor, mine)

    def loss_of(batch: tuple[BatchFeature, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"total": encoder.lm_loss(*batch)}

    return optimise(encoder, cfg, "sft", steps, make, loss_of, cfg.batch_size * world, run)


def run_contrastive(encoder: ProCIREncoder, data: TrainSet, cfg: TrainConfig, run: Run) -> dict:
    rank, world = process_rank()
    steps = total_steps(len(data.triplets), cfg.batch_size * world, cfg.epochs, cfg.max_steps)
    make = functools.partial(prepare_contrastive, encoder.processor, data, cfg, steps=steps, rank=rank, world=world)

    def loss_of(batch: ContrastiveBatch) -> dict[str, torch.Tensor]:
        return contrastive_loss(encoder, batch, cfg)

    return optimise(encoder, cfg, "contrastive", steps, make, loss_of, cfg.batch_size * world, run)


def train(
    encoder: ProCIREncoder, data: TrainSet, cfg: TrainConfig, out_dir: Path, provenance: dict | None = None
) -> dict:
    """SFT (if on), then contrastive training; rank 0 saves the model, the step log and a summary in `out_dir`.

    If `out_dir` holds a checkpoint of the same configuration (`save_every`), training resumes from it: the same
    batches, learning rates and optimiser state as an uninterrupted run. The checkpoint is removed at the end.
    `provenance` (base model, training data) goes into the summary, where the model card reads it."""
    if not data.triplets:
        raise ValueError(f"no usable training triplets (skipped: {dict(data.skipped) or 'none'})")
    rank, _ = process_rank()
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else encoder.device.type == "cuda":
        encoder.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = load_checkpoint(out_dir, cfg)
    if resume:
        encoder.vlm.load_state_dict(resume["model"])
        log.info("resuming %s at step %d from %s", resume["stage"], resume["step"], out_dir / CHECKPOINT_FILE)
    log_path = out_dir / LOG_FILE
    if rank == 0 and not resume:
        log_path.write_text("")

    def record(entry: dict) -> None:
        if rank != 0:
            return
        with log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("%s step %d: loss %.4f", entry["stage"], entry["step"], entry["loss_total"])

    run = Run(out_dir, record, resume)
    summary: dict = {"variant": cfg.variant, "config": cfg.model_dump(), "triplets": len(data.triplets)}
    summary |= provenance or {}
    summary["skipped"] = dict(data.skipped)
    summary["hard_negatives"] = {
        "per_triplet": cfg.negatives_per_triplet(data),
        "triplets_with_some": sum(1 for t in data.triplets if data.hard_negatives.get(t.index)),
    }
    if cfg.sft:
        sft_done = resume is not None and resume["stage"] == "contrastive"
        summary["sft"] = (
            {"note": "finished before the resumed checkpoint"} if sft_done else run_sft(encoder, data, cfg, run)
        )
    summary["contrastive"] = run_contrastive(encoder, data, cfg, run)
    if rank == 0:
        encoder.save_pretrained(out_dir)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return summary


def iter_log(out_dir: Path) -> Iterator[dict]:
    with (out_dir / LOG_FILE).open() as f:
        yield from (json.loads(line) for line in f if line.strip())
