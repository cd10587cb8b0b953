"""The flow module's own small pieces, without a server: runner choice, retry rule, stats tables, artifact keys."""

from prefect.states import Completed, Failed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from fashionmv_builder.cli.common import stage_rows
from fashionmv_builder.core.config import ConfigError
from fashionmv_builder.core.stage import StageReport
from fashionmv_builder.flows.build_fashionmv import (
    FLOW_NAME,
    _worth_retrying,
    artifact_key,
    build_fashionmv,
    local_runner,
    shard_task,
)
from fashionmv_builder.lmm.calls import CircuitOpen
from fashionmv_builder.lmm.client import LmmRefused, LmmUnreachable


def test_the_flow_and_its_shard_tasks_carry_the_documented_names():
    assert build_fashionmv.name == FLOW_NAME == "build-fashionmv"
    assert shard_task.retries >= 1


def test_local_runner_uses_processes_only_for_heavy_stages_with_several_workers():
    assert isinstance(local_runner(2, processes=True), ProcessPoolTaskRunner)
    assert isinstance(local_runner(2, processes=False), ThreadPoolTaskRunner)
    assert isinstance(local_runner(1, processes=True), ThreadPoolTaskRunner)  # one worker: in-process, like the CLI


def _failed(err: BaseException):
    return Failed(data=err, message=str(err))


def test_retries_are_spent_only_where_they_can_help():
    assert _worth_retrying(None, None, _failed(LmmUnreachable("server restarting")))
    assert not _worth_retrying(None, None, _failed(LmmRefused("HTTP 401: check lmm.api_key_env")))
    assert _worth_retrying(None, None, _failed(ConnectionResetError("reset by peer")))
    assert not _worth_retrying(None, None, _failed(CircuitOpen("too many invalid answers")))
    assert not _worth_retrying(None, None, _failed(ConfigError("lmm: bad")))
    assert not _worth_retrying(None, None, _failed(FileNotFoundError("source root is not a folder")))
    assert _worth_retrying(None, None, Completed(data=1))


def test_stage_rows_show_counts_rejects_and_errors():
    counts = {"products_in": 10, "products_out": 8, "rejected.too_few_views": 2, "views_in": 30}
    reports = [
        StageReport("dedupe", "shop", shards=3, skipped=1, stats={"counts": counts}),
        StageReport("dedupe", "gone", error="cannot list the source: missing"),
    ]
    shop, gone = stage_rows(reports)
    assert shop["products in"] == 10 and shop["products out"] == 8 and shop["views out"] == 0
    assert shop["rejects"] == "too_few_views 2" and (shop["shards"], shop["skipped"]) == (3, 1)
    assert gone["rejects"] == "cannot list the source: missing"


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("My_Shop v2", "caption") == "fashionmv-my-shop-v2-caption"
