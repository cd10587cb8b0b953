"""The stage contract: what every stage of the pipeline declares and implements.

A stage declares its name and version, the tables it reads (`TableRef`s of earlier stages), the tables it writes
(Arrow schemas; every stage also writes `rejects`), and its kind of work. It implements three steps over one
dataset, which the executor (executor.py) runs the same way for every stage, on the command line or on Prefect:

    plan(dataset)          every shard of the dataset, each with the fingerprint of the inputs it reads
    prepare(dataset, todo) only for dataset-wide work: the global step, once, for the shards to (re)do
    run_shard(task)        one shard's tables, with its counts and rejects on a ledger
    finish(plan)           stats.json fields beyond the summed counts

A shard whose marker records the same config hash (`settings`) and fingerprint is skipped; that is the one resume
mechanism. Stages never write files or count in/out themselves: the executor writes what `run_shard` returns and
checks conservation.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import pyarrow as pa

from fashionmv_builder.core.build import Build, TableRef
from fashionmv_builder.core.config import RunConfig, digest
from fashionmv_builder.core.ledger import ShardLedger


class Work(StrEnum):
    SHARD = "shard"  # CPU work per shard, run in worker processes
    DATASET = "dataset"  # a dataset-wide step (search, mining), then light per-shard writes
    LMM = "lmm"  # one LMM request per product, shards sharing one client and one circuit breaker


@dataclass(frozen=True)
class ShardTask:
    """One shard of one stage for one dataset: plain data, so it pickles to any worker."""

    dataset: str
    shard: int
    fingerprint: str
    payload: Any = None  # what the stage's planning or global step hands the shard (listed products, decisions)


@dataclass
class DatasetPlan:
    dataset: str
    tasks: list[ShardTask]  # every shard the stage has for the dataset
    todo: list[ShardTask]  # those whose marker does not match
    extra: dict = field(default_factory=dict)  # stats.json fields found while planning (listing counters…)
    error: str | None = None  # the dataset cannot be planned (a source that cannot be listed, a missing input)
    whole: bool = True  # False for a pilot: the shards beyond its slice are not stale


@dataclass
class ShardOutput:
    tables: dict[str, pa.Table]  # every table in the stage's `writes`
    ledger: ShardLedger


@dataclass
class StageReport:
    """What one stage did for one dataset: the one report type of every stage run."""

    stage: str
    dataset: str
    shards: int = 0
    skipped: int = 0
    stats: dict = field(default_factory=dict)
    error: str | None = None
    run: dict = field(default_factory=dict)  # what this run did (executor.this_run); stats.json keeps the last that did

    @property
    def counts(self) -> dict[str, int]:
        return self.stats.get("counts", {})


class Stage(ABC):
    """The first line of a stage's docstring is what `fashionmv stages` and the stage's command say it does."""

    name: ClassVar[str]  # its folder in the build
    version: ClassVar[str]  # bump when the output changes for the same inputs and settings
    work: ClassVar[Work]
    reads: ClassVar[tuple[TableRef, ...]]  # the first one's shards are the stage's shards
    writes: ClassVar[dict[str, pa.Schema]]  # besides `rejects`

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.build = Build(config.output_dir)

    # -- what decides a rerun ----------------------------------------------------------------------------------

    def settings(self, dataset: str) -> dict:
        """Everything besides the input files that the dataset's output depends on; a change redoes its shards."""
        return {}

    def config_hash(self, dataset: str) -> str:
        return digest({"stage": self.name, "version": self.version, "settings": self.settings(dataset)})

    @classmethod
    def summary(cls) -> str:
        return (inspect.getdoc(cls) or cls.name).splitlines()[0]

    def depends_on(self) -> set[str]:
        return {ref.stage for ref in self.reads}

    # -- the life cycle ----------------------------------------------------------------------------------------

    def plan(self, dataset: str) -> DatasetPlan:
        """One task per shard of the first input, fingerprinted by every declared read."""
        primary = self.reads[0]
        markers = self.build.markers(primary, dataset)
        if not markers:
            return DatasetPlan(dataset, [], [], error=f"no {primary.stage} shards: run {primary.stage} first")
        tasks = []
        for shard, fingerprint in self.build.fingerprints(self.reads, dataset, [m.shard for m in markers]).items():
            if fingerprint is None:
                missing = ", ".join(str(r) for r in self.reads)
                return DatasetPlan(dataset, [], [], error=f"shard {shard}: an input is missing ({missing})")
            tasks.append(ShardTask(dataset, shard, fingerprint))
        return DatasetPlan(dataset, tasks, self.pending(tasks))

    def pending(self, tasks: list[ShardTask]) -> list[ShardTask]:
        return [
            t
            for t in tasks
            if not self.build.is_complete(self.name, t.dataset, t.shard, self.config_hash(t.dataset), t.fingerprint)
        ]

    def earlier_rows(self, dataset: str, table: str, shards: Iterable[int] | None = None) -> list[dict]:
        """The rows of one of its tables this stage wrote with its current settings (all shards, or the given ones):
        what an incremental run keeps instead of redoing. Read before this run writes the shards."""
        store = self.build.store(self.name, dataset)
        current = self.config_hash(dataset)
        markers = store.markers() if shards is None else [m for s in shards if (m := store.read_marker(s))]
        return [
            row
            for marker in markers
            if marker.config_hash == current
            for row in store.read_part(marker, table).to_pylist()  # type: ignore[union-attr]
        ]

    def prepare(self, dataset: str, todo: list[ShardTask]) -> tuple[list[ShardTask], dict]:
        """The dataset-wide step (Work.DATASET), run once when a shard is to do: each task with its payload, and
        stats.json fields about the step."""
        return todo, {}

    @abstractmethod
    def run_shard(self, task: ShardTask) -> ShardOutput:
        """One shard's tables and ledger (LMM stages implement the harness's async `answer_shard` instead)."""

    def finish(self, plan: DatasetPlan) -> dict:
        """stats.json fields beyond the summed counts (default: what planning found)."""
        return plan.extra

    def ledger(self, dataset: str) -> ShardLedger:
        return ShardLedger(self.name, dataset)

    def metadata(self) -> dict[str, str]:
        """Key-value metadata of every Parquet file the stage writes."""
        return {"fashionmv.stage": self.name, "fashionmv.run_config_hash": self.config.config_hash()}
