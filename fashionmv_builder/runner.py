"""The local executor: runs a stage's shard tasks in worker processes with a progress bar.

Stages only provide `plan` (what shards exist and which are already done) and `run_shard`; where they run is decided
here for the command line, or by the Prefect flow (flows/), never by the stage itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], *, workers: int, desc: str) -> list[R]:
    """Run `fn` over `tasks`; results in task order. One worker runs in-process (easier to debug and profile)."""
    results: list[R | None] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc, unit="shard", disable=not tasks) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                results[i] = fn(task)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    return results  # type: ignore[return-value]
