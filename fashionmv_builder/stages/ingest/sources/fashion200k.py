"""Fashion200K: `<root>/<gender>/<category>/<subcategory>/<pid>/<pid>_<k>.jpeg`, one product per numeric pid."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from fashionmv_builder.core.config import Fashion200kSource
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

_FILE = re.compile(r"(\d+)_(\d+)\.[A-Za-z]+")


class Fashion200kCrawler(LocalFileReader):
    source: Fashion200kSource

    def list_products(self) -> Iterator[RawProduct]:
        root_real = self.source.root.resolve()
        views: dict[str, list[RawView]] = defaultdict(list)
        folders: dict[str, str] = {}
        problems: dict[str, Reject] = {}
        for folder in walk_tree(self.source.root):
            self.listing_counts["files_skipped_suffix"] += folder.skipped_files
            if folder.escapes_root:
                pid = folder.rel.rsplit("/", 1)[-1]
                folders.setdefault(pid, folder.rel)
                problems[pid] = Reject(RejectReason.UNSAFE_PATH, f"folder {folder.rel} leads outside the source root")
                continue
            for name, path in folder.files:
                match = _FILE.fullmatch(name)
                if match is None:
                    self.listing_counts["files_skipped_unrecognised_name"] += 1
                    continue
                pid = match.group(1)
                folders.setdefault(pid, folder.rel)
                views[pid].append(file_view(name, path, root_real))
        for pid in sorted(set(views) | set(problems)):
            parts = folders[pid].split("/")
            yield RawProduct(
                dataset=self.source.dataset,
                product_id=pid,
                views=sorted_views(views.get(pid, [])),
                group_key=pid,
                category="/".join(parts[1:3]) if len(parts) > 2 else None,
                licence=self.source.licence,
                source_uri=str(self.source.root / folders[pid]),
                problem=problems.get(pid),
            )
