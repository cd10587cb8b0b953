"""Ingest: crawl a source, decode + validate + hash every view once, write product and image shards.

In: the products a crawler lists (a folder tree, an h5 file, a manifest of URLs). Out, per shard: `products`,
`images` (bytes stored here and nowhere else) and `rejects`. A product survives ingest if it has a safe id and at
least one readable view; view-count rules and duplicates are the dedupe stage's job. A shard reruns when the
listing of its products changes (ids, file names, sizes and times, manifest rows) or the ingest settings do.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa

from fashionmv_builder.core.build import INGEST_IMAGES, INGEST_PRODUCTS
from fashionmv_builder.core.config import RunConfig, digest
from fashionmv_builder.core.ledger import Reject, Rejected, ShardLedger
from fashionmv_builder.core.stage import DatasetPlan, ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.ingest.images import check_image
from fashionmv_builder.stages.ingest.sources import make_source
from fashionmv_builder.stages.ingest.sources.base import RawProduct, RawView


def _problem(reject: Reject | None) -> list | None:
    return [reject.reason.value, reject.detail] if reject else None


def listing_fingerprint(products: tuple[RawProduct, ...]) -> str:
    """What a shard's output depends on in the source: the listed products and views, with their change stamps."""
    return digest(
        [
            [
                p.product_id,
                _problem(p.problem),
                p.split,
                p.category,
                [[v.file_name, v.locator, v.stamp, _problem(v.problem)] for v in p.views],
            ]
            for p in products
        ]
    )


