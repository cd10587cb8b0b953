"""Ingest speed (decode + validate + hash + shard write) per core, against imagededup's PHash encoder.

Both run single-process on the same JPEG files (the sample catalogue's garments, 256×320). imagededup runs in its own
venv (.venv-bench, installed without its deep-learning dependencies) as a subprocess; each side is timed around its
own work only. Target: ≥ 3× imagededup per core.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from fashionmv_builder.core.config import validate_config
from fashionmv_builder.pipeline import run_local

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "build" / "sample-catalogue" / "folder"
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

PEER_SCRIPT = Path(__file__).with_name("imagededup_peer.py")


def _copy_images(n: int, dest: Path) -> int:
    """n good JPEGs from the sample catalogue, one folder per product (unreadable fault files left out)."""
    copied = 0
    for path in sorted(CATALOGUE.rglob("*.jpg")):
        if copied >= n:
            break
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, SyntaxError, ValueError):
            continue  # the catalogue's planted faults
        target = dest / f"p{copied // 4:05d}" / f"{copied % 4}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += 1
    return copied


def _ours(images_dir: Path, out: Path) -> float:
    config = validate_config(
        {
            "output_dir": str(out),
            "shard_size": 250,
            "workers": 1,
            "sources": [{"kind": "folder", "dataset": "bench", "root": str(images_dir)}],
        }
    )
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    [report] = run_local(config, ["ingest"])["ingest"]
    elapsed = time.perf_counter() - start
    assert report.stats["counts"]["views_rejected"] == 0
    return elapsed


def _peer(images_dir: Path) -> float:
    done = subprocess.run(
        [str(PEER_PYTHON), str(PEER_SCRIPT), str(images_dir)], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main(smoke: bool = False) -> None:
    n, reps = (40, 1) if smoke else (2000, 5)
    with tempfile.TemporaryDirectory() as tmp:
        images_dir = Path(tmp) / "images"
        count = _copy_images(n, images_dir)
        if count == 0:
            sys.exit(f"no images under {CATALOGUE}: run `make sample` first")
        ours, peer = [], []
        for _ in range(reps):  # interleaved, so drifting machine load hits both sides alike
            ours.append(count / _ours(images_dir, Path(tmp) / "out"))
            peer.append(count / _peer(images_dir))
    ours_med, peer_med = statistics.median(ours), statistics.median(peer)
    print(f"ingest: {count} JPEGs, {reps} interleaved repetitions, single process (one core)")
    print(f"  fashionmv ingest (decode+validate+pHash+dHash+sha256+parquet): {ours_med:8.0f} img/s/core")
    print(f"  imagededup PHash.encode_images:                                {peer_med:8.0f} img/s/core")
    print(f"  ratio ours / imagededup = {ours_med / peer_med:.2f}x  (target >= 3x)")
    if reps > 1:
        print(f"  spread: ours {min(ours):.0f}-{max(ours):.0f}, imagededup {min(peer):.0f}-{max(peer):.0f} img/s")


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv[1:])
