"""Listwise target selection: one LMM call sees a source and its shown candidates and picks at most two targets,
each with `triplets.paraphrases` distinct short (16–32 words) modification texts, a long (64–128 words) one and the
views involved.

In: `candidates` shards. Out: `triplets` and `hard_negatives` (the shown candidates not chosen, kept with each
triplet: FashionMV throws them away). A source with no chosen target is rejected (`no_target_selected`); an answer
that repeats a candidate or a short text, or stays invalid after the retries is rejected (`invalid_lmm_answer`).
"""

from __future__ import annotations

from typing import ClassVar

from fashionmv_builder.core.build import (
    CANDIDATES,
    CAPTIONS,
    DEDUPE_VIEWS,
    INGEST_IMAGES,
    SELECTED_NEGATIVES,
    SELECTED_TRIPLETS,
    rejects,
)
from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.core.ledger import Reject, ShardLedger
from fashionmv_builder.core.stage import ShardTask
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.lmm_answers import selection_answer
from fashionmv_builder.data_schema.reasons import RejectLevel, RejectReason
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
from fashionmv_builder.lmm.media import MediaCache, PreparedImage, warm


def repeated_candidate(answer) -> str | None:
    picked = [c.candidate for c in answer.choices]
    return f"candidate chosen twice: {picked}" if len(picked) != len(set(picked)) else None


def repeated_text(answer) -> str | None:
    for choice in answer.choices:
        texts = choice.modifications_short
        if len(texts) != len(set(texts)):
            return f"candidate {choice.candidate}: a short text written twice: {texts}"
    return None


