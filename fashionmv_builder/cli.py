"""The `fashionmv` command: one sub-command per stage, plus `run` for every stage built so far."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
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
    ("dedupe", "perceptual-hash dedupe within and across products, view rules", None),
    ("caption", "Stage 1: multi-view captions on vLLM", None),
    ("verify", "Stage 2: hallucination verifier on vLLM", None),
    ("triplets", "Stage 3: split, candidate mining, listwise selection, triplets", None),
    ("publish", "push shards to the Hugging Face Hub", None),
]

ConfigArg = Annotated[Path, typer.Argument(help="run configuration (YAML)", exists=True, dir_okay=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", help="output folder (overrides output_dir)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.sub=value")]
DatasetOpt = Annotated[list[str] | None, typer.Option(help="only these dataset tags")]
PilotOpt = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="run this fraction of each dataset's shards and project the full cost"),
]


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


def _print_stage(stage: str, reports: list, cfg: RunConfig) -> None:
    """One table per stage: shards done and skipped, the conserved counts, and the rejects by reason."""
    table = Table(title=f"{stage} → {cfg.output_dir}/{stage}")
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
        out.print(f"rejects by reason (rows in {stage}/<dataset>/rejects/*.parquet):\n" + "\n".join(reasons))


@contextmanager
def _one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Expected failures (a server down, bad settings, a refused upload) end the command with one line, exit 1."""
    try:
        yield
    except errors as err:  # none of these messages holds a token
        console.print(f"[red]{type(err).__name__}:[/red] {err}")
        raise typer.Exit(1) from None


