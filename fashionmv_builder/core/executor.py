"""The executor: one life cycle for every stage, walked in pipeline order, on a runner.

    run_pipeline   stages in order; a stage whose input stage was skipped (no lmm section) is skipped too, and a
                   dataset that failed a stage (a source that cannot be listed) leaves the later stages
    run_stage      plan every dataset → run the shards to do → finish every dataset (stale markers, stats.json)

Where shards run is the runner's business: `LocalRunner` (the `fashionmv` command: worker processes for CPU shards,
one asyncio client for LMM shards) or the Prefect flow's runner (flows/build_fashionmv.py: tasks, retries,
artifacts). Both plan with `plan_dataset`, write with `execute_shard` or the LMM harness, and finish with
`finish_dataset`, so a stage behaves the same on either.
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import functools
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from fashionmv_builder.core.build import Build
from fashionmv_builder.core.config import RunConfig
from fashionmv_builder.core.lock import run_lock
from fashionmv_builder.core.shards import ShardMarker, ShardStore
from fashionmv_builder.core.stage import DatasetPlan, ShardOutput, ShardTask, Stage, StageReport, Work

if TYPE_CHECKING:
    from fashionmv_builder.lmm.calls import CircuitBreaker

log = logging.getLogger("fashionmv")

# What planning a dataset may meet in bad input or bad settings: the dataset is reported, the others go on.
PLANNING_ERRORS = (OSError, KeyError, ValueError)
_STATS_KEYS = ("stage", "dataset", "shards", "counts")


@dataclass
class LmmRun:
    """The LMM side of one stage's run: where its requests go (its server is started the first time they are asked
    for, so a stage with nothing to do starts none), and its circuit breaker for the whole run."""

    open_endpoints: Callable[[], list[str]]
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    _endpoints: list[str] | None = None

    @property
    def endpoints(self) -> list[str]:
        if self._endpoints is None:
            self._endpoints = self.open_endpoints()
        return self._endpoints

    @property
    def started(self) -> bool:
        return self._endpoints is not None

    def breaker(self, stage: Stage) -> CircuitBreaker:
        if stage.name not in self.breakers:
            self.breakers[stage.name] = stage.make_breaker()  # type: ignore[attr-defined]
        return self.breakers[stage.name]


# -- the life cycle of one stage -----------------------------------------------------------------------------


def plan_dataset(stage: Stage, dataset: str, pilot: float | None = None) -> DatasetPlan:
    """Plan a dataset's shards (a pilot takes the first share of them), then run a dataset-wide stage's global step
    for the shards to do."""
    try:
        plan = stage.plan(dataset)
    except PLANNING_ERRORS as err:  # a missing root, an h5 without its datasets…
        log.error("%s: %s: cannot plan: %s", stage.name, dataset, err)
        return DatasetPlan(dataset, [], [], error=str(err))
    if plan.error is None and pilot is not None:
        tasks = plan.tasks[: max(1, math.ceil(len(plan.tasks) * pilot))]
        plan = DatasetPlan(dataset, tasks, [t for t in plan.todo if t in tasks], plan.extra, whole=False)
    if plan.error is None and plan.todo and stage.work is Work.DATASET:
        plan.todo, extra = stage.prepare(dataset, plan.todo)
        plan.extra.update(extra)
    return plan


def commit(stage: Stage, task: ShardTask, output: ShardOutput) -> ShardMarker:
    """Check conservation, then write the shard's tables and its marker (the marker is the commit)."""
    output.ledger.check()
    if missing := set(stage.writes) - set(output.tables):
        raise RuntimeError(f"{stage.name}: shard {task.shard} of {task.dataset} lacks tables {sorted(missing)}")
    return stage.build.write_shard(
        stage.name,
        task.dataset,
        task.shard,
        {**output.tables, "rejects": output.ledger.rejects_table()},
        config_hash=stage.config_hash(task.dataset),
        fingerprint=task.fingerprint,
        counts=output.ledger.counts,
        metadata=stage.metadata(),
    )


def execute_shard(stage: Stage, task: ShardTask) -> ShardMarker:
    """One CPU shard, start to finish: the unit a worker process or a task runs."""
    return commit(stage, task, stage.run_shard(task))


def finish_dataset(stage: Stage, plan: DatasetPlan, runtime: dict | None = None) -> StageReport:
    """After every planned shard is written: drop the markers of shards that no longer exist, sum the stats.

    When no shard was redone, the stats' extra fields (thresholds, timings, `last_run`) stay as the run that wrote
    them left them: a rerun with nothing to do changes no file. What this run did is in the report's `run`."""
    if plan.error is not None:
        return StageReport(stage.name, plan.dataset, error=plan.error)
    store = stage.build.store(stage.name, plan.dataset)
    if plan.whole:
        store.remove_stale(t.shard for t in plan.tasks)
    run = this_run(store, plan)
    if plan.todo:
        extra = {**stage.finish(plan), **(runtime or {}), "last_run": run}
    else:
        previous = {k: v for k, v in (store.read_stats() or {}).items() if k not in _STATS_KEYS}
        extra = {**previous, **stage.finish(plan)}
    skipped = len(plan.tasks) - len(plan.todo)
    return StageReport(stage.name, plan.dataset, len(plan.tasks), skipped, store.write_stats(extra), run=run)


