"""Building: `run` (every stage), one command per stage, `stages`, and `serve-lmm`; all derived from the pipeline."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from fashionmv_builder import pipeline
from fashionmv_builder.cli.common import (
    DatasetOpt,
    console,
    one_line_errors,
    print_stage,
    run_errors,
    with_run_config,
)
from fashionmv_builder.core.config import ConfigError, RefreshSlice, RunConfig
from fashionmv_builder.core.executor import failures
from fashionmv_builder.core.stage import Stage, StageReport, Work

PilotOpt = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="run this fraction of each dataset's shards and project the full cost"),
]


def _show(stage: Stage, reports: list[StageReport], pilot: float | None = None) -> None:
    print_stage(f"{stage.name} → {stage.config.output_dir}/{stage.name}", reports)
    if stage.work is Work.LMM:
        _print_cost(stage, reports, pilot)


def _print_cost(stage: Stage, reports: list[StageReport], pilot: float | None) -> None:
    """Tokens and server time of an LMM stage; with a pilot, projected to every product of its input."""
    done = sum(r.counts.get("products_in", 0) for r in reports)
    tokens_in = sum(r.counts.get("tokens_in", 0) for r in reports)
    tokens_out = sum(r.counts.get("tokens_out", 0) for r in reports)
    seconds = max((r.stats.get("server_seconds", 0) for r in reports), default=0)
    name = stage.name
    price = stage.lmm.price  # type: ignore[attr-defined]
    money = price.cost(tokens_in, tokens_out, seconds)
    console.print(
        f"{name} ({stage.lmm.model}): {done} products, {tokens_in} tokens in, {tokens_out} out, "  # type: ignore[attr-defined]
        f"{seconds:.0f} server-seconds, {money:.4g} {price.currency}"
    )
    if pilot is None or not done:
        return
    source = stage.reads[0].stage
    total = sum(m.counts.get("products_out", 0) for r in reports for m in stage.build.markers(source, r.dataset))
    scale = total / done
    console.print(
        f"{name} projected for all {total} products: {tokens_in * scale:.3g} tokens in, {tokens_out * scale:.3g} out, "
        f"{seconds * scale / 3600:.3g} server-hours on this server, {money * scale:.4g} {price.currency}"
    )


def run_stages(
    cfg: RunConfig, names: list[str] | None, datasets: list[str] | None = None, pilot: float | None = None
) -> dict[str, list[StageReport]]:
    """Run the named stages (default: all) in pipeline order on this machine; expected failures end in one line."""
    with one_line_errors(*run_errors()):
        return pipeline.run_local(
            cfg, names, datasets, pilot, on_report=lambda stage, reports: _show(stage, reports, pilot)
        )


def finish_run(cfg: RunConfig, reports: dict[str, list[StageReport]]) -> None:
    """Say where the outputs are; exit 1 when a stage failed."""
    console.print(f"outputs under {cfg.output_dir}: <stage>/<dataset>/<table>/part-*.parquet, stats.json per stage")
    _end(reports)


def _end(reports: dict[str, list[StageReport]]) -> None:
    if problems := failures(reports):
        console.print("[red]failed:[/red] " + "; ".join(problems))
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command()
    @with_run_config
    def run(
        cfg: RunConfig,
        dataset: DatasetOpt = None,
        refresh_triplets: Annotated[
            str | None,
            typer.Option(help="mine again this share of the existing sources (all, 10%, 0.1); new ones always are"),
        ] = None,
        refresh_slice: Annotated[int, typer.Option(min=0, help="which slice of that share (e.g. the day number)")] = 0,
    ) -> None:
        """Run every stage of the pipeline in order; shards whose marker matches are skipped, and existing sources
        keep their triplets unless refreshed."""
        if refresh_triplets is not None:
            with one_line_errors(ValidationError):
                refresh = RefreshSlice(share=refresh_triplets, slice=refresh_slice)  # type: ignore[arg-type]
            cfg = cfg.model_copy(update={"triplets": cfg.triplets.model_copy(update={"refresh": refresh})})
        finish_run(cfg, run_stages(cfg, None, dataset))

    @app.command()
    def stages() -> None:
        """List the pipeline's stages in order: what each reads, writes and does."""
        out = Console(width=max(Console().width, 120))
        for cls in pipeline.PIPELINE:
            reads = ", ".join(f"{r}{' (all shards)' if r.whole else ''}" for r in cls.reads) or "the sources"
            out.print(f"{cls.name:<11} {cls.work.value:<8} {cls.summary()}")
            out.print(f"{'':<20} reads {reads}; writes {', '.join([*cls.writes, 'rejects'])}")

    for cls in pipeline.PIPELINE:
        app.command(cls.name, help=cls.summary())(_stage_command(cls.name, cls.work))

    @app.command("serve-lmm")
    @with_run_config
    def serve_lmm(
        cfg: RunConfig,
        stage: Annotated[
            str | None, typer.Option(help="the LMM stage whose server to start (caption, verify, select)")
        ] = None,
        stop: Annotated[bool, typer.Option("--stop", help="stop the server this config started")] = False,
        print_command: Annotated[
            bool, typer.Option("--print-command", help="print the vllm command line (sized from the stages) and exit")
        ] = False,
    ) -> None:
        """Start the vLLM server of the config's lmm.serve section (or a stage's own) and leave it running."""
        from fashionmv_builder.lmm.server import ServerError
        from fashionmv_builder.lmm.serving import server_for

        with one_line_errors(ServerError, ConfigError):
            lmm = cfg.lmm
            if stage is not None:
                try:
                    found = pipeline.stage_class(stage)
                except KeyError as err:
                    raise ConfigError(f"--stage: {err.args[0]}") from None
                if found.work is not Work.LMM:
                    raise ConfigError(f"--stage {stage}: not an LMM stage")
                lmm = found(cfg).lmm
            server = server_for(cfg, lmm)
            if print_command:
                console.print(shlex.join(server.spec.command()), soft_wrap=True, highlight=False)
                return
            if stop:
                server.stop()
                console.print("stopped")
                return
            assert lmm is not None and lmm.serve is not None  # server_for checked
            url = server.start(timeout_s=lmm.serve.startup_timeout_s)
        console.print(
            f"vLLM serving {lmm.serve.served_name!r} at {url} (pidfile {server.pidfile}, log {server.logfile})"
        )


def _stage_command(name: str, work: Work):
    """`fashionmv <stage> CONFIG`: that stage alone, on the shards its inputs have (LMM stages take --pilot)."""
    if work is Work.LMM:

        def lmm_command(cfg: RunConfig, dataset: DatasetOpt = None, pilot: PilotOpt = None) -> None:
            _end(run_stages(cfg, [name], dataset, pilot))

        return with_run_config(lmm_command)

    def command(cfg: RunConfig, dataset: DatasetOpt = None) -> None:
        _end(run_stages(cfg, [name], dataset))

    return with_run_config(command)
