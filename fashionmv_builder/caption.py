"""Stage 1: one LMM request per product with all its views, answered as per-view captions, a long and a short
caption, and category, gender and is-clothing fields (FashionMV's multi-view captioning).

In: `dedupe` products and view references. Out: `captions` shards. A product whose answer stays invalid after the
retries is rejected (`invalid_lmm_answer`); one judged not clothing is rejected (`not_clothing`) only where the
config says so.
"""

from __future__ import annotations

from typing import ClassVar

from data_schema.lmm_answers import caption_answer
from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import CAPTIONS
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.lmm.calls import CallOutcome
from fashionmv_builder.lmm.stage import Ask, Item, LmmStage, StageContext, image_parts, text_part


class CaptionStage(LmmStage):
    name = "caption"
    version = "1"
    settings = "caption"
    input_stage = "dedupe"
    input_table = "products"
    output_schemas: ClassVar[dict] = {"captions": CAPTIONS}
    bad_outcome = "answered invalidly"

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        parts, hashes = image_parts(item.images, ctx.media)
        intro = f"A product with {len(item.views)} views. Describe each image in order, then the whole product."
        model = caption_answer(self.config.lmm.words, len(item.views))
        return self.make_ask(model, [text_part(intro), *parts], hashes, [intro])

    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | None:
        answer = outcome.answer
        product = item.product
        if self.config.caption.reject_not_clothing and not answer.is_clothing:
            ledger.reject(
                RejectLevel.PRODUCT,
                RejectReason.NOT_CLOTHING,
                product["product_id"],
                f"the captioner judged it not clothing (category {answer.category!r})",
            )
            return None
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
            "model": self.config.lmm.model,
            "tokens_in": outcome.tokens_in,
            "tokens_out": outcome.tokens_out,
        }
        return {"captions": [row]}
