"""The `fashionmv` command as a user runs it: a real subprocess."""

import subprocess
import sys
from pathlib import Path

from conftest import jpeg_bytes, write

FASHIONMV = str(Path(sys.executable).with_name("fashionmv"))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FASHIONMV, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    (tmp_path / "run.yaml").write_text("output_dir: out\nsourcez: []\n")
    done = _run("ingest", "run.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert "sourcez: unknown key" in done.stderr
    assert not (tmp_path / "out").exists()


def test_run_ingests_reports_bad_items_on_one_line_and_says_what_it_skipped(tmp_path):
    for v in range(2):
        write(tmp_path / "shop" / "p1" / f"{v}.jpg", jpeg_bytes(v))
    write(tmp_path / "shop" / "p2" / "0.jpg", b"")
    (tmp_path / "run.yaml").write_text(
        "output_dir: out\nworkers: 1\nsources:\n  - {kind: folder, dataset: shop, root: shop}\n"
        "  - {kind: folder, dataset: gone, root: missing}\n"
    )
    done = _run("run", "run.yaml", cwd=tmp_path)
    assert done.returncode == 1  # one source could not be listed; the other still ran
    assert "WARNING ingest: shop/'p2' 0.jpg: empty_file: the file is empty (0 bytes)" in done.stderr
    assert "gone: cannot list the source" in done.stderr
    assert "no lmm section in the config" in done.stderr  # the LMM stages are skipped, and said to be
    assert (tmp_path / "out" / "ingest" / "shop" / "stats.json").exists()
