"""Counts and rejects of one shard of one stage, and the conservation check every stage ends with.

A stage reports what came in, what went out, and each rejected item with a reason code; the ledger turns that into
reject rows, per-reason counters and one clear log line per bad item, and refuses to finish a shard whose counts do
not add up (`in = out + rejected`), so nothing is ever dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter

import pyarrow as pa

from data_schema.reasons import RejectLevel, RejectReason
from data_schema.tables import REJECTS

log = logging.getLogger("fashionmv")


CONSERVED = (
    "products_in",
    "products_out",
    "products_rejected",
    "views_in",
    "views_out",
    "views_rejected",
    "views_dropped_with_product",
)


class ConservationError(RuntimeError):
    """A stage lost or invented items: a bug, never bad input."""


class ShardLedger:
    def __init__(self, stage: str, dataset: str) -> None:
        self.stage = stage
        self.dataset = dataset
        # The conservation counters are always present, zeros included, so stats.json has one shape.
        self.counts: Counter[str] = Counter(dict.fromkeys(CONSERVED, 0))
        self.rejects: list[dict] = []

    def reject(
        self,
        level: RejectLevel,
        reason: RejectReason,
        product_id: str,
        detail: str,
        *,
        view_index: int | None = None,
        file_name: str | None = None,
        related_id: str | None = None,
        source_uri: str | None = None,
    ) -> None:
        self.rejects.append(
            {
                "stage": self.stage,
                "dataset": self.dataset,
                "product_id": product_id,
                "level": level.value,
                "view_index": view_index,
                "file_name": file_name,
                "reason": reason.value,
                "detail": detail,
                "related_id": related_id,
                "source_uri": source_uri,
            }
        )
        self.counts[f"{level.value}s_rejected"] += 1
        self.counts[f"rejected.{reason.value}"] += 1
        where = f"{self.dataset}/{product_id!r}" + (f" {file_name}" if file_name else "")
        log.warning("%s: %s: %s: %s", self.stage, where, reason.value, detail.replace("\n", " "))

    def check(self, *, dropped_with_product: str = "views_dropped_with_product") -> None:
        """products_in = out + rejected; views_in = out + rejected + views of products rejected as a whole."""
        c = self.counts
        if c["products_in"] != c["products_out"] + c["products_rejected"]:
            raise ConservationError(f"{self.stage}/{self.dataset}: product counts do not add up: {dict(c)}")
        if c["views_in"] != c["views_out"] + c["views_rejected"] + c[dropped_with_product]:
            raise ConservationError(f"{self.stage}/{self.dataset}: view counts do not add up: {dict(c)}")

    def rejects_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rejects, schema=REJECTS)
