"""The repo folder as it goes to the Hub: `data/<config>/<split>-NNNNN-of-NNNNN.parquet` and `README.md`.

Files are written deterministically (same rows, same bytes), so a rerun finds the Hub's copies identical and sends
nothing again. Each file is written to a temporary name and renamed, so an interrupted write never leaves a partial
shard that could be uploaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fashionmv_builder.core.files import atomic_write

DATA = "data"
SHARD_NAME = re.compile(r"^(?P<split>\w+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$")
# The Hub's advice is Parquet files of a few hundred MB at most; Arrow sizes are close to the uncompressed size.
MAX_SHARD_BYTES = 300_000_000
MAX_SHARD_ROWS = 500_000
ROW_GROUP_ROWS = 10_000
IMAGE_ROW_GROUP_ROWS = 100  # rows carry image bytes: small groups keep the viewer's reads small


def shard_path(config: str, split: str, index: int, count: int) -> str:
    return f"{DATA}/{config}/{split}-{index:05d}-of-{count:05d}.parquet"


def write_parquet(path: Path, table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    # Content-defined chunking keeps unchanged pages byte-identical across rewrites (a takedown), which lets the
    # Hub's Xet storage deduplicate them.
    atomic_write(
        path,
        lambda f: pq.write_table(
            table, f, compression="zstd", row_group_size=row_group_rows, use_content_defined_chunking=True
        ),
    )


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def row_slices(table: pa.Table) -> list[Callable[[], pa.Table]]:
    """The table cut into shards under the size advice, as loaders (one per shard)."""
    count = max(1, math.ceil(table.nbytes / MAX_SHARD_BYTES), math.ceil(table.num_rows / MAX_SHARD_ROWS))
    size = max(1, math.ceil(table.num_rows / count))
    return [lambda start=start: table.slice(start, size) for start in range(0, table.num_rows, size)]


def write_split(
    folder: Path, config: str, split: str, shards: Sequence[Callable[[], pa.Table]], row_group_rows: int
) -> list[str]:
    """One file per shard loader; returns the paths written, relative to `folder`."""
    paths = []
    for index, load in enumerate(shards):
        path = shard_path(config, split, index, len(shards))
        write_parquet(folder / path, load(), row_group_rows)
        paths.append(path)
    return paths


def remove_others(folder: Path, keep: set[str]) -> list[str]:
    """Delete data files that are not in `keep` (left by an earlier layout with other shard counts)."""
    removed = []
    for path in sorted((folder / DATA).rglob("*")) if (folder / DATA).exists() else []:
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in keep:
            path.unlink()
            removed.append(relative)
    return removed


def data_files(folder: Path) -> dict[str, dict[str, list[str]]]:
    """config → split → shard paths, as found in the folder."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in sorted((folder / DATA).glob("*/*.parquet")):
        match = SHARD_NAME.match(path.name)
        if match:
            config = path.parent.name
            found.setdefault(config, {}).setdefault(match["split"], []).append(path.relative_to(folder).as_posix())
    return found


def row_counts(folder: Path) -> dict[str, dict[str, int]]:
    """config → split → rows, from the Parquet footers (no data read)."""
    return {
        config: {split: sum(pq.read_metadata(folder / p).num_rows for p in paths) for split, paths in splits.items()}
        for config, splits in data_files(folder).items()
    }


def has_column(folder: Path, config: str, column: str) -> bool:
    paths = sorted((folder / DATA / config).glob("*.parquet"))
    return bool(paths) and column in pq.read_schema(paths[0]).names


def features_metadata(schema: pa.Schema, images_column: str | None) -> dict[bytes, bytes]:
    """The `datasets` feature description of a schema, with `images_column` as a list of `Image`s, so that
    `load_dataset` and the Hub's viewer decode the bytes as images."""
    from datasets import Features, Image, List  # heavy import, needed only for images

    features = Features.from_arrow_schema(pa.schema([f for f in schema if f.name != images_column]))
    if images_column is not None:
        features[images_column] = List(Image())
    return {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
