"""The Prefect flow `build-fashionmv`: the pipeline (fashionmv_builder/pipeline.py), one task per shard.

It walks the same list with the same life cycle as `fashionmv run` (core/executor.py); what is Prefect's is here:

    build-fashionmv      validates the config, then runs each stage as a sub-flow named after it:
      <stage>-plan       one task per dataset: list the source or the input shards, run a dataset-wide global step
      <stage>-shard      one task per shard to do: CPU shards on the CPU runner (processes locally, or Dask),
                         LMM shards on threads of this process, tagged `lmm` and sharing the run's breaker

Resume is the stages' own (shards.py): a shard whose marker records the same config hash and input fingerprint is
skipped, and LMM answers are replayed from the answer store, so Prefect result caching is off (NO_CACHE).

    python -m flows.build_fashionmv run configs/sample.yaml [--set key=value ...] [--runner dask]
    python -m flows.build_fashionmv serve [--name served]     # the deployment build-fashionmv/served
"""

import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated, Any, Literal

import typer
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import Field
from tqdm import tqdm

from fashionmv_builder import pipeline
from fashionmv_builder.cli.common import ConfigArg, SetOpt, console, load_run, print_stage, stage_rows
from fashionmv_builder.core.config import ConfigError, load_config
from fashionmv_builder.core.executor import (
    LmmRun,
    Runner,
    execute_shard,
    failures,
    plan_dataset,
    run_pipeline,
    run_stage,
)
from fashionmv_builder.core.shards import ShardMarker
from fashionmv_builder.core.stage import DatasetPlan, ShardTask, Stage, StageReport, Work
from fashionmv_builder.lmm.calls import CircuitOpen
from fashionmv_builder.lmm.client import LmmRefused
from fashionmv_builder.lmm.harness import run_lmm_shard

FLOW_NAME = "build-fashionmv"
DEFAULT_CONFIG = "configs/sample.yaml"
LMM_TAG = "lmm"  # every LMM task carries it: `prefect concurrency-limit create lmm N` bounds them across runs

