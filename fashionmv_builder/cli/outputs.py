"""What is made from a finished build: the report, FashionMV's layout, a Hub dataset repo (and takedowns), and the
human audit of captions."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fashionmv_builder.cli.common import DatasetOpt, console, one_line_errors, with_run_config
from fashionmv_builder.core.config import ConfigError, RunConfig

FolderOpt = Annotated[
    Path | None,
    typer.Option(
        "--folder", help="local folder for the repo, its takedown list and state (default <output_dir>/publish)"
    ),
]


class DropRedundant(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    BOTH = "both"


DropRedundantOpt = Annotated[
    DropRedundant | None,
    typer.Option(
        "--drop-redundant",
        help="leave out triplets whose text alone (text), source image alone (image) or either (both) already ranks "
        "the target first among the shown candidates",
    ),
]
LabelsOpt = Annotated[Path, typer.Option("--labels", help="labels file (JSON): created, then resumed", dir_okay=False)]


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    from fashionmv_builder.outputs.hub.upload import UploadError

    return (ConfigError, UploadError, HfHubHTTPError)


def register(app: typer.Typer) -> None:
    @app.command("export-fashionmv")
    @with_run_config
    def export_fashionmv(
        cfg: RunConfig,
        to: Annotated[Path, typer.Option("--to", help="folder for FashionMV's layout")] = Path(
            "build/fashionmv-export"
        ),
        dataset: DatasetOpt = None,
        drop_redundant: DropRedundantOpt = None,
        megapairs: Annotated[
            bool, typer.Option("--megapairs", help="also the MegaPairs-style layout (every paraphrase, hard negatives)")
        ] = False,
    ) -> None:
        """Write FashionMV's own layout (triplet and caption JSONL, images/<dataset>/<id>/) for its tools to read."""
        from fashionmv_builder.outputs.export import export_fashionmv as export
        from fashionmv_builder.outputs.export import export_megapairs

        drop = drop_redundant.value if drop_redundant is not None else None
        console.print(f"FashionMV layout under {to}: {export(cfg, to, dataset, drop)}")
        if megapairs:
            console.print(f"MegaPairs-style layout under {to}/megapairs: {export_megapairs(cfg, to, dataset, drop)}")

    @app.command()
    @with_run_config
    def report(
        cfg: RunConfig,
        to: Annotated[Path | None, typer.Option("--to", help="folder for report.json and report.md")] = None,
        html: Annotated[
            bool, typer.Option("--html", help="also write report.html (plots, contact sheets) and contact_sheets/*.png")
        ] = False,
        sheets: Annotated[int, typer.Option("--sheets", min=0, help="contact sheets per dataset with --html")] = 2,
        seed: Annotated[int, typer.Option("--seed", help="seed of the contact sheets' triplet sample")] = 0,
    ) -> None:
        """Counts, text statistics, LMM cost and a modality-redundancy check of a build (JSON + Markdown, HTML too)."""
        from fashionmv_builder.outputs.report import to_markdown, write_report

        folder = to or Path(cfg.output_dir) / "report"
        result = write_report(cfg, folder)
        Console().print(to_markdown(result))
        console.print(f"report written to {folder}/report.json and report.md")
        if html:
            from fashionmv_builder.outputs.report_html import write_html_report

            page = write_html_report(cfg, result, folder, sheets=sheets, seed=seed)
            console.print(f"HTML report written to {page} ({page.stat().st_size // 1024} KiB)")

    @app.command()
    @with_run_config
    def publish(
        cfg: RunConfig,
        repo_id: Annotated[str, typer.Option("--repo-id", help="Hub dataset repo, ORG/NAME")],
        private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
        with_images: Annotated[
            bool, typer.Option("--with-images", help="embed the image bytes (only for catalogues you may publish)")
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="write the repo folder, list it, upload nothing")
        ] = False,
        revision: Annotated[str, typer.Option("--revision", help="branch to publish to (created if missing)")] = "main",
        licence: Annotated[str, typer.Option("--license", help="Hub licence id of the annotations")] = "other",
        folder: FolderOpt = None,
    ) -> None:
        """Publish the build to a Hugging Face Hub dataset repo (token: HF_TOKEN or `hf auth login`)."""
        from fashionmv_builder.outputs.publish import PublishOptions, summary
        from fashionmv_builder.outputs.publish import publish as run_publish

        with one_line_errors(*_hub_errors()):
            options = PublishOptions(
                repo_id, private=private, with_images=with_images, revision=revision, licence=licence
            )
            result = run_publish(cfg, options, dry_run=dry_run, root=folder)
        Console().print("\n".join(summary(result)))

    @app.command()
    @with_run_config
    def remove(
        cfg: RunConfig,
        ids: Annotated[
            Path, typer.Option("--ids", exists=True, dir_okay=False, help="one dataset/product_id or product_id a line")
        ],
        repo_id: Annotated[
            str | None, typer.Option("--repo-id", help="Hub dataset repo (default: where the build was last published)")
        ] = None,
        revision: Annotated[str | None, typer.Option("--revision", help="branch (default: the last published)")] = None,
        squash_history: Annotated[
            bool,
            typer.Option("--squash-history", help="then squash the branch's history so no old revision keeps them"),
        ] = False,
        folder: FolderOpt = None,
    ) -> None:
        """Takedown: drop products and every triplet, caption and hard negative naming them; publish a new revision."""
        from fashionmv_builder.outputs.publish import remove as run_remove
        from fashionmv_builder.outputs.publish import summary

        lines = ids.read_text(encoding="utf-8").splitlines()
        with one_line_errors(*_hub_errors()):
            rewritten, result = run_remove(
                cfg, lines, repo_id=repo_id, revision=revision, squash_history=squash_history, root=folder
            )
        Console().print("\n".join([f"{len(rewritten)} shard(s) rewritten", *summary(result)]))

    audit_app = typer.Typer(
        add_completion=False, no_args_is_help=True, help="Hand-label a sample of captions, then score the verifier."
    )
    app.add_typer(audit_app, name="audit")

    @audit_app.command("serve")
    @with_run_config
    def audit_serve(
        cfg: RunConfig,
        labels: LabelsOpt,
        sample: Annotated[int, typer.Option(min=1, help="products to draw (FashionMV audited 1,000)")] = 1000,
        seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
        port: Annotated[int, typer.Option(min=0, max=65535, help="port of the page on 127.0.0.1")] = 8765,
        host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
        cache: Annotated[
            Path | None, typer.Option(help="image cache (default: one per build in the temp folder)")
        ] = None,
        dataset: DatasetOpt = None,
    ) -> None:
        """Serve the audit page: a seeded sample of captioned products (verifier removals included, verdicts hidden)."""
        import uvicorn

        from fashionmv_builder.outputs.audit.app import create_app, open_session
        from fashionmv_builder.outputs.audit.labels import LabelsError

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
    @with_run_config
    def audit_score(
        cfg: RunConfig,
        labels: LabelsOpt,
        json_out: Annotated[Path | None, typer.Option("--json", help="score file (default: LABELS.score.json)")] = None,
    ) -> None:
        """Severe-error rates and the verifier's precision/recall on left/right errors, with 95% Wilson intervals."""
        from fashionmv_builder.outputs.audit.data import read_verdicts
        from fashionmv_builder.outputs.audit.labels import LabelsError, labelled_items, load_labels
        from fashionmv_builder.outputs.audit.score import score_labels, score_rows

        try:
            doc = load_labels(labels)
        except LabelsError as err:
            console.print(f"[red]audit:[/red] {err}")
            raise typer.Exit(2) from None
        if doc is None:
            console.print(f"[red]audit:[/red] no labels file at {labels}: run `fashionmv audit serve` first")
            raise typer.Exit(2)
        result = score_labels(labelled_items(doc), read_verdicts(cfg, doc["datasets"]))
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
            console.print(
                f"{v['no_verdict']} labelled products have no verdict: they are left out of the verifier rows"
            )
        target = json_out or labels.with_name(labels.name + ".score.json")
        target.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        console.print(f"score written to {target}")