def this_run(store: ShardStore, plan: DatasetPlan) -> dict:
    """What this run did for the dataset, beside the totals of every shard: the shards it redid, those whose files
    it rewrote (a redone shard with the same result keeps its files), and the counts of the redone shards (requests
    sent, replayed and carried over, products in and out)."""
    redone = [m for t in plan.todo if (m := store.read_marker(t.shard)) is not None]
    counts: Counter[str] = Counter()
    for marker in redone:
        counts.update(marker.counts)
    return {
        "shards_redone": len(plan.todo),
        "shards_rewritten": sum(m.files_changed for m in redone),
        "counts": dict(sorted(counts.items())),
    }


# -- runners -----------------------------------------------------------------------------------------------


class Runner(ABC):
    """Where a stage's planning and shards run; what it shows of them."""

    def plan(self, stage: Stage, datasets: list[str], pilot: float | None) -> list[DatasetPlan]:
        return [plan_dataset(stage, dataset, pilot) for dataset in datasets]

    @abstractmethod
    def run(self, stage: Stage, tasks: list[ShardTask], lmm: LmmRun | None) -> None: ...

    def run_stage(
        self, stage: Stage, datasets: list[str], lmm: LmmRun | None, pilot: float | None
    ) -> list[StageReport]:
        """The whole life cycle of one stage (a runner may wrap it: the Prefect flow makes it a sub-flow)."""
        return run_stage(stage, self, datasets, lmm, pilot)

    def report(self, stage: Stage, reports: list[StageReport]) -> None:  # noqa: B027 (optional hook)
        """Show a stage's reports (a table on the command line, an artifact on Prefect)."""

    def skip(self, stage: Stage, why: str) -> None:
        log.warning("%s skipped: %s", stage.name, why)


class LocalRunner(Runner):
    """This machine: CPU shards in `workers` processes (one runs in-process, easier to debug and profile), LMM
    shards concurrently on one client, so the server stays busy across shard boundaries."""

    def __init__(self, workers: int, on_report: Callable[[Stage, list[StageReport]], None] | None = None) -> None:
        self.workers = workers
        self.on_report = on_report

    def run(self, stage: Stage, tasks: list[ShardTask], lmm: LmmRun | None) -> None:
        if stage.work is Work.LMM:
            from fashionmv_builder.lmm.harness import run_lmm_shards

            assert lmm is not None
            if tasks:
                asyncio.run(run_lmm_shards(stage, tasks, lmm.endpoints, lmm.breaker(stage)))  # type: ignore[arg-type]
            return
        # A dataset-wide stage's shards are a few rows to write: the work was its global step.
        workers = self.workers if stage.work is Work.SHARD else 1
        run_in_processes(stage, tasks, workers)

    def report(self, stage: Stage, reports: list[StageReport]) -> None:
        if self.on_report is not None:
            self.on_report(stage, reports)


