"""Shard IO and the one resume mechanism every stage uses.

Layout under a build's output folder (any fsspec URL):

    <out>/<stage>/<dataset>/<table>/part-00042.parquet   data, one file per table of the shard
    <out>/<stage>/<dataset>/_markers/part-00042.json      completion marker, written last
    <out>/<stage>/<dataset>/stats.json                   counts summed over the stage's shards

A shard is complete when its marker exists, records the same stage config hash and input fingerprint, and every
file it lists is there with the size and sha256 it records. Nothing on disk is trusted blindly: resume checks sizes
and hashes before it skips a shard (a corrupt or truncated file is redone), and a reader checks a file's hash the
first time this process reads it (a corrupt input is named in one line). No atomic rename is needed, which is what
makes this work on object stores. Paths in markers are relative to the stage's dataset folder, so a build can be
copied or moved, to another disk or an object store, and stay whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from fashionmv_builder.core.ledger import CONSERVED, check_totals
from fashionmv_builder.data_schema.tables import SCHEMA_VERSION

log = logging.getLogger("fashionmv")

MARKERS = "_markers"


class ShardFile(BaseModel):
    path: str  # relative to the stage's dataset folder; markers of older builds hold absolute paths
    sha256: str
    rows: int
    size: int | None = None  # bytes; absent in markers of older builds


class CorruptShardError(OSError):
    """A marked file that is missing or no longer what its marker recorded."""


# Files this process has hashed, with the size and modification stamp they had: a file is hashed again only when it
# changed, not at every read or skip check.
_verified: set[tuple[str, str, int, str]] = set()


def _stamp(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: its mtime locally, its ETag or last-modified time on object stores."""
    for key in ("mtime", "ETag", "LastModified", "last_modified", "etag", "updated"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardMarker(BaseModel):
    stage: str
    dataset: str
    shard: int
    schema_version: str = SCHEMA_VERSION
    config_hash: str
    input_fingerprint: str
    files: dict[str, ShardFile]
    counts: dict[str, int]
    files_changed: bool = True  # False: redone with the very bytes it had, so its files were left as they were


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
        self.stats_path = f"{self.base}/stats.json"

    def table_path(self, table: str, shard: int) -> str:
        return f"{self.base}/{table}/part-{shard:05d}.parquet"

    def marker_path(self, shard: int) -> str:
        return f"{self.base}/{MARKERS}/part-{shard:05d}.json"

    def read_marker(self, shard: int) -> ShardMarker | None:
        try:
            return ShardMarker.model_validate_json(self.fs.cat_file(self.marker_path(shard)))
        except (FileNotFoundError, ValueError):
            return None  # missing or half-written marker: the shard is not done

    def file_path(self, marker: ShardMarker, table: str) -> str:
        """Where a marked table is: always this store's layout path, whatever folder the build was written in."""
        return self.table_path(table, marker.shard)

    def problem(self, marker: ShardMarker, table: str, *, hash_check: bool = True) -> str | None:
        """Why a marked file cannot be trusted (missing, other size, other hash), or None when it is intact."""
        path, entry = self.file_path(marker, table), marker.files[table]
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return f"{path} is missing"
        if entry.size is not None and info["size"] != entry.size:
            return f"{path} has {info['size']} bytes, its marker says {entry.size} (truncated or rewritten)"
        seen = (path, entry.sha256, info["size"], _stamp(info))
        if hash_check and seen not in _verified:
            if _sha256(self.fs, path) != entry.sha256:
                return f"{path}: sha256 does not match its completion marker (corrupt or changed since written)"
            _verified.add(seen)
        return None

    def is_complete(self, shard: int, config_hash: str, input_fingerprint: str) -> bool:
        """The marker matches and every file it lists is intact; a damaged shard is logged and redone."""
        marker = self.read_marker(shard)
        if marker is None or marker.config_hash != config_hash or marker.input_fingerprint != input_fingerprint:
            return False
        for table in marker.files:
            if problem := self.problem(marker, table):
                log.warning("%s: shard %d of %s is redone: %s", self.stage, shard, self.dataset, problem)
                return False
        return True

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
        """Write every table of the shard, then the marker: the marker is the commit. A table whose bytes are those
        the shard's intact file already holds is not rewritten, so a shard redone with the same result (a dataset-wide
        stage after a change elsewhere in the dataset) keeps its files, and the stages after it skip it."""
        earlier = self.read_marker(shard)
        files = {}
        changed = False
        extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
        extra[b"fashionmv.config_hash"] = config_hash.encode()
        for name, table in tables.items():
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
            buf = io.BytesIO()
            pq.write_table(table, buf, compression=_compression(table.schema))
            data = buf.getvalue()
            path = self.table_path(name, shard)
            sha256 = hashlib.sha256(data).hexdigest()
            unchanged = (
                earlier is not None
                and name in earlier.files
                and earlier.files[name].sha256 == sha256
                and self.problem(earlier, name) is None
            )
            changed |= not unchanged
            if not unchanged:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(path, data)
            files[name] = ShardFile(
                path=path.removeprefix(f"{self.base}/"), sha256=sha256, rows=table.num_rows, size=len(data)
            )
            info = self.fs.info(path)
            _verified.add((path, sha256, info["size"], _stamp(info)))
        marker = ShardMarker(
            stage=self.stage,
            dataset=self.dataset,
            shard=shard,
            config_hash=config_hash,
            input_fingerprint=input_fingerprint,
            files=files,
            counts=dict(counts),
            files_changed=changed,
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
                for table in marker.files:
                    if self.fs.exists(path := self.file_path(marker, table)):
                        self.fs.rm_file(path)

    def read_part(self, marker: ShardMarker, table: str, *, columns: list[str] | None = None) -> pa.Table | None:
        """One marked shard's table (only `columns`, when given: column chunks not asked for are not read), after
        checking the file against its marker (the hash once per process)."""
        if table not in marker.files:
            return None
        if problem := self.problem(marker, table):
            raise CorruptShardError(f"{problem}; rerun the {self.stage} stage to redo it")
        with self.fs.open(self.file_path(marker, table), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """All marked shards of one table, in shard order."""
        parts = [self.read_part(m, table, columns=columns) for m in self.markers()]
        parts = [p for p in parts if p is not None]
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts)

    def read_stats(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.stats_path))
        except (FileNotFoundError, ValueError):
            return None

    def write_stats(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Sum the markers' counts into stats.json; leave the file untouched when nothing changed."""
        markers = self.markers()
        totals: Counter[str] = Counter(dict.fromkeys(CONSERVED, 0))  # one shape, a dataset without shards included
        for m in markers:
            totals.update(m.counts)
        stats = {
            "stage": self.stage,
            "dataset": self.dataset,
            "shards": len(markers),
            "counts": dict(sorted(totals.items())),
            **(extra or {}),
        }
        check_totals(f"{self.stage}/{self.dataset}", totals)
        data = (json.dumps(stats, indent=1) + "\n").encode()
        path = self.stats_path
        if not (self.fs.exists(path) and self.fs.cat_file(path) == data):
            self.fs.makedirs(self.base, exist_ok=True)  # a dataset with no shard at all (an empty source)
            self.fs.pipe_file(path, data)
        return stats
