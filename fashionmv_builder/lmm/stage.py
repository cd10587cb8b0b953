"""The harness every LMM stage runs in: shards in, one request per product, shards out.

A stage says how to load a shard's items, what request each item makes, and what an answer means (a row, or a
reject with its reason); the harness does the rest the same way for all of them: skip shards whose marker matches,
run every shard's requests concurrently through the one client (so the server stays busy across shard
boundaries), replay stored answers, count tokens and time, trip the circuit breaker, check conservation, and write
the shard and its marker.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
from pydantic import BaseModel

from data_schema.lmm_answers import schema_digest, schema_of
from data_schema.reasons import RejectLevel, RejectReason
from fashionmv_builder.config import RunConfig, digest
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.lmm.calls import AnswerStore, CallOutcome, CircuitBreaker, call_validated
from fashionmv_builder.lmm.client import LmmClient, LmmRequest
from fashionmv_builder.lmm.media import MediaCache
from fashionmv_builder.prompts import load_prompt
from fashionmv_builder.shards import ShardMarker, ShardStore


@dataclass
class Item:
    """One product on its way through an LMM stage."""

    product: dict  # the input row
    views: list[dict]  # view references (view_index, file_name, view), in order
    images: list[bytes]  # the views' stored bytes, from the ingest images table
    extra: dict = field(default_factory=dict)  # stage-specific input, e.g. the captions to verify


def _no_check(_answer: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Ask:
    request: LmmRequest
    canonical: dict
    model: type[BaseModel]
    check: Callable[[Any], str | None] = _no_check  # a rule the schema cannot express; its message if broken


@dataclass
class StageContext:
    config: RunConfig
    client: LmmClient
    media: MediaCache
    answers: AnswerStore
    breaker: CircuitBreaker
    endpoints: int


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_parts(images: Sequence[bytes], media: MediaCache) -> tuple[list[dict], list[str]]:
    """`[Image k]` labels and image parts, and the content hashes that go into the request key."""
    parts, hashes = [], []
    for k, data in enumerate(images, start=1):
        prepared = media.prepare(data)
        parts += [text_part(f"[Image {k}]"), {"type": "image_url", "image_url": {"url": prepared.url}}]
        hashes.append(prepared.sha256)
    return parts, hashes


class LmmStage(ABC):
    name: str
    version: str  # bump when the stage's output changes for the same inputs and settings
    settings: str  # the config section with the stage's prompt, max_tokens and breaker_threshold
    input_stage: str
    input_table: str  # the input shard's table with one row per product
    output_schemas: ClassVar[dict[str, pa.Schema]]  # the tables a shard writes besides `rejects`
    bad_outcome: str  # what the circuit breaker counts, in words

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.section = getattr(config, self.settings)
        self.prompt = load_prompt(self.section.prompt)

    def stage_hash(self) -> str:
        """Everything besides the inputs that the stage's output depends on: a change redoes its shards."""
        lmm = self.config.lmm
        return digest(
            {
                "stage": self.name,
                "version": self.version,
                "prompt_sha": hashlib.sha256(self.prompt.text.encode()).hexdigest(),
                "settings": self.section.model_dump(mode="json"),
                "lmm": lmm.model_dump(
                    mode="json",
                    include={"model", "model_revision", "words", "temperature", "retry_temperature", "seed"}
                    | {"invalid_retries", "image_max_pixels"},
                ),
            }
        )

    def make_ask(
        self,
        model: type[BaseModel],
        content: list[dict],
        image_hashes: list[str],
        texts: list[str],
        check: Callable[[Any], str | None] = _no_check,
    ) -> Ask:
        """The request for one item: the stage's prompt first (vLLM's prefix cache reuses it across requests), then
        the item's content; and the canonical form of everything the answer depends on, which keys the store."""
        lmm = self.config.lmm
        canonical = {
            "model": lmm.model,
            "revision": lmm.model_revision,
            "prompt": self.prompt.id,
            "prompt_sha": hashlib.sha256(self.prompt.text.encode()).hexdigest(),
            "schema": schema_digest(model),
            "max_tokens": self.section.max_tokens,
            "temperature": lmm.temperature,
            "images": image_hashes,
            "text": texts,
        }
        request = LmmRequest(
            key="",
            messages=({"role": "system", "content": self.prompt.text}, {"role": "user", "content": content}),
            schema_name=self.name,
            schema=schema_of(model),
            max_tokens=self.section.max_tokens,
            temperature=lmm.temperature,
            seed=lmm.seed,
        )
        return Ask(request, canonical, model, check)

    @abstractmethod
    def ask(self, item: Item, ctx: StageContext) -> Ask: ...

    @abstractmethod
    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | None:
        """The output rows (per table) for a valid answer, or None after recording a reject on the ledger."""

    def extra_inputs(self, marker: ShardMarker) -> dict[tuple[str, str], Any]:
        """Per-product stage inputs beyond views and images, keyed by (dataset, product_id)."""
        return {}

    def views_for(self, marker: ShardMarker) -> pa.Table:
        """The view references of the shard's products (the dedupe stage's `views` table)."""
        store = ShardStore(self.config.output_dir, "dedupe", marker.dataset)
        dedupe_marker = store.read_marker(marker.shard)
        if dedupe_marker is None:
            raise FileNotFoundError(f"dedupe shard {marker.shard} of {marker.dataset} is missing")
        return store.read_part(dedupe_marker, "views")

    # -- the harness -------------------------------------------------------------------------------------------

    def input_markers(self, dataset: str) -> list[ShardMarker]:
        return ShardStore(self.config.output_dir, self.input_stage, dataset).markers()

    def fingerprint(self, marker: ShardMarker) -> str:
        ingest = ShardStore(self.config.output_dir, "ingest", marker.dataset).read_marker(marker.shard)
        return digest(
            {
                "input": {name: f.sha256 for name, f in marker.files.items()},
                "images": ingest.files["images"].sha256 if ingest else None,
            }
        )

    def load_items(self, marker: ShardMarker) -> list[Item]:
        store = ShardStore(self.config.output_dir, self.input_stage, marker.dataset)
        products = store.read_part(marker, self.input_table).to_pylist()
        views: dict[str, list[dict]] = {}
        for row in self.views_for(marker).to_pylist():
            views.setdefault(row["product_id"], []).append(row)
        ingest = ShardStore(self.config.output_dir, "ingest", marker.dataset)
        ingest_marker = ingest.read_marker(marker.shard)
        images_table = ingest.read_part(ingest_marker, "images", columns=["product_id", "view_index", "image"])
        image_bytes = {(r["product_id"], r["view_index"]): r["image"]["bytes"] for r in images_table.to_pylist()}
        extra = self.extra_inputs(marker)
        items = []
        for product in products:
            pviews = sorted(views.get(product["product_id"], []), key=lambda v: v["file_name"])
            items.append(
                Item(
                    product=product,
                    views=pviews,
                    images=[image_bytes[(product["product_id"], v["view_index"])] for v in pviews],
                    extra=extra.get((product["dataset"], product["product_id"]), {}),
                )
            )
        return items

    async def run_shard(self, marker: ShardMarker, ctx: StageContext) -> ShardMarker:
        items = self.load_items(marker)
        ledger = ShardLedger(self.name, marker.dataset)
        asks = [self.ask(item, ctx) for item in items]
        tasks = [
            asyncio.ensure_future(
                call_validated(
                    ctx.client,
                    ctx.answers,
                    a.request,
                    a.canonical,
                    a.model,
                    invalid_retries=self.config.lmm.invalid_retries,
                    retry_temperature=self.config.lmm.retry_temperature,
                    send_seed=self.config.lmm.send_seed,
                    check=a.check,
                )
            )
            for a in asks
        ]
        outcomes: list[CallOutcome] = []
        try:
            for done in asyncio.as_completed(tasks):
                outcome = await done
                outcomes.append(outcome)
                ctx.breaker.record(self.is_bad(outcome), self.bad_outcome)
        finally:
            for t in tasks:
                t.cancel()
        by_key = {o.key: o for o in outcomes}
        rows: dict[str, list[dict]] = {name: [] for name in self.output_schemas}
        for item, ask in zip(items, asks, strict=True):
            outcome = by_key[ask_key(ask)]
            n_views = len(item.views)
            ledger.counts["products_in"] += 1
            ledger.counts["views_in"] += n_views
            ledger.counts["tokens_in"] += outcome.tokens_in
            ledger.counts["tokens_out"] += outcome.tokens_out
            ledger.counts["requests_sent"] += outcome.attempts - outcome.from_store
            ledger.counts["answers_replayed"] += outcome.from_store
            ledger.counts["request_milliseconds"] += round(outcome.seconds * 1000)
            if outcome.answer is None:
                ledger.reject(
                    RejectLevel.PRODUCT,
                    RejectReason.INVALID_LMM_ANSWER,
                    item.product["product_id"],
                    f"{outcome.attempts} answers failed validation; last: {outcome.error}",
                )
                produced = None
            else:
                produced = self.accept(item, outcome, ledger)
            if produced is None:
                ledger.counts["views_dropped_with_product"] += n_views
                continue
            for name, new_rows in produced.items():
                rows[name].extend(new_rows)
            ledger.counts["products_out"] += 1
            ledger.counts["views_out"] += n_views
        ledger.check()
        store = ShardStore(self.config.output_dir, self.name, marker.dataset)
        tables = {name: pa.Table.from_pylist(rows[name], schema=schema) for name, schema in self.output_schemas.items()}
        return store.write(
            marker.shard,
            {**tables, "rejects": ledger.rejects_table()},
            config_hash=self.stage_hash(),
            input_fingerprint=self.fingerprint(marker),
            counts=ledger.counts,
            metadata={"fashionmv.stage": self.name, "fashionmv.model": self.config.lmm.model},
        )

    def is_bad(self, outcome: CallOutcome) -> bool:
        return outcome.answer is None


