"""The discriminability check after selection: does a triplet's text lead from its source back to its target?

FashionMV asks its selection model for texts that pick the target out among the other candidates, but never checks
it. Here one cheap call per triplet shows the source and the same candidates selection saw (as short captions, or as
images at a small pixel budget) with one of the triplet's short texts (a seeded choice among its paraphrases) and
asks which candidate the text describes, in a schema of one index. A triplet whose text leads elsewhere is rejected
(`text_not_discriminative`, the candidate picked as related id) and its target joins the hard negatives of the
source's other triplets.

Every triplet also gets two redundancy flags from the embeddings the build already has (embed stage): whether its
first short text alone (against the shown candidates' short-caption vectors) or its source image alone (against
their image vectors) already ranks the target first among the shown candidates. A composed query should need both.

In: select's `triplets` and `hard_negatives`. Out: the build's `triplets` (with the check's pick and the flags) and
`hard_negatives`. The stage's items are triplets: its products in/out count triplets. With
`discriminability.enabled: false` no LMM is asked (the stage runs as a CPU stage): every triplet passes, flagged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import numpy as np
import pyarrow as pa

from fashionmv_builder.core.build import (
    CAPTIONS,
    DEDUPE_VIEWS,
    EMBEDDINGS,
    HARD_NEGATIVES,
    INGEST_IMAGES,
    SELECTED_NEGATIVES,
    SELECTED_TRIPLETS,
    TRIPLETS,
)
from fashionmv_builder.core.config import RunConfig, digest
from fashionmv_builder.core.ledger import Reject, ShardLedger
from fashionmv_builder.core.stage import DatasetPlan, ShardOutput, ShardTask, Stage, Work
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.lmm_answers import discrimination_answer
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.lmm.calls import CallOutcome
from fashionmv_builder.lmm.harness import (
    Ask,
    Item,
    LmmStage,
    RequestSize,
    StageContext,
    image_tokens,
    text_part,
    words_tokens,
)
from fashionmv_builder.lmm.media import MediaCache
from fashionmv_builder.stages.embed import encode_texts
from fashionmv_builder.stages.select import SelectStage


def ranks_first(query: np.ndarray, shown: np.ndarray, target: int) -> bool:
    """Whether the target (a row of `shown`) has the highest cosine with the query (unit vectors)."""
    return int(np.argmax(shown @ query)) == target


class DiscriminateStage(SelectStage):
    """Check that each triplet's text leads from its source back to its target; flag modality redundancy."""

    name = TRIPLETS.stage
    version = "1"
    reads = (
        SELECTED_TRIPLETS,
        SELECTED_NEGATIVES,
        EMBEDDINGS.every_shard(),
        DEDUPE_VIEWS.every_shard(),
        CAPTIONS.every_shard(),
        INGEST_IMAGES.every_shard(),
    )
    writes: ClassVar[dict] = {TRIPLETS.table: tables.TRIPLETS, HARD_NEGATIVES.table: tables.HARD_NEGATIVES}
    settings_section = "discriminability"
    bad_outcome = "answered invalidly"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.check_section = config.discriminability
        if not self.check_section.enabled:
            self.work = Work.SHARD  # nothing to ask: triplets pass, flagged, in worker processes
        self._vectors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # dataset → product → image, caption

    # -- what decides a rerun ----------------------------------------------------------------------------------

    def settings(self, dataset: str) -> dict:
        t = self.config.triplets
        own = {"enabled": self.check_section.enabled, "text_model": t.text_model, "seed": t.seed}
        return {**own, **super().settings(dataset)} if self.check_section.enabled else own

    def finish(self, plan: DatasetPlan) -> dict:
        return super().finish(plan) if self.check_section.enabled else Stage.finish(self, plan)

    # -- inputs --------------------------------------------------------------------------------------------------

    def _embeddings(self, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if dataset not in self._vectors:
            rows = self.build.rows(EMBEDDINGS, dataset, columns=["product_id", "image", "short_caption"])
            self._vectors[dataset] = {
                r["product_id"]: (np.asarray(r["image"], np.float32), np.asarray(r["short_caption"], np.float32))
                for r in rows
            }
        return self._vectors[dataset]

    def redundancy(self, dataset: str, triplets: list[dict]) -> list[tuple[bool | None, bool | None]]:
        """Per triplet: (text alone ranks the target first, source image alone does); None where a vector is
        missing (a product the embed stage has not embedded)."""
        vectors = self._embeddings(dataset)
        texts = encode_texts([t["modification_text_short"] for t in triplets], self.config.triplets.text_model)
        flags: list[tuple[bool | None, bool | None]] = []
        for t, text in zip(triplets, texts, strict=True):
            shown = t["candidate_ids"]
            if any(p not in vectors for p in (t["source_id"], *shown)) or t["target_id"] not in shown:
                flags.append((None, None))
                continue
            target = shown.index(t["target_id"])
            images = np.stack([vectors[p][0] for p in shown])
            captions = np.stack([vectors[p][1] for p in shown])
            flags.append((ranks_first(text, captions, target), ranks_first(vectors[t["source_id"]][0], images, target)))
        return flags

    def text_index(self, triplet: dict) -> int:
        """Which of the triplet's short texts the check shows: seeded per triplet, so every paraphrase gets asked."""
        texts = triplet["modification_texts_short"] or [triplet["modification_text_short"]]
        return int(digest({"seed": self.config.triplets.seed, "triplet": triplet["triplet_id"]})[:8], 16) % len(texts)

    def load_items(self, task: ShardTask) -> list[Item]:
        triplets = self.build.read_shard(SELECTED_TRIPLETS, task.dataset, task.shard).to_pylist()
        negatives: dict[str, list[dict]] = defaultdict(list)
        for n in self.build.read_shard(SELECTED_NEGATIVES, task.dataset, task.shard).to_pylist():
            negatives[n["triplet_id"]].append(n)
        if self.check_section.enabled:
            self._dataset(task.dataset)
        items = []
        for t, (text_first, image_first) in zip(triplets, self.redundancy(task.dataset, triplets), strict=True):
            flagged = {**t, "text_alone_ranks_target_first": text_first, "image_alone_ranks_target_first": image_first}
            # the ledger names an item by "product_id": here the item is a triplet
            items.append(
                Item(
                    product={**flagged, "product_id": t["triplet_id"]},
                    views=[],
                    images=[],
                    extra={"negatives": negatives[t["triplet_id"]]},
                )
            )
        return items

    # -- the request ---------------------------------------------------------------------------------------------

    def largest_request(self) -> RequestSize:
        """The source's views, every shown candidate (as captions or small images) and one short text."""
        d, shown, views = self.check_section, self.config.triplets.candidates_shown, self.config.dedupe.max_views
        source = LmmStage.largest_request(self)
        text = words_tokens(self.lmm.words.modification_short[1]) + 16
        if d.candidates_as == "captions":
            text += shown * (words_tokens(self.lmm.words.short_caption[1]) + 8)
            return RequestSize(source.images, source.tokens + text, f"{source.detail}, {text} tokens of text")
        per_image = image_tokens(d.candidate_max_pixels)
        images = shown * views
        detail = f"{source.detail}, {shown} candidates × {views} images of {per_image} tokens, {text} tokens of text"
        return RequestSize(source.images + images, source.tokens + images * (per_image + 8) + text, detail)

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        d, lmm, t = self.check_section, self.lmm, item.product
        dataset, source, shown = t["dataset"], t["source_id"], t["candidate_ids"]
        small = MediaCache(ctx.media.folder, d.candidate_max_pixels, ctx.media.share_disk)
        budgets = {lmm.image_max_pixels: ctx.media, d.candidate_max_pixels: small}
        self._prepare(dataset, {source, *shown} if d.candidates_as == "images" else {source}, budgets)

        content, hashes, texts = [], [], []

        def add_images(pid: str, budget: int, label: str) -> None:
            for k, p in enumerate(self._prepared[(dataset, pid, budget)], start=1):
                content.extend([text_part(f"[{label}, Image {k}]"), {"type": "image_url", "image_url": {"url": p.url}}])
                hashes.append(p.sha256)

        intro = f"Source product ({len(self._views[dataset][source])} views):"
        content.append(text_part(intro))
        texts.append(intro)
        add_images(source, lmm.image_max_pixels, "Source")
        for c, pid in enumerate(shown, start=1):
            if d.candidates_as == "images":
                line = f"Candidate {c}:"
                content.append(text_part(line))
                add_images(pid, d.candidate_max_pixels, f"Candidate {c}")
            else:
                line = f"Candidate {c}: {self._captions[dataset][pid]}"
                content.append(text_part(line))
            texts.append(line)
        index = self.text_index(t)
        question = f"Modification text: {(t['modification_texts_short'] or [t['modification_text_short']])[index]}"
        content.append(text_part(question))
        texts.append(question)
        return self.make_ask(discrimination_answer(len(shown)), content, hashes, texts)

    # -- the answer ----------------------------------------------------------------------------------------------

    def earlier_outcomes(self, dataset: str) -> dict[str, dict]:  # type: ignore[override]
        """The triplets this stage kept with the same settings, by triplet id (an incremental build)."""
        return {row["triplet_id"]: row for row in self.earlier_rows(dataset, TRIPLETS.table)}

    def carried(self, item: Item, ledger: ShardLedger) -> dict[str, list[dict]] | Reject | None:
        """A triplet that passed the check in an earlier run, from the same selection answer with the same texts,
        keeps its verdict when its candidates only lost products withdrawn since: no request.
        (A triplet that failed it is asked again: its reject row does not record which selection answer it judged.)"""
        t = item.product
        before = self._earlier[t["dataset"]].get(t["triplet_id"])
        same_texts = ("request_sha256", "modification_texts_short", "modification_text_short")
        if before is None or any(before[k] != t[k] for k in same_texts):
            return None
        if not set(t["candidate_ids"]) <= set(before["candidate_ids"]):
            return None
        ledger.counts["check_passed" if before["check_picked_id"] == t["target_id"] else "check_failed"] += 1
        return self._rows(item, before["check_text_index"], before["check_picked_id"])

    def _rows(self, item: Item, index: int | None, picked: str | None) -> dict[str, list[dict]]:
        row = {k: v for k, v in item.product.items() if k != "product_id"}
        row |= {"check_text_index": index, "check_picked_id": picked}
        return {TRIPLETS.table: [row], HARD_NEGATIVES.table: list(item.extra["negatives"])}

    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | Reject:
        t = item.product
        shown, index = t["candidate_ids"], self.text_index(t)
        pick = outcome.answer.candidate
        picked = shown[pick - 1] if 1 <= pick <= len(shown) else None
        if picked == t["target_id"]:
            ledger.counts["check_passed"] += 1
            return self._rows(item, index, picked)
        ledger.counts["check_failed"] += 1
        if not self.check_section.reject:
            return self._rows(item, index, picked)
        led_to = f"candidate {pick} ({picked})" if picked is not None else f"candidate {pick}, not among the shown"
        return Reject(
            RejectReason.TEXT_NOT_DISCRIMINATIVE,
            f"short text {index + 1} led to {led_to}, not to the target {t['target_id']}",
            related_id=picked,
        )

    def with_rejected_targets(self, task: ShardTask, output: ShardOutput) -> ShardOutput:
        """A rejected triplet's target joins the hard negatives of its source's kept triplets (it was shown)."""
        failed = {r["product_id"] for r in output.ledger.rejects if r["reason"] == RejectReason.TEXT_NOT_DISCRIMINATIVE}
        if not failed:
            return output
        triplets = output.tables[TRIPLETS.table].to_pylist()
        negatives = output.tables[HARD_NEGATIVES.table].to_pylist()
        selected = self.build.read_shard(SELECTED_TRIPLETS, task.dataset, task.shard).to_pylist()
        for bad in (r for r in selected if r["triplet_id"] in failed):
            for kept in (r for r in triplets if r["source_id"] == bad["source_id"]):
                negatives.append(
                    {
                        "triplet_id": kept["triplet_id"],
                        "dataset": kept["dataset"],
                        "split": kept["split"],
                        "source_id": kept["source_id"],
                        "negative_id": bad["target_id"],
                        "rank_shown": kept["candidate_ids"].index(bad["target_id"]),
                    }
                )
                output.ledger.counts["rejected_targets_to_negatives"] += 1
        output.tables[HARD_NEGATIVES.table] = pa.Table.from_pylist(negatives, schema=tables.HARD_NEGATIVES)
        return output

    async def answer_shard(self, task: ShardTask, ctx: StageContext) -> ShardOutput:
        return self.with_rejected_targets(task, await super().answer_shard(task, ctx))

    def run_shard(self, task: ShardTask) -> ShardOutput:
        """The check switched off: every triplet passes with its flags, nothing is asked."""
        if self.check_section.enabled:
            return super().run_shard(task)  # an LMM stage: its shards run through the harness
        ledger = self.ledger(task.dataset)
        rows: dict[str, list[dict]] = {name: [] for name in self.writes}
        for item in self.load_items(task):
            ledger.take(0)
            for name, new in self._rows(item, None, None).items():
                rows[name].extend(new)
            ledger.keep(0)
        return ShardOutput({n: pa.Table.from_pylist(rows[n], schema=s) for n, s in self.writes.items()}, ledger)
