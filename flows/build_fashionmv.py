"""The Prefect flow `build-fashionmv`: every built stage of the pipeline, one task per shard.

The stages stay plain functions (fashionmv_builder); this module only wires them, retries them and shows progress:

    build-fashionmv    loads and validates the config, then runs each stage as a sub-flow:
      ingest           a list-source task per dataset, then an ingest-shard task per shard        (CPU runner)
      dedupe           a dedupe-plan task per dataset (the global step), then a dedupe-shard task per shard (CPU)
      caption, verify  a caption-shard / verify-shard task per shard, tagged `lmm`       (threads of this process)

Resume is the stages' own (shards.py): a shard whose marker records the same config hash and input fingerprint is
skipped, and LMM answers are replayed from the answer store, so Prefect result caching is off (NO_CACHE).

CPU stages run on `runner="local"` (a pool of `workers` processes, as `fashionmv run` uses) or `runner="dask"`
(prefect-dask on the Dask cluster at `dask_address`, or on a local cluster started for the run). LMM shards always
run in threads of the flow's own process: they only wait on the server, and a local server reads their images as
file:// URLs from the output folder, which this machine is sure to share.

    python -m flows.build_fashionmv run configs/sample.yaml [--set key=value ...] [--runner dask]
    python -m flows.build_fashionmv serve [--name served]     # the deployment build-fashionmv/served
"""

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import Field
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from fashionmv_builder import dedupe, ingest
from fashionmv_builder.caption import CaptionStage
from fashionmv_builder.config import ConfigError, RunConfig, load_config, parse_override
from fashionmv_builder.lmm.calls import CircuitOpen
from fashionmv_builder.lmm.serving import lmm_endpoints
from fashionmv_builder.lmm.stage import LmmStage, check_endpoints, finish_stage, plan_stage, run_lmm_shard
from fashionmv_builder.shards import ShardMarker
from fashionmv_builder.triplets.candidates import run_candidates
from fashionmv_builder.triplets.select import SelectStage
from fashionmv_builder.verify import VerifyStage

FLOW_NAME = "build-fashionmv"
DEFAULT_CONFIG = "configs/sample.yaml"
LMM_TAG = "lmm"  # every LMM task carries it: `prefect concurrency-limit create lmm N` bounds them across runs
# In pipeline order; Stage 3's candidate mining runs right before "triplets" (its listwise selection).
LMM_STAGES: dict[str, type[LmmStage]] = {"caption": CaptionStage, "verify": VerifyStage, "triplets": SelectStage}

Report = dict[str, Any]  # a stage's report for one dataset: dataset, shards, skipped, stats


@dataclass(frozen=True)
class LmmJob:
    """One shard of an LMM stage, as a task gets it (plain data: it pickles to any worker)."""

    config: RunConfig
    stage: str
    endpoints: tuple[str, ...]
    marker: ShardMarker
    max_in_flight: int


# ---------------------------------------------------------------------------------------------------------------
# tasks: each calls one stage function


# What a retry would only meet again: a tripped circuit breaker, a bad config, a missing input, bad data.
PERMANENT_ERRORS = (
    CircuitOpen,
    ConfigError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    KeyError,
    ValueError,
)


def _worth_retrying(task: Task, task_run: Any, state: Any) -> bool:
    """Retry what may pass next time (a lost connection, a server restarting, an object store hiccup)."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except Exception:
        return True
    return True


@task(
    name="list-source",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
    task_run_name="list {dataset}",
)
def list_source(config: RunConfig, dataset: str) -> tuple[list[ingest.IngestShard], dict[str, int]]:
    """A source's products cut into shards (reads its listing: a folder tree, an h5 file, a manifest)."""
    return ingest.plan(config, config.source(dataset))


@task(
    name="ingest-shard",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
    task_run_name="ingest {job.dataset} {job.shard:05d}",
)
def ingest_shard(job: ingest.IngestShard) -> ShardMarker:
    return ingest.run_shard(job)


@task(
    name="mine-candidates",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
    task_run_name="candidates {dataset}",
)
def mine_candidates(config: RunConfig, dataset: str) -> list[dict]:
    """Stage 3's split, embeddings and candidate mining for one dataset (it looks at whole splits at once)."""
    return run_candidates(config, [dataset])


