"""Writing a local file whole or not at all."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never part of one.

    `data` is bytes, text (written as UTF-8) or a function that writes into the open binary file (for writers such
    as Parquet or torch that stream large outputs). The bytes go to a temporary file beside `path` (same filesystem,
    so the rename is atomic), are flushed to disk, then renamed over `path`; on any failure the temporary file is
    removed and `path` is left as it was. The temporary name is unique, so threads or processes writing the same
    path at once never share one; its `.tmp` suffix lets folder walks skip it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        # O_EXCL: never write into someone else's file. Mode 0o666 is narrowed by the umask, as for any new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode)  # a rewrite keeps the permissions the file had
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