def _failed(reports: list) -> bool:
    return any("error" in r.stats for r in reports)


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="folder to write the catalogue into")] = Path("build/sample-catalogue"),
    products: Annotated[int, typer.Option(min=20, help="products in the catalogue")] = 200,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Generate the sample catalogue (garments with known attributes and planted faults) in five layouts."""
    from fashionmv_builder.sources.sample import generate_sample

    truth = generate_sample(out, products=products, seed=seed)
    console.print(f"sample catalogue: {len(truth['products'])} products in five layouts under {out}")


@app.command()
def ingest(
    config: ConfigArg, out: OutOpt = None, set_: SetOpt = None, dataset: DatasetOpt = None, verbose: bool = False
) -> None:
    """Crawl the configured sources and write product/image shards, rejects and stats.json."""
    _setup_logging(verbose)
    cfg = _load(config, out, set_)
    from fashionmv_builder.ingest import run_ingest

    reports = run_ingest(cfg, dataset)
    _print_stage("ingest", reports, cfg)
    if _failed(reports):
        raise typer.Exit(1)


@app.command()
def dedupe(
    config: ConfigArg, out: OutOpt = None, set_: SetOpt = None, dataset: DatasetOpt = None, verbose: bool = False
) -> None:
    """Drop duplicate views and re-listed products, apply the view and image rules; write dedupe shards."""
    _setup_logging(verbose)
    cfg = _load(config, out, set_)
    from fashionmv_builder.dedupe import run_dedupe

    reports = run_dedupe(cfg, dataset)
    _print_stage("dedupe", reports, cfg)
    if _failed(reports):
        raise typer.Exit(1)


def _run_lmm_stages(cfg: RunConfig, names: list[str], datasets: list[str] | None, pilot: float | None) -> None:
    """Run LMM stages against the configured endpoints, or a server started (and stopped) for the purpose."""
    import openai

    from fashionmv_builder.caption import CaptionStage
    from fashionmv_builder.lmm.calls import CircuitOpen
    from fashionmv_builder.lmm.client import LmmUnreachable
    from fashionmv_builder.lmm.server import ServerError
    from fashionmv_builder.lmm.serving import lmm_endpoints
    from fashionmv_builder.lmm.stage import run_stage
    from fashionmv_builder.triplets.candidates import run_candidates
    from fashionmv_builder.triplets.select import SelectStage
    from fashionmv_builder.verify import VerifyStage

    stages = {"caption": CaptionStage, "verify": VerifyStage, "triplets": SelectStage}
    expected = (LmmUnreachable, CircuitOpen, ServerError, ConfigError, openai.APIError)
    with _one_line_errors(*expected), lmm_endpoints(cfg) as endpoints:
        for name in names:
            if name == "triplets":  # mining needs no LMM, but selection right after it does
                run_candidates(cfg, datasets)
            reports = asyncio.run(run_stage(stages[name](cfg), endpoints, datasets, pilot))
            _print_stage(name, reports, cfg)
            _print_cost(name, reports, cfg, pilot)


def _print_cost(stage: str, reports: list, cfg: RunConfig, pilot: float | None) -> None:
    """Tokens and server time of the stage; with a pilot, projected to every product of the input."""
    from fashionmv_builder.shards import ShardStore

    done = sum(r.stats["counts"].get("products_in", 0) for r in reports)
    tokens_in = sum(r.stats["counts"].get("tokens_in", 0) for r in reports)
    tokens_out = sum(r.stats["counts"].get("tokens_out", 0) for r in reports)
    seconds = max((r.stats.get("server_seconds", 0) for r in reports), default=0)
    console.print(f"{stage}: {done} products, {tokens_in} tokens in, {tokens_out} out, {seconds:.0f} server-seconds")
    if pilot is None or not done:
        return
    input_stage = {"caption": "dedupe", "verify": "caption", "triplets": "candidates"}[stage]
    total = sum(
        m.counts.get("products_out", 0)
        for r in reports
        for m in ShardStore(cfg.output_dir, input_stage, r.dataset).markers()
    )
    scale = total / done
    console.print(
        f"{stage} projected for all {total} products: {tokens_in * scale:.3g} tokens in, {tokens_out * scale:.3g} out, "
        f"{seconds * scale / 3600:.3g} server-hours on this server"
    )


def _lmm_command(stage: str, summary: str):
    def command(
        config: ConfigArg,
        out: OutOpt = None,
        set_: SetOpt = None,
        dataset: DatasetOpt = None,
        pilot: PilotOpt = None,
        verbose: bool = False,
    ) -> None:
        _setup_logging(verbose)
        _run_lmm_stages(_load(config, out, set_), [stage], dataset, pilot)

    command.__doc__ = summary
    return command


for _stage, _summary in (
    ("caption", "Stage 1: caption every product from all its views with the LMM."),
    ("verify", "Stage 2: check the captions' orientation claims against the images; remove hallucinated products."),
    ("triplets", "Stage 3: split, mine candidates in each split, and let the LMM pick targets and write texts."),
):
    app.command(_stage)(_lmm_command(_stage, _summary))


@app.command("serve-lmm")
def serve_lmm(
    config: ConfigArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    stop: Annotated[bool, typer.Option("--stop", help="stop the server this config started")] = False,
) -> None:
    """Start the vLLM server of the config's lmm.serve section and leave it running (or --stop it)."""
    _setup_logging(True)
    from fashionmv_builder.lmm.server import ServerError
    from fashionmv_builder.lmm.serving import server_for

    cfg = _load(config, out, set_)
    with _one_line_errors(ServerError, ConfigError):
        server = server_for(cfg)
        if stop:
            server.stop()
            console.print("stopped")
            return
        url = server.start(timeout_s=cfg.lmm.serve.startup_timeout_s)
    console.print(
        f"vLLM serving {cfg.lmm.serve.served_name!r} at {url} (pidfile {server.pidfile}, log {server.logfile})"
    )