@task(
    name="dedupe-plan",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
    task_run_name="dedupe {dataset}",
)
def dedupe_plan(config: RunConfig, dataset: str) -> dedupe.DedupePlan:
    """The dataset-wide step: every hash of the dataset, one decision per product and view."""
    return dedupe.plan_dataset(config, dataset)


@task(
    name="dedupe-shard",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
    task_run_name="dedupe {job.dataset} {job.shard:05d}",
)
def dedupe_shard(job: dedupe.DedupeShard) -> ShardMarker:
    return dedupe.run_shard(job)


@task(
    name="lmm-shard",
    tags=[LMM_TAG],
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
    task_run_name="{job.stage} {job.marker.dataset} {job.marker.shard:05d}",
)
def lmm_shard(job: LmmJob) -> ShardMarker:
    # A retry replays the answers stored before the failure: nothing is asked twice.
    return run_lmm_shard(LMM_STAGES[job.stage](job.config), list(job.endpoints), job.marker, job.max_in_flight)


# ---------------------------------------------------------------------------------------------------------------
# running shards, progress and stats


def run_shards(shard_task: Task, jobs: Sequence[Any], *, what: str, in_flight: int) -> list[Any]:
    """One task per job, at most `in_flight` submitted ahead, with a progress bar here and a progress artifact.

    Once a shard has failed (its retries used up) no new one is submitted; those running finish, since what they
    write is kept (markers, answers), and then the first failure is raised."""
    if not jobs:
        return []
    log = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"{what}: share of the {len(jobs)} shards to do")
    queue = iter(jobs)
    pending: list[PrefectFuture] = []
    results: list[Any] = []
    errors: list[BaseException] = []
    submitted = 0
    with tqdm(total=len(jobs), desc=what, unit="shard", disable=None) as bar:  # a bar only on a terminal
        while True:
            while not errors and len(pending) < in_flight and (job := next(queue, None)) is not None:
                pending.append(shard_task.submit(job))
                submitted += 1
            if not pending:
                break
            done = next(as_completed(pending))
            pending.remove(done)
            try:
                results.append(done.result())
            except Exception as err:
                errors.append(err)
            bar.update()
            update_progress_artifact(artifact, 100.0 * (len(results) + len(errors)) / len(jobs))
    if errors:
        unstarted = len(jobs) - submitted
        log.error("%s: %d shard(s) failed, %d not started; a rerun does only those", what, len(errors), unstarted)
        raise errors[0]
    return results


def stage_rows(reports: list[Report]) -> list[dict[str, Any]]:
    """The table a stage's reports make, one row per dataset (for artifacts and the command line)."""
    rows = []
    for r in reports:
        counts = r["stats"].get("counts", {})
        reasons = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in counts.items() if k.startswith("rejected."))
        rows.append(
            {
                "dataset": r["dataset"],
                "shards": r["shards"],
                "skipped": r["skipped"],
                "products in": counts.get("products_in", 0),
                "products out": counts.get("products_out", 0),
                "views in": counts.get("views_in", 0),
                "views out": counts.get("views_out", 0),
                "rejects": r["stats"].get("error") or reasons,
            }
        )
    return rows


def artifact_key(run_name: str, stage: str) -> str:
    """Artifact keys take lowercase letters, digits and dashes; one key per run name and stage keeps a history."""
    return re.sub(r"[^a-z0-9]+", "-", f"fashionmv-{run_name}-{stage}".lower()).strip("-")


def publish_stats(config: RunConfig, stage: str, reports: list[Report]) -> None:
    create_table_artifact(
        table=stage_rows(reports),
        key=artifact_key(config.name, stage),
        description=f"**{stage}** of run `{config.name}`: shards and stats.json under `{config.output_dir}/{stage}/`",
    )


def _report(dataset: str, error: str) -> Report:
    return {"dataset": dataset, "shards": 0, "skipped": 0, "stats": {"error": error}}


# ---------------------------------------------------------------------------------------------------------------
# one sub-flow per stage