class SelectStage(LmmStage):
    """Stage 3: let the LMM pick targets among each source's candidates and write modification texts."""

    name = SELECTED_TRIPLETS.stage
    version = "2"  # 2: paraphrases
    # Candidates are any product of the dataset: their views, short captions and images are read from every shard.
    reads = (CANDIDATES, DEDUPE_VIEWS.every_shard(), CAPTIONS.every_shard(), INGEST_IMAGES.every_shard())
    writes: ClassVar[dict] = {
        SELECTED_TRIPLETS.table: tables.TRIPLETS,
        SELECTED_NEGATIVES.table: tables.HARD_NEGATIVES,
    }
    settings_section = "triplets"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        # Filled once per dataset and shared by the shards (threads of one process on Prefect, one loop locally).
        self._views: dict[str, dict[str, list[dict]]] = {}  # dataset → product → kept view references
        self._shard_of: dict[str, dict[str, int]] = {}  # dataset → product → shard
        self._captions: dict[str, dict[str, str]] = {}  # dataset → product → short caption
        self._prepared: dict[tuple[str, str, int], list[PreparedImage]] = {}  # (dataset, product, budget) → images
        self._earlier: dict[str, dict[str, dict[str, list[dict]] | Reject]] = {}  # dataset → source → earlier outcome

    # -- inputs --------------------------------------------------------------------------------------------------

    def _dataset(self, dataset: str) -> None:
        if dataset in self._views:
            return
        captions = self.build.rows(CAPTIONS, dataset, columns=["product_id", "short_caption"])
        self._captions[dataset] = {r["product_id"]: r["short_caption"] for r in captions}
        self._shard_of[dataset] = self.build.product_shards(dataset)
        self._views[dataset] = self.build.kept_views(dataset, with_bytes=False)
        self._earlier[dataset] = self.earlier_outcomes(dataset)

    def earlier_outcomes(self, dataset: str) -> dict[str, dict[str, list[dict]] | Reject]:
        """What this stage wrote for each source with the same settings: its triplets and hard negatives, or its
        reject. Read before any shard of this run is written."""
        found: dict[str, dict[str, list[dict]] | Reject] = {}
        for name in self.writes:
            for row in self.earlier_rows(dataset, name):
                found.setdefault(row["source_id"], {n: [] for n in self.writes})[name].append(row)  # type: ignore[index]
        for row in self.earlier_rows(dataset, rejects(self.name).table):
            if row["level"] == RejectLevel.PRODUCT:
                found[row["product_id"]] = Reject(RejectReason(row["reason"]), row["detail"])
        return found

    def _prepare(self, dataset: str, wanted: set[str], media: dict[int, MediaCache]) -> None:
        """Resize (once, into the content-addressed cache) the views of products not prepared yet: every product of
        a shard one of them is in, so that each shard's image bytes are read once, not once per source that shows
        one of its products."""
        missing = {pid for pid in wanted if (dataset, pid, min(media)) not in self._prepared}
        for shard in sorted({self._shard_of[dataset][pid] for pid in missing}):
            for pid, views in self.build.kept_views(dataset, [shard]).items():
                for view in views:  # every budget from one decode, unless an earlier LMM stage prepared it
                    warm(list(media.values()), view["bytes"])
                for budget, cache in media.items():
                    self._prepared[(dataset, pid, budget)] = [cache.prepare(v["bytes"]) for v in views]

    def load_items(self, task: ShardTask) -> list[Item]:
        self._dataset(task.dataset)
        rows = self.build.read_shard(CANDIDATES, task.dataset, task.shard).to_pylist()
        views = self._views[task.dataset]
        return [Item(product=row, views=views[row["product_id"]], images=[]) for row in rows]

    # -- the request ---------------------------------------------------------------------------------------------

    def largest_request(self) -> RequestSize:
        """The source's views, and every shown candidate's (as images at their smaller budget, or as captions)."""
        t, views = self.config.triplets, self.config.dedupe.max_views
        source = super().largest_request()
        if t.candidates_as == "captions":
            text = t.candidates_shown * (words_tokens(self.lmm.words.short_caption[1]) + 8)
            return RequestSize(source.images, source.tokens + text, f"{source.detail}, {text} tokens of candidates")
        per_image = image_tokens(t.candidate_max_pixels)
        images = t.candidates_shown * views
        detail = (
            f"{source.detail}, {t.candidates_shown} candidates × {views} images of {per_image} tokens at "
            f"{t.candidate_max_pixels} px"
        )
        return RequestSize(source.images + images, source.tokens + images * (per_image + 8), detail)

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        t, lmm = self.config.triplets, self.lmm
        dataset, source = item.product["dataset"], item.product["product_id"]
        candidates = item.product["candidate_ids"]
        small = MediaCache(ctx.media.folder, t.candidate_max_pixels, ctx.media.share_disk)
        budgets = {lmm.image_max_pixels: ctx.media, t.candidate_max_pixels: small}
        wanted = {source, *candidates} if t.candidates_as == "images" else {source}
        self._prepare(dataset, wanted, budgets)

        def images(pid: str, budget: int, label: str) -> tuple[list[dict], list[str]]:
            prepared = self._prepared[(dataset, pid, budget)]
            parts = []
            for k, p in enumerate(prepared, start=1):
                parts += [text_part(f"[{label}, Image {k}]"), {"type": "image_url", "image_url": {"url": p.url}}]
            return parts, [p.sha256 for p in prepared]

        content, hashes, texts = [], [], []
        parts, h = images(source, lmm.image_max_pixels, "Source")
        intro = f"Source product ({len(item.views)} views):"
        content += [text_part(intro), *parts]
        hashes += h
        texts.append(intro)
        for c, pid in enumerate(candidates, start=1):
            if t.candidates_as == "images":
                parts, h = images(pid, t.candidate_max_pixels, f"Candidate {c}")
                line = f"Candidate {c}:"
                content += [text_part(line), *parts]
                hashes += h
            else:
                line = f"Candidate {c}: {self._captions[dataset][pid]}"
                content.append(text_part(line))
            texts.append(line)
        model = selection_answer(
            lmm.words, len(candidates), t.max_targets, t.min_targets, t.min_views_involved, t.paraphrases
        )
        return self.make_ask(model, content, hashes, texts, check=self.check)

    # -- the answer ----------------------------------------------------------------------------------------------

    def carried(self, item: Item, ledger: ShardLedger) -> dict[str, list[dict]] | Reject | None:
        """A source whose candidates were kept from an earlier run keeps that run's answer, less what refers to
        products no longer among its candidates (withdrawn from the catalogue): no request for it."""
        p = item.product
        if not p.get("carried_over"):
            return None
        before = self._earlier[p["dataset"]].get(p["product_id"])
        if before is None or isinstance(before, Reject):
            return before  # None: no earlier answer with these settings, so ask
        shown = set(p["candidate_ids"])
        triplets = [
            {**t, "candidate_ids": [c for c in t["candidate_ids"] if c in shown]}
            for t in before[SELECTED_TRIPLETS.table]
            if t["target_id"] in shown
        ]
        if not triplets:
            gone = sorted({t["target_id"] for t in before[SELECTED_TRIPLETS.table]})
            return Reject(RejectReason.TARGET_WITHDRAWN, f"its targets {gone} are no longer in the build")
        kept = {t["triplet_id"] for t in triplets}
        negatives = [
            n for n in before[SELECTED_NEGATIVES.table] if n["triplet_id"] in kept and n["negative_id"] in shown
        ]
        ledger.counts["triplets"] += len(triplets)
        ledger.counts["triplets_multi_view"] += sum(len(t["views_involved"]) >= 2 for t in triplets)
        return {SELECTED_TRIPLETS.table: triplets, SELECTED_NEGATIVES.table: negatives}

    def check(self, answer) -> str | None:
        """Rules the schema cannot express: no candidate or short text twice, and distinct views spanning enough."""
        if problem := repeated_candidate(answer) or repeated_text(answer):
            return problem
        for choice in answer.choices:
            if len(set(choice.views_involved)) < self.config.triplets.min_views_involved:
                return f"views_involved {choice.views_involved} spans fewer than the required distinct views"
        return None

    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | Reject:
        p = item.product
        shown = p["candidate_ids"]
        choices = outcome.answer.choices
        if not choices:
            return Reject(RejectReason.NO_TARGET_SELECTED, f"none of the {len(shown)} candidates was chosen")
        chosen = {shown[c.candidate - 1] for c in choices}
        triplets, negatives = [], []
        for choice in choices:
            target = shown[choice.candidate - 1]
            triplet_id = f"{p['dataset']}:{p['product_id']}->{target}"
            views = sorted(set(choice.views_involved))
            ledger.counts["triplets"] += 1
            ledger.counts["triplets_multi_view"] += len(views) >= 2
            triplets.append(
                {
                    "triplet_id": triplet_id,
                    "dataset": p["dataset"],
                    "split": p["split"],
                    "source_id": p["product_id"],
                    "target_id": target,
                    "modification_text_short": choice.modifications_short[0],
                    "modification_texts_short": list(choice.modifications_short),
                    "modification_text_long": choice.modification_long,
                    "views_involved": views,
                    "candidate_ids": shown,
                    "request_sha256": outcome.key,
                    "prompt_version": self.config.triplets.prompt,
                    "model": self.lmm.model,
                }
            )
            negatives += [
                {
                    "triplet_id": triplet_id,
                    "dataset": p["dataset"],
                    "split": p["split"],
                    "source_id": p["product_id"],
                    "negative_id": other,
                    "rank_shown": rank,
                }
                for rank, other in enumerate(shown)
                if other not in chosen
            ]
        return {"triplets": triplets, "hard_negatives": negatives}
