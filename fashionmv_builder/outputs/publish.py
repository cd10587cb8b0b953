"""`fashionmv publish` and `fashionmv remove`: a build as a Hugging Face Hub dataset repo, and takedowns.

The repo is first written to a local folder, `<output_dir>/publish/repo/` (README.md and
`data/<config>/<split>-NNNNN-of-NNNNN.parquet`), then uploaded with huggingface_hub (see `hub.upload`). Beside it,
`state.json` records where the build was published and `removed_ids.txt` every product taken down, so that a later
`publish` from the build never brings a removed product back. Neither file is uploaded.

The token is never handled here: huggingface_hub reads it from `HF_TOKEN` or its login.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fashionmv_builder.core.config import ConfigError, RunConfig
from fashionmv_builder.outputs.hub import layout
from fashionmv_builder.outputs.hub.card import CardInput, build_info, render_card
from fashionmv_builder.outputs.hub.tables import (
    CONFIGS,
    PRODUCTS_WITH_IMAGES,
    SPLITS,
    Takedown,
    add_images,
    apply_takedown,
    build_tables,
    dropped_triplets,
    image_parts,
)
from fashionmv_builder.outputs.hub.upload import CARD, RetryPolicy, UploadResult, upload_folder, with_retries

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

REPO_DIR = "repo"
STATE_FILE = "state.json"
REMOVED_FILE = "removed_ids.txt"
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class PublishOptions:
    repo_id: str
    private: bool = False
    with_images: bool = False
    revision: str = "main"
    licence: str = "other"  # a Hub licence id for the annotations
    endpoint: str | None = None  # None: huggingface_hub's (HF_ENDPOINT or the Hub)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        # A bare name would be created under the token's user, but every later call needs the full id.
        if not REPO_ID.fullmatch(self.repo_id):
            raise ConfigError(f"--repo-id must be ORG/NAME, got {self.repo_id!r}")


@dataclass
class PublishResult:
    folder: Path
    files: list[tuple[str, int]]  # (path in repo, bytes) of the folder
    upload: UploadResult | None  # None for a dry run


def publish_root(config: RunConfig, root: Path | None = None) -> Path:
    """Where the repo folder and the takedown list live: `<output_dir>/publish` unless given."""
    if root is not None:
        return root
    if "://" in config.output_dir:
        raise ConfigError("output_dir is not a local folder: give a local --folder for the repo to publish")
    return Path(config.output_dir) / "publish"


def read_takedown(root: Path, config: RunConfig) -> Takedown:
    path = root / REMOVED_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return Takedown.parse(lines, [s.dataset for s in config.sources])


def _read_report(config: RunConfig) -> dict[str, Any] | None:
    """The build's `fashionmv report` (report/report.json), or a fresh one when none was written."""
    path = Path(config.output_dir) / "report" / "report.json"
    if "://" not in config.output_dir and path.exists():
        return json.loads(path.read_text())
    from fashionmv_builder.outputs.report import build_report  # loads the text embedder: only when needed

    return build_report(config)


def _images_shard(out: str, dataset: str, shard: int, part: pa.Table, metadata: dict) -> pa.Table:
    return add_images(out, dataset, shard, part).replace_schema_metadata(metadata)


def _shards(config: RunConfig, name: str, table: pa.Table, with_images: bool) -> list[Callable[[], pa.Table]]:
    """Loaders of the shards of one config's split: by size, or for products with images, by build shard."""
    if not (with_images and name == "products"):
        return layout.row_slices(table)
    metadata = layout.features_metadata(PRODUCTS_WITH_IMAGES, "images")
    shards: list[Callable[[], pa.Table]] = []
    for source in config.sources:
        rows = table.filter(pc.equal(table.column("dataset"), source.dataset))
        for shard, part in image_parts(config.output_dir, source.dataset, rows):
            shards.append(partial(_images_shard, config.output_dir, source.dataset, shard, part, metadata))
    return shards


def stage_data(config: RunConfig, folder: Path, with_images: bool, takedown: Takedown) -> list[str]:
    """Write every config and split of the build into the folder; returns the data files written."""
    datasets = [s.dataset for s in config.sources]
    tables = build_tables(config.output_dir, datasets)
    dropped = dropped_triplets(tables["triplets"], takedown)
    written = []
    for name in CONFIGS:
        table = apply_takedown(name, tables[name], takedown, dropped)
        rows_per_group = layout.IMAGE_ROW_GROUP_ROWS if with_images and name == "products" else layout.ROW_GROUP_ROWS
        for split in SPLITS:
            part = table.filter(pc.equal(table.column("split"), split))
            if part.num_rows:
                written += layout.write_split(
                    folder, name, split, _shards(config, name, part, with_images), rows_per_group
                )
    stale = layout.remove_others(folder, set(written))
    log.info("%d data files written to %s (%d stale ones removed)", len(written), folder, len(stale))
    return written


def write_card(config: RunConfig, folder: Path, options: PublishOptions, removed: int) -> None:
    card = CardInput(
        repo_id=options.repo_id,
        licence=options.licence,
        with_images=layout.has_column(folder, "products", "images"),
        files=layout.data_files(folder),
        rows=layout.row_counts(folder),
        removed=removed,
        build=build_info(config),
        report=_read_report(config),
    )
    layout.write_text(folder / CARD, render_card(card))