@flow(name="ingest")
def ingest_flow(config: RunConfig, in_flight: int) -> list[Report]:
    log = get_run_logger()
    listings = {s.dataset: list_source.submit(config, s.dataset) for s in config.sources}
    reports: dict[str, Report] = {}
    planned = []
    for dataset, listed in listings.items():
        try:
            shards, listing = listed.result()
        except Exception as err:  # a missing root, an h5 without its datasets…: reported, the others go on
            log.error("ingest: %s: cannot list the source: %s", dataset, err)
            reports[dataset] = _report(dataset, f"cannot list the source: {err}")
            continue
        source = config.source(dataset)
        planned.append((source, shards, listing, ingest.pending_shards(config, source, shards)))
    run_shards(ingest_shard, [job for *_, todo in planned for job in todo], what="ingest", in_flight=in_flight)
    for source, shards, listing, todo in planned:
        report = ingest.finish_source(config, source, len(shards), len(shards) - len(todo), listing)
        reports[source.dataset] = asdict(report)
    ordered = [reports[s.dataset] for s in config.sources]
    publish_stats(config, "ingest", ordered)
    return ordered


@flow(name="dedupe")
def dedupe_flow(config: RunConfig, datasets: list[str], in_flight: int) -> list[Report]:
    futures = [dedupe_plan.submit(config, dataset) for dataset in datasets]
    plans: list[dedupe.DedupePlan] = [f.result() for f in futures]
    run_shards(dedupe_shard, [job for p in plans for job in p.todo], what="dedupe", in_flight=in_flight)
    reports = [asdict(dedupe.finish_dataset(config, p)) for p in plans]
    publish_stats(config, "dedupe", reports)
    return reports


@flow(name="lmm-stage")
def lmm_stage_flow(
    config: RunConfig, stage: str, endpoints: list[str], datasets: list[str], shards_in_flight: int
) -> list[Report]:
    lmm_stage = LMM_STAGES[stage](config)
    plans = plan_stage(lmm_stage, datasets)
    # The run's request budget (lmm.max_in_flight) is shared by the shards in flight, each on a client of its own.
    per_shard = max(1, math.ceil(config.lmm.max_in_flight / shards_in_flight))
    jobs = [LmmJob(config, stage, tuple(endpoints), m, per_shard) for p in plans for m in p.todo]
    start = time.perf_counter()
    shard_task = lmm_shard.with_options(name=f"{stage}-shard")
    run_shards(shard_task, jobs, what=stage, in_flight=shards_in_flight)
    reports = [asdict(r) for r in finish_stage(lmm_stage, plans, time.perf_counter() - start, len(endpoints))]
    publish_stats(config, stage, reports)
    return reports


# ---------------------------------------------------------------------------------------------------------------
# the flow


def local_runner(workers: int, processes: bool) -> TaskRunner:
    """Processes for work that holds the GIL (decoding images), as `fashionmv run` uses; threads for the rest, since
    each process pays a start-up (Python, Prefect, the stages) that light shard tasks never earn back."""
    if processes and workers > 1:
        return ProcessPoolTaskRunner(workers)
    return ThreadPoolTaskRunner(workers)


@contextmanager
def cpu_runners(
    runner: str, workers: int, dask_address: str | None, dask_workers: int | None
) -> Iterator[tuple[Callable[[bool], TaskRunner], int]]:
    """A task-runner factory for the CPU stages, `make(processes)` (one runner per sub-flow), and how many shards
    run at once."""
    if runner == "local":
        yield (lambda processes: local_runner(workers, processes)), workers
        return
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    if dask_address:
        with Client(dask_address, timeout=30) as client:
            threads = sum(client.nthreads().values())
        yield (lambda _: DaskTaskRunner(address=dask_address)), max(1, threads)
        return
    n = dask_workers or workers
    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would drown the run's own
    # one cluster for the whole run, so its start-up is paid once; the dashboard on a free port
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        get_run_logger().info(
            "a local Dask cluster of %d workers at %s (dashboard %s)",
            n,
            cluster.scheduler_address,
            cluster.dashboard_link,
        )
        yield (lambda _: DaskTaskRunner(address=cluster.scheduler_address)), n


