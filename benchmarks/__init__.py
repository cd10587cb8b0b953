"""`make bench`'s benchmarks (run.py runs them all) and what they share."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's largest resident set so far, in MB. Linux's VmHWM starts afresh when a process execs; ru_maxrss
    keeps the RSS of the parent it was forked from (every worker of one `make bench` run showed its parent's 1.3 GB)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, the only place it is reached
