"""Stage 2: a second LMM pass checks Stage 1's orientation and placement claims against the images and removes
products whose captions are wrong (FashionMV's hallucination filter).

In: `captions` shards, the products' kept views and image bytes. Out: `verdicts` for the products
that pass; a removed product is rejected (`removed_by_verifier`) with the verifier's reason and wrong claims.
"""

from __future__ import annotations

import json
from typing import ClassVar

from fashionmv_builder.core.build import CAPTIONS, DEDUPE_VIEWS, INGEST_IMAGES, VERDICTS
from fashionmv_builder.core.ledger import Reject, ShardLedger
from fashionmv_builder.data_schema import tables
from fashionmv_builder.data_schema.lmm_answers import verdict_answer
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.lmm.calls import CallOutcome
from fashionmv_builder.lmm.harness import Ask, Item, LmmStage, StageContext, image_parts, text_part, words_tokens


def captions_text(row: dict) -> str:
    """Stage 1's answer as the verifier reads it: image numbers instead of view indexes."""
    views = [
        {"image": k, "view_type": v["view_type"], "wearer_left_on": v["wearer_left_on_image"], "caption": v["caption"]}
        for k, v in enumerate(row["view_captions"], start=1)
    ]
    body = {"views": views, "long_caption": row["long_caption"], "short_caption": row["short_caption"]}
    return "Captions to check:\n" + json.dumps(body, ensure_ascii=False)


class VerifyStage(LmmStage):
    """Stage 2: check the captions' orientation claims against the images; remove hallucinated products."""

    name = VERDICTS.stage
    version = "1"
    reads = (CAPTIONS, DEDUPE_VIEWS, INGEST_IMAGES)
    writes: ClassVar[dict] = {VERDICTS.table: tables.VERDICTS}
    bad_outcome = "removed or answered invalidly"

    def is_bad(self, outcome: CallOutcome) -> bool:
        removing = self.config.verify.remove and outcome.answer is not None and outcome.answer.verdict == "remove"
        return outcome.answer is None or removing

    def extra_tokens(self, views: int) -> int:
        w = self.lmm.words
        return words_tokens(views * w.view_caption[1] + w.long_caption[1] + w.short_caption[1]) + 40 * views

    def ask(self, item: Item, ctx: StageContext) -> Ask:
        parts, hashes = image_parts(item.images, ctx.media)
        intro = f"A product with {len(item.views)} views."
        claims = captions_text(item.product)
        model = verdict_answer(self.lmm.words)
        return self.make_ask(model, [text_part(intro), *parts, text_part(claims)], hashes, [intro, claims])

    def accept(self, item: Item, outcome: CallOutcome, ledger: ShardLedger) -> dict[str, list[dict]] | Reject:
        answer = outcome.answer
        product_id = item.product["product_id"]
        if answer.verdict == "remove":
            ledger.counts["verdicts_remove"] += 1
        if answer.verdict == "remove" and self.config.verify.remove:
            claims = "; ".join(answer.wrong_claims) or "none listed"
            return Reject(RejectReason.REMOVED_BY_VERIFIER, f"{answer.reason} (wrong claims: {claims})")
        row = {
            "dataset": item.product["dataset"],
            "product_id": product_id,
            "verdict": answer.verdict,
            "reason": answer.reason,
            "wrong_claims": list(answer.wrong_claims),
            "request_sha256": outcome.key,
            "prompt_version": self.config.verify.prompt,
            "model": self.lmm.model,
            "tokens_in": outcome.tokens_in,
            "tokens_out": outcome.tokens_out,
        }
        return {"verdicts": [row]}
