"""FashionGen h5: rows of `input_productID` (N,1) and `input_image` (N,H,W,3), read in chunks, never whole.

Views are named `<global row index>.jpg` and re-encoded as JPEG quality 95, as FashionMV's preparation tool does, so
the same five views are chosen by the plain string sort of file names. The file's official split is kept.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from fashionmv_builder.core.config import FashionGenSource
from fashionmv_builder.core.ledger import Reject
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.ingest.images import encode_jpeg
from fashionmv_builder.stages.ingest.sources.base import RawProduct, RawView, file_stamp, sorted_views

CHUNK_ROWS = 8192


def _text(value: np.ndarray | bytes) -> str | None:
    raw = value.flat[0] if isinstance(value, np.ndarray) else value
    if isinstance(raw, bytes):
        return raw.decode("latin-1").strip() or None
    return str(raw).strip() or None


class FashionGenCrawler:
    def __init__(self, source: FashionGenSource, max_file_bytes: int) -> None:
        self.source = source
        self.listing_counts: Counter[str] = Counter()
        self.rows_read = 0

    def list_products(self) -> Iterator[RawProduct]:
        path = self.source.path
        stamp = file_stamp(path)
        rows: dict[str, list[int]] = defaultdict(list)
        categories: dict[str, str | None] = {}
        with h5py.File(path, "r") as h5:
            ids = h5["input_productID"]
            cats = h5.get("input_category")
            for start in range(0, ids.shape[0], CHUNK_ROWS):
                chunk = np.asarray(ids[start : start + CHUNK_ROWS]).reshape(-1)
                cat_chunk = cats[start : start + CHUNK_ROWS] if cats is not None else None
                for offset, pid in enumerate(chunk):
                    key = str(int(pid))
                    rows[key].append(start + offset)
                    if key not in categories:
                        categories[key] = _text(cat_chunk[offset]) if cat_chunk is not None else None
        for pid in sorted(rows):
            views = [RawView(f"{row}.jpg", f"{path}#{row}", None, stamp=f"{stamp}:{row}") for row in rows[pid]]
            yield RawProduct(
                dataset=self.source.dataset,
                product_id=pid,
                views=sorted_views(views),
                group_key=pid,
                split=self.source.split,
                category=categories[pid],
                licence=self.source.licence,
                source_uri=str(path),
            )

    def read_views(self, views: Sequence[RawView]) -> Iterator[tuple[RawView, bytes | Reject]]:
        with h5py.File(self.source.path, "r") as h5:
            images = h5["input_image"]
            for view in sorted(views, key=_row):
                try:
                    pixels = np.asarray(images[_row(view)])
                except (OSError, ValueError, IndexError) as err:
                    yield view, Reject(RejectReason.UNREADABLE_FILE, f"h5 row {_row(view)}: {err}")
                    continue
                if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
                    detail = f"h5 row {_row(view)}: expected (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}"
                    yield view, Reject(RejectReason.CORRUPT_IMAGE, detail)
                    continue
                self.rows_read += 1
                yield view, encode_jpeg(pixels)

    def fetch_counts(self) -> dict[str, int]:
        return {"h5_rows": self.rows_read}


def _row(view: RawView) -> int:
    return int(view.locator.rsplit("#", 1)[1])
