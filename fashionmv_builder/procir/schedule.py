"""What changes over training: the learning rate, the chain-of-thought keep ratio, and the per-step text choices.

Every choice is drawn from a generator seeded by (seed, step), so all processes of a multi-GPU run make the same
choice at a step without talking to each other, and a rerun repeats them.
"""

from __future__ import annotations

import math
import random

import torch
from transformers import get_cosine_schedule_with_warmup


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to 0 over the run, without warm-up (the paper's Appendix D)."""
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)


def cot_keep_ratio(step: int, total_steps: int) -> float:
    """ρ(t) = max(0, 1 − t / (T/2)): all of the caption at the start, none from half of training on."""
    if total_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / (0.5 * total_steps))


def keep_words(text: str, ratio: float, rng: random.Random) -> str:
    """⌈ratio·n⌉ of the text's n words, chosen at random and kept in their order.

    The paper drops caption tokens; we drop whitespace-separated words, so the schedule does not depend on the
    tokenizer and a kept word is never cut in half."""
    words = text.split()
    keep = math.ceil(ratio * len(words))
    if keep >= len(words):
        return " ".join(words)
    chosen = sorted(rng.sample(range(len(words)), keep))
    return " ".join(words[i] for i in chosen)


def step_rng(seed: int, step: int) -> random.Random:
    return random.Random(f"{seed}:{step}")
