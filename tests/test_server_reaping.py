"""The vLLM launcher signals only a process group it can prove it started; a stale pidfile harms nobody.

No vLLM here: unrelated `sleep`s stand in for processes that took over a recorded pid, and a small fake
`vllm.entrypoints.openai.api_server` (an HTTP server that starts one child, as vLLM starts its engine) stands in for
a server of ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashionmv_builder.lmm.server import ServerError, ServerSpec, VllmServer, free_port

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

FAKE_API_SERVER = """
import json, subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = args[args.index("--served-model-name") + 1]
engine = subprocess.Popen(["sleep", "100"])  # the "engine": same process group, as vLLM's are
print(engine.pid, flush=True)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": name}]}).encode() if self.path == "/v1/models" else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _stat(pid: int) -> list[str] | None:
    """Fields 3… of /proc/<pid>/stat (state first), or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> int:
    stat = _stat(pid)
    assert stat is not None
    return int(stat[19])  # field 22


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # an orphan killed here may stay a zombie if init does not reap


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def _identity(pid: int) -> dict:
    """The proof the launcher records, read here independently of its code."""
    deadline = time.monotonic() + 5
    raw = b""
    while not raw and time.monotonic() < deadline:  # empty for a moment while the exec completes
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        time.sleep(0.01)
    cmdline = [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]
    return {"boot_id": _boot_id(), "start_time": _start_time(pid), "cmdline": cmdline}


@pytest.fixture
def spawn() -> Iterator:
    """Start processes in sessions of their own; whatever is left is killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


FALSE = Path(shutil.which("false") or "/bin/false")


def _server(tmp_path: Path, python: Path = FALSE, env: dict[str, str] | None = None) -> VllmServer:
    """A launcher whose "vLLM" exits at once (`false`) unless told otherwise: start() never starts vLLM here."""
    spec = ServerSpec(python=python, model=tmp_path / "model", served_name="tiny", port=free_port(), env=env or {})
    return VllmServer(spec, tmp_path / "_lmm_server")


def _write_pidfile(server: VllmServer, pid: int, **fields) -> None:
    server.state_dir.mkdir(parents=True, exist_ok=True)
    # The keys the launcher has always written, plus whatever proof the case gives.
    record = {"pgid": pid, "url": server.spec.url, "model": str(server.spec.model), "port": server.spec.port}
    server.pidfile.write_text(json.dumps({**record, **fields}))


STALE_CASES = {
    "old format": lambda pid: {},
    "wrong start time": lambda pid: {**_identity(pid), "start_time": _start_time(pid) - 1},
    "another boot": lambda pid: {**_identity(pid), "boot_id": "00000000-0000-0000-0000-000000000000"},
    "another command": lambda pid: {**_identity(pid), "cmdline": ["python", "-m", "vllm.entrypoints.openai"]},
}


@pytest.mark.parametrize("case", list(STALE_CASES))
def test_stop_spares_a_process_the_pidfile_cannot_prove_ours(tmp_path, spawn, caplog, case):
    stranger = spawn(["sleep", "100"])
    server = _server(tmp_path)
    _write_pidfile(server, stranger.pid, **STALE_CASES[case](stranger.pid))
    with caplog.at_level(logging.WARNING, logger="fashionmv"):
        server.stop()
    assert _running(stranger.pid), "an unrelated process was killed"
    assert not server.pidfile.exists()
    stale = [r.getMessage() for r in caplog.records if "stale vLLM pidfile" in r.getMessage()]
    assert len(stale) == 1 and "nothing was signalled" in stale[0] and "\n" not in stale[0]


@pytest.mark.parametrize("case", ["old format", "wrong start time"])
def test_start_spares_a_process_the_pidfile_cannot_prove_ours(tmp_path, spawn, case):
    stranger = spawn(["sleep", "100"])
    server = _server(tmp_path)
    _write_pidfile(server, stranger.pid, **STALE_CASES[case](stranger.pid))
    with pytest.raises(ServerError, match="exited"):  # the stand-in for vLLM (`false`) fails at once
        server.start(timeout_s=30)
    assert _running(stranger.pid), "an unrelated process was killed"
    assert json.loads(server.pidfile.read_text())["pgid"] != stranger.pid


def test_stop_stops_a_group_proven_ours(tmp_path, spawn):
    ours = spawn(["sleep", "100"])
    server = _server(tmp_path)
    _write_pidfile(server, ours.pid, **_identity(ours.pid))
    server.stop()
    assert _wait_gone(ours.pid, timeout_s=1), "a group proven ours must be stopped"
    assert not server.pidfile.exists()


def test_start_reaps_a_leftover_proven_ours_that_does_not_answer(tmp_path, spawn):
    leftover = spawn(["sleep", "100"])
    server = _server(tmp_path)
    _write_pidfile(server, leftover.pid, **_identity(leftover.pid))
    with pytest.raises(ServerError, match="exited"):
        server.start(timeout_s=30)
    assert _wait_gone(leftover.pid, timeout_s=1)


@pytest.mark.parametrize("recorded", [True, False])
def test_orphans_of_a_dead_leader_are_reaped_only_when_recorded(tmp_path, spawn, recorded):
    leader = spawn(["sh", "-c", "sleep 100 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = int(leader.stdout.readline())
    server = _server(tmp_path)
    members = [[child, _start_time(child) if recorded else _start_time(child) - 1]]
    _write_pidfile(server, leader.pid, **_identity(leader.pid), members=members)
    os.kill(leader.pid, signal.SIGKILL)  # the API server dies alone, as in a crash
    leader.wait(timeout=10)
    assert _running(child)
    server.stop()
    if recorded:
        assert _wait_gone(child, timeout_s=1), "the recorded orphan must be reaped"
    else:
        assert _running(child), "an orphan that is not provably ours must be spared"


def test_fake_server_is_reused_and_its_orphaned_engine_reaped(tmp_path):
    package = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(FAKE_API_SERVER)
    server = _server(tmp_path, python=Path(sys.executable), env={"PYTHONPATH": str(tmp_path / "fake")})
    url = server.start(timeout_s=30)
    try:
        record = json.loads(server.pidfile.read_text())
        leader = record["pgid"]
        engine = int((server.logfile.read_text().split() or ["0"])[0])
        assert record["boot_id"] == _boot_id() and record["start_time"] == _start_time(leader)
        assert record["cmdline"] == server.spec.command()
        assert [engine, _start_time(engine)] in record["members"]

        # A second launcher finds the healthy server serving the same model and reuses it.
        again = VllmServer(server.spec, server.state_dir)
        assert again.start(timeout_s=30) == url
        assert json.loads(server.pidfile.read_text())["pgid"] == leader

        # The API server dies alone; stopping reaps the orphaned engine, proven by its recorded start time.
        server.kill_hard()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(leader, 0)
        assert _running(engine)
        server.stop()
        assert _wait_gone(engine, timeout_s=5)
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError, ValueError, OSError):
            os.killpg(json.loads(server.pidfile.read_text())["pgid"], signal.SIGKILL)
