"""Stage 1: one LMM request per product with all its views, answered as per-view captions, a long and a short
caption, and category, gender and is-clothing fields (FashionMV's multi-view captioning).

In: `dedupe` products and view references. Out: `captions` shards. A product whose answer stays invalid after the
retries is rejected (`invalid_lmm_answer`); one judged not clothing is rejected (`not_clothing`) only where the
config says so.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

from data_schema.lmm_answers import caption_answer, schema_digest, schema_of
from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import CAPTIONS
from fashionmv_builder.config import digest
from fashionmv_builder.ledger import ShardLedger
from fashionmv_builder.lmm.calls import CallOutcome
from fashionmv_builder.lmm.client import LmmRequest
from fashionmv_builder.lmm.stage import Ask, Item, LmmStage, StageContext, image_parts, text_part
from fashionmv_builder.prompts import load_prompt

STAGE_VERSION = "1"


class CaptionStage(LmmStage):
    name = "caption"
    input_stage = "dedupe"
    input_table = "products"
    output_schemas: ClassVar[dict] = {"captions": CAPTIONS}
    bad_outcome = "answered invalidly"

    def breaker_threshold(self) -> float:
        return self.config.caption.breaker_threshold

    def stage_hash(self) -> str:
        c, lmm = self.config.caption, self.config.lmm
        prompt = load_prompt(c.prompt)
        return digest(
            {
                "stage": self.name,
                "version": STAGE_VERSION,
                "prompt": prompt.id,
                "prompt_sha": hashlib.sha256(prompt.text.encode()).hexdigest(),
                "words": lmm.words.model_dump(),
                "model": lmm.model,
                "revision": lmm.model_revision,
                "max_tokens": c.max_tokens,
                "temperature": lmm.temperature,
                "seed": lmm.seed,
                "invalid_retries": lmm.invalid_retries,
                "retry_temperature": lmm.retry_temperature,
                "image_max_pixels": lmm.image_max_pixels,
                "reject_not_clothing": c.reject_not_clothing,
            }
        )

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        lmm, prompt = self.config.lmm, load_prompt(self.config.caption.prompt)
        model = caption_answer(lmm.words, len(item.views))
        parts, hashes = image_parts(item.images, ctx.media)
        intro = f"A product with {len(item.views)} views. Describe each image in order, then the whole product."
        messages = (
            {"role": "system", "content": prompt.text},  # shared by every request: vLLM's prefix cache reuses it
            {"role": "user", "content": [text_part(intro), *parts]},
        )
        canonical = {
            "model": lmm.model,
            "revision": lmm.model_revision,
            "prompt": prompt.id,
            "prompt_sha": hashlib.sha256(prompt.text.encode()).hexdigest(),
            "schema": schema_digest(model),
            "max_tokens": self.config.caption.max_tokens,
            "temperature": lmm.temperature,
            "images": hashes,
            "text": intro,
        }
        request = LmmRequest(
            key="",
            messages=messages,
            schema_name="caption",
            schema=schema_of(model),
            max_tokens=self.config.caption.max_tokens,
            temperature=lmm.temperature,
            seed=lmm.seed,
        )
        return Ask(request, canonical, model)

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
