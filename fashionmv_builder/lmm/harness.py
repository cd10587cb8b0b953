"""The harness every LMM stage runs in: one request per product, on the stage contract (core/stage.py).

An LMM stage says how to load a shard's items, what request each item makes, and what an answer means (rows, or a
reject with its reason); the harness does the rest the same way for all of them: send or replay every request of a
shard through the client, count tokens and time, trip the run's circuit breaker for the stage, and hand the shard
to the executor's `commit`. Locally every shard's requests share one client (`run_lmm_shards`, so the server stays
busy across shard boundaries); a task runner runs one shard on a client of its own (`run_lmm_shard`).

Before a shard's requests are made, its views are prepared at every pixel budget of the run's LMM stages (media.py)
in a pool of `workers` threads (PIL decodes, resizes and encodes without the GIL), while the earlier shards' requests
are in flight: the first LMM stage decodes each full-size photo once, and the later ones read the small files.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel

from fashionmv_builder.core.config import LMM_SECTIONS, ConfigError, LmmConfig, RunConfig, digest
from fashionmv_builder.core.executor import commit
from fashionmv_builder.core.ledger import Reject, ShardLedger
from fashionmv_builder.core.prompts import load_prompt
from fashionmv_builder.core.shards import ShardMarker
from fashionmv_builder.core.stage import DatasetPlan, ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema.lmm_answers import schema_digest, schema_of
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.lmm.calls import AnswerStore, CallOutcome, CircuitBreaker, call_validated
from fashionmv_builder.lmm.client import PIXELS_PER_IMAGE_TOKEN, LmmClient, LmmRequest, lmm_client
from fashionmv_builder.lmm.media import MediaCache, warm


@dataclass(frozen=True)
class RequestSize:
    """The largest request a stage can send: what a server's context length and image limit must hold."""

    images: int
    tokens: int  # prompt (text and images) plus max_tokens
    detail: str  # how it adds up, for error messages


def image_tokens(pixels: int) -> int:
    """Tokens of one image at a pixel budget on a Qwen-VL-style encoder (28×28 pixels a token, plus start/end)."""
    return math.ceil(pixels / PIXELS_PER_IMAGE_TOKEN) + 2


def words_tokens(words: int) -> int:
    """A bound on the tokens of `words` schema words (at most 20 characters each): about 5 tokens a word."""
    return 5 * words


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
    budgets: Sequence[MediaCache] = ()  # every pixel budget of the run's LMM stages, prepared ahead of the requests
    pool: Executor | None = None  # where they are prepared; None: each image when its request is made

    async def warm(self, images: Sequence[bytes]) -> None:
        """Prepare `images` at every budget in the pool, so that no request waits on a full-size decode."""
        if self.pool is None or not self.budgets:
            return
        loop = asyncio.get_running_loop()
        # An image that fails here fails again, as before the cache, when its request is made: reported there.
        jobs = (loop.run_in_executor(self.pool, warm, self.budgets, data) for data in images)
        await asyncio.gather(*jobs, return_exceptions=True)


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


