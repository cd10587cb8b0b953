"""The `fashionmv` command: one sub-command per stage, plus `run` for every stage built so far."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fashionmv_builder.config import ConfigError, RunConfig, load_config, parse_override

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

# The pipeline in order: (stage, what it does, the issue that builds it; None once built).
PIPELINE = [
    ("ingest", "crawl sources, validate and hash images, write product/image shards", None),
    ("dedupe", "perceptual-hash dedupe within and across products, view rules", "#4"),
    ("caption", "Stage 1: multi-view captions on vLLM", "#5"),
    ("verify", "Stage 2: hallucination verifier on vLLM", "#5"),
    ("triplets", "Stage 3: split, candidate mining, listwise selection, triplets", "#6"),
    ("publish", "push shards to the Hugging Face Hub", "#8"),
]

ConfigArg = Annotated[Path, typer.Argument(help="run configuration (YAML)", exists=True, dir_okay=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", help="output folder (overrides output_dir)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.sub=value")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(message)s",
    )


def _load(config: Path, out: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        values = dict(parse_override(o) for o in overrides or [])
        if out is not None:
            values["output_dir"] = str(out.resolve())
        return load_config(config, values)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from None


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="folder to write the catalogue into")] = Path("build/sample-catalogue"),
    products: Annotated[int, typer.Option(min=20, help="products in the catalogue")] = 200,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Generate the sample catalogue (garments with known attributes and planted faults) in all five layouts."""
    from fashionmv_builder.sources.sample import generate_sample

    truth = generate_sample(out, products=products, seed=seed)
    console.print(f"sample catalogue: {len(truth['products'])} products in five layouts under {out}")


@app.command()
def ingest(
    config: ConfigArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    dataset: Annotated[list[str] | None, typer.Option(help="only these dataset tags")] = None,
    verbose: bool = False,
) -> None:
    """Crawl the configured sources and write product/image shards, rejects and stats.json."""
    _setup_logging(verbose)
    cfg = _load(config, out, set_)
    from fashionmv_builder.ingest import run_ingest

    reports = run_ingest(cfg, dataset)
    _print_ingest(reports, cfg)
    if any("error" in r.stats for r in reports):
        raise typer.Exit(1)


def _print_ingest(reports: list, cfg: RunConfig) -> None:
    table = Table(title=f"ingest → {cfg.output_dir}/ingest")
    for col in ("dataset", "shards (skipped)", "products in/out", "views in/out", "rejected products/views"):
        table.add_column(col)
    reasons = []
    for r in reports:
        c = r.stats.get("counts", {})
        table.add_row(
            r.dataset,
            f"{r.shards} ({r.skipped})",
            f"{c.get('products_in', 0)}/{c.get('products_out', 0)}",
            f"{c.get('views_in', 0)}/{c.get('views_out', 0)}",
            r.stats.get("error", f"{c.get('products_rejected', 0)}/{c.get('views_rejected', 0)}"),
        )
        by_reason = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in c.items() if k.startswith("rejected."))
        if by_reason:
            reasons.append(f"  {r.dataset}: {by_reason}")
    out = Console(width=max(Console().width, 110))
    out.print(table)
    if reasons:
        out.print("rejects by reason (rows in <dataset>/rejects/*.parquet):\n" + "\n".join(reasons))


@app.command()
def run(config: ConfigArg, out: OutOpt = None, set_: SetOpt = None, verbose: bool = False) -> None:
    """Run every stage built so far, in order, and say which stages are not built yet."""
    _setup_logging(verbose)
    cfg = _load(config, out, set_)
    from fashionmv_builder.ingest import run_ingest

    reports = run_ingest(cfg)
    _print_ingest(reports, cfg)
    missing = [(name, what, issue) for name, what, issue in PIPELINE if issue]
    if missing:
        console.print("[yellow]not built yet:[/yellow]")
        for name, what, issue in missing:
            console.print(f"  {name:<9} {what} (issue {issue})")
    console.print(f"outputs under {cfg.output_dir}")
    if any("error" in r.stats for r in reports):
        raise typer.Exit(1)


@app.command()
def stages() -> None:
    """List the pipeline's stages and which are built."""
    for name, what, issue in PIPELINE:
        Console().print(f"{name:<9} {'built' if issue is None else 'not built (' + issue + ')':<18} {what}")


@app.command("build-tiny-procir")
def build_tiny_procir(
    out: Annotated[Path, typer.Option(help="folder to write the model into")] = Path("build/models/tiny-procir"),
    seed: Annotated[int, typer.Option(help="random seed of the weights")] = 0,
) -> None:
    """Write a tiny random-weight Qwen3.5 (ProCIR backbone) with an offline tokenizer, for tests on CPU."""
    from fashionmv_builder.procir.tiny import build_tiny_procir as build

    build(out, seed=seed)
    console.print(f"tiny ProCIR model written to {out}")


def _split_datasets(values: list[str] | None) -> tuple[str, ...]:
    from fashionmv_builder.procir.data import VAL_DATASETS

    if not values:
        return VAL_DATASETS
    # Repeated options or comma-separated lists both work (the reference takes space-separated ones).
    return tuple(tag for value in values for tag in value.split(",") if tag)


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
    verbose: bool = False,
) -> None:
    """Evaluate a ProCIR model with FashionMV's protocol: R@1/5/10 per dataset, written to eval_results.json."""
    _setup_logging(verbose)
    import torch

    from fashionmv_builder.procir.evaluate import QUERY_MODES, init_distributed
    from fashionmv_builder.procir.evaluate import evaluate as run_eval
    from fashionmv_builder.procir.recall import RESULTS_FILE, summary_line

    if mode not in QUERY_MODES:
        console.print(f"[red]unknown mode {mode!r}[/red]; one of {', '.join(QUERY_MODES)}")
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
    )
    if results is None:
        return  # not rank 0
    for r in results:
        console.print(summary_line(r))
    console.print(f"results written to {output_dir / RESULTS_FILE}")
