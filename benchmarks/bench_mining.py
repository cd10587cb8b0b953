"""Stage 3 mining at catalogue scale (issue #18): exact against approximate nearest-neighbour search, per split.

Mining searches every product of a split against the whole split on three paths: the image (1280-d from
EfficientNet-Lite0, 144-d from today's gradient histogram; 1280 here, the larger) and the long and short captions
(384-d MiniLM). The input is synthetic and clustered so that recall is not trivially easy: N/50 Gaussian clusters in
a 32-d latent space (centres drawn N(0, 1.5²), members centre + N(0, 1), so neighbouring clusters overlap), mapped
to the path's dimension by a fixed random linear map, plus isotropic noise, normalised onto the unit sphere.

Each (size, path, index) runs `candidates.nearest` in a fresh process, so its peak memory (max RSS) is its own: the
path's vectors (and their generation's temporaries) plus the index; "growth" is the peak over the RSS before mining.
Recall@20 is against exact search on 1,000 sampled sources (the source itself left out of both lists); exact
search's time for the whole split is measured at 10K and, above, extrapolated from the time it takes for those
sampled sources (brute force is linear in the number of sources). The peer of an approximate index is exact search
in the same run. Bar: 1M products per split, all three paths, in under 10 minutes on the 2-core machine with
recall@20 >= 0.95.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import faiss
import numpy as np

from fashionmv_builder.core.config import MiningIndexConfig, TripletsConfig

PATHS = (("image", 1280), ("long caption", 384), ("short caption", 384))
TOP_K = TripletsConfig().top_k
RECALL_SOURCES = 1_000
LATENT_DIM = 32
CLUSTER_SIZE = 50  # products per cluster on average: a style in a few colours and sizes
FULL_EXACT_MAX = 10_000  # above this, exact search's time is extrapolated from the sampled sources
BAR_SECONDS = 600


def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """n unit vectors of `dim` dimensions: a Gaussian mixture in a 32-d latent space, embedded linearly, plus noise."""
    rng = np.random.default_rng(seed)
    centres = 1.5 * rng.standard_normal((max(1, n // CLUSTER_SIZE), LATENT_DIM), dtype=np.float32)
    embedding = rng.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
    noise = 0.5 * np.sqrt(LATENT_DIM / dim)  # the noise's norm is half the norm of a member's offset from its centre
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in blocks: the latent draws of 1M products would double the peak
        size = min(100_000, n - start)
        latent = centres[rng.integers(0, len(centres), size)] + rng.standard_normal((size, LATENT_DIM), np.float32)
        block = latent @ embedding + noise * rng.standard_normal((size, dim), dtype=np.float32)
        vectors[start : start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def _without_source(found: np.ndarray, sources: np.ndarray) -> list[set[int]]:
    return [set([int(j) for j in row if j != s][:TOP_K]) for row, s in zip(found, sources, strict=True)]


def _worker(n: int, dim: int, seed: int, kind: str) -> None:
    """Run in a fresh process: mine one path of one split, then print time, memory and recall as JSON."""
    from fashionmv_builder.stages.candidates import nearest

    vectors = clustered_vectors(n, dim, seed)
    members = np.arange(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    found = nearest(vectors, members, TOP_K + 1, MiningIndexConfig(index=kind))  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sources = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, RECALL_SOURCES), replace=False))
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    start = time.perf_counter()
    exact = flat.search(vectors[sources], TOP_K + 1)[1]
    exact_estimate = (time.perf_counter() - start) * n / len(sources)
    truth, approx = _without_source(exact, sources), _without_source(found[sources], sources)
    recall = float(np.mean([len(a & t) / max(1, len(t)) for a, t in zip(approx, truth, strict=True)]))
    result = {"seconds": seconds, "peak_mb": peak / 1024, "base_mb": base / 1024, "recall": recall}
    print(json.dumps(result | {"exact_estimate": exact_estimate}))


def _run(n: int, dim: int, seed: int, kind: str) -> dict:
    code = f"from benchmarks.bench_mining import _worker; _worker({n}, {dim}, {seed}, {kind!r})"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(smoke: bool = False, sizes: tuple[int, ...] | None = None) -> None:
    sizes = sizes or ((2_000,) if smoke else (10_000, 100_000, 1_000_000))
    print(f"mining: each product's top {TOP_K} in its split, per path (synthetic clustered unit vectors)")
    print(
        f"  {'N':>9}  {'path':<13} {'dim':>4}  {'index':<5}  {'seconds':>8}  {'peak MB':>8}  {'growth MB':>9}  "
        f"{'recall@20':>9}  {'exact s':>9}  speed-up"
    )
    for n in sizes:
        kinds = ("exact", "hnsw", "ivf") if n <= FULL_EXACT_MAX else ("hnsw", "ivf") if n <= 100_000 else ("hnsw",)
        totals: dict[str, float] = {}
        for seed, (path, dim) in enumerate(PATHS):
            exact_seconds = None
            for kind in kinds:
                r = _run(n, dim, seed, kind)
                if kind == "exact":
                    exact_seconds = r["seconds"]
                exact_text = f"{exact_seconds:9.2f}" if exact_seconds else f"~{r['exact_estimate']:8.0f}"
                speed_up = (exact_seconds or r["exact_estimate"]) / r["seconds"]
                totals[kind] = totals.get(kind, 0.0) + r["seconds"]
                print(
                    f"  {n:>9}  {path:<13} {dim:>4}  {kind:<5}  {r['seconds']:8.2f}  {r['peak_mb']:8.0f}  "
                    f"{r['peak_mb'] - r['base_mb']:9.0f}  {r['recall']:9.3f}  {exact_text}  {speed_up:6.1f}x"
                )
        summary = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in totals.items())
        print(f"  {n:>9}  all three paths: {summary}")
    if not smoke:
        print(f"  bar: 1M products, three paths, in <= {BAR_SECONDS} s with recall@20 >= 0.95 (hnsw)")


if __name__ == "__main__":
    main(sizes=tuple(int(size) for size in sys.argv[1:]) or None)
