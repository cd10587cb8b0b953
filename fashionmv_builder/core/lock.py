"""One run at a time per output folder.

Two runs writing one build would each do all the work, overwrite each other's shards with other settings, and the
first to finish would stop an LMM server the other still uses. So a run holds `<out>/_run.lock.json` (what runs,
where, since when, and a heartbeat it refreshes) from start to end, and a second run is refused in one line.

A lock is stale, and taken over with a warning, when its process is gone (same host, no such pid) or its heartbeat
is older than `stale_after_s` (another host that died, or a machine that rebooted). On a local disk the lock file
is created exclusively; an object store has no exclusive create, so there the lock is written, read back after a
moment, and kept only if it is still ours (two runs starting within that moment may both see the other's lock and
both stop: never both proceed).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fashionmv_builder.core.build import Build

log = logging.getLogger("fashionmv")

LOCK_FILE = "_run.lock.json"
STALE_AFTER_S = 120.0  # the heartbeat is refreshed every sixth of this


class BuildLocked(RuntimeError):
    """Another run holds the output folder."""


def _now() -> float:
    return time.time()


def _describe(lock: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lock.get("started", 0)))
    return f"{lock.get('what', '?')!r} (pid {lock.get('pid')} on {lock.get('host')}, since {since})"


def _stale(lock: dict[str, Any], stale_after_s: float) -> str | None:
    """Why a lock no longer holds the folder, or None while its run may be alive."""
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock.get("pid", 0)), 0)
        except ProcessLookupError:
            return "its process is gone"
        except (PermissionError, ValueError):
            pass  # alive but not ours to signal, or a pid we cannot read: go by the heartbeat
    age = _now() - float(lock.get("heartbeat", 0))
    return f"its heartbeat is {age:.0f} s old" if age > stale_after_s else None


class _Holder:
    def __init__(self, build: Build, what: str, stale_after_s: float) -> None:
        self.build = build
        self.path = f"{build.root}/{LOCK_FILE}"
        self.stale_after_s = stale_after_s
        now = _now()
        self.lock = {
            "token": uuid.uuid4().hex,
            "what": what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
        }
        self.stop = threading.Event()

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.build.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by a run that died while writing it: stale at once (no heartbeat)

    def ours(self) -> bool:
        return (self.read() or {}).get("token") == self.lock["token"]

    def acquire(self) -> None:
        held = self.read()
        if held is not None:
            why = _stale(held, self.stale_after_s)
            if why is None:
                raise BuildLocked(
                    f"{self.build.out} is in use by {_describe(held)}; wait for it to end "
                    f"(or remove {self.path} if that run is gone)"
                )
            log.warning("taking over the lock of %s: %s", _describe(held), why)
            self.build.fs.rm_file(self.path)
        data = json.dumps(self.lock).encode()
        self.build.fs.makedirs(self.build.root, exist_ok=True)
        if self.build.is_local():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise BuildLocked(f"{self.build.out} is in use by {_describe(self.read() or {})}") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        self.build.fs.pipe_file(self.path, data)
        time.sleep(1.0)  # let a concurrent writer's lock land before reading back
        if not self.ours():
            raise BuildLocked(f"{self.build.out} is in use by {_describe(self.read() or {})}")

    def beat(self) -> None:
        while not self.stop.wait(self.stale_after_s / 6):
            if not self.ours():
                log.error("the run lock %s was taken by another run", self.path)
                return
            self.lock["heartbeat"] = _now()
            self.build.fs.pipe_file(self.path, json.dumps(self.lock).encode())

    def release(self) -> None:
        self.stop.set()
        try:
            if self.ours():
                self.build.fs.rm_file(self.path)
        except OSError as err:  # an unreachable store: the lock goes stale by itself
            log.warning("could not remove the run lock %s: %s", self.path, err)


@contextmanager
def run_lock(build: Build, what: str | None = None, stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
    """Hold the output folder for the duration of a run; BuildLocked when another run holds it."""
    holder = _Holder(build, what or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200], stale_after_s)
    holder.acquire()
    beat = threading.Thread(target=holder.beat, name="run-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        holder.release()
        beat.join(timeout=5)