def ask_key(ask: Ask) -> str:
    """The key of an ask's first attempt: what `call_validated` reports as the outcome's key."""
    return digest({**ask.canonical, "seed": ask.request.seed})


@dataclass
class StageReport:
    dataset: str
    shards: int
    skipped: int
    stats: dict


def media_cache(config: RunConfig) -> MediaCache:
    fs, root = fsspec.core.url_to_fs(config.output_dir)
    share = config.lmm.share_disk and fs.protocol in ("file", ("file", "local"))
    return MediaCache(Path(root) / "lmm-images", config.lmm.image_max_pixels, share)


async def run_stage(
    stage: LmmStage, endpoints: list[str], datasets: list[str] | None = None, pilot: float | None = None
) -> list[StageReport]:
    """Run one LMM stage over every dataset (or the first `pilot` fraction of each one's shards), every shard's
    requests on one client, so the server stays busy across shard boundaries."""
    client = lmm_client(stage.config, endpoints)
    try:
        await client.check()
        ctx = stage_context(stage, client, len(endpoints))
        plans = plan_stage(stage, datasets, pilot)
        start = time.perf_counter()
        await asyncio.gather(*(stage.run_shard(m, ctx) for plan in plans for m in plan.todo))
    finally:
        await client.close()
    return finish_stage(stage, plans, time.perf_counter() - start, len(endpoints))