@flow(name=FLOW_NAME)
def build_fashionmv(
    config_path: str = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    runner: Literal["local", "dask"] = "local",
    dask_address: str | None = None,
    dask_workers: int | None = None,
    lmm_shards: Annotated[int, Field(ge=1)] = 4,
) -> dict[str, list[Report]]:
    """Build the dataset a run configuration describes: every stage built so far, one task per shard.

    Args:
        config_path: the run's YAML file (a relative path is taken from the working directory).
        overrides: config keys to change, dotted (`{"shard_size": 50, "lmm.max_in_flight": 8}`), as `--set` does.
        runner: where the CPU stages (ingest, dedupe) run: `local` processes, or `dask`.
        dask_address: the scheduler of a running Dask cluster; without it, `dask` starts a local cluster.
        dask_workers: workers of that local cluster (default: the config's `workers`).
        lmm_shards: LMM shards in flight at once; they share the config's `lmm.max_in_flight` requests.
    """
    log = get_run_logger()
    config = load_config(config_path, overrides)
    log.info("run %r from %s: outputs under %s", config.name, config_path, config.output_dir)
    reports: dict[str, list[Report]] = {}
    with cpu_runners(runner, config.workers, dask_address, dask_workers) as (make_runner, parallel):
        reports["ingest"] = ingest_flow.with_options(task_runner=make_runner(True))(config, 2 * parallel)
        ingested = [r["dataset"] for r in reports["ingest"] if "error" not in r["stats"]]
        if ingested:
            # the global step is numpy and the shard writes are light: threads locally
            dedupe_runner = make_runner(False)
            reports["dedupe"] = dedupe_flow.with_options(task_runner=dedupe_runner)(config, ingested, 2 * parallel)
        if config.lmm is None:
            log.warning("no lmm section in the config: captioning and verification skipped")
        elif ingested:
            with lmm_endpoints(config) as endpoints:  # a server started here (lmm.serve) is stopped on the way out
                check_endpoints(config, endpoints)
                for stage in LMM_STAGES:
                    if stage == "triplets":
                        for dataset in ingested:
                            mine_candidates(config, dataset)
                    threads = ThreadPoolTaskRunner(lmm_shards)
                    stage_flow = lmm_stage_flow.with_options(name=stage, task_runner=threads)
                    reports[stage] = stage_flow(config, stage, endpoints, ingested, lmm_shards)
        # Publishing to the Hub (issue #8) goes here, after every stage.
    # like `fashionmv run`: a source that cannot be listed does not stop the others, but the run fails at the end
    errors = [
        f"{stage} {r['dataset']}: {r['stats']['error']}"
        for stage, rs in reports.items()
        for r in rs
        if "error" in r["stats"]
    ]
    if errors:
        raise RuntimeError("; ".join(errors))
    return reports


# ---------------------------------------------------------------------------------------------------------------
# command line

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The Prefect flow build-fashionmv.")
console = Console(stderr=True)


def print_summary(reports: dict[str, list[Report]]) -> None:
    out = Console(width=max(Console().width, 110))
    for stage, stage_reports in reports.items():
        rows = stage_rows(stage_reports)
        table = Table(title=stage)
        for column in rows[0] if rows else []:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        out.print(table)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run configuration (YAML)", exists=True, dir_okay=False)],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.sub=value")] = None,
    runner: Annotated[str, typer.Option(help="where ingest and dedupe run: local or dask")] = "local",
    dask_address: Annotated[str | None, typer.Option(help="a running Dask scheduler (else a local one)")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="workers of the local Dask cluster")] = None,
    lmm_shards: Annotated[int, typer.Option(min=1, help="LMM shards in flight")] = 4,
) -> None:
    """Run the flow in this process, against PREFECT_API_URL (or a temporary local server without it)."""
    try:
        overrides = dict(parse_override(o) for o in set_ or [])
        load_config(config, overrides)  # a bad config fails here, naming the key, before Prefect starts
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from None
    if runner not in ("local", "dask"):
        console.print(f"[red]--runner {runner!r}:[/red] local or dask")
        raise typer.Exit(2)
    state = build_fashionmv(str(config), overrides, runner, dask_address, dask_workers, lmm_shards, return_state=True)  # type: ignore[call-overload]
    if not state.is_completed():
        console.print(f"[red]{state.name}:[/red] {state.message}")
        raise typer.Exit(1)
    print_summary(state.result())


@app.command()
def serve(
    name: Annotated[str, typer.Option(help="deployment name: build-fashionmv/NAME")] = "served",
    config: Annotated[str, typer.Option(help="the config_path a run gets by default")] = DEFAULT_CONFIG,
) -> None:
    """Serve the flow as a deployment: this process polls the server and runs each flow run it is given."""
    build_fashionmv.serve(
        name=name,
        parameters={"config_path": config},
        tags=["fashionmv"],
        description="Build a FashionMV-style dataset from a run configuration (served by flows/build_fashionmv.py).",
    )


if __name__ == "__main__":
    # Import under the package name, so what is pickled for worker processes refers to flows.build_fashionmv.
    from flows.build_fashionmv import app as package_app

    package_app()
