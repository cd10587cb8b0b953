"""Nothing on disk or in the process table is trusted blindly: damaged shards, empty sources, copied and moved
builds, a second run on one folder, a bad output folder, and workers whose parent dies or is interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import jpeg_bytes, write

from fashionmv_builder.core.build import INGEST_IMAGES, Build
from fashionmv_builder.core.config import validate_config
from fashionmv_builder.core.ledger import ConservationError
from fashionmv_builder.core.lock import LOCK_FILE, BuildLocked, run_lock
from fashionmv_builder.core.shards import CorruptShardError, ShardStore
from fashionmv_builder.pipeline import run_local

FASHIONMV = str(Path(sys.executable).with_name("fashionmv"))


def _shop(root: Path, products: int = 6) -> None:
    for p in range(products):
        for v in range(2):
            write(root / f"p{p}" / f"{v}.jpg", jpeg_bytes(10 * p + v, size=(160, 200)))


def _yaml(tmp_path: Path, sources: str = "  - {kind: folder, dataset: shop, root: shop}\n", **top: object) -> Path:
    settings = {"output_dir": "out", "shard_size": 2, "workers": 1, **top}
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()) + "sources:\n" + sources)
    return path


def _run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([FASHIONMV, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- damaged shards ------------------------------------------------------------------------------------------


def test_a_corrupt_or_truncated_shard_is_redone_not_skipped(tmp_path):
    _shop(tmp_path / "shop")
    config = validate_config({**_config_dict(tmp_path), "output_dir": str(tmp_path / "out")})
    [first] = run_local(config, ["ingest"])["ingest"]
    want = Build(config.output_dir).read(INGEST_IMAGES, "shop")
    images = tmp_path / "out" / "ingest" / "shop" / "images"
    _flip_a_byte(images / "part-00001.parquet")
    (images / "part-00002.parquet").write_bytes((images / "part-00002.parquet").read_bytes()[:-100])
    [again] = run_local(config, ["ingest"])["ingest"]
    assert (first.skipped, again.skipped) == (0, first.shards - 2)  # exactly the two damaged shards were redone
    assert Build(config.output_dir).read(INGEST_IMAGES, "shop").equals(want)


def test_a_stage_reading_a_corrupt_input_names_it_in_one_line(tmp_path):
    _shop(tmp_path / "shop")
    config = _yaml(tmp_path)
    assert _run("ingest", str(config), cwd=tmp_path).returncode == 0
    damaged = tmp_path / "out" / "ingest" / "shop" / "images" / "part-00001.parquet"
    _flip_a_byte(damaged)
    done = _run("dedupe", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert f"CorruptShardError: {damaged}: sha256 does not match" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_checks_each_file_against_its_marker(tmp_path):
    _shop(tmp_path / "shop")
    config = validate_config({**_config_dict(tmp_path), "output_dir": str(tmp_path / "out")})
    run_local(config, ["ingest"])
    store = ShardStore(config.output_dir, "ingest", "shop")
    _flip_a_byte(tmp_path / "out" / "ingest" / "shop" / "products" / "part-00000.parquet")
    marker = store.read_marker(0)
    with pytest.raises(CorruptShardError, match=r"part-00000\.parquet: sha256 does not match"):
        store.read_part(marker, "products")


def _config_dict(tmp_path: Path) -> dict:
    return {
        "shard_size": 2,
        "workers": 1,
        "sources": [{"kind": "folder", "dataset": "shop", "root": str(tmp_path / "shop")}],
    }


# -- empty sources -------------------------------------------------------------------------------------------


def test_empty_sources_do_not_stop_the_ones_after_them(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "header.csv").write_text("product_id,url\n")
    (tmp_path / "blank.csv").write_text("")
    _shop(tmp_path / "shop")
    sources = (
        "  - {kind: folder, dataset: empty, root: empty}\n"
        "  - {kind: manifest, dataset: header, path: header.csv}\n"
        "  - {kind: manifest, dataset: blank, path: blank.csv}\n"
        "  - {kind: folder, dataset: shop, root: shop}\n"
    )
    done = _run("ingest", str(_yaml(tmp_path, sources)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    build = Build(str(tmp_path / "out"))
    for dataset in ("empty", "header", "blank"):
        assert build.stats("ingest", dataset)["shards"] == 0
        assert build.counts("ingest", dataset)["products_in"] == 0
    assert build.counts("ingest", "shop")["products_out"] == 6


# -- copied and moved builds ---------------------------------------------------------------------------------


def test_a_copied_build_reads_its_own_files_and_a_moved_one_redoes_nothing(tmp_path):
    _shop(tmp_path / "shop")
    original = tmp_path / "a"
    config = validate_config({**_config_dict(tmp_path), "output_dir": str(original)})
    [first] = run_local(config, ["ingest", "dedupe"])["dedupe"]
    marker = json.loads((original / "ingest" / "shop" / "_markers" / "part-00000.json").read_text())
    assert all(not Path(f["path"]).is_absolute() for f in marker["files"].values())

    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    (copy / "ingest" / "shop" / "images" / "part-00001.parquet").unlink()  # lost in the copy only
    copied = validate_config({**_config_dict(tmp_path), "output_dir": str(copy)})
    [ingest] = run_local(copied, ["ingest"])["ingest"]
    assert ingest.skipped == ingest.shards - 1  # the copy noticed its own missing file, and only that one

    moved = tmp_path / "c"
    original.rename(moved)
    reports = run_local(validate_config({**_config_dict(tmp_path), "output_dir": str(moved)}), ["ingest", "dedupe"])
    assert [r.skipped for r in reports["ingest"] + reports["dedupe"]] == [first.shards, first.shards]


# -- one run at a time ---------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_in_one_line(tmp_path):
    _shop(tmp_path / "shop")
    config = _yaml(tmp_path)
    with run_lock(Build(str(tmp_path / "out")), what="the first run"):
        done = _run("run", str(config), cwd=tmp_path)
        with pytest.raises(BuildLocked, match="in use by 'the first run'"):
            run_local(validate_config({**_config_dict(tmp_path), "output_dir": str(tmp_path / "out")}))
    assert done.returncode == 1
    assert "BuildLocked:" in done.stderr and "in use by 'the first run'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "ingest").exists()  # refused before any work
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # the holder released it


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    _shop(tmp_path / "shop")
    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    lock = {"token": "x", "what": "killed run", "host": os.uname().nodename, "pid": gone.pid}
    (out / LOCK_FILE).write_text(json.dumps({**lock, "started": time.time(), "heartbeat": time.time()}))
    done = _run("ingest", str(_yaml(tmp_path)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "taking over the lock of 'killed run'" in done.stderr
    assert not (out / LOCK_FILE).exists()


# -- a bad output folder -------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_dir", ["a-file/out", "nosuchscheme://bucket/out"])
def test_a_bad_output_folder_fails_before_any_work_in_one_line(tmp_path, output_dir):
    _shop(tmp_path / "shop")
    (tmp_path / "a-file").write_text("not a folder")
    done = _run("run", str(_yaml(tmp_path, output_dir=output_dir)), cwd=tmp_path)
    assert done.returncode in (1, 2)
    assert "output_dir" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2


# -- counts ----------------------------------------------------------------------------------------------------


def test_summed_counts_are_checked_and_a_no_op_rerun_rewrites_no_stats(tmp_path):
    _shop(tmp_path / "shop")
    config = validate_config({**_config_dict(tmp_path), "output_dir": str(tmp_path / "out")})
    run_local(config, ["ingest", "dedupe"])
    stats = tmp_path / "out" / "dedupe" / "shop" / "stats.json"
    before = stats.stat().st_mtime_ns
    run_local(config, ["ingest", "dedupe"])
    assert stats.stat().st_mtime_ns == before

    marker = tmp_path / "out" / "dedupe" / "shop" / "_markers" / "part-00001.json"
    doc = json.loads(marker.read_text())
    doc["counts"]["products_out"] += 1  # a marker whose counts no longer add up
    marker.write_text(json.dumps(doc))
    with pytest.raises(ConservationError, match="dedupe/shop: product counts do not add up"):
        ShardStore(config.output_dir, "dedupe", "shop").write_stats()


# -- workers and their parent --------------------------------------------------------------------------------


class _SlowImages(SimpleHTTPRequestHandler):
    """Serves a folder, each file after a pause: ingest's shards take seconds, so a run can be stopped mid-way."""

    def do_GET(self) -> None:
        time.sleep(0.4)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_manifest(tmp_path):
    for p in range(24):
        for v in range(2):
            write(tmp_path / "img" / f"p{p}-{v}.jpg", jpeg_bytes(100 + 2 * p + v))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_SlowImages, directory=str(tmp_path / "img")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    rows = [{"product_id": f"p{p}", "url": f"{base}p{p}-{v}.jpg"} for p in range(24) for v in range(2)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        "output_dir: out\nshard_size: 2\nworkers: 2\nhttp: {allow_private_addresses: true, per_host_concurrency: 1}\n"
        "sources:\n  - {kind: manifest, dataset: shop, path: m.jsonl}\n"
    )
    yield tmp_path
    server.shutdown()


