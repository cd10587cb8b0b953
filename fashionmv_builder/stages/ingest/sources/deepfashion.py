"""DeepFashion In-shop: `<root>/<GENDER>/<Category>/id_XXXXXXXX/NN_k_view.jpg`.

All files of one item sit flat in its folder; the `NN` prefix is the colour variant. FashionMV regroups them into one
product per prefix, with id `GENDER/Category/id_XXXXXXXX/NN`; the view label is the word after the second `_`
(front, side, back, full, additional). Colour variants of one item share a group key, so a split keeps them
together.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from fashionmv_builder.core.config import DeepFashionSource
from fashionmv_builder.core.ids import DEEPFASHION_ID, id_problem
from fashionmv_builder.core.ledger import Reject
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.ingest.sources.base import (
    LocalFileReader,
    RawProduct,
    RawView,
    file_view,
    sorted_views,
    walk_tree,
)

_FILE = re.compile(r"(\d+)_(\d+)_([A-Za-z]+)\.[A-Za-z]+")


class DeepFashionCrawler(LocalFileReader):
    source: DeepFashionSource

    def list_products(self) -> Iterator[RawProduct]:
        root = self.source.root
        root_real = root.resolve()
        products: list[RawProduct] = []
        for folder in walk_tree(root):
            self.listing_counts["files_skipped_suffix"] += folder.skipped_files
            item = folder.rel
            if folder.escapes_root:
                products.append(
                    self._product(item, item, (), Reject(RejectReason.UNSAFE_PATH, "folder leads outside root"))
                )
                continue
            variants: dict[str, list[RawView]] = defaultdict(list)
            for name, path in folder.files:
                match = _FILE.fullmatch(name)
                if match is None:
                    self.listing_counts["files_skipped_unrecognised_name"] += 1
                    continue
                variants[match.group(1)].append(file_view(name, path, root_real, match.group(3).lower()))
            for prefix, views in variants.items():
                product_id = f"{item}/{prefix}"
                problem = id_problem(product_id)
                if problem is None and not DEEPFASHION_ID.fullmatch(product_id):
                    problem = "not in DeepFashion's GENDER/Category/id_XXXXXXXX/NN layout"
                products.append(
                    self._product(
                        product_id,
                        item,
                        sorted_views(views),
                        Reject(RejectReason.INVALID_PRODUCT_ID, problem) if problem else None,
                    )
                )
        yield from sorted(products, key=lambda p: p.product_id)

    def _product(
        self,
        product_id: str,
        item: str,
        views: tuple[RawView, ...],
        problem: Reject | None,
    ) -> RawProduct:
        parts = item.split("/")
        return RawProduct(
            dataset=self.source.dataset,
            product_id=product_id,
            views=views,
            group_key=item,
            category=parts[1] if len(parts) > 1 else None,
            licence=self.source.licence,
            source_uri=str(self.source.root / item),
            problem=problem,
        )
