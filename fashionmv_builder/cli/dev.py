"""Development tools: the sample catalogue, tiny random-weight models, and scoring a build against the sample's
ground truth. None of them is part of building a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fashionmv_builder.cli.common import console, with_run_config
from fashionmv_builder.core.config import LMM_SECTIONS, LmmConfig, RunConfig


def register(app: typer.Typer) -> None:
    @app.command()
    def sample(
        out: Annotated[Path, typer.Option(help="folder to write the catalogue into")] = Path("build/sample-catalogue"),
        products: Annotated[int, typer.Option(min=20, help="products in the catalogue")] = 200,
        seed: Annotated[int, typer.Option(help="random seed")] = 0,
    ) -> None:
        """Generate the sample catalogue (garments with known attributes and planted faults) in five layouts."""
        from fashionmv_builder.devtools.sample_catalogue import generate_sample

        truth = generate_sample(out, products=products, seed=seed)
        console.print(f"sample catalogue: {len(truth['products'])} products in five layouts under {out}")

    @app.command("score-captions")
    @with_run_config
    def score_captions(
        cfg: RunConfig,
        truth: Annotated[Path, typer.Option(help="the sample's ground_truth.json")] = Path(
            "build/sample-catalogue/ground_truth.json"
        ),
    ) -> None:
        """Score Stage 1 captions and Stage 2 verdicts against the sample catalogue's ground truth."""
        from fashionmv_builder.devtools.score_captions import score_build

        Console().print_json(json.dumps(score_build(cfg, json.loads(truth.read_text()))))

    @app.command("truth-run")
    @with_run_config
    def truth_run(
        cfg: RunConfig,
        catalogue: Annotated[Path, typer.Option(help="the sample catalogue (with ground_truth.json)")] = Path(
            "build/sample-catalogue"
        ),
        wrong_share: Annotated[float, typer.Option(min=0, max=1, help="share of products given a wrong claim")] = 0.1,
        seed: Annotated[int, typer.Option(help="seed of the planted wrong claims")] = 0,
    ) -> None:
        """Build the sample with the ground-truth answering server as the LMM (a development tool: its answers come
        from the catalogue's ground truth, so a build's meaning can be checked). Every stage runs as in `run`."""
        from fashionmv_builder.cli.build import finish_run, run_stages
        from fashionmv_builder.devtools.ground_truth_server import MODEL_NAME, serve_ground_truth

        budgets = (cfg.lmm.image_max_pixels, cfg.triplets.candidate_max_pixels)
        root = Path(cfg.output_dir).resolve()
        with serve_ground_truth(catalogue, media_root=root, budgets=budgets, wrong_share=wrong_share, seed=seed) as (
            url,
            _,
        ):
            base = cfg.lmm.model_dump() if cfg.lmm else {}
            lmm = LmmConfig.model_validate({**base, "endpoints": (url,), "serve": None, "model": MODEL_NAME})
            # every LMM stage asks the server: a stage's own lmm section would send it elsewhere
            stages = {s: getattr(cfg, s).model_copy(update={"lmm": None}) for s in LMM_SECTIONS}
            finish_run(cfg, run_stages(cfg.model_copy(update={"lmm": lmm, **stages}), None))

    @app.command("build-tiny-procir")
    def build_tiny_procir(
        out: Annotated[Path, typer.Option(help="folder to write the model into")] = Path("build/models/tiny-procir"),
        seed: Annotated[int, typer.Option(help="random seed of the weights")] = 0,
        full_size: Annotated[bool, typer.Option(help="Qwen3.5-0.8B's layer sizes instead (GPU speed figures)")] = False,
    ) -> None:
        """Write a tiny random-weight Qwen3.5 (ProCIR backbone) with an offline tokenizer, for tests on CPU."""
        from fashionmv_builder.devtools.tiny_procir import build_tiny_procir as build

        build(out, seed=seed, full_size=full_size)
        console.print(f"{'0.8B-size' if full_size else 'tiny'} random ProCIR model written to {out}")
