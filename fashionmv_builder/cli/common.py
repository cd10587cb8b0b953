"""What every command shares: the run options (CONFIG, --out, --set, --verbose) handled once, one-line errors, and
the per-stage summary table."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fashionmv_builder.core.config import ConfigError, RunConfig, load_config, parse_override
from fashionmv_builder.core.stage import StageReport

console = Console(stderr=True, soft_wrap=True)  # an error stays on one line, whatever the width

ConfigArg = Annotated[Path, typer.Argument(help="run configuration (YAML)", exists=True, dir_okay=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", help="output folder (overrides output_dir)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.sub=value")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="log every step and every reject")]
DatasetOpt = Annotated[list[str] | None, typer.Option(help="only these dataset tags")]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def load_run(config: Path, out: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run's config with the command line's overrides; a bad one ends the command with one line, exit 2."""
    try:
        values = dict(parse_override(o) for o in overrides or [])
        if out is not None:
            values["output_dir"] = str(out.resolve())
        return load_config(config, values)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from None


def with_run_config(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the shared run options and call it with the loaded config as its first argument.

    `def report(cfg: RunConfig, html: ...)` becomes `fashionmv report CONFIG [--html] [--out] [--set] [--verbose]`:
    the options are declared, parsed, validated and logged here once."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    shared = [
        inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ConfigArg),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=OutOpt),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt),
    ]

    @functools.wraps(command)
    def wrapper(config: Path, *, out: Path | None, set_: list[str] | None, verbose: bool, **kwargs: Any) -> Any:
        setup_logging(verbose)
        exit_on_sigterm()
        return command(load_run(config, out, set_), **kwargs)

    wrapper.__signature__ = inspect.Signature(shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in shared}
    del wrapper.__wrapped__  # Typer must read the signature above, not the command's own
    return wrapper


@contextmanager
def one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Expected failures (a server down, bad settings, a refused upload) end the command with one line, exit 1."""
    try:
        yield
    except errors as err:  # none of these messages holds a token
        console.print(f"[red]{type(err).__name__}:[/red] {err}")
        raise typer.Exit(1) from None


def run_errors() -> tuple[type[BaseException], ...]:
    """What a run may end with that is not a bug: bad settings, a folder in use by another run, a damaged input
    shard, an LMM server down or refusing, a tripped circuit breaker."""
    import openai

    from fashionmv_builder.core.executor import WorkerDied
    from fashionmv_builder.core.lock import BuildLocked
    from fashionmv_builder.core.shards import CorruptShardError
    from fashionmv_builder.lmm.calls import CircuitOpen
    from fashionmv_builder.lmm.client import LmmRefused, LmmUnreachable
    from fashionmv_builder.lmm.server import ServerError

    return (
        ConfigError,
        BuildLocked,
        CorruptShardError,
        LmmUnreachable,
        LmmRefused,
        CircuitOpen,
        ServerError,
        WorkerDied,
        openai.APIError,
    )


def exit_on_sigterm() -> None:
    """SIGTERM (what `timeout`, systemd and Kubernetes send) unwinds the run like Ctrl-C: workers are stopped, a vLLM
    server the run started is stopped, the run lock is released."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def stage_rows(reports: list[StageReport]) -> list[dict[str, Any]]:
    """One row per dataset of a stage's reports (the command line's table, the Prefect flow's artifact)."""
    rows = []
    for r in reports:
        c = r.counts
        reasons = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in c.items() if k.startswith("rejected."))
        rows.append(
            {
                "dataset": r.dataset,
                "shards": r.shards,
                "skipped": r.skipped,
                "products in": c.get("products_in", 0),
                "products out": c.get("products_out", 0),
                "views in": c.get("views_in", 0),
                "views out": c.get("views_out", 0),
                "this run": run_change(r),
                "rejects": r.error or reasons,
            }
        )
    return rows


def run_change(report: StageReport) -> str:
    """What this run changed, in words: shards rewritten, products added and withdrawn, LMM requests sent, replayed
    and carried over from earlier runs."""
    run = report.run
    counts = run.get("counts", {})
    parts = [f"{run.get('shards_rewritten', 0)} shards rewritten"]
    if run.get("shards_redone") and (change := report.stats.get("change")):
        parts.append(f"+{change['added']} −{change['withdrawn']} products")
    if any(k in counts for k in ("requests_sent", "answers_replayed")):
        parts.append(
            f"{counts.get('requests_sent', 0)} sent, {counts.get('answers_replayed', 0)} replayed, "
            f"{counts.get('answers_carried_over', 0)} carried over"
        )
    return "; ".join(parts)


def print_stage(stage: str, reports: list[StageReport]) -> None:
    rows = stage_rows(reports)
    table = Table(title=stage)
    for column in rows[0] if rows else []:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=max(Console().width, 110)).print(table)
