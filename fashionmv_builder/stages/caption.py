"""Stage 1: one LMM request per product with all its views, answered as per-view captions, a long and a short
caption, and category, gender and is-clothing fields (FashionMV's multi-view captioning).

In: `dedupe` products, their kept views and image bytes. Out: `captions` shards. A product whose answer stays
retries is rejected (`invalid_lmm_answer`); one judged not clothing is rejected (`not_clothing`) only where the
config says so.
"""

from __future__ import annotations

from typing import ClassVar

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_PRODUCTS, DEDUPE_VIEWS, INGEST_IMAGES
from fashionmv_builder.core.ledger import Reject, ShardLedger
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.lmm_answers import caption_answer
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.lmm.calls import CallOutcome
from fashionmv_builder.lmm.harness import Ask, Item, LmmStage, StageContext, image_parts, text_part


class CaptionStage(LmmStage):
    """Stage 1: caption every product from all its views with the LMM."""

    name = CAPTIONS.stage
    version = "1"
    reads = (DEDUPE_PRODUCTS, DEDUPE_VIEWS, INGEST_IMAGES)
    writes: ClassVar[dict] = {CAPTIONS.table: tables.CAPTIONS}

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        parts, hashes = image_parts(item.images, ctx.media)
        intro = f"A product with {len(item.views)} views. Describe each image in order, then the whole product."
        model = caption_answer(self.lmm.words, len(item.views))
        return self.make_ask(model, [text_part(intro), *parts], hashes, [intro])

    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | Reject:
        answer = outcome.answer
        product = item.product
        if self.config.caption.reject_not_clothing and not answer.is_clothing:
            detail = f"the captioner judged it not clothing (category {answer.category!r})"
            return Reject(RejectReason.NOT_CLOTHING, detail)
        row = {
            "dataset": product["dataset"],
            "product_id": product["product_id"],
            "view_captions": [
                {
                    "view_index": view["view_index"],
                    "view_type": caption.view_type,
                    "wearer_left_on_image": caption.wearer_left_on,
                    "caption": caption.caption,
                }
                for view, caption in zip(item.views, answer.views, strict=True)
            ],
            "long_caption": answer.long_caption,
            "short_caption": answer.short_caption,
            "category": answer.category,
            "gender": answer.gender,
            "is_clothing": answer.is_clothing,
            "request_sha256": outcome.key,
            "prompt_version": self.config.caption.prompt,
            "model": self.lmm.model,
            "tokens_in": outcome.tokens_in,
            "tokens_out": outcome.tokens_out,
        }
        return {"captions": [row]}
