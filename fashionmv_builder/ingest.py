"""Ingest: crawl a source, decode + validate + hash every view once, write product and image shards.

In: the products a crawler lists. Out, per shard: `products`, `images` (bytes stored here and nowhere else) and
`rejects` tables, and a completion marker. A product survives ingest if it has a safe id and at least one readable
view; view-count rules and duplicates are the dedupe stage's job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import pyarrow as pa

from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import IMAGES, PRODUCTS
from fashionmv_builder.config import RunConfig, SourceConfig, digest
from fashionmv_builder.images import ImageRejected, check_image
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.runner import run_tasks
from fashionmv_builder.shards import ShardMarker, ShardStore
from fashionmv_builder.sources import make_source
from fashionmv_builder.sources.base import RawProduct, RawView, ViewReadError

STAGE = "ingest"
STAGE_VERSION = "1"  # bump when ingest's output changes for the same input and config
log = logging.getLogger("fashionmv")


@dataclass(frozen=True)
class IngestShard:
    config: RunConfig
    dataset: str
    shard: int
    products: tuple[RawProduct, ...]
    fingerprint: str


def stage_hash(config: RunConfig, source: SourceConfig) -> str:
    """What ingest's output depends on besides the input files: a change here redoes the shards."""
    return digest(
        {
            "stage": STAGE,
            "version": STAGE_VERSION,
            "source": source.model_dump(mode="json"),
            "ingest": config.ingest.model_dump(mode="json"),
            "allow_private_addresses": config.http.allow_private_addresses,
            "max_redirects": config.http.max_redirects,
        }
    )


def _view_key(v: RawView) -> list:
    return [v.file_name, v.locator, v.stamp, v.problem]


def fingerprint(products: tuple[RawProduct, ...]) -> str:
    return digest(
        [
            [
                p.product_id,
                p.problem,
                p.split,
                p.category,
                [[v.file_name, v.locator, v.stamp, v.problem] for v in p.views],
            ]
            for p in products
        ]
    )


def _chunks(items: Iterator[RawProduct], size: int) -> Iterator[tuple[RawProduct, ...]]:
    while chunk := tuple(islice(items, size)):
        yield chunk


def plan(config: RunConfig, source: SourceConfig) -> tuple[list[IngestShard], dict[str, int]]:
    """Every shard of one source (sorted product order, `shard_size` products each) and the listing counters."""
    crawler = make_source(source, config)
    shards = [
        IngestShard(config, source.dataset, i, chunk, fingerprint(chunk))
        for i, chunk in enumerate(_chunks(iter(crawler.list_products()), config.shard_size))
    ]
    return shards, dict(getattr(crawler, "listing_counts", {}))


def _image_row(product: RawProduct, index: int, view: RawView, data: bytes, config: RunConfig) -> dict:
    checked = check_image(
        data,
        max_file_bytes=config.ingest.max_file_bytes,
        max_image_pixels=config.ingest.max_image_pixels,
        allowed_formats=config.ingest.allowed_formats,
    )
    return {
        "dataset": product.dataset,
        "product_id": product.product_id,
        "view_index": index,
        "file_name": view.file_name,
        "view": view.view,
        "image": {"bytes": checked.data, "path": f"{product.product_id}/{view.file_name}"},
        "format": checked.format,
        "width": checked.width,
        "height": checked.height,
        "phash": checked.phash,
        "dhash": checked.dhash,
        "sha256": checked.sha256,
        "source_uri": view.locator,
        "licence": product.licence,
    }


