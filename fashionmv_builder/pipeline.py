"""The pipeline: every stage, in order. `fashionmv run`, `fashionmv stages`, the per-stage commands, the Prefect
flow, the report's funnel and its cost tables are all derived from this list.

    sources ─ ingest ──▶ products, images (the only copy of the bytes)
              dedupe ──▶ products (cluster ids), views kept           reads ingest, whole dataset
              caption ─▶ captions              (LMM, Stage 1)          reads dedupe + ingest bytes
              verify ──▶ verdicts              (LMM, Stage 2)          reads captions + ingest bytes
              embed ───▶ embeddings                                    reads verdicts, captions, bytes
              candidates ▶ products with split, candidates             reads embeddings, whole dataset
              select ──▶ triplets, hard negatives (LMM, Stage 3)       reads candidates (+ their views)
              discriminate ▶ the build's triplets (checked, flagged)  (LMM) reads select, embeddings, captions

Each stage module fills in the contract of core/stage.py; where a build's files are is core/build.py's business.
Outputs made from a finished build (report, FashionMV export, Hub publishing, the audit page) live in outputs/.
Adding a stage is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.core.stage import Stage, StageReport
from fashionmv_builder.stages.candidates import CandidatesStage
from fashionmv_builder.stages.caption import CaptionStage
from fashionmv_builder.stages.dedupe.stage import DedupeStage
from fashionmv_builder.stages.discriminate import DiscriminateStage
from fashionmv_builder.stages.embed import EmbedStage
from fashionmv_builder.stages.ingest.stage import IngestStage
from fashionmv_builder.stages.select import SelectStage
from fashionmv_builder.stages.verify import VerifyStage

PIPELINE: list[type[Stage]] = [
    IngestStage,
    DedupeStage,
    CaptionStage,
    VerifyStage,
    EmbedStage,
    CandidatesStage,
    SelectStage,
    DiscriminateStage,
]


def stage_names() -> list[str]:
    return [cls.name for cls in PIPELINE]


def stage_class(name: str) -> type[Stage]:
    for cls in PIPELINE:
        if cls.name == name:
            return cls
    raise KeyError(f"no stage {name!r} in the pipeline ({', '.join(stage_names())})")


def build_stages(config: RunConfig, names: list[str] | None = None) -> list[Stage]:
    """The pipeline's stages for a run (only `names`, in pipeline order, when given)."""
    return [cls(config) for cls in PIPELINE if names is None or cls.name in names]


def run_local(
    config: RunConfig,
    names: list[str] | None = None,
    datasets: list[str] | None = None,
    pilot: float | None = None,
    on_report: Callable[[Stage, list[StageReport]], None] | None = None,
) -> dict[str, list[StageReport]]:
    """Run the named stages (default: all) on this machine, as `fashionmv run` does: reports by stage name."""
    from fashionmv_builder.core.executor import LocalRunner, run_pipeline

    return run_pipeline(config, build_stages(config, names), LocalRunner(config.workers, on_report), datasets, pilot)
