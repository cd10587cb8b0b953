"""A plain tree: every folder holding image files is a product; its id is the folder's path under the root."""

from __future__ import annotations

from collections.abc import Iterator

from fashionmv_builder.core.config import FolderSource
from fashionmv_builder.core.ids import id_problem
from fashionmv_builder.core.ledger import Reject
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.ingest.sources.base import (
    LocalFileReader,
    RawProduct,
    file_view,
    sorted_views,
    view_from_name,
    walk_tree,
)


class FolderCrawler(LocalFileReader):
    source: FolderSource

    def list_products(self) -> Iterator[RawProduct]:
        root_real = self.source.root.resolve()
        products = []
        for folder in walk_tree(self.source.root):
            self.listing_counts["files_skipped_suffix"] += folder.skipped_files
            if not folder.files and not folder.escapes_root:
                continue
            problem = None
            if folder.escapes_root:
                problem = Reject(RejectReason.UNSAFE_PATH, "folder leads outside the source root")
            elif reason := id_problem(folder.rel):
                problem = Reject(RejectReason.INVALID_PRODUCT_ID, reason)
            views = [file_view(name, path, root_real, view_from_name(name)) for name, path in folder.files]
            products.append(
                RawProduct(
                    dataset=self.source.dataset,
                    product_id=folder.rel or ".",
                    views=sorted_views(views),
                    group_key=folder.rel,
                    licence=self.source.licence,
                    source_uri=str(self.source.root / folder.rel),
                    problem=problem,
                )
            )
        yield from sorted(products, key=lambda p: p.product_id)