def run_shard(task: IngestShard) -> ShardMarker:
    config, source = task.config, task.config.source(task.dataset)
    crawler = make_source(source, config)
    ledger = ShardLedger(STAGE, task.dataset)
    to_read = [v for p in task.products if p.problem is None for v in p.views if v.problem is None]
    fetched: dict[RawView, bytes | ViewReadError] = dict(crawler.read_views(to_read))
    products, images = [], []
    for product in task.products:
        ledger.counts["products_in"] += 1
        ledger.counts["views_in"] += len(product.views)
        if product.problem is not None:
            reason, detail = product.problem
            ledger.reject(RejectLevel.PRODUCT, reason, product.product_id, detail, source_uri=product.source_uri)
            ledger.counts["views_dropped_with_product"] += len(product.views)
            continue
        rows = []
        for index, view in enumerate(product.views):
            outcome = view.problem or fetched[view]
            try:
                if isinstance(outcome, tuple):
                    raise ImageRejected(*outcome)
                if isinstance(outcome, ViewReadError):
                    raise ImageRejected(outcome.reason, outcome.detail)
                rows.append(_image_row(product, index, view, outcome, config))
            except ImageRejected as err:
                ledger.reject(
                    RejectLevel.VIEW,
                    err.reason,
                    product.product_id,
                    err.detail,
                    view_index=index,
                    file_name=view.file_name,
                    source_uri=view.locator,
                )
        if not rows:
            ledger.reject(
                RejectLevel.PRODUCT,
                RejectReason.NO_READABLE_VIEWS,
                product.product_id,
                f"none of its {len(product.views)} views could be read",
                source_uri=product.source_uri,
            )
            continue
        ledger.counts["products_out"] += 1
        ledger.counts["views_out"] += len(rows)
        images.extend(rows)
        products.append(
            {
                "dataset": product.dataset,
                "product_id": product.product_id,
                "source_kind": source.kind,
                "group_key": product.group_key or product.product_id,
                "split": product.split,
                "category": product.category,
                "n_views": len(rows),
                "licence": product.licence,
                "source_uri": product.source_uri,
            }
        )
    ledger.check()
    store = ShardStore(config.output_dir, STAGE, task.dataset)
    return store.write(
        task.shard,
        {
            "products": pa.Table.from_pylist(products, schema=PRODUCTS),
            "images": pa.Table.from_pylist(images, schema=IMAGES),
            "rejects": ledger.rejects_table(),
        },
        config_hash=stage_hash(config, source),
        input_fingerprint=task.fingerprint,
        counts=ledger.counts,
        metadata={"fashionmv.stage": STAGE, "fashionmv.run_config_hash": config.config_hash()},
    )


@dataclass
class IngestReport:
    dataset: str
    shards: int
    skipped: int
    stats: dict


def run_ingest(config: RunConfig, datasets: list[str] | None = None) -> list[IngestReport]:
    """Ingest every source (or the named ones), skipping shards whose marker matches."""
    reports = []
    for source in config.sources:
        if datasets and source.dataset not in datasets:
            continue
        try:
            shards, listing = plan(config, source)
        except (OSError, KeyError, ValueError) as err:  # a missing root, an h5 without its datasets…
            log.error("ingest: %s: cannot list the source: %s", source.dataset, err)
            reports.append(IngestReport(source.dataset, 0, 0, {"error": f"cannot list the source: {err}"}))
            continue
        todo = pending_shards(config, source, shards)
        run_tasks(run_shard, todo, workers=config.workers, desc=f"ingest {source.dataset}")
        reports.append(finish_source(config, source, len(shards), len(shards) - len(todo), listing))
    return reports


def pending_shards(config: RunConfig, source: SourceConfig, shards: list[IngestShard]) -> list[IngestShard]:
    """The shards whose marker does not match: what a run has to (re)do."""
    store = ShardStore(config.output_dir, STAGE, source.dataset)
    config_hash = stage_hash(config, source)
    return [s for s in shards if not store.is_complete(s.shard, config_hash, s.fingerprint)]


def finish_source(
    config: RunConfig, source: SourceConfig, shards: int, skipped: int, listing: dict[str, int]
) -> IngestReport:
    """After every shard is written: drop the markers of shards that no longer exist, and sum the stats."""
    store = ShardStore(config.output_dir, STAGE, source.dataset)
    store.remove_stale(range(shards))
    return IngestReport(source.dataset, shards, skipped, store.write_stats({"listing": listing}))
