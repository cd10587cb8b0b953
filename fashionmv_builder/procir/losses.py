"""ProCIR's contrastive objective (FashionMV, arXiv 2604.10297).

SymInfoNCE(x, y) = ½[InfoNCE(x→y) + InfoNCE(y→x)] on L2-normalised rows at temperature τ, where row i of x and row i
of y are the positive pair and every other row of the (gathered) batch is a negative. Two rows that stand for the
same product (one target chosen by two queries, one source with two targets) are not negatives of each other: the
paper does not say how it handles them, so we follow the independent re-implementation and mask them out.

Hard negatives (rejected candidates of a triplet, MegaPairs-style) are extra documents: extra columns of the
query→document direction only, since no query is theirs. A hard negative that is some query's own target product
is masked for that query; an empty slot (key None: its triplet had fewer negatives) is masked for every query.

Under torch.distributed every process gathers the embeddings of all processes with a differentiable all-gather and
computes the same loss over the whole batch; gradients flow back to each process's own rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TAU = 0.07
LAMBDA_DOC = 0.25
LAMBDA_SRC = 0.25


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows in rank order, differentiable (the identity in a single process)."""
    if _world() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_keys(keys: Sequence[Hashable]) -> list[Hashable]:
    """Every process's product keys in rank order, matching `gather_rows`."""
    if _world() == 1:
        return list(keys)
    parts: list[list[Hashable]] = [[] for _ in range(_world())]
    torch.distributed.all_gather_object(parts, list(keys))
    return [key for part in parts for key in part]


def duplicate_mask(keys: Sequence[Hashable]) -> torch.Tensor:
    """[n, n] True where rows i != j stand for the same product (false negatives to leave out)."""
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    codes = torch.tensor([ids[key] for key in keys])
    same = codes[:, None] == codes[None, :]
    return same & ~torch.eye(len(keys), dtype=torch.bool)


def sym_info_nce(
    x: torch.Tensor,
    y: torch.Tensor,
    keys: Sequence[Hashable] | None = None,
    tau: float = TAU,
    extra: torch.Tensor | None = None,
    extra_keys: Sequence[Hashable | None] | None = None,
):
    """Symmetric InfoNCE of paired rows; `keys[i]` names the product of pair i, so duplicates are masked. `extra`
    rows (keyed by `extra_keys`, which needs `keys`) are further candidates of the x→y direction only."""
    x = F.normalize(x.float(), dim=-1)
    logits = x @ F.normalize(y.float(), dim=-1).T / tau
    if keys is not None:
        logits = logits.masked_fill(duplicate_mask(keys).to(logits.device), float("-inf"))
    labels = torch.arange(len(x), device=logits.device)
    backward = F.cross_entropy(logits.T, labels)
    if extra is not None and len(extra):
        assert keys is not None and extra_keys is not None, "hard negatives need the products' keys"
        masked = torch.tensor([[k is None or k == key for k in extra_keys] for key in keys], device=logits.device)
        hard = (x @ F.normalize(extra.float(), dim=-1).T / tau).masked_fill(masked, float("-inf"))
        logits = torch.cat([logits, hard], dim=1)
    return (F.cross_entropy(logits, labels) + backward) / 2


@dataclass
class StepEmbeddings:
    """One step's local embeddings: q and d always; s with MT; caption embeddings with Align."""

    query: torch.Tensor
    doc: torch.Tensor
    target_keys: list[Hashable]
    source_keys: list[Hashable]
    source: torch.Tensor | None = None
    target_caption: torch.Tensor | None = None
    source_caption: torch.Tensor | None = None
    negatives: torch.Tensor | None = None  # hard-negative documents, k slots per triplet (zeros where empty)
    negative_keys: list[Hashable | None] | None = None


def procir_loss(
    e: StepEmbeddings, tau: float = TAU, lambda_doc: float = LAMBDA_DOC, lambda_src: float = LAMBDA_SRC
) -> dict[str, torch.Tensor]:
    """L = L_cir + λ_d·L_doc + λ_s·L_src over the batch gathered from every process; the parts come back too."""
    targets, sources = gather_keys(e.target_keys), gather_keys(e.source_keys)
    negatives = gather_rows(e.negatives) if e.negatives is not None else None
    negative_keys = gather_keys(e.negative_keys) if e.negative_keys is not None else None
    parts = {"cir": sym_info_nce(gather_rows(e.query), gather_rows(e.doc), targets, tau, negatives, negative_keys)}
    total = parts["cir"]
    if e.target_caption is not None:
        parts["doc"] = sym_info_nce(gather_rows(e.doc), gather_rows(e.target_caption), targets, tau)
        total = total + lambda_doc * parts["doc"]
    if e.source is not None and e.source_caption is not None:
        parts["src"] = sym_info_nce(gather_rows(e.source), gather_rows(e.source_caption), sources, tau)
        total = total + lambda_src * parts["src"]
    parts["total"] = total
    return parts