def assign_shards(
    listed: list[RawProduct], previous: dict[int, set[str]], size: int
) -> dict[int, tuple[RawProduct, ...]]:
    """Stable work units: a product stays in the shard it was first written to, and products not seen before top
    up the last shard, then fill new ones, `size` each, in listing order. So adding products rewrites only the last
    shard and new ones, and withdrawing one rewrites only its own shard: every other shard of every stage keeps its
    files and is skipped. (Measured on the sample's folder layout, 180 listed products in shards of 25 plus 20 with
    interleaved ids: cutting the sorted listing into chunks, as before, changes 8 of 8 shards; hashing ids into 8
    fixed buckets would change 8 of 8 too; this changes 1, the last, topped up.) A first build is the sorted listing
    cut into chunks, as it always was."""
    home = {pid: shard for shard, pids in previous.items() for pid in pids}
    shards: dict[int, list[RawProduct]] = {}
    new: list[RawProduct] = []
    for product in listed:
        if product.product_id in home:
            shards.setdefault(home[product.product_id], []).append(product)
        else:
            new.append(product)
    if previous and new:
        last = max(previous)
        room = max(0, size - len(shards.get(last, [])))
        if room:
            shards.setdefault(last, []).extend(new[:room])
            new = new[room:]
    first_new = max(previous, default=-1) + 1
    for k in range(0, len(new), size):
        shards[first_new + k // size] = new[k : k + size]
    # Listing order inside a shard, whatever the order products arrived in it.
    position = {p.product_id: i for i, p in enumerate(listed)}
    return {s: tuple(sorted(ps, key=lambda p: position[p.product_id])) for s, ps in sorted(shards.items()) if ps}


class IngestStage(Stage):
    """Crawl the sources, validate and hash every image once, write product and image shards."""

    name = INGEST_PRODUCTS.stage
    version = "2"  # 2: images record their source file's change stamp
    work = Work.SHARD
    reads = ()  # the sources, not the build
    writes: ClassVar[dict] = {INGEST_PRODUCTS.table: tables.PRODUCTS, INGEST_IMAGES.table: tables.IMAGES}

    def settings(self, dataset: str) -> dict:
        """The source's own section is part of it: changing one source redoes only its shards."""
        return {
            "source": self.config.source(dataset).model_dump(mode="json"),
            "ingest": self.config.ingest.model_dump(mode="json"),
            "allow_private_addresses": self.config.http.allow_private_addresses,
            "max_redirects": self.config.http.max_redirects,
        }

    def plan(self, dataset: str) -> DatasetPlan:
        """Every shard of one source (`assign_shards`: products keep their shard from run to run), and what changed
        since the last run: products added, kept and withdrawn."""
        crawler = make_source(self.config.source(dataset), self.config)
        try:
            listed = list(crawler.list_products())
        except (OSError, KeyError, ValueError) as err:  # a missing root, an h5 without its datasets…
            return DatasetPlan(dataset, [], [], error=f"cannot list the source: {err}")
        previous = self.build.shard_members(INGEST_PRODUCTS, dataset)
        assigned = assign_shards(listed, previous, self.config.shard_size)
        tasks = [ShardTask(dataset, shard, listing_fingerprint(chunk), chunk) for shard, chunk in assigned.items()]
        before = set().union(*previous.values())
        now = {p.product_id for p in listed}
        todo = self.pending(tasks)
        extra: dict = {"listing": dict(crawler.listing_counts)}
        if todo:  # nothing to do means nothing changed: stats.json keeps the last change
            extra["change"] = {"added": len(now - before), "kept": len(now & before), "withdrawn": len(before - now)}
        return DatasetPlan(dataset, tasks, todo, extra)

    def run_shard(self, task: ShardTask) -> ShardOutput:
        source = self.config.source(task.dataset)
        crawler = make_source(source, self.config)
        ledger = self.ledger(task.dataset)
        raw: tuple[RawProduct, ...] = task.payload
        earlier = self.earlier_views(task)
        to_read = [
            v
            for p in raw
            if p.problem is None
            for v in p.views
            if v.problem is None and (p.product_id, v.file_name, v.stamp) not in earlier
        ]
        fetched: dict[RawView, bytes | Reject | dict] = dict(crawler.read_views(to_read))
        for p in raw:
            for v in p.views:
                if (found := earlier.get((p.product_id, v.file_name, v.stamp))) is not None:
                    fetched[v] = found
                    ledger.counts["views_not_read_again"] += 1
        products, images = [], []
        for product in raw:
            ledger.take(len(product.views))
            if product.problem is not None:
                ledger.reject_product(
                    product.problem, product.product_id, views_left=len(product.views), source_uri=product.source_uri
                )
                continue
            rows = self._read_views(product, fetched, ledger)
            if not rows:
                detail = f"none of its {len(product.views)} views could be read"
                reject = Reject(RejectReason.NO_READABLE_VIEWS, detail)
                ledger.reject_product(reject, product.product_id, views_left=0, source_uri=product.source_uri)
                continue
            ledger.keep(len(rows))
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
        for name, value in crawler.fetch_counts().items():
            ledger.counts[f"read.{name}"] += value
        return ShardOutput(
            {
                INGEST_PRODUCTS.table: pa.Table.from_pylist(products, schema=tables.PRODUCTS),
                INGEST_IMAGES.table: pa.Table.from_pylist(images, schema=tables.IMAGES),
            },
            ledger,
        )

    def earlier_views(self, task: ShardTask) -> dict[tuple[str, str, str], dict]:
        """The image rows this shard holds from an earlier run with the same settings, by product, file name and
        change stamp: a view whose file has the same stamp is not read and decoded again (a shard redone because a
        product was added to it or withdrawn from it)."""
        try:
            rows = self.earlier_rows(task.dataset, INGEST_IMAGES.table, [task.shard])
        except OSError:  # damaged: read the sources again
            return {}
        return {(r["product_id"], r["file_name"], r["source_stamp"]): r for r in rows if r["source_stamp"]}

    def _read_views(
        self, product: RawProduct, fetched: dict[RawView, bytes | Reject | dict], ledger: ShardLedger
    ) -> list:
        rows = []
        for index, view in enumerate(product.views):
            outcome = view.problem or fetched[view]
            try:
                if isinstance(outcome, Reject):
                    raise Rejected(outcome)
                if isinstance(outcome, dict):  # read in an earlier run: what the listing says may still differ
                    rows.append({**outcome, **_listing_fields(product, index, view)})
                    continue
                rows.append(_image_row(product, index, view, outcome, self.config))
            except Rejected as err:
                ledger.reject_view(
                    err.reject, product.product_id, view_index=index, file_name=view.file_name, source_uri=view.locator
                )
        return rows


def _image_row(product: RawProduct, index: int, view: RawView, data: bytes, config: RunConfig) -> dict:
    checked = check_image(
        data,
        max_file_bytes=config.ingest.max_file_bytes,
        max_image_pixels=config.ingest.max_image_pixels,
        allowed_formats=config.ingest.allowed_formats,
    )
    return {
        **_listing_fields(product, index, view),
        "image": {"bytes": checked.data, "path": f"{product.product_id}/{view.file_name}"},
        "format": checked.format,
        "width": checked.width,
        "height": checked.height,
        "phash": checked.phash,
        "dhash": checked.dhash,
        "sha256": checked.sha256,
    }


def _listing_fields(product: RawProduct, index: int, view: RawView) -> dict:
    """An image row's fields that come from the listing, not from the bytes."""
    return {
        "dataset": product.dataset,
        "product_id": product.product_id,
        "view_index": index,
        "file_name": view.file_name,
        "view": view.view,
        "source_uri": view.locator,
        "licence": product.licence,
        "source_stamp": view.stamp,
    }