# -- per-shard entry points for task runners (the Prefect flow): run_stage's steps, one shard per call ----------


@dataclass
class StagePlan:
    """One dataset's input shards for a stage, and those whose marker does not match (to do)."""

    dataset: str
    markers: list[ShardMarker]
    todo: list[ShardMarker]
    whole: bool = True  # False for a pilot: the shards beyond its slice are not stale


def plan_stage(stage: LmmStage, datasets: list[str] | None = None, pilot: float | None = None) -> list[StagePlan]:
    config = stage.config
    plans = []
    for source in config.sources:
        if datasets and source.dataset not in datasets:
            continue
        markers = stage.input_markers(source.dataset)
        if pilot is not None:
            markers = markers[: max(1, math.ceil(len(markers) * pilot))]
        store = ShardStore(config.output_dir, stage.name, source.dataset)
        todo = [m for m in markers if not store.is_complete(m.shard, stage.stage_hash(), stage.fingerprint(m))]
        plans.append(StagePlan(source.dataset, markers, todo, whole=pilot is None))
    return plans


def finish_stage(stage: LmmStage, plans: list[StagePlan], wall: float, endpoints: int) -> list[StageReport]:
    """After every planned shard is written: drop stale markers and sum the stats (time only when work was done)."""
    reports = []
    for plan in plans:
        store = ShardStore(stage.config.output_dir, stage.name, plan.dataset)
        if plan.whole:
            store.remove_stale(m.shard for m in plan.markers)
        extra = {"wall_seconds": round(wall, 3), "server_seconds": round(wall * endpoints, 3)}
        if not plan.todo:
            previous = store.read_stats() or {}
            extra = {k: previous[k] for k in extra if k in previous}
        skipped = len(plan.markers) - len(plan.todo)
        reports.append(StageReport(plan.dataset, len(plan.markers), skipped, store.write_stats(extra)))
    return reports


def lmm_client(config: RunConfig, endpoints: list[str], max_in_flight: int | None = None) -> LmmClient:
    lmm = config.lmm
    return LmmClient(
        endpoints,
        lmm.model,
        max_in_flight=max_in_flight or lmm.max_in_flight,
        timeout_s=lmm.timeout_s,
        retries=lmm.retries,
        backoff_s=lmm.backoff_s,
    )


def stage_context(stage: LmmStage, client: LmmClient, endpoints: int) -> StageContext:
    config = stage.config
    return StageContext(
        config=config,
        client=client,
        media=media_cache(config),
        answers=AnswerStore(config.output_dir, stage.name),
        breaker=CircuitBreaker(
            stage.section.breaker_threshold, config.lmm.breaker_min_products, f"{stage.settings}.breaker_threshold"
        ),
        endpoints=endpoints,
    )


def check_endpoints(config: RunConfig, endpoints: list[str]) -> None:
    """Fail early, with what to do, when a server is down or serves another model (LmmUnreachable)."""

    async def check() -> None:
        client = lmm_client(config, endpoints)
        try:
            await client.check()
        finally:
            await client.close()

    asyncio.run(check())


def run_lmm_shard(
    stage: LmmStage, endpoints: list[str], marker: ShardMarker, max_in_flight: int | None = None
) -> ShardMarker:
    """One shard on a client of its own, in an event loop of its own: the unit a task runner schedules.

    Its circuit breaker judges this shard's products only, from `lmm.breaker_min_products` of them on."""

    async def run() -> ShardMarker:
        client = lmm_client(stage.config, endpoints, max_in_flight)
        try:
            await client.check()
            return await stage.run_shard(marker, stage_context(stage, client, len(endpoints)))
        finally:
            await client.close()

    return asyncio.run(run())
