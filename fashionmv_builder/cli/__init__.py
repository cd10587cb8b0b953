"""The `fashionmv` command: run the pipeline or one stage of it, make outputs from a build, train and evaluate
ProCIR, and the development tools. One module per command group; the shared run options live in common.py."""

from __future__ import annotations

import typer

from fashionmv_builder.cli import build, dev, outputs, procir

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
for group in (build, outputs, procir, dev):
    group.register(app)
