"""atomic_write: the whole new content or the old one, and no temporary files left behind."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from fashionmv_builder.core.files import atomic_write


def test_writes_text_and_bytes_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.txt"
    atomic_write(path, "première\n")  # the folder is created; text is UTF-8
    assert path.read_bytes() == "première\n".encode()
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda f: f.write(b"streamed"))
    assert path.read_bytes() == b"streamed"
    assert os.listdir(path.parent) == ["file.txt"]


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    atomic_write(path, b"old")

    def half_then_fail(f: BinaryIO) -> None:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_a_rewrite_keeps_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    atomic_write(path, "one")
    path.chmod(0o640)
    atomic_write(path, "two")
    assert path.stat().st_mode & 0o777 == 0o640


def test_concurrent_writers_of_one_path_never_collide(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    contents = [bytes([i]) * 100_000 for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda data: atomic_write(path, data), contents))
    assert path.read_bytes() in contents  # one writer's bytes, whole
    assert os.listdir(tmp_path) == ["file.bin"]