@app.command("score-captions")
def score_captions(
    config: ConfigArg,
    truth: Annotated[Path, typer.Option(help="the sample's ground_truth.json")] = Path(
        "build/sample-catalogue/ground_truth.json"
    ),
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score Stage 1 captions and Stage 2 verdicts against the sample catalogue's ground truth."""
    from fashionmv_builder.score_captions import score_build

    cfg = _load(config, out, set_)
    results = score_build(cfg, json.loads(truth.read_text()))
    Console().print_json(json.dumps(results))


@app.command()
def run(config: ConfigArg, out: OutOpt = None, set_: SetOpt = None, verbose: bool = False) -> None:
    """Run every stage built so far, in order, and say which stages are not built yet."""
    _setup_logging(verbose)
    cfg = _load(config, out, set_)
    from fashionmv_builder.dedupe import run_dedupe
    from fashionmv_builder.ingest import run_ingest

    reports = run_ingest(cfg)
    _print_stage("ingest", reports, cfg)
    ingested = [r.dataset for r in reports if "error" not in r.stats]
    dedupe_reports = run_dedupe(cfg, ingested) if ingested else []
    _print_stage("dedupe", dedupe_reports, cfg)
    if cfg.lmm is not None and ingested:
        _run_lmm_stages(cfg, ["caption", "verify", "triplets"], ingested, None)
    else:
        console.print("[yellow]no lmm section in the config: captioning and verification skipped[/yellow]")
    missing = [(name, what, issue) for name, what, issue in PIPELINE if issue]
    if missing:
        console.print("[yellow]not built yet:[/yellow]")
        for name, what, issue in missing:
            console.print(f"  {name:<9} {what} (issue {issue})")
    console.print(f"outputs under {cfg.output_dir}: <stage>/<dataset>/<table>/part-*.parquet, stats.json per stage")
    if _failed([*reports, *dedupe_reports]):
        raise typer.Exit(1)


@app.command("export-fashionmv")
def export_fashionmv_cmd(
    config: ConfigArg,
    to: Annotated[Path, typer.Option("--to", help="folder for FashionMV's layout")] = Path("build/fashionmv-export"),
    out: OutOpt = None,
    set_: SetOpt = None,
    dataset: DatasetOpt = None,
) -> None:
    """Write FashionMV's own layout (triplet and caption JSONL, images/<dataset>/<id>/) for its tools to read."""
    from fashionmv_builder.triplets.export import export_fashionmv

    counts = export_fashionmv(_load(config, out, set_), to, dataset)
    console.print(f"FashionMV layout under {to}: {counts}")


@app.command()
def report(
    config: ConfigArg,
    to: Annotated[Path | None, typer.Option("--to", help="folder for report.json and report.md")] = None,
    html: Annotated[
        bool, typer.Option("--html", help="also write report.html (plots, contact sheets) and contact_sheets/*.png")
    ] = False,
    sheets: Annotated[int, typer.Option("--sheets", min=0, help="contact sheets per dataset with --html")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="seed of the contact sheets' triplet sample")] = 0,
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Counts, text statistics, LMM cost and a modality-redundancy check of a build (JSON + Markdown, HTML too)."""
    from fashionmv_builder.triplets.report import to_markdown, write_report

    cfg = _load(config, out, set_)
    folder = to or Path(cfg.output_dir) / "report"
    result = write_report(cfg, folder)
    Console().print(to_markdown(result))
    console.print(f"report written to {folder}/report.json and report.md")
    if html:
        from fashionmv_builder.triplets.report_html import write_html_report

        page = write_html_report(cfg, result, folder, sheets=sheets, seed=seed)
        console.print(f"HTML report written to {page} ({page.stat().st_size // 1024} KiB)")


FolderOpt = Annotated[
    Path | None,
    typer.Option(
        "--folder", help="local folder for the repo, its takedown list and state (default <output_dir>/publish)"
    ),
]


@app.command()
def publish(
    config: ConfigArg,
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub dataset repo, ORG/NAME")],
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    with_images: Annotated[
        bool, typer.Option("--with-images", help="embed the image bytes (only for catalogues you may publish)")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="write the repo folder, list it, upload nothing")] = False,
    revision: Annotated[str, typer.Option("--revision", help="branch to publish to (created if missing)")] = "main",
    licence: Annotated[str, typer.Option("--license", help="Hub licence id of the annotations")] = "other",
    folder: FolderOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Publish the build to a Hugging Face Hub dataset repo (token: HF_TOKEN or `hf auth login`)."""
    _setup_logging(verbose)
    from huggingface_hub.errors import HfHubHTTPError

    from fashionmv_builder.hub.upload import UploadError
    from fashionmv_builder.publish import PublishOptions, summary
    from fashionmv_builder.publish import publish as run_publish

    cfg = _load(config, out, set_)
    with _one_line_errors(ConfigError, UploadError, HfHubHTTPError):
        options = PublishOptions(repo_id, private=private, with_images=with_images, revision=revision, licence=licence)
        result = run_publish(cfg, options, dry_run=dry_run, root=folder)
    Console().print("\n".join(summary(result)))


@app.command()
def remove(
    config: ConfigArg,
    ids: Annotated[
        Path, typer.Option("--ids", exists=True, dir_okay=False, help="one dataset/product_id or product_id a line")
    ],
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hub dataset repo (default: where the build was last published)")
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="branch (default: the last published)")] = None,
    squash_history: Annotated[
        bool, typer.Option("--squash-history", help="then squash the branch's history so no old revision keeps them")
    ] = False,
    folder: FolderOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Takedown: drop products and every triplet, caption and hard negative naming them; publish a new revision."""
    _setup_logging(verbose)
    from huggingface_hub.errors import HfHubHTTPError

    from fashionmv_builder.hub.upload import UploadError
    from fashionmv_builder.publish import remove as run_remove
    from fashionmv_builder.publish import summary

    cfg = _load(config, out, set_)
    lines = ids.read_text(encoding="utf-8").splitlines()
    with _one_line_errors(ConfigError, UploadError, HfHubHTTPError):
        rewritten, result = run_remove(
            cfg, lines, repo_id=repo_id, revision=revision, squash_history=squash_history, root=folder
        )
    Console().print("\n".join([f"{len(rewritten)} shard(s) rewritten", *summary(result)]))


@app.command()
def stages() -> None:
    """List the pipeline's stages and which are built."""
    for name, what, issue in PIPELINE:
        Console().print(f"{name:<9} {'built' if issue is None else 'not built (' + issue + ')':<18} {what}")


