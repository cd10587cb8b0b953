"""What every crawler produces: products as groups of views, listed cheaply, read shard by shard.

A crawler lists products in a deterministic order without decoding anything; ingest cuts that list into shards and
asks the crawler for the bytes of one shard's views at a time. Problems found while listing (an unsafe id, a
symlink leaving the root) travel with the product as its `problem` (a `Reject`) so ingest records them as rejects:
listing never raises on bad input. A view that cannot be read comes back as a `Reject` in place of its bytes.
Counters (files skipped while listing, HTTP requests and retries while reading) reach the stage's stats.json.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fashionmv_builder.core.ledger import Reject
from fashionmv_builder.data_schema.reasons import RejectReason

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # FashionMV's evaluation keeps exactly these


@dataclass(frozen=True)
class RawView:
    file_name: str  # the name views are sorted by (plain string sort, as FashionMV does)
    locator: str  # absolute path, URL, or an h5 row reference: whatever the crawler's reader understands
    view: str | None = None  # front / back / side / … where the source names it
    stamp: str = ""  # cheap change detector (size and mtime, manifest row…) for the shard fingerprint
    problem: Reject | None = None  # found while listing; the view is rejected without reading


@dataclass(frozen=True)
class RawProduct:
    dataset: str
    product_id: str
    views: tuple[RawView, ...]
    group_key: str = ""  # products sharing it stay in one split; defaults to the product id
    split: str | None = None
    category: str | None = None
    licence: str | None = None
    source_uri: str = ""
    problem: Reject | None = None  # found while listing; the product is rejected unread
    extra: dict[str, str] = field(default_factory=dict)


class Source(Protocol):
    listing_counts: Counter[str]  # what listing skipped or noticed (files without an image suffix…)

    def list_products(self) -> Iterator[RawProduct]:
        """Every product, in a deterministic order, with views sorted by file name."""
        ...

    def read_views(self, views: Sequence[RawView]) -> Iterator[tuple[RawView, bytes | Reject]]:
        """The bytes of each view (or why not), in any order."""
        ...

    def fetch_counts(self) -> dict[str, int]:
        """Counters of the reads so far (requests, retries, bytes…), for the shard's stats."""
        ...


def sorted_views(views: list[RawView]) -> tuple[RawView, ...]:
    return tuple(sorted(views, key=lambda v: v.file_name))


def file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def inside_root(path: Path, root_real: Path) -> bool:
    """True when `path`, with every symlink resolved, stays inside `root_real` (already resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root_real)
    except OSError:
        return False


class LocalFileReader:
    """Reads views whose locators are local file paths; shared by the file-tree crawlers."""

    def __init__(self, source: Any, max_file_bytes: int) -> None:
        self.source = source  # the crawler's own section of the config
        self.max_file_bytes = max_file_bytes
        self.listing_counts: Counter[str] = Counter()
        self.read_bytes = 0

    def read_views(self, views: Sequence[RawView]) -> Iterator[tuple[RawView, bytes | Reject]]:
        for v in views:
            data = self._read(v)
            if isinstance(data, bytes):
                self.read_bytes += len(data)
            yield v, data

    def fetch_counts(self) -> dict[str, int]:
        return {"bytes": self.read_bytes}

    def _read(self, view: RawView) -> bytes | Reject:
        try:
            size = os.stat(view.locator).st_size
            if size > self.max_file_bytes:
                return Reject(RejectReason.FILE_TOO_LARGE, f"{size} bytes is over the limit of {self.max_file_bytes}")
            with open(view.locator, "rb") as fh:
                return fh.read()
        except OSError as err:
            return Reject(RejectReason.UNREADABLE_FILE, f"cannot read file: {err.strerror or err}")


@dataclass(frozen=True)
class TreeDir:
    """One folder of a source tree: its image files (name, path), or the fact that it leaves the root."""

    rel: str  # path relative to the root, '/'-separated ('' for the root itself)
    files: tuple[tuple[str, Path], ...]
    escapes_root: bool = False
    skipped_files: int = 0  # files without an image suffix (notes, thumbnails' metadata…)


def walk_tree(root: Path) -> Iterator[TreeDir]:
    """Folders under `root` in sorted order. Symlinks are followed only while they stay inside the root; a folder
    reached through a link that leaves it is reported (escapes_root) and not listed. Hidden entries are skipped."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"source root {root} is not a folder")
    root_real = Path(os.path.realpath(root))
    seen: set[str] = set()
    stack = [(Path(root), "")]
    while stack:
        path, rel = stack.pop()
        real = os.path.realpath(path)
        if not Path(real).is_relative_to(root_real):
            yield TreeDir(rel, (), escapes_root=True)
            continue
        if real in seen:  # a symlink cycle, or two links to one folder
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            yield TreeDir(rel, (), escapes_root=False)
            continue
        files, subdirs, skipped = [], [], 0
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir():
                subdirs.append((Path(entry.path), child_rel))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                files.append((entry.name, Path(entry.path)))
            else:
                skipped += 1
        if files or skipped:
            yield TreeDir(rel, tuple(files), skipped_files=skipped)
        stack.extend(reversed(subdirs))


def file_view(name: str, path: Path, root_real: Path, view: str | None = None) -> RawView:
    """A view backed by a local file; a symlink leading outside the root becomes a listing problem.

    `walk_tree` already checked the folder, so only a file that is itself a link needs resolving."""
    if path.is_symlink() and not inside_root(path, root_real):
        return RawView(
            name, str(path), view, problem=Reject(RejectReason.UNSAFE_PATH, "symlink leads outside the source root")
        )
    try:
        stamp = file_stamp(path)
    except OSError as err:
        return RawView(
            name, str(path), view, problem=Reject(RejectReason.UNREADABLE_FILE, f"cannot stat: {err.strerror}")
        )
    return RawView(name, str(path), view, stamp=stamp)


VIEW_WORDS = ("front", "back", "side", "detail", "full", "additional", "flat", "top")


def view_from_name(name: str) -> str | None:
    """The view label a file name carries, if any (`02_1_front.jpg` → front)."""
    stem = name.rsplit(".", 1)[0].lower()
    for word in VIEW_WORDS:
        if stem == word or stem.endswith(("_" + word, "-" + word)) or stem.startswith((word + "_", word + "-")):
            return word
    return None