# What a retry would only meet again: a tripped circuit breaker, a bad config, a missing input, bad data.
PERMANENT_ERRORS = (
    CircuitOpen,
    LmmRefused,  # a refused key, model or request: a retry gets the same answer (a server restarting is retried)
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


# ---------------------------------------------------------------------------------------------------------------
# the two tasks every stage is made of


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def plan_task(stage: Stage, dataset: str, pilot: float | None) -> DatasetPlan:
    """A dataset's shards (and, for a dataset-wide stage, its global step)."""
    return plan_dataset(stage, dataset, pilot)


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def shard_task(stage: Stage, job: ShardTask, lmm: LmmRun | None, max_in_flight: int | None) -> ShardMarker:
    """One shard. An LMM shard's retry replays the answers stored before the failure: nothing is asked twice."""
    if stage.work is Work.LMM:
        assert lmm is not None
        return run_lmm_shard(stage, job, lmm.endpoints, lmm.breaker(stage), max_in_flight)  # type: ignore[arg-type]
    return execute_shard(stage, job)


# ---------------------------------------------------------------------------------------------------------------
# the runner: where the executor's life cycle meets Prefect


def submit_all(shard: Task, jobs: Sequence[Any], *, what: str, in_flight: int) -> None:
    """One task per job, at most `in_flight` submitted ahead, with a progress bar here and a progress artifact.

    Once a shard has failed (its retries used up) no new one is submitted; those running finish, since what they
    write is kept (markers, answers), and then the first failure is raised."""
    if not jobs:
        return
    artifact = create_progress_artifact(0.0, description=f"{what}: share of the {len(jobs)} shards to do")
    queue = iter(jobs)
    pending: list[PrefectFuture] = []
    errors: list[BaseException] = []
    finished = submitted = 0
    with tqdm(total=len(jobs), desc=what, unit="shard", disable=None) as bar:  # a bar only on a terminal
        while True:
            while not errors and len(pending) < in_flight and (job := next(queue, None)) is not None:
                pending.append(shard.submit(*job))
                submitted += 1
            if not pending:
                break
            done = next(as_completed(pending))
            pending.remove(done)
            try:
                done.result()
            except Exception as err:
                errors.append(err)
            finished += 1
            bar.update()
            update_progress_artifact(artifact, 100.0 * finished / len(jobs))
    if errors:
        get_run_logger().error(
            "%s: %d shard(s) failed, %d not started; a rerun does only those", what, len(errors), len(jobs) - submitted
        )
        raise errors[0]


def artifact_key(run_name: str, stage: str) -> str:
    """Artifact keys take lowercase letters, digits and dashes; one key per run name and stage keeps a history."""
    return re.sub(r"[^a-z0-9]+", "-", f"fashionmv-{run_name}-{stage}".lower()).strip("-")


class PrefectRunner(Runner):
    """Plans and shards as Prefect tasks: CPU work on the given task runner, LMM shards on `lmm_shards` threads."""

    def __init__(self, cpu_runner: Callable[[bool], TaskRunner], cpu_parallel: int, lmm_shards: int) -> None:
        self.cpu_runner = cpu_runner
        self.cpu_parallel = cpu_parallel
        self.lmm_shards = lmm_shards

    def _task_runner(self, stage: Stage) -> TaskRunner:
        if stage.work is Work.LMM:
            # LMM shards only wait on the server, and a local server reads their images as file:// URLs from the
            # output folder, which this machine is sure to share: threads of this process.
            return ThreadPoolTaskRunner(self.lmm_shards)
        # Processes for work that holds the GIL (decoding images); threads for a dataset-wide stage's light writes.
        return self.cpu_runner(stage.work is Work.SHARD)

    def run_stage(
        self, stage: Stage, datasets: list[str], lmm: LmmRun | None, pilot: float | None
    ) -> list[StageReport]:
        """The stage's life cycle inside a sub-flow named after it, on the task runner its kind of work wants."""

        @flow(name=stage.name, task_runner=self._task_runner(stage))
        def stage_subflow(datasets: list[str]) -> list[dict]:
            return [asdict(r) for r in run_stage(stage, self, datasets, lmm, pilot)]

        return [StageReport(**r) for r in stage_subflow(datasets)]

    def plan(self, stage: Stage, datasets: list[str], pilot: float | None) -> list[DatasetPlan]:
        planner = plan_task.with_options(name=f"{stage.name}-plan")
        futures = [
            planner.with_options(task_run_name=f"{stage.name} plan {d}").submit(stage, d, pilot) for d in datasets
        ]
        return [f.result() for f in futures]

    def run(self, stage: Stage, tasks: list[ShardTask], lmm: LmmRun | None) -> None:
        tags = [LMM_TAG] if stage.work is Work.LMM else []
        shard = shard_task.with_options(
            name=f"{stage.name}-shard", tags=tags, task_run_name=f"{stage.name} {{job.dataset}} {{job.shard:05d}}"
        )
        in_flight = self.lmm_shards if stage.work is Work.LMM else 2 * self.cpu_parallel
        # The run's request budget (lmm.max_in_flight) is shared by the shards in flight, each on a client of its own.
        per_shard = None
        if stage.work is Work.LMM and lmm is not None:
            # The stage's one breaker for the run, made before its shards start on their threads (made lazily, two
            # threads could each make one), so every shard records into it, as on the command line.
            lmm.breaker(stage)
            if tasks:
                lmm.endpoints  # noqa: B018  (starts the stage's server here, not in one of the shards' threads)
            per_shard = max(1, math.ceil(stage.lmm.max_in_flight / in_flight))  # type: ignore[attr-defined]
        submit_all(shard, [(stage, t, lmm, per_shard) for t in tasks], what=stage.name, in_flight=in_flight)

    def report(self, stage: Stage, reports: list[StageReport]) -> None:
        config = stage.config
        create_table_artifact(
            table=stage_rows(reports),
            key=artifact_key(config.name, stage.name),
            description=f"**{stage.name}** of run `{config.name}`: shards and stats.json under "
            f"`{config.output_dir}/{stage.name}/`",
        )

    def skip(self, stage: Stage, why: str) -> None:
        get_run_logger().warning("%s skipped: %s", stage.name, why)


# ---------------------------------------------------------------------------------------------------------------
# task runners for the CPU stages


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


# ---------------------------------------------------------------------------------------------------------------
# the flow


@flow(name=FLOW_NAME)
def build_fashionmv(
    config_path: str = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    runner: Literal["local", "dask"] = "local",
    dask_address: str | None = None,
    dask_workers: int | None = None,
    lmm_shards: Annotated[int, Field(ge=1)] = 4,
) -> dict[str, list[dict]]:
    """Build the dataset a run configuration describes: every stage of the pipeline, one task per shard.

    Args:
        config_path: the run's YAML file (a relative path is taken from the working directory).
        overrides: config keys to change, dotted (`{"shard_size": 50, "lmm.max_in_flight": 8}`), as `--set` does.
        runner: where the CPU stages (ingest, dedupe, embed, candidates) run: `local` processes, or `dask`.
        dask_address: the scheduler of a running Dask cluster; without it, `dask` starts a local cluster.
        dask_workers: workers of that local cluster (default: the config's `workers`).
        lmm_shards: LMM shards in flight at once; they share the config's `lmm.max_in_flight` requests.
    """
    config = load_config(config_path, overrides)
    get_run_logger().info("run %r from %s: outputs under %s", config.name, config_path, config.output_dir)
    with cpu_runners(runner, config.workers, dask_address, dask_workers) as (make_runner, parallel):
        reports = run_pipeline(config, pipeline.build_stages(config), PrefectRunner(make_runner, parallel, lmm_shards))
    # like `fashionmv run`: a source that cannot be listed does not stop the others, but the run fails at the end
    if problems := failures(reports):
        raise RuntimeError("; ".join(problems))
    return {stage: [asdict(r) for r in rs] for stage, rs in reports.items()}


# ---------------------------------------------------------------------------------------------------------------
# command line

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The Prefect flow build-fashionmv.")


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    runner: Annotated[str, typer.Option(help="where the CPU stages run: local or dask")] = "local",
    dask_address: Annotated[str | None, typer.Option(help="a running Dask scheduler (else a local one)")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="workers of the local Dask cluster")] = None,
    lmm_shards: Annotated[int, typer.Option(min=1, help="LMM shards in flight")] = 4,
) -> None:
    """Run the flow in this process, against PREFECT_API_URL (or a temporary local server without it)."""
    from fashionmv_builder.core.config import parse_override

    load_run(config, None, set_)  # a bad config fails here, naming the key, before Prefect starts
    overrides = dict(parse_override(o) for o in set_ or [])
    if runner not in ("local", "dask"):
        console.print(f"[red]--runner {runner!r}:[/red] local or dask")
        raise typer.Exit(2)
    state = build_fashionmv(str(config), overrides, runner, dask_address, dask_workers, lmm_shards, return_state=True)  # type: ignore[call-overload]
    if not state.is_completed():
        console.print(f"[red]{state.name}:[/red] {state.message}")
        raise typer.Exit(1)
    for stage, reports in state.result().items():
        print_stage(stage, [StageReport(**r) for r in reports])


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
    # Import under the package name, so what is pickled for worker processes refers to an importable module.
    from fashionmv_builder.flows.build_fashionmv import app as package_app

    package_app()
