"""Counts and rejects of one shard of one stage, and the conservation check every shard ends with.

Every bad item, from a crawler's listing to Stage 3, is one `Reject` value (reason, detail, related id). A stage
tells the ledger what came in (`take`), what went out (`keep`) and what it rejected; the ledger turns that into
reject rows, the conservation counters, per-reason counters and one clear log line per bad item, and the executor
refuses to write a shard whose counts do not add up (`in = out + rejected`), so nothing is ever dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from fashionmv_builder.data_schema.reasons import RejectLevel, RejectReason
from fashionmv_builder.data_schema.tables import REJECTS

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


@dataclass(frozen=True)
class Reject:
    """Why an item is dropped: a reason code from the one enum, a one-line detail, and the other item it relates to
    (the kept duplicate, say). Where it happened (stage, dataset, product, view) is added when it is recorded."""

    reason: RejectReason
    detail: str
    related_id: str | None = None


class Rejected(Exception):
    """Raised where a check deep in a call stack finds an item bad; carries its `Reject`."""

    def __init__(self, reject: Reject) -> None:
        super().__init__(reject.detail)
        self.reject = reject


def check_totals(where: str, c: Mapping[str, int]) -> None:
    """products_in = out + rejected; views_in = out + rejected + views of products rejected as a whole. Checked for
    every shard before it is written, and again for the sums in stats.json."""
    n = Counter(c)  # a missing counter is 0
    if n["products_in"] != n["products_out"] + n["products_rejected"]:
        raise ConservationError(f"{where}: product counts do not add up: {dict(c)}")
    if n["views_in"] != n["views_out"] + n["views_rejected"] + n["views_dropped_with_product"]:
        raise ConservationError(f"{where}: view counts do not add up: {dict(c)}")


class ShardLedger:
    def __init__(self, stage: str, dataset: str) -> None:
        self.stage = stage
        self.dataset = dataset
        # The conservation counters are always present, zeros included, so stats.json has one shape.
        self.counts: Counter[str] = Counter(dict.fromkeys(CONSERVED, 0))
        self.rejects: list[dict] = []

    def take(self, n_views: int) -> None:
        """A product and its views came in."""
        self.counts["products_in"] += 1
        self.counts["views_in"] += n_views

    def keep(self, n_views: int) -> None:
        """A product went out with `n_views` views."""
        self.counts["products_out"] += 1
        self.counts["views_out"] += n_views

    def reject_product(
        self, reject: Reject, product_id: str, *, views_left: int, source_uri: str | None = None
    ) -> None:
        """The whole product is dropped; `views_left` of its views were still in it (not rejected one by one)."""
        self._record(RejectLevel.PRODUCT, reject, product_id, source_uri=source_uri)
        self.counts["views_dropped_with_product"] += views_left

    def reject_view(
        self,
        reject: Reject,
        product_id: str,
        *,
        view_index: int | None,
        file_name: str | None,
        source_uri: str | None = None,
    ) -> None:
        self._record(
            RejectLevel.VIEW, reject, product_id, view_index=view_index, file_name=file_name, source_uri=source_uri
        )

    def _record(
        self,
        level: RejectLevel,
        reject: Reject,
        product_id: str,
        *,
        view_index: int | None = None,
        file_name: str | None = None,
        source_uri: str | None = None,
    ) -> None:
        reason, detail, related_id = reject.reason, reject.detail, reject.related_id
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
        # Ids, file names and details can come from untrusted folders and manifests: non-printable characters are
        # escaped (repr style) so that one name can neither break the log line nor forge another.
        where = f"{self.dataset}/{product_id!r}" + (f" {file_name}" if file_name else "")
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in f"{where}: {reason.value}: {detail}")
        log.warning("%s: %s", self.stage, shown)

    def check(self) -> None:
        check_totals(f"{self.stage}/{self.dataset}", self.counts)

    def rejects_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rejects, schema=REJECTS)
