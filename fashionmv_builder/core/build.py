"""The build reader: the only code that knows where a build's files are.

A build is one output folder (any fsspec URL). Its layout:

    <out>/<stage>/<dataset>/<table>/part-00042.parquet   one shard's table
    <out>/<stage>/<dataset>/_markers/part-00042.json      the shard's completion marker (shards.py)
    <out>/<stage>/<dataset>/stats.json                   the stage's summed counts for the dataset
    <out>/<stage>/_answers/<key[:2]>/<key>.json          an LMM stage's stored answers
    <out>/lmm-images/, <out>/_lmm_server/                  images prepared for the LMM, the server a run started
    <out>/_runs.jsonl                                      the last runs: what each stage redid, sent and replayed
    <out>/_cache/image-embeddings/                        image vectors by content hash (or embed.image.cache_dir)

Every table a stage writes has one constant here (`TableRef`); stages declare what they read with them, and code
after the build (report, export, publish, audit) reads through `Build` too, so renaming a stage or moving a table
is one edit in this file. Shard `n` of every stage holds the products of ingest shard `n`.

Why a shard reruns has one answer, `Build.fingerprints`: the sha256 of every input file the shard reads, as its
stage declares them (the same shard number of a table, or every shard of it for a dataset-wide read).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from fashionmv_builder.core.config import ConfigError, digest
from fashionmv_builder.core.shards import ShardMarker, ShardStore

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class TableRef:
    """A table of a stage. `whole`: a reader needs every shard of it, not only the shard it works on."""

    stage: str
    table: str
    whole: bool = False

    def every_shard(self) -> TableRef:
        return replace(self, whole=True)

    def __str__(self) -> str:
        return f"{self.stage}/{self.table}"


INGEST_PRODUCTS = TableRef("ingest", "products")
INGEST_IMAGES = TableRef("ingest", "images")  # the only copy of the image bytes
DEDUPE_PRODUCTS = TableRef("dedupe", "products")
DEDUPE_VIEWS = TableRef("dedupe", "views")  # references to the ingest images a product keeps
CAPTIONS = TableRef("caption", "captions")
VERDICTS = TableRef("verify", "verdicts")
EMBEDDINGS = TableRef("embed", "embeddings")
SPLIT_PRODUCTS = TableRef("candidates", "products")  # every product with its split: the galleries
CANDIDATES = TableRef("candidates", "candidates")
SELECTED_TRIPLETS = TableRef("select", "triplets")  # what selection wrote, before the checks that follow it
SELECTED_NEGATIVES = TableRef("select", "hard_negatives")
# The build's triplets: those the discriminability check kept, with their flags; every output reads these.
TRIPLETS = TableRef("discriminate", "triplets")
HARD_NEGATIVES = TableRef("discriminate", "hard_negatives")


RUNS_FILE = "_runs.jsonl"
RUNS_KEPT = 30


def rejects(stage: str) -> TableRef:
    return TableRef(stage, "rejects")


def _holds_bytes(kind: pa.DataType) -> bool:
    """Binary data, or a struct with some (the `image` column: the Hugging Face Image feature)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and any(_holds_bytes(kind.field(i).type) for i in range(kind.num_fields))


