"""Development tools: the sample catalogue, tiny random-weight models, and scoring a build against the sample's
ground truth. None of them is part of building a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fashionmv_builder.cli.common import console, with_run_config
from fashionmv_builder.core.config import RunConfig


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
