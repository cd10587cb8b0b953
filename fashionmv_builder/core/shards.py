"""Shard IO and the one resume mechanism every stage uses.

Layout under a build's output folder (any fsspec URL):

    <out>/<stage>/<dataset>/<table>/part-00042.parquet   data, one file per table of the shard
    <out>/<stage>/<dataset>/_markers/part-00042.json      completion marker, written last
    <out>/<stage>/<dataset>/stats.json                   counts summed over the stage's shards

A shard is complete when its marker exists and records the same stage config hash and input fingerprint. The
marker holds the sha256 and row count of every data file, so readers trust only marked files and can verify them;
no atomic rename is needed, which is what makes this work on object stores.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from fashionmv_builder.data_schema.tables import SCHEMA_VERSION

MARKERS = "_markers"


class ShardFile(BaseModel):
    path: str
    sha256: str
    rows: int


class ShardMarker(BaseModel):
    stage: str
    dataset: str
    shard: int
    schema_version: str = SCHEMA_VERSION
    config_hash: str
    input_fingerprint: str
    files: dict[str, ShardFile]
    counts: dict[str, int]


def _compression(schema: pa.Schema) -> dict[str, str]:
    """zstd everywhere except encoded image bytes, which do not compress and would only cost CPU."""
    codecs = {}
    for field in schema:
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            codecs[f"{field.name}.bytes"] = "none"
            codecs[f"{field.name}.path"] = "zstd"
        else:
            codecs[field.name] = "zstd"
    return codecs


class ShardStore:
    """The shards of one stage of one dataset under a build's output folder."""

    def __init__(self, out: str, stage: str, dataset: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(out)
        self.root = root.rstrip("/")
        self.stage = stage
        self.dataset = dataset
        self.base = f"{self.root}/{stage}/{dataset}"

    def table_path(self, table: str, shard: int) -> str:
        return f"{self.base}/{table}/part-{shard:05d}.parquet"

    def marker_path(self, shard: int) -> str:
        return f"{self.base}/{MARKERS}/part-{shard:05d}.json"

    def read_marker(self, shard: int) -> ShardMarker | None:
        try:
            return ShardMarker.model_validate_json(self.fs.cat_file(self.marker_path(shard)))
        except (FileNotFoundError, ValueError):
            return None  # missing or half-written marker: the shard is not done

    def is_complete(self, shard: int, config_hash: str, input_fingerprint: str) -> bool:
        marker = self.read_marker(shard)
        return (
            marker is not None
            and marker.config_hash == config_hash
            and marker.input_fingerprint == input_fingerprint
            and all(self.fs.exists(f.path) for f in marker.files.values())
        )

    def write(
        self,
        shard: int,
        tables: Mapping[str, pa.Table],
        *,
        config_hash: str,
        input_fingerprint: str,
        counts: Mapping[str, int],
        metadata: Mapping[str, str] | None = None,
    ) -> ShardMarker:
        """Write every table of the shard, then the marker: the marker is the commit."""
        files = {}
        extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
        extra[b"fashionmv.config_hash"] = config_hash.encode()
        for name, table in tables.items():
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
            buf = io.BytesIO()
            pq.write_table(table, buf, compression=_compression(table.schema))
            data = buf.getvalue()
            path = self.table_path(name, shard)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, data)
            files[name] = ShardFile(path=path, sha256=hashlib.sha256(data).hexdigest(), rows=table.num_rows)
        marker = ShardMarker(
            stage=self.stage,
            dataset=self.dataset,
            shard=shard,
            config_hash=config_hash,
            input_fingerprint=input_fingerprint,
            files=files,
            counts=dict(counts),
        )
        self.fs.makedirs(f"{self.base}/{MARKERS}", exist_ok=True)
        self.fs.pipe_file(self.marker_path(shard), marker.model_dump_json(indent=1).encode())
        return marker

    def markers(self) -> list[ShardMarker]:
        paths = sorted(self.fs.glob(f"{self.base}/{MARKERS}/part-*.json"))
        found = (self.read_marker(int(p.rsplit("-", 1)[1].split(".")[0])) for p in paths)
        return [m for m in found if m is not None]

    def remove_stale(self, keep: Iterable[int]) -> None:
        """Drop markers of shards that no longer exist (the input shrank), so readers never see them."""
        keep = set(keep)
        for marker in self.markers():
            if marker.shard not in keep:
                self.fs.rm_file(self.marker_path(marker.shard))
                for entry in marker.files.values():
                    if self.fs.exists(entry.path):
                        self.fs.rm_file(entry.path)

    def read_part(
        self, marker: ShardMarker, table: str, *, columns: list[str] | None = None, verify: bool = False
    ) -> pa.Table | None:
        """One marked shard's table (only `columns`, when given: column chunks not asked for are not read)."""
        entry = marker.files.get(table)
        if entry is None:
            return None
        if not verify:
            with self.fs.open(entry.path, "rb") as f:
                return pq.read_table(f, columns=columns)
        data = self.fs.cat_file(entry.path)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise OSError(f"{entry.path}: checksum does not match its completion marker")
        return pq.read_table(io.BytesIO(data), columns=columns)

    def read_table(self, table: str, verify: bool = False, columns: list[str] | None = None) -> pa.Table:
        """All marked shards of one table, in shard order."""
        parts = [self.read_part(m, table, columns=columns, verify=verify) for m in self.markers()]
        parts = [p for p in parts if p is not None]
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts)

    def read_stats(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.base}/stats.json"))
        except (FileNotFoundError, ValueError):
            return None

    def write_stats(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Sum the markers' counts into stats.json; leave the file untouched when nothing changed."""
        markers = self.markers()
        totals: Counter[str] = Counter()
        for m in markers:
            totals.update(m.counts)
        stats = {
            "stage": self.stage,
            "dataset": self.dataset,
            "shards": len(markers),
            "counts": dict(sorted(totals.items())),
            **(extra or {}),
        }
        data = (json.dumps(stats, indent=1) + "\n").encode()
        path = f"{self.base}/stats.json"
        if not (self.fs.exists(path) and self.fs.cat_file(path) == data):
            self.fs.pipe_file(path, data)
        return stats
