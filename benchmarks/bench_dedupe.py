"""Cross-product near-duplicate search: time and peak memory against N, and the ratio against imagededup.

The input is N random 64-bit hashes of which 10% are planted near-duplicates (a random earlier hash with 0 to r+2
bits flipped), searched for every pair within r bits (dedupe's `cross_phash_radius`), exactly. Ours is
`neardup.near_pairs` (multi-index hashing; faiss brute force for small N); the peer is imagededup's
`find_duplicates` with its defaults (Cython brute force, a worker per core) in .venv-bench, on the same hashes, where
it finishes in reasonable time (it grows as N²: 10K hashes take it about 20 s here, so 100K would take over half an
hour). Each run is a fresh process, so its peak memory (max RSS) is its own; the stage runs the search twice (pHash
and dHash). Bar: 1M hashes in ≤ 10 min and ≤ 4 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import peak_rss_mb
from fashionmv_builder.core.config import DedupeConfig

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
PEER_SCRIPT = Path(__file__).with_name("imagededup_search_peer.py")
PEER_MAX_N = 10_000  # imagededup's brute force is quadratic: beyond this it takes tens of minutes


def planted_hashes(n: int, radius: int, seed: int = 0) -> np.ndarray:
    """n random hashes; the last 10% are copies of earlier ones with 0..radius+2 bits flipped."""
    rng = np.random.default_rng(seed)
    n_copies = n // 10
    codes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    sources = rng.integers(0, n - n_copies, size=n_copies)
    flips = rng.integers(0, radius + 3, size=n_copies)
    masks = np.zeros(n_copies, dtype=np.uint64)
    for bit in range(radius + 2):  # set `flips[k]` distinct random bits of mask k, one round per bit
        chosen = np.uint64(1) << rng.integers(0, 64, size=n_copies).astype(np.uint64)
        fresh = (masks & chosen) == 0
        masks |= np.where((bit < flips) & fresh, chosen, np.uint64(0))
    codes[n - n_copies :] = codes[sources] ^ masks
    return codes


def _ours_worker(path: str, radius: int) -> None:
    """Run in a fresh process: search, then print seconds, pairs and memory as JSON."""
    from fashionmv_builder.stages.dedupe.neardup import near_pairs

    codes = np.load(path)
    base = peak_rss_mb()
    start = time.perf_counter()
    i, _, _ = near_pairs(codes, radius)
    elapsed = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({"seconds": elapsed, "pairs": len(i), "peak_mb": peak, "base_mb": base}))


def _run_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ours(path: Path, radius: int) -> dict:
    code = f"from benchmarks.bench_dedupe import _ours_worker; _ours_worker({str(path)!r}, {radius})"
    return _run_json([sys.executable, "-c", code])


def _peer(path: Path, radius: int) -> dict | None:
    if not PEER_PYTHON.exists():
        return None
    return _run_json([str(PEER_PYTHON), str(PEER_SCRIPT), str(path), str(radius)])


def main(smoke: bool = False) -> None:
    radius = DedupeConfig().cross_phash_radius
    sizes = (2_000, 5_000) if smoke else (10_000, 100_000, 1_000_000)
    peer_max = 2_000 if smoke else PEER_MAX_N
    print(f"dedupe search: all pairs within {radius} bits among N 64-bit hashes (10% planted near-duplicates)")
    print(f"  {'N':>9}  {'ours s':>8}  {'peak MB':>8}  {'growth MB':>9}  {'pairs':>8}  {'imagededup s':>12}  ratio")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"codes-{n}.npy"
            np.save(path, planted_hashes(n, radius))
            ours = _ours(path, radius)
            peer = _peer(path, radius) if n <= peer_max else None
            if peer is not None and peer["pairs"] != ours["pairs"]:
                sys.exit(f"pair counts differ at N={n}: ours {ours['pairs']}, imagededup {peer['pairs']}")
            peer_text = f"{peer['seconds']:12.2f}" if peer else f"{'not run':>12}"
            ratio = f"{peer['seconds'] / ours['seconds']:.0f}x faster" if peer else "-"
            growth = ours["peak_mb"] - ours["base_mb"]
            print(
                f"  {n:>9}  {ours['seconds']:8.2f}  {ours['peak_mb']:8.0f}  {growth:9.0f}  {ours['pairs']:>8}  "
                f"{peer_text}  {ratio}"
            )
    if not smoke:
        print("  bar: 1M hashes in <= 600 s and <= 4096 MB (the stage searches pHash and dHash: about twice this)")
