"""Stage 3 mining at catalogue scale (issue #18): exact against approximate nearest-neighbour search, per split.

Mining searches every product of a split against the whole split on three paths: the image (1280-d from
EfficientNet-Lite0, 144-d from today's gradient histogram; 1280 here, the larger) and the long and short captions
(384-d MiniLM). The input is synthetic and clustered so that recall is not trivially easy: N/50 Gaussian clusters in
a 32-d latent space (centres drawn N(0, 1.5²), members centre + N(0, 1), so neighbouring clusters overlap), mapped
to the path's dimension by a fixed random linear map, plus isotropic noise, normalised onto the unit sphere.

Synthetic vectors make dimension reduction look better than it is: their structure lives in 32 dimensions, where
real embeddings spread theirs over many more. So the same comparison runs on real vectors too: 100K (smoke: 2K)
distinct comment and docstring lines of the installed Python packages (English technical text; versions pinned by
constraints.txt), embedded with the build's default text model (real MiniLM weights), cached under
build/bench-mining/ (embedding 100K takes ~10 minutes on 2 cores, once).

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
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks import peak_rss_mb
from fashionmv_builder.core.config import MiningIndexConfig, TripletsConfig

PATHS = (("image", 1280), ("long caption", 384), ("short caption", 384))
TOP_K = TripletsConfig().top_k
RECALL_SOURCES = 1_000
LATENT_DIM = 32
CLUSTER_SIZE = 50  # products per cluster on average: a style in a few colours and sizes
FULL_EXACT_MAX = 10_000  # above this, exact search's time is extrapolated from the sampled sources
BAR_SECONDS = 600
REAL_TEXTS = 100_000
CACHE = Path(__file__).resolve().parents[1] / "build" / "bench-mining"


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


def real_text_vectors(n: int) -> Path:
    """A file of n real MiniLM vectors of real text (see the module's docstring), made once."""
    path = CACHE / f"text-vectors-{n}.npy"
    if path.exists():
        return path
    lines: set[str] = set()
    for source in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        for line in source.read_text(errors="ignore").splitlines():
            line = line.strip().lstrip("#").strip()
            if 40 <= len(line) <= 200 and sum(c.isalpha() or c == " " for c in line) > 0.85 * len(line):
                lines.add(line)
    ordered = sorted(lines)
    picked = np.random.default_rng(0).choice(len(ordered), min(n, len(ordered)), replace=False)
    from fashionmv_builder.stages.embed.stage import encode_texts

    vectors = encode_texts([ordered[i] for i in picked]).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return path


def _without_source(found: np.ndarray, sources: np.ndarray) -> list[set[int]]:
    return [set([int(j) for j in row if j != s][:TOP_K]) for row, s in zip(found, sources, strict=True)]


def _worker(n: int, dim: int, seed: int, kind: str, vectors_file: str = "") -> None:
    """Run in a fresh process: mine one path of one split, then print time, memory and recall as JSON."""
    from fashionmv_builder.stages.candidates import nearest

    vectors = np.load(vectors_file) if vectors_file else clustered_vectors(n, dim, seed)
    n, dim = vectors.shape
    members = np.arange(n)
    base = peak_rss_mb()
    start = time.perf_counter()
    found = nearest(vectors, members, TOP_K + 1, MiningIndexConfig(index=kind))  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    sources = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, RECALL_SOURCES), replace=False))
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    start = time.perf_counter()
    exact = flat.search(vectors[sources], TOP_K + 1)[1]
    exact_estimate = (time.perf_counter() - start) * n / len(sources)
    truth, approx = _without_source(exact, sources), _without_source(found[sources], sources)
    recall = float(np.mean([len(a & t) / max(1, len(t)) for a, t in zip(approx, truth, strict=True)]))
    result = {"seconds": seconds, "peak_mb": peak, "base_mb": base, "recall": recall}
    print(json.dumps(result | {"exact_estimate": exact_estimate}))


def _run(n: int, dim: int, seed: int, kind: str, vectors_file: str = "") -> dict:
    code = f"from benchmarks.bench_mining import _worker; _worker({n}, {dim}, {seed}, {kind!r}, {vectors_file!r})"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def indexes_measured_at(n: int) -> tuple[str, ...]:
    """Exact search runs whole up to 10K; plain HNSW and IVF on the full vectors up to 100K (at 1M they take 15+
    minutes for the three paths, or lose recall: BENCHMARKS.md)."""
    if n <= FULL_EXACT_MAX:
        return ("exact", "hnsw-pca", "hnsw", "ivf")
    return ("hnsw-pca", "hnsw", "ivf") if n <= 100_000 else ("hnsw-pca",)


def _measure(n: int, path: str, dim: int, seed: int, kinds: tuple[str, ...], vectors_file: str = "") -> dict:
    """Print one row per index for one path of one split; return each index's seconds."""
    seconds: dict[str, float] = {}
    exact_seconds = None
    for kind in kinds:
        r = _run(n, dim, seed, kind, vectors_file)
        if kind == "exact":
            exact_seconds = r["seconds"]
        exact_text = f"{exact_seconds:9.2f}" if exact_seconds else f"~{r['exact_estimate']:8.0f}"
        speed_up = (exact_seconds or r["exact_estimate"]) / r["seconds"]
        seconds[kind] = r["seconds"]
        print(
            f"  {n:>9}  {path:<13} {dim:>4}  {kind:<8}  {r['seconds']:8.2f}  {r['peak_mb']:8.0f}  "
            f"{r['peak_mb'] - r['base_mb']:9.0f}  {r['recall']:9.3f}  {exact_text}  {speed_up:6.1f}x"
        )
    return seconds


def main(smoke: bool = False, sizes: tuple[int, ...] | None = None) -> None:
    """The synthetic sizes, then (unless sizes are given) the real text vectors."""
    header = (
        f"  {'N':>9}  {'path':<13} {'dim':>4}  {'index':<8}  {'seconds':>8}  {'peak MB':>8}  {'growth MB':>9}  "
        f"{'recall@20':>9}  {'exact s':>9}  speed-up"
    )
    print(f"mining: each product's top {TOP_K} in its split, per path (synthetic clustered unit vectors)")
    print(header)
    for n in sizes or ((2_000,) if smoke else (10_000, 100_000, 1_000_000)):
        totals: dict[str, float] = {}
        for seed, (path, dim) in enumerate(PATHS):
            for kind, seconds in _measure(n, path, dim, seed, indexes_measured_at(n)).items():
                totals[kind] = totals.get(kind, 0.0) + seconds
        summary = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in totals.items())
        print(f"  {n:>9}  all three paths: {summary}")
    if not smoke:
        print(f"  bar: 1M products, three paths, in <= {BAR_SECONDS} s with recall@20 >= 0.95 (hnsw-pca)")
    if sizes:
        return
    n = 2_000 if smoke else REAL_TEXTS
    print(f"mining on real vectors: {n} lines of English text embedded with MiniLM (one 384-d path)")
    print(header)
    # made in a process of its own: a worker forked from a parent that held the text model would start from its RSS
    code = f"from benchmarks.bench_mining import real_text_vectors; print(real_text_vectors({n}))"
    made = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    _measure(n, "text", 384, 0, indexes_measured_at(n), made.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main(sizes=tuple(int(size) for size in sys.argv[1:]) or None)