def die_with_parent() -> None:
    """Set up a worker process: killed when the process that started it dies (kill -9, a crash), since a worker with
    no owner would go on writing shards nobody accounts for and hold its memory forever (Linux's parent-death
    signal; elsewhere nothing). A shard cut short leaves no marker, so it never passes as complete.

    Ctrl-C is the parent's to act on: it reaches the whole process group, and a worker killed by it while waiting for
    its next shard dies holding the pool's queue lock, which the parent's clean-up then waits for forever (measured:
    with the default action in the workers, a run stopped by Ctrl-C hung whenever a worker was idle). The parent's
    clean-up stops the workers with SIGTERM, whose default action they keep, once it holds that lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the signal was armed
            os._exit(1)


_PR_SET_PDEATHSIG = 1


def run_in_processes(stage: Stage, tasks: Sequence[ShardTask], workers: int) -> None:
    datasets = sorted({t.dataset for t in tasks})
    with tqdm(total=len(tasks), desc=f"{stage.name} {','.join(datasets)}", unit="shard", disable=not tasks) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                execute_shard(stage, task)
                bar.update()
            return
        # multiprocessing's pool, not concurrent.futures': leaving its block on an error or Ctrl-C terminates the
        # workers, where an executor would first finish every shard already queued. Spawned, not forked: a worker
        # forked from a process that has run torch (OpenMP) crashes in libgomp as soon as it runs torch itself.
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(tasks)), initializer=die_with_parent) as pool:
            results = pool.imap_unordered(functools.partial(execute_shard, stage), tasks)
            seen = set(pool._pool)  # type: ignore[attr-defined]  # see _next_or_dead
            for _ in tasks:
                _next_or_dead(stage, pool, results, seen)
                bar.update()


class WorkerDied(RuntimeError):
    """A worker process died (a crash, or killed from outside): the shards it held are not written."""


def _next_or_dead(stage: Stage, pool: Any, results: Any, seen: set) -> None:
    """The next result; a worker's death raises instead of waiting forever (the pool replaces a dead worker without
    a word, and the shard it held never comes back). Its `_pool` list is private, and the only way to see it."""
    while True:
        try:
            return results.next(timeout=2)
        except multiprocessing.TimeoutError:
            seen |= set(pool._pool)
            dead = [p.exitcode for p in seen if p.exitcode not in (None, 0)]
            if dead:
                how = f"signal {-dead[0]}" if dead[0] < 0 else f"exit code {dead[0]}"
                raise WorkerDied(
                    f"{stage.name}: a worker process died ({how}); the shards it held were not written, and a rerun "
                    "redoes only those"
                ) from None


# -- the walk ----------------------------------------------------------------------------------------------


def run_stage(
    stage: Stage,
    runner: Runner,
    datasets: list[str],
    lmm: LmmRun | None = None,
    pilot: float | None = None,
) -> list[StageReport]:
    plans = runner.plan(stage, datasets, pilot)
    start = time.perf_counter()
    runner.run(stage, [t for p in plans for t in p.todo], lmm)
    wall = time.perf_counter() - start
    runtime = None
    if stage.work is Work.LMM and lmm is not None and lmm.started:
        runtime = {"wall_seconds": round(wall, 3), "server_seconds": round(wall * len(lmm.endpoints), 3)}
    reports = [finish_dataset(stage, p, runtime) for p in plans]
    runner.report(stage, reports)
    return reports


def run_pipeline(
    config: RunConfig,
    stages: Sequence[Stage],
    runner: Runner,
    datasets: list[str] | None = None,
    pilot: float | None = None,
) -> dict[str, list[StageReport]]:
    """Run the stages in order over the datasets (default: every source), holding the output folder's run lock.
    Each LMM stage gets its own endpoints (lmm/serving.py: a server the run starts is swapped between stages that
    serve other models, and stopped at the end)."""
    from fashionmv_builder.lmm.serving import StageServers

    datasets = list(datasets or [s.dataset for s in config.sources])
    reports: dict[str, list[StageReport]] = {}
    skipped: set[str] = set()
    build = Build(config.output_dir)
    build.check_writable()  # before any work: a bad output_dir is one line now, not a traceback after decoding
    started = dt.datetime.now(dt.UTC)
    with ExitStack() as stack:
        stack.enter_context(run_lock(build))
        servers = StageServers(config, [s for s in stages if s.work is Work.LMM])  # type: ignore[misc]
        stack.callback(servers.close)
        for stage in stages:
            why = None
            if stage.depends_on() & skipped:
                why = f"it reads {', '.join(sorted(stage.depends_on() & skipped))}, which did not run"
            elif stage.work is Work.LMM and stage.lmm_settings is None:  # type: ignore[attr-defined]
                why = "no lmm section in the config"
            elif not datasets:
                why = "no dataset is left to run it on"
            if why is not None:
                skipped.add(stage.name)
                runner.skip(stage, why)
                continue
            lmm = None
            if stage.work is Work.LMM:
                lmm = LmmRun(functools.partial(servers.endpoints, stage))
            reports[stage.name] = runner.run_stage(stage, datasets, lmm, pilot)
            datasets = [r.dataset for r in reports[stage.name] if r.error is None]
        if any(r.run.get("shards_redone") for rs in reports.values() for r in rs):  # a no-op rerun writes nothing
            build.record_run(run_summary(config, reports, started))
    return reports


_RUN_COUNTS = ("products_in", "products_out", "requests_sent", "answers_replayed", "answers_carried_over")


def run_summary(config: RunConfig, reports: dict[str, list[StageReport]], started: dt.datetime) -> dict:
    """One line of the build's run history: per stage and dataset, what this run changed and what it cost."""
    stages: dict[str, dict] = {}
    for name, rs in reports.items():
        for r in rs:
            run = r.run
            entry = {k: run[k] for k in ("shards_redone", "shards_rewritten") if k in run}
            entry |= {k: v for k, v in run.get("counts", {}).items() if k in _RUN_COUNTS}
            for key in ("change", "sources"):  # ingest's products added and withdrawn; candidates' sources mined
                if key in r.stats and run.get("shards_redone"):
                    entry[key] = r.stats[key]
            if r.error is not None:
                entry["error"] = r.error
            stages.setdefault(name, {})[r.dataset] = entry
    finished = dt.datetime.now(dt.UTC)
    return {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "run": config.name,
        "config_hash": config.config_hash(),
        "stages": stages,
    }


def failures(reports: dict[str, list[StageReport]]) -> list[str]:
    return [f"{stage} {r.dataset}: {r.error}" for stage, rs in reports.items() for r in rs if r.error is not None]