class Build:
    """Read (and, for the executor, write) one build's shards."""

    def __init__(self, out: str) -> None:
        self.out = out
        try:
            self.fs, root = fsspec.core.url_to_fs(out)
        except (ValueError, ImportError) as err:  # an unknown scheme, or one whose package is not installed
            raise ConfigError(f"output_dir {out!r}: {err}") from None
        self.root = root.rstrip("/")

    def check_writable(self) -> None:
        """Fail before any work, in one line, when the output folder cannot be written (read-only, under a file,
        no permission, a bucket that does not exist)."""
        probe = f"{self.root}/.fashionmv-probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm_file(probe)
        except (OSError, ValueError) as err:
            raise ConfigError(f"output_dir {self.out!r} cannot be written: {type(err).__name__}: {err}") from None

    def is_local(self) -> bool:
        return self.fs.protocol in ("file", ("file", "local"))

    def local_folder(self, name: str) -> Path:
        """A run-level folder on the local disk (`lmm-images`, `_lmm_server`): only for a local build."""
        return Path(self.root) / name

    def image_vector_cache(self, cache_dir: str | None) -> tuple[Any, str]:
        """Where image vectors are cached (filesystem, folder): the configured folder, else inside the build."""
        if cache_dir is None:
            return self.fs, f"{self.root}/_cache/image-embeddings"
        fs, root = fsspec.core.url_to_fs(cache_dir)
        return fs, root.rstrip("/")

    # -- shards ----------------------------------------------------------------------------------------------

    def store(self, stage: str, dataset: str) -> ShardStore:
        return ShardStore(self.out, stage, dataset)

    def markers(self, stage: str | TableRef, dataset: str) -> list[ShardMarker]:
        name = stage.stage if isinstance(stage, TableRef) else stage
        return self.store(name, dataset).markers()

    def marker(self, stage: str | TableRef, dataset: str, shard: int) -> ShardMarker | None:
        name = stage.stage if isinstance(stage, TableRef) else stage
        return self.store(name, dataset).read_marker(shard)

    def read(self, ref: TableRef, dataset: str, columns: list[str] | None = None) -> pa.Table:
        """Every marked shard of a table, in shard order (an empty table when there is none)."""
        return self.store(ref.stage, dataset).read_table(ref.table, columns=columns)

    def rows(self, ref: TableRef, dataset: str, columns: list[str] | None = None) -> list[dict]:
        return self.read(ref, dataset, columns).to_pylist()

    def datasets(self, stage: str | TableRef) -> list[str]:
        """The datasets a stage has written, sorted (its folders, less the `_answers` kind)."""
        name = stage.stage if isinstance(stage, TableRef) else stage
        base = f"{self.root}/{name}"
        if not self.fs.isdir(base):
            return []
        folders = (
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(base, detail=True) if e["type"] == "directory"
        )
        return sorted(n for n in folders if not n.startswith("_"))

    def frame(
        self,
        ref: TableRef,
        dataset: str | None = None,
        *,
        columns: list[str] | None = None,
        with_images: bool = False,
    ) -> pd.DataFrame:
        """A table as a pandas DataFrame, for analysis: one dataset, or every dataset of the build (None); every
        table has a `dataset` column. Columns holding image bytes are left out unless `with_images`."""
        import pandas as pd  # here, not at the top: it adds about 0.3 s to every process that reads a build

        frames = []
        for name in [dataset] if dataset is not None else self.datasets(ref):
            schema = self._schema(ref, name)
            if schema is None:
                continue
            wanted = columns or [f.name for f in schema if with_images or not _holds_bytes(f.type)]
            frames.append(self.read(ref, name, columns=wanted).to_pandas())
        if not frames:
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def _schema(self, ref: TableRef, dataset: str) -> pa.Schema | None:
        """The schema of a table's first marked shard (read from the Parquet footer); None when it has none."""
        store = self.store(ref.stage, dataset)
        for marker in store.markers():
            if ref.table in marker.files:
                with self.fs.open(store.file_path(marker, ref.table), "rb") as f:
                    return pq.read_schema(f)
        return None

    def read_shard(self, ref: TableRef, dataset: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        """One shard of a table; a missing shard is an error naming it (a stage ran before its input)."""
        store = self.store(ref.stage, dataset)
        marker = store.read_marker(shard)
        table = store.read_part(marker, ref.table, columns=columns) if marker is not None else None
        if table is None:
            raise FileNotFoundError(f"{ref} shard {shard} of {dataset} is missing: run {ref.stage} first")
        return table

    def stats(self, stage: str, dataset: str) -> dict[str, Any] | None:
        return self.store(stage, dataset).read_stats()

    def stats_modified(self, stage: str, dataset: str) -> dt.datetime | None:
        """When the stage last wrote its stats for the dataset (the end of its last run), in UTC."""
        path = self.store(stage, dataset).stats_path
        if not self.fs.exists(path):
            return None
        when = self.fs.modified(path)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    def counts(self, stage: str, dataset: str) -> dict[str, int]:
        return (self.stats(stage, dataset) or {}).get("counts", {})

    def fingerprints(self, reads: Iterable[TableRef], dataset: str, shards: Iterable[int]) -> dict[int, str | None]:
        """Per shard, the checksums of every input file it reads (None when one of them is not there yet). Each
        table's markers are read once for all the shards: a whole-dataset read would otherwise read every marker of
        the table again for every shard."""
        marked = {ref: {m.shard: m for m in self.markers(ref, dataset)} for ref in reads}
        result: dict[int, str | None] = {}
        for shard in shards:
            parts: dict[str, list[str]] | None = {}
            for ref, by_shard in marked.items():
                markers = list(by_shard.values()) if ref.whole else [by_shard.get(shard)]
                if not markers or any(m is None or ref.table not in m.files for m in markers):
                    parts = None
                    break
                parts[f"{ref}{'*' if ref.whole else ''}"] = [m.files[ref.table].sha256 for m in markers]
            result[shard] = digest(parts) if parts is not None else None
        return result

    # -- joins every later stage needs ---------------------------------------------------------------------

    def kept_views(
        self,
        dataset: str,
        shards: Iterable[int] | None = None,
        *,
        products: set[str] | None = None,
        with_bytes: bool = True,
    ) -> dict[str, list[dict]]:
        """The views dedupe kept, per product, in file-name order (as FashionMV's evaluation reads them), each with
        its image bytes from ingest under "bytes". Only the given shards (default: all), only the given products."""
        wanted = sorted(set(shards)) if shards is not None else [m.shard for m in self.markers(DEDUPE_VIEWS, dataset)]
        views: dict[str, list[dict]] = defaultdict(list)
        for shard in wanted:
            kept = self.read_shard(DEDUPE_VIEWS, dataset, shard).to_pylist()
            if products is not None:
                kept = [v for v in kept if v["product_id"] in products]
            if not kept or not with_bytes:
                for v in kept:
                    views[v["product_id"]].append(v)
                continue
            images = self.read_shard(INGEST_IMAGES, dataset, shard, columns=["product_id", "view_index", "image"])
            data = {
                (r["product_id"], r["view_index"]): r["image"]["bytes"]
                for r in images.to_pylist()
                if products is None or r["product_id"] in products
            }
            for v in kept:
                views[v["product_id"]].append({**v, "bytes": data[(v["product_id"], v["view_index"])]})
        for pid in views:
            views[pid].sort(key=lambda v: v["file_name"])
        return dict(views)

    def shard_members(self, ref: TableRef, dataset: str) -> dict[int, set[str]]:
        """Per marked shard of `ref`'s stage, every product id it holds: those in `ref` and those it rejected."""
        members: dict[int, set[str]] = {}
        for m in self.markers(ref, dataset):
            ids = set(self.read_shard(ref, dataset, m.shard, columns=["product_id"]).column("product_id").to_pylist())
            if "rejects" in m.files:
                ids |= set(
                    self.read_shard(rejects(ref.stage), dataset, m.shard, ["product_id"])["product_id"].to_pylist()
                )
            members[m.shard] = ids
        return members

    def product_shards(self, dataset: str) -> dict[str, int]:
        """Which shard each kept product is in (dedupe's, hence every later stage's)."""
        return {
            r["product_id"]: m.shard
            for m in self.markers(DEDUPE_PRODUCTS, dataset)
            for r in self.read_shard(DEDUPE_PRODUCTS, dataset, m.shard, columns=["product_id"]).to_pylist()
        }

    # -- writing, for the executor ---------------------------------------------------------------------------

    def write_shard(
        self,
        stage: str,
        dataset: str,
        shard: int,
        tables: Mapping[str, pa.Table],
        *,
        config_hash: str,
        fingerprint: str,
        counts: Mapping[str, int],
        metadata: Mapping[str, str],
    ) -> ShardMarker:
        return self.store(stage, dataset).write(
            shard, tables, config_hash=config_hash, input_fingerprint=fingerprint, counts=counts, metadata=metadata
        )

    def is_complete(self, stage: str, dataset: str, shard: int, config_hash: str, fingerprint: str) -> bool:
        return self.store(stage, dataset).is_complete(shard, config_hash, fingerprint)

    # -- the history of runs -------------------------------------------------------------------------------

    def record_run(self, entry: Mapping[str, Any], keep: int = RUNS_KEPT) -> None:
        """Append one run's summary to the build's history (`_runs.jsonl`), keeping the last `keep` runs."""
        history = [*self.runs(), dict(entry)][-keep:]
        self.fs.pipe_file(f"{self.root}/{RUNS_FILE}", "".join(json.dumps(e) + "\n" for e in history).encode())

    def runs(self) -> list[dict[str, Any]]:
        """The build's recent runs, oldest first (what each stage redid, sent and replayed, per dataset)."""
        try:
            text = self.fs.cat_file(f"{self.root}/{RUNS_FILE}").decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def answers(self, stage: str):  # -> AnswerStore (imported here only: the LMM package is not needed otherwise)
        from fashionmv_builder.lmm.calls import AnswerStore

        return AnswerStore(self.out, stage)
