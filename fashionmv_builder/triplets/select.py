"""Listwise target selection: one LMM call sees a source and its shown candidates and picks at most two targets,
each with a short (16–32 words) and a long (64–128 words) modification text and the views involved.

In: `candidates` shards. Out: `triplets` and `hard_negatives` (the shown candidates not chosen, kept with each
triplet: FashionMV throws them away). A source with no chosen target is rejected (`no_target_selected`); an answer
that repeats a candidate or stays invalid after the retries is rejected (`invalid_lmm_answer`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

from data_schema.lmm_answers import selection_answer
from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import HARD_NEGATIVES, TRIPLETS
from fashionmv_builder.config import RunConfig, digest
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.lmm.calls import CallOutcome
from fashionmv_builder.lmm.media import MediaCache, PreparedImage
from fashionmv_builder.lmm.stage import Ask, Item, LmmStage, StageContext, text_part
from fashionmv_builder.shards import ShardMarker, ShardStore


def repeated_candidate(answer) -> str | None:
    picked = [c.candidate for c in answer.choices]
    return f"candidate chosen twice: {picked}" if len(picked) != len(set(picked)) else None


class SelectStage(LmmStage):
    name = "triplets"
    version = "1"
    settings = "triplets"
    input_stage = "candidates"
    input_table = "candidates"
    output_schemas: ClassVar[dict] = {"triplets": TRIPLETS, "hard_negatives": HARD_NEGATIVES}
    bad_outcome = "answered invalidly"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self._views: dict[str, dict[str, list[dict]]] = {}  # dataset → product → kept view references
        self._shard_of: dict[str, dict[str, int]] = {}  # dataset → product → ingest/dedupe shard
        self._captions: dict[str, dict[str, str]] = {}  # dataset → product → short caption
        self._prepared: dict[tuple[str, str, int], list[PreparedImage]] = {}  # (dataset, product, budget) → images

    def fingerprint(self, marker: ShardMarker) -> str:
        return digest({name: f.sha256 for name, f in marker.files.items()})

    # -- inputs --------------------------------------------------------------------------------------------------

    def _dataset(self, dataset: str) -> None:
        if dataset in self._views:
            return
        out = self.config.output_dir
        views: dict[str, list[dict]] = defaultdict(list)
        shard_of: dict[str, int] = {}
        store = ShardStore(out, "dedupe", dataset)
        for marker in store.markers():
            for v in store.read_part(marker, "views").to_pylist():
                views[v["product_id"]].append(v)
                shard_of[v["product_id"]] = marker.shard
        for pid in views:
            views[pid].sort(key=lambda v: v["file_name"])
        captions = ShardStore(out, "caption", dataset).read_table("captions", columns=["product_id", "short_caption"])
        self._views[dataset] = views
        self._shard_of[dataset] = shard_of
        self._captions[dataset] = {r["product_id"]: r["short_caption"] for r in captions.to_pylist()}

    def _prepare(self, dataset: str, wanted: set[str], media: dict[int, MediaCache]) -> None:
        """Resize (once, into the content-addressed cache) the views of products not prepared yet."""
        missing = {pid for pid in wanted if (dataset, pid, min(media)) not in self._prepared}
        by_shard: dict[int, set[str]] = defaultdict(set)
        for pid in missing:
            by_shard[self._shard_of[dataset][pid]].add(pid)
        ingest = ShardStore(self.config.output_dir, "ingest", dataset)
        for shard, pids in by_shard.items():
            kept = {(pid, v["view_index"]) for pid in pids for v in self._views[dataset][pid]}
            table = ingest.read_part(ingest.read_marker(shard), "images", columns=["product_id", "view_index", "image"])
            found: dict[tuple[str, int], bytes] = {}
            for r in table.to_pylist():
                if (r["product_id"], r["view_index"]) in kept:
                    found[(r["product_id"], r["view_index"])] = r["image"]["bytes"]
            for pid in pids:
                for budget, cache in media.items():
                    views = self._views[dataset][pid]
                    self._prepared[(dataset, pid, budget)] = [
                        cache.prepare(found[(pid, v["view_index"])]) for v in views
                    ]

    def load_items(self, marker: ShardMarker) -> list[Item]:
        self._dataset(marker.dataset)
        store = ShardStore(self.config.output_dir, self.input_stage, marker.dataset)
        rows = store.read_part(marker, self.input_table).to_pylist()
        views = self._views[marker.dataset]
        return [Item(product=row, views=views[row["product_id"]], images=[]) for row in rows]

    # -- the request ---------------------------------------------------------------------------------------------

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        t, lmm = self.config.triplets, self.config.lmm
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
        model = selection_answer(lmm.words, len(candidates), t.max_targets, t.min_targets, t.min_views_involved)
        return self.make_ask(model, content, hashes, texts, check=self.check)

    # -- the answer ----------------------------------------------------------------------------------------------

    def check(self, answer) -> str | None:
        """Rules the schema cannot express: no candidate twice, and distinct views spanning enough of them."""
        if problem := repeated_candidate(answer):
            return problem
        for choice in answer.choices:
            if len(set(choice.views_involved)) < self.config.triplets.min_views_involved:
                return f"views_involved {choice.views_involved} spans fewer than the required distinct views"
        return None

    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | None:
        p = item.product
        shown = p["candidate_ids"]
        choices = outcome.answer.choices
        if not choices:
            ledger.reject(
                RejectLevel.PRODUCT,
                RejectReason.NO_TARGET_SELECTED,
                p["product_id"],
                f"none of the {len(shown)} candidates was chosen",
            )
            return None
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
                    "modification_text_short": choice.modification_short,
                    "modification_text_long": choice.modification_long,
                    "views_involved": views,
                    "candidate_ids": shown,
                    "request_sha256": outcome.key,
                    "prompt_version": self.config.triplets.prompt,
                    "model": self.config.lmm.model,
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