@app.command("build-tiny-procir")
def build_tiny_procir(
    out: Annotated[Path, typer.Option(help="folder to write the model into")] = Path("build/models/tiny-procir"),
    seed: Annotated[int, typer.Option(help="random seed of the weights")] = 0,
    full_size: Annotated[bool, typer.Option(help="Qwen3.5-0.8B's layer sizes instead (GPU speed figures)")] = False,
) -> None:
    """Write a tiny random-weight Qwen3.5 (ProCIR backbone) with an offline tokenizer, for tests on CPU."""
    from fashionmv_builder.procir.tiny import build_tiny_procir as build

    build(out, seed=seed, full_size=full_size)
    console.print(f"{'0.8B-size' if full_size else 'tiny'} random ProCIR model written to {out}")


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
        bool, typer.Option(help="use a source's query-pass s as its gallery entry instead of a document pass (faster)")
    ] = False,
    encoding: Annotated[
        str, typer.Option(help="joint (all views in one prompt), meanpool or maxsim (each view alone)")
    ] = "joint",
    verbose: bool = False,
) -> None:
    """Evaluate a ProCIR model with FashionMV's protocol: R@1/5/10 per dataset, written to eval_results.json."""
    _setup_logging(verbose)
    _quiet_openmp()
    import torch

    from fashionmv_builder.procir.evaluate import ENCODINGS, QUERY_MODES, init_distributed
    from fashionmv_builder.procir.evaluate import evaluate as run_eval
    from fashionmv_builder.procir.recall import RESULTS_FILE, summary_line

    if mode not in QUERY_MODES or encoding not in ENCODINGS:
        console.print(f"[red]unknown mode or encoding[/red]: modes {QUERY_MODES}, encodings {ENCODINGS}")
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
    verbose: bool = False,
) -> None:
    """Train ProCIR on a build or on FashionMV's files; under torchrun every process takes a slice of each batch."""
    _setup_logging(verbose)
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
    with _one_line_errors(ConfigError, ValidationError, FileNotFoundError):
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
        )
        if build is not None:
            run_cfg = _load(build, None, None)
            data = load_build_train(run_cfg, Path(run_cfg.output_dir) / "procir" / "images")
        else:
            data = load_fashionmv_train(data_dir, image_root, _split_datasets(datasets) if datasets else None)
    init_distributed()
    target = torch.device(device) if device else default_device()
    encoder = ProCIREncoder.from_pretrained(model).to(target)
    console.print(f"{cfg.variant}: {len(data.triplets)} triplets (skipped {dict(data.skipped) or 'none'})")
    with _one_line_errors(ValueError):
        summary = run_train(encoder, data, cfg, out)
    last = summary["contrastive"]
    console.print(f"{last['step'] + 1} steps, last loss {last['loss_total']:.4f}; model and log in {out}")