def _folder_files(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def _api(options: PublishOptions) -> HfApi:
    from huggingface_hub import HfApi  # token: HF_TOKEN or the stored login, read by the client itself

    return HfApi(endpoint=options.endpoint)


def _upload(folder: Path, options: PublishOptions, message: str) -> UploadResult:
    return upload_folder(
        _api(options),
        folder,
        options.repo_id,
        revision=options.revision,
        private=options.private,
        message=message,
        policy=options.retry,
    )


def _save_state(root: Path, options: PublishOptions) -> None:
    state = {k: v for k, v in asdict(options).items() if k in ("repo_id", "revision", "licence", "with_images")}
    layout.write_text(root / STATE_FILE, json.dumps(state, indent=1) + "\n")


def publish(
    config: RunConfig, options: PublishOptions, *, dry_run: bool = False, root: Path | None = None
) -> PublishResult:
    """Write the repo folder from the build (without removed products) and, unless a dry run, upload it."""
    root = publish_root(config, root)
    folder = root / REPO_DIR
    takedown = read_takedown(root, config)
    stage_data(config, folder, options.with_images, takedown)
    write_card(config, folder, options, removed=len(takedown.lines()))
    files = _folder_files(folder)
    if dry_run:
        return PublishResult(folder, files, None)
    result = _upload(folder, options, f"Publish build {config.name} ({config.config_hash()[:12]})")
    _save_state(root, options)
    return PublishResult(folder, files, result)


def _rewrite_shards(folder: Path, takedown: Takedown) -> list[str]:
    """Filter every published shard in place; only shards that change are written again (same names)."""
    files = layout.data_files(folder)
    columns = ["triplet_id", "dataset", "source_id", "target_id"]
    dropped: set[str] = set()
    for path in (p for paths in files.get("triplets", {}).values() for p in paths):
        dropped |= dropped_triplets(pq.read_table(folder / path, columns=columns), takedown)
    rewritten = []
    for name, splits in files.items():
        for path in (p for paths in splits.values() for p in paths):
            table = pq.read_table(folder / path)
            kept = apply_takedown(name, table, takedown, dropped)
            if not kept.equals(table):
                group = layout.IMAGE_ROW_GROUP_ROWS if "images" in table.schema.names else layout.ROW_GROUP_ROWS
                layout.write_parquet(folder / path, kept, group)
                rewritten.append(path)
    return rewritten


def _options_for_remove(root: Path, repo_id: str | None, revision: str | None, endpoint: str | None) -> PublishOptions:
    """Where the build was last published (state.json), unless told otherwise."""
    state_path = root / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if repo_id is None and "repo_id" not in state:
        raise ConfigError(f"{state_path} is missing: give --repo-id")
    state |= {k: v for k, v in (("repo_id", repo_id), ("revision", revision)) if v is not None}
    return PublishOptions(**state, endpoint=endpoint)


def remove(
    config: RunConfig,
    lines: list[str],
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    squash_history: bool = False,
    retry: RetryPolicy | None = None,
    root: Path | None = None,
) -> tuple[list[str], PublishResult]:
    """Take products down: record them, drop them (and every row naming them) from the published shards, and publish
    the result as a new commit; with `squash_history`, the branch's history is then squashed into that one commit
    so that no older revision still serves them. Returns the shards rewritten and the publish result."""
    root = publish_root(config, root)
    folder = root / REPO_DIR
    if not (folder / CARD).exists():
        raise ConfigError(f"nothing published from this build yet ({folder} is missing): run fashionmv publish first")
    options = _options_for_remove(root, repo_id, revision, endpoint)
    if retry is not None:
        options.retry = retry
    new = Takedown.parse(lines, [s.dataset for s in config.sources])
    takedown = read_takedown(root, config) | new
    layout.write_text(root / REMOVED_FILE, "\n".join(takedown.lines()) + "\n")
    rewritten = _rewrite_shards(folder, takedown)
    write_card(config, folder, options, removed=len(takedown.lines()))
    # The message names no product: a takedown must not publish the ids it removes.
    message = f"Takedown: remove {len(new.lines())} product(s)"
    result = _upload(folder, options, message)
    if squash_history:
        api = _api(options)
        with_retries(
            lambda: api.super_squash_history(
                options.repo_id, branch=options.revision, repo_type="dataset", commit_message=message
            ),
            options.retry,
            "squash history",
        )
    _save_state(root, options)
    return rewritten, PublishResult(folder, _folder_files(folder), result)


def summary(result: PublishResult) -> list[str]:
    """What was (or, for a dry run, would be) uploaded, for the command line."""
    total = sum(size for _, size in result.files)
    if result.upload is None:
        lines = [f"  {path}  ({size:,} bytes)" for path, size in result.files]
        return [
            f"dry run: {len(result.files)} files ({total:,} bytes) written to {result.folder}",
            *lines,
            "nothing uploaded; files already identical on the Hub are skipped by a real run",
        ]
    plan = result.upload.plan
    return [
        f"uploaded {len(plan.upload)} files ({plan.bytes:,} bytes), {len(plan.unchanged)} already on the Hub, "
        f"{len(plan.delete)} stale files deleted, in {len(result.upload.commits)} commit(s)",
        *(f"  commit {oid}" for oid in result.upload.commits),
    ]
