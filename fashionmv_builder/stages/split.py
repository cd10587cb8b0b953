"""Split products into train/val before any pairing, by a group key, so nothing leaks between splits.

A group is every product that must stay together: the colour variants of one DeepFashion item share a group key
(set at ingest), and dedupe has already collapsed re-listed copies into one kept product. A source with an official
split (FashionGen) keeps it; other groups go to val when a seeded hash of their key falls under the val ratio, which
is stable: adding products never moves an existing group to the other split.
"""

from __future__ import annotations

import hashlib


def split_of(group_key: str, official: str | None, val_ratio: float, seed: int) -> str:
    if official in ("train", "val"):
        return official
    digest = hashlib.sha256(f"{seed}:{group_key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_ratio else "train"