# ---- Human audit of Stage-1 captions (FashionMV's 1,000-product audit, on your own build) ----------------------
audit_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Hand-label a sample of captions, then score the verifier."
)
app.add_typer(audit_app, name="audit")

LabelsOpt = Annotated[Path, typer.Option("--labels", help="labels file (JSON): created, then resumed", dir_okay=False)]


@audit_app.command("serve")
def audit_serve(
    config: ConfigArg,
    labels: LabelsOpt,
    sample: Annotated[int, typer.Option(min=1, help="products to draw (FashionMV audited 1,000)")] = 1000,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    port: Annotated[int, typer.Option(min=0, max=65535, help="port of the page on 127.0.0.1")] = 8765,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    cache: Annotated[Path | None, typer.Option(help="image cache (default: one per build in the temp folder)")] = None,
    dataset: DatasetOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve the audit page: a seeded sample of captioned products (verifier removals included, verdicts hidden)."""
    import uvicorn

    from fashionmv_builder.audit.app import create_app, open_session
    from fashionmv_builder.audit.labels import LabelsError

    cfg = _load(config, out, set_)
    try:
        session = open_session(
            cfg, labels, sample=sample, seed=seed, datasets=dataset, cache_dir=cache, progress=console.print
        )
    except (LabelsError, ValueError) as err:
        console.print(f"[red]audit:[/red] {err}")
        raise typer.Exit(2) from None
    state = session.state()
    console.print(
        f"audit of {state['total']} products, {state['labelled']} labelled; labels saved to {labels}\n"
        f"open http://{host}:{port}/  (Ctrl-C stops; a restart resumes at the first unlabelled item)"
    )
    uvicorn.run(create_app(session), host=host, port=port, log_level="warning")


@audit_app.command("score")
def audit_score(
    config: ConfigArg,
    labels: LabelsOpt,
    json_out: Annotated[Path | None, typer.Option("--json", help="score file (default: LABELS.score.json)")] = None,
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Severe-error rates and the verifier's precision/recall on left/right errors, with 95% Wilson intervals."""
    from fashionmv_builder.audit.data import read_verdicts
    from fashionmv_builder.audit.labels import LabelsError, labelled_items, load_labels
    from fashionmv_builder.audit.score import score_labels, score_rows

    cfg = _load(config, out, set_)
    try:
        doc = load_labels(labels)
    except LabelsError as err:
        console.print(f"[red]audit:[/red] {err}")
        raise typer.Exit(2) from None
    if doc is None:
        console.print(f"[red]audit:[/red] no labels file at {labels}: run `fashionmv audit serve` first")
        raise typer.Exit(2)
    labelled = labelled_items(doc)
    result = score_labels(labelled, read_verdicts(cfg, doc["datasets"]))
    result = {"labels_file": str(labels), "seed": doc["seed"], "sample": len(doc["items"]), **result}
    table = Table(title=f"audit: {result['labelled']} of {result['sample']} labelled ({labels})")
    for col in ("metric", "rate", "count", "95% CI", "FashionMV"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, p, paper in score_rows(result):
        ci = f"{p['ci95'][0]:.1%}–{p['ci95'][1]:.1%}" if p["ci95"] else "-"
        rate = f"{p['rate']:.1%}" if p["rate"] is not None else "-"
        table.add_row(name, rate, f"{p['k']}/{p['n']}", ci, f"{paper:.1%}" if paper is not None else "")
    Console(width=max(Console().width, 100)).print(table)
    v = result["verifier"]
    if v["no_verdict"]:
        console.print(f"{v['no_verdict']} labelled products have no verdict: they are left out of the verifier rows")
    target = json_out or labels.with_name(labels.name + ".score.json")
    target.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    console.print(f"score written to {target}")