def _living(group: int) -> list[int]:
    """Processes of a process group that are alive (a zombie waiting for its reaper is not)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _still_living_after(group: int, seconds: float) -> list[int]:
    """The group's processes still alive once `seconds` have passed (returns as soon as none is)."""
    deadline = time.monotonic() + seconds
    while _living(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _living(group)


# Started as a terminal starts a foreground command, with Ctrl-C's default action, whatever started the suite: a
# non-interactive shell's background job (as a CI runner may be) ignores SIGINT, and its children inherit that.
_WITH_CTRL_C = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _start_ingest(folder: Path) -> subprocess.Popen:
    run = subprocess.Popen(
        [sys.executable, "-c", _WITH_CTRL_C, FASHIONMV, "ingest", "run.yaml"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    markers = folder / "out" / "ingest" / "shop" / "_markers"
    deadline = time.monotonic() + 60
    # under way: the command and its two workers alive, and a first shard written (each of the 12 takes ~1.6 s)
    while len(_living(run.pid)) < 3 or not any(markers.glob("*.json")):
        assert run.poll() is None and time.monotonic() < deadline, "ingest did not get under way"
        time.sleep(0.1)
    return run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_workers_die_with_a_killed_parent(slow_manifest):
    run = _start_ingest(slow_manifest)
    os.kill(run.pid, signal.SIGKILL)  # only the parent, as an OOM killer would
    run.wait(timeout=10)
    assert _still_living_after(run.pid, seconds=5) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stop_within_seconds_leaving_only_whole_shards(slow_manifest, sig):
    run = _start_ingest(slow_manifest)
    started = time.monotonic()
    os.killpg(run.pid, sig) if sig == signal.SIGINT else os.kill(run.pid, sig)  # Ctrl-C reaches the whole group
    run.wait(timeout=20)
    stopped_after = time.monotonic() - started
    assert stopped_after < 4, run.stderr.read().decode()[-3000:]
    assert _still_living_after(run.pid, seconds=5) == []
    store = ShardStore(str(slow_manifest / "out"), "ingest", "shop")
    done = store.markers()
    assert 0 < len(done) < 12, run.stderr.read().decode()[-3000:]  # stopped mid-way
    assert all(store.problem(m, table) is None for m in done for table in m.files)
    assert not (slow_manifest / "out" / LOCK_FILE).exists()  # the lock was released on the way out


def test_ctrl_c_with_a_worker_idle_stops_the_run(slow_manifest):
    # Two shards of unequal size: the worker done with the small one waits for work holding the pool's queue lock.
    # Killed there by Ctrl-C's default action, it left the lock taken, and the parent hung in its clean-up.
    run_yaml = slow_manifest / "run.yaml"
    run_yaml.write_text(run_yaml.read_text().replace("shard_size: 2", "shard_size: 20"))
    run = _start_ingest(slow_manifest)
    os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    try:
        run.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("the run hung after the signal")
    assert _still_living_after(run.pid, seconds=5) == []
    assert len(ShardStore(str(slow_manifest / "out"), "ingest", "shop").markers()) == 1
    assert not (slow_manifest / "out" / LOCK_FILE).exists()
