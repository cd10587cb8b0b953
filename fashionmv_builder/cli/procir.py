"""The bundled ProCIR model: train it on a build (or FashionMV's files) and evaluate it with FashionMV's protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fashionmv_builder.cli.common import console, load_run, one_line_errors, setup_logging
from fashionmv_builder.core.config import ConfigError


def _quiet_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning made forwards 20x slower."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _split_datasets(values: list[str] | None) -> tuple[str, ...]:
    from fashionmv_builder.procir.data import VAL_DATASETS

    if not values:
        return VAL_DATASETS
    # Repeated options or comma-separated lists both work (the reference takes space-separated ones).
    return tuple(tag for value in values for tag in value.split(",") if tag)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        model: Annotated[Path, typer.Option(help="model folder (Qwen3.5 checkpoint with tokenizer/processor)")],
        data_dir: Annotated[Path, typer.Option(help="folder holding val_triplets.jsonl")],
        image_root: Annotated[Path, typer.Option(help="folder holding <dataset>/<product_id>/ image folders")],
        datasets: Annotated[list[str] | None, typer.Option(help="dataset tags (repeat or comma-separate)")] = None,
        output_dir: Annotated[Path, typer.Option(help="where eval_results.json goes")] = Path("results"),
        batch_size: Annotated[int, typer.Option(min=1, help="products or queries per forward")] = 10,
        mode: Annotated[str, typer.Option(help="two-turn, single-turn, text-only or image-only queries")] = "two-turn",
        workers: Annotated[int, typer.Option(min=0, help="data-loader processes for images")] = 0,
        device: Annotated[str | None, typer.Option(help="torch device (default: the GPU if any, else CPU)")] = None,
        sources_from_queries: Annotated[
            bool,
            typer.Option(help="use a source's query-pass s as its gallery entry instead of a document pass (faster)"),
        ] = False,
        encoding: Annotated[
            str, typer.Option(help="joint (all views in one prompt), meanpool or maxsim (each view alone)")
        ] = "joint",
        dtype: Annotated[str, typer.Option(help="bf16 (the whole model, as the reference) or fp32")] = "bf16",
        verbose: bool = False,
    ) -> None:
        """Evaluate a ProCIR model with FashionMV's protocol: R@1/5/10 per dataset, written to eval_results.json."""
        setup_logging(verbose)
        _quiet_openmp()
        import torch

        from fashionmv_builder.procir.evaluate import ENCODINGS, QUERY_MODES, init_distributed
        from fashionmv_builder.procir.evaluate import evaluate as run_eval
        from fashionmv_builder.procir.model import DTYPES
        from fashionmv_builder.procir.recall import RESULTS_FILE, summary_line

        if mode not in QUERY_MODES or encoding not in ENCODINGS or dtype not in DTYPES:
            console.print(
                f"[red]unknown mode, encoding or dtype[/red]: modes {QUERY_MODES}, encodings {ENCODINGS}, "
                f"dtypes {tuple(DTYPES)}"
            )
            raise typer.Exit(2)
        init_distributed()
        results = run_eval(
            model,
            data_dir,
            image_root,
            output_dir,
            datasets=_split_datasets(datasets),
            batch_size=batch_size,
            mode=mode,
            workers=workers,
            device=torch.device(device) if device else None,
            sources_from_queries=sources_from_queries,
            encoding=encoding,
            dtype=dtype,
        )
        if results is None:
            return  # not rank 0
        for r in results:
            console.print(summary_line(r))
        console.print(f"results written to {output_dir / RESULTS_FILE}")

    @app.command()
    def train(
        model: Annotated[Path, typer.Option(help="initial model folder (Qwen3.5 checkpoint with tokenizer/processor)")],
        out: Annotated[Path, typer.Option("--out", help="folder for the trained model, train_log.jsonl, summary")],
        build: Annotated[Path | None, typer.Option(help="train on this build's train split (its run config)")] = None,
        data_dir: Annotated[Path | None, typer.Option(help="or: FashionMV folder with train_*.jsonl")] = None,
        image_root: Annotated[Path | None, typer.Option(help="with --data-dir: the images/ folder")] = None,
        datasets: Annotated[list[str] | None, typer.Option(help="only these dataset tags (FashionMV files)")] = None,
        mt: Annotated[bool, typer.Option(help="two-turn queries (s and q)")] = True,
        align: Annotated[bool, typer.Option(help="caption alignment losses")] = True,
        cot: Annotated[bool, typer.Option(help="chain-of-thought guidance with progressive dropping")] = False,
        sft: Annotated[bool, typer.Option(help="run the SFT stage first")] = False,
        batch_size: Annotated[int, typer.Option(min=1, help="triplets per process per step")] = 16,
        epochs: Annotated[float, typer.Option(help="passes over the triplets")] = 1.0,
        max_steps: Annotated[int | None, typer.Option(help="stop after this many contrastive steps")] = None,
        sft_max_steps: Annotated[int | None, typer.Option(help="stop SFT after this many steps")] = None,
        lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-5,
        seed: int = 0,
        workers: Annotated[int, typer.Option(min=0, help="data-loader processes preparing batches")] = 0,
        save_every: Annotated[
            int, typer.Option(min=0, help="checkpoint every N steps; rerunning the command resumes from it")
        ] = 0,
        device: Annotated[str | None, typer.Option(help="torch device (default: the GPU if any, else CPU)")] = None,
        dtype: Annotated[str, typer.Option(help="bf16 (autocast over fp32 weights, as the paper) or fp32")] = "bf16",
        hard_negatives: Annotated[
            int | None,
            typer.Option(min=0, help="a triplet's rejected candidates per step in L_cir (default: 1 with a build)"),
        ] = None,
        verbose: bool = False,
    ) -> None:
        """Train ProCIR on a build or on FashionMV's files; under torchrun every process takes a slice of each batch."""
        setup_logging(verbose)
        _quiet_openmp()
        import torch
        from pydantic import ValidationError

        from fashionmv_builder.procir.evaluate import default_device, init_distributed
        from fashionmv_builder.procir.model import ProCIREncoder
        from fashionmv_builder.procir.train import TrainConfig
        from fashionmv_builder.procir.train import train as run_train
        from fashionmv_builder.procir.train_data import load_build_train, load_fashionmv_train

        if (build is None) == (data_dir is None) or (data_dir is not None and image_root is None):
            console.print("[red]give either --build CONFIG or --data-dir with --image-root[/red]")
            raise typer.Exit(2)
        with one_line_errors(ConfigError, ValidationError, FileNotFoundError):
            cfg = TrainConfig(
                mt=mt,
                align=align,
                cot=cot,
                sft=sft,
                batch_size=batch_size,
                epochs=epochs,
                max_steps=max_steps,
                sft_max_steps=sft_max_steps,
                lr=lr,
                seed=seed,
                workers=workers,
                save_every=save_every,
                dtype=dtype,
                hard_negatives=hard_negatives,
            )
            if build is not None:
                run_cfg = load_run(build)
                data = load_build_train(run_cfg, Path(run_cfg.output_dir) / "procir" / "images")
                source = f"build `{run_cfg.name}` (config hash `{run_cfg.config_hash()[:12]}`), train split"
            else:
                data = load_fashionmv_train(data_dir, image_root, _split_datasets(datasets) if datasets else None)
                source = f"FashionMV-layout files in `{data_dir}`"
        init_distributed()
        target = torch.device(device) if device else default_device()
        encoder = ProCIREncoder.from_pretrained(model).to(target)
        console.print(f"{cfg.variant}: {len(data.triplets)} triplets (skipped {dict(data.skipped) or 'none'})")
        with one_line_errors(ValueError):
            summary = run_train(encoder, data, cfg, out, {"base_model": str(model), "data": source})
        last = summary["contrastive"]
        console.print(f"{last['step'] + 1} steps, last loss {last['loss_total']:.4f}; model and log in {out}")

    @app.command("publish-model")
    def publish_model(
        model_dir: Annotated[Path, typer.Argument(help="a model folder `fashionmv train` wrote")],
        repo_id: Annotated[str, typer.Option("--repo-id", help="Hub model repo, ORG/NAME")],
        base_model: Annotated[
            str | None, typer.Option(help="Hub id of the base model (default: what train recorded)")
        ] = None,
        data_repo: Annotated[str | None, typer.Option(help="Hub dataset repo the model was trained on")] = None,
        data_revision: Annotated[str | None, typer.Option(help="its revision (branch, tag or commit)")] = None,
        results: Annotated[
            list[Path] | None, typer.Option(help="eval_results.json to publish (repeat; default: MODEL_DIR's)")
        ] = None,
        private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
        revision: Annotated[str, typer.Option(help="branch to publish to (created if missing)")] = "main",
        licence: Annotated[str, typer.Option("--license", help="Hub licence id of the weights")] = "apache-2.0",
        dry_run: Annotated[bool, typer.Option("--dry-run", help="stage in MODEL_DIR/.publish, upload nothing")] = False,
    ) -> None:
        """Publish a trained ProCIR model to a Hugging Face Hub model repo with a model card (token: HF_TOKEN)."""
        from huggingface_hub.errors import HfHubHTTPError

        from fashionmv_builder.outputs.hub.model_repo import ModelPublishOptions
        from fashionmv_builder.outputs.hub.model_repo import publish_model as run_publish
        from fashionmv_builder.outputs.hub.upload import UploadError

        options = ModelPublishOptions(
            repo_id,
            base_model=base_model,
            data_repo=data_repo,
            data_revision=data_revision,
            results=results or [],
            private=private,
            revision=revision,
            licence=licence,
        )
        with one_line_errors(ConfigError, UploadError, HfHubHTTPError):
            where, result = run_publish(model_dir, options, dry_run=dry_run)
        if result is None:
            console.print(f"staged in {where} (dry run: nothing uploaded)")
            return
        plan = result.plan
        console.print(
            f"{repo_id}@{revision}: {len(plan.upload)} file(s) uploaded ({plan.bytes} bytes), "
            f"{len(plan.unchanged)} unchanged, {len(result.commits)} commit(s)"
        )