class LmmStage(Stage):
    work = Work.LMM
    settings_section: ClassVar[str | None] = None  # the config section with its prompt, max_tokens, breaker
    bad_outcome: ClassVar[str] = "answered invalidly"  # what the circuit breaker counts, in words

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.settings_section = self.settings_section or self.name
        self.section = getattr(config, self.settings_section)
        self.prompt = load_prompt(self.section.prompt)
        self.lmm_settings = config.stage_lmm(self.settings_section)  # None: the run has no LMM for this stage

    @property
    def lmm(self) -> LmmConfig:
        if self.lmm_settings is None:
            raise ConfigError(f"{self.name}: no LMM is configured (an lmm section, or {self.settings_section}.lmm)")
        return self.lmm_settings

    def settings(self, dataset: str) -> dict:
        """Everything besides the inputs that the stage's output depends on: a change redoes its shards."""
        lmm = self.lmm
        return {
            "prompt_sha": hashlib.sha256(self.prompt.text.encode()).hexdigest(),
            # its own lmm section: only the fields that change answers count, and they are in "lmm" below
            "settings": self.section.model_dump(mode="json", exclude={"lmm", "refresh", "mining"}),
            "lmm": lmm.model_dump(
                mode="json",
                include={"model", "model_revision", "words", "temperature", "retry_temperature", "seed"}
                | {"invalid_retries", "image_max_pixels"},
            ),
        }

    def metadata(self) -> dict[str, str]:
        return {
            **super().metadata(),
            "fashionmv.model": self.lmm.model,
            "fashionmv.model_revision": self.lmm.model_revision,
        }

    def largest_request(self) -> RequestSize:
        """Every view of a product with the most views, the prompt, the stage's own text, and max_tokens."""
        views = self.config.dedupe.max_views
        prompt = math.ceil(len(self.prompt.text) / 4) + 64  # the system prompt; 64 for the item's own lines
        per_image = image_tokens(self.lmm.image_max_pixels)
        tokens = prompt + views * per_image + self.extra_tokens(views) + self.section.max_tokens
        detail = (
            f"{views} images of {per_image} tokens at {self.lmm.image_max_pixels} px, a {prompt}-token prompt, "
            f"{self.extra_tokens(views)} tokens of the stage's text, max_tokens {self.section.max_tokens}"
        )
        return RequestSize(views, tokens, detail)

    def extra_tokens(self, views: int) -> int:
        """Tokens of text a request carries besides its prompt (e.g. the captions a verifier checks)."""
        return 0

    def finish(self, plan: DatasetPlan) -> dict:
        """The stats record which model answered and what it costs, so the report and the card can say so."""
        lmm = self.lmm
        model = {"model": lmm.model, "model_revision": lmm.model_revision, "price": lmm.price.model_dump()}
        return {**super().finish(plan), **model}

    def make_breaker(self) -> CircuitBreaker:
        return CircuitBreaker(
            self.section.breaker_threshold,
            self.lmm.breaker_min_products,
            f"{self.settings_section}.breaker_threshold",
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
        lmm = self.lmm
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
    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | Reject:
        """The output rows (per table) for a valid answer, or why the product is dropped. The ledger is there for
        the stage's own counters."""

    def extra_inputs(self, task: ShardTask) -> dict[tuple[str, str], Any]:
        """Per-product stage inputs beyond views and images, keyed by (dataset, product_id)."""
        return {}

    def load_items(self, task: ShardTask) -> list[Item]:
        """The shard's input rows, each with its kept views and their image bytes."""
        products = self.build.read_shard(self.reads[0], task.dataset, task.shard).to_pylist()
        views = self.build.kept_views(task.dataset, [task.shard])
        extra = self.extra_inputs(task)
        items = []
        for product in products:
            pviews = views.get(product["product_id"], [])
            items.append(
                Item(
                    product=product,
                    views=pviews,
                    images=[v["bytes"] for v in pviews],
                    extra=extra.get((product["dataset"], product["product_id"]), {}),
                )
            )
        return items

    def run_shard(self, task: ShardTask) -> ShardOutput:
        raise TypeError(f"{self.name} is an LMM stage: its shards run through run_lmm_shards or run_lmm_shard")

    def carried(self, item: Item, ledger: ShardLedger) -> dict[str, list[dict]] | Reject | None:
        """An item's outcome kept from an earlier run without asking (an incremental build); None: ask."""
        return None

    async def answer_shard(self, task: ShardTask, ctx: StageContext) -> ShardOutput:
        items = self.load_items(task)
        ledger = self.ledger(task.dataset)
        kept = {i: found for i, item in enumerate(items) if (found := self.carried(item, ledger)) is not None}
        await ctx.warm([data for i, item in enumerate(items) if i not in kept for data in item.images])
        asks = {i: self.ask(item, ctx) for i, item in enumerate(items) if i not in kept}
        tasks = [
            asyncio.ensure_future(
                call_validated(
                    ctx.client,
                    ctx.answers,
                    a.request,
                    a.canonical,
                    a.model,
                    invalid_retries=self.lmm.invalid_retries,
                    retry_temperature=self.lmm.retry_temperature,
                    send_seed=self.lmm.send_seed,
                    check=a.check,
                )
            )
            for a in asks.values()
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
        rows: dict[str, list[dict]] = {name: [] for name in self.writes}
        for i, item in enumerate(items):
            n_views = len(item.views)
            ledger.take(n_views)
            ledger.counts["answers_carried_over"] += i in kept
            produced = kept[i] if i in kept else self.settle(item, by_key[ask_key(asks[i])], ledger)
            if isinstance(produced, Reject):
                ledger.reject_product(produced, item.product["product_id"], views_left=n_views)
                continue
            for name, new_rows in produced.items():
                rows[name].extend(new_rows)
            ledger.keep(n_views)
        tables = {name: pa.Table.from_pylist(rows[name], schema=schema) for name, schema in self.writes.items()}
        return ShardOutput(tables, ledger)

    def settle(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | Reject:
        """Count an answered item's request, then turn its answer into rows (or a reject)."""
        ledger.counts["tokens_in"] += outcome.tokens_in
        ledger.counts["tokens_out"] += outcome.tokens_out
        ledger.counts["requests_sent"] += outcome.attempts - outcome.from_store
        ledger.counts["answers_replayed"] += outcome.from_store
        ledger.counts["request_milliseconds"] += round(outcome.seconds * 1000)
        if outcome.answer is None:
            detail = f"{outcome.attempts} answers failed validation; last: {outcome.error}"
            return Reject(RejectReason.INVALID_LMM_ANSWER, detail)
        return self.accept(item, outcome, ledger)

    def is_bad(self, outcome: CallOutcome) -> bool:
        return outcome.answer is None


def ask_key(ask: Ask) -> str:
    """The key of an ask's first attempt: what `call_validated` reports as the outcome's key."""
    return digest({**ask.canonical, "seed": ask.request.seed})


def media_cache(stage: LmmStage, max_pixels: int | None = None) -> MediaCache:
    """The stage's prepared images (at its own budget unless told), cached on the build's disk where it is local."""
    folder = stage.build.local_folder("lmm-images") if stage.build.is_local() else None
    return MediaCache(folder, max_pixels or stage.lmm.image_max_pixels, stage.lmm.share_disk)


def run_budgets(stage: LmmStage) -> list[MediaCache]:
    """A cache for every pixel budget the run's LMM stages send images at: each stage's own, and Stage 3's smaller
    one for candidates."""
    config = stage.config
    budgets = {lmm.image_max_pixels for s in LMM_SECTIONS if (lmm := config.stage_lmm(s)) is not None}
    if config.triplets.candidates_as == "images":
        budgets.add(config.triplets.candidate_max_pixels)
    return [media_cache(stage, b) for b in sorted(budgets, reverse=True)]


def stage_context(
    stage: LmmStage, client: LmmClient, breaker: CircuitBreaker, endpoints: int, pool: Executor | None = None
) -> StageContext:
    return StageContext(
        config=stage.config,
        client=client,
        media=media_cache(stage),
        answers=stage.build.answers(stage.name),
        breaker=breaker,
        endpoints=endpoints,
        budgets=run_budgets(stage),
        pool=pool,
    )


async def run_lmm_shards(
    stage: LmmStage, tasks: Sequence[ShardTask], endpoints: Sequence[str], breaker: CircuitBreaker
) -> list[ShardMarker]:
    """Every shard's requests at once on one client, so the server stays busy across shard boundaries."""
    if not tasks:
        return []
    client = lmm_client(stage.lmm, endpoints)
    pool = ThreadPoolExecutor(stage.config.workers, thread_name_prefix=f"{stage.name}-images")
    try:
        await client.check()
        ctx = stage_context(stage, client, breaker, len(endpoints), pool)

        async def one(task: ShardTask) -> ShardMarker:
            return commit(stage, task, await stage.answer_shard(task, ctx))

        return await asyncio.gather(*(one(t) for t in tasks))
    finally:
        pool.shutdown(cancel_futures=True)
        await client.close()


def run_lmm_shard(
    stage: LmmStage,
    task: ShardTask,
    endpoints: Sequence[str],
    breaker: CircuitBreaker,
    max_in_flight: int | None = None,
) -> ShardMarker:
    """One shard on a client of its own, in an event loop of its own: the unit a task runner schedules. The
    breaker is the run's for the stage, shared with the shards running beside it."""

    async def run() -> ShardMarker:
        client = lmm_client(stage.lmm, endpoints, max_in_flight)
        pool = ThreadPoolExecutor(stage.config.workers, thread_name_prefix=f"{stage.name}-images")
        try:
            await client.check()
            ctx = stage_context(stage, client, breaker, len(endpoints), pool)
            return commit(stage, task, await stage.answer_shard(task, ctx))
        finally:
            pool.shutdown(cancel_futures=True)
            await client.close()

    return asyncio.run(run())
