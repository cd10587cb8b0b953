"""The LMM stages on real-size photos: products/s per stage against a server that answers at once, beside ingest.

The sample catalogue's garments are enlarged to 1–2 MP photos (with sensor-like noise, so they compress and decode
like photos, about 0.5 MB a view). The ground-truth answering server (a development tool, devtools/) runs in a
process of its own and answers from the truth as soon as it has read each image's bytes, so the timed work is our
side's: preparing images, building and storing requests, validating answers and writing shards. Every LMM stage runs
as in a build (caption, verify, then embed and candidates untimed, then Stage 3 selection), at a 7B captioner's pixel
budget. Caption runs twice: with the image cache empty (it prepares every view at every budget of the run, in its
thread pool, while requests are in flight) and again on a fresh caption folder with the cache filled, which is what
the caption stage costs once preparation is done ahead of it. The peer is ingest of the same photos, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import multiprocessing
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
from PIL import Image

from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.devtools.ground_truth_server import MODEL_NAME, TRUTH_WORDS, serve_ground_truth
from fashionmv_builder.devtools.sample_catalogue import generate_sample
from fashionmv_builder.lmm.media import fit_to_pixels, prepare_views
from fashionmv_builder.pipeline import run_local

CAPTION_PIXELS = 327_680  # 512×640: a 7–8B VLM's usual budget (about 420 image tokens)
CANDIDATE_PIXELS = 128 * 160


def enlarge_photos(folder: Path, size: tuple[int, int], seed: int = 0) -> int:
    """Every readable JPEG under `folder` enlarged to `size` with noise, in place; returns how many."""
    rng = np.random.default_rng(seed)
    count = 0
    for path in sorted(folder.rglob("*.jpg")):
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        except (OSError, SyntaxError, ValueError):
            continue  # the catalogue's planted faults stay as they are
        pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
        path.write_bytes(buf.getvalue())
        count += 1
    return count


def _serve(catalogue: Path, media_root: Path, port: int, ready: Event) -> None:
    with serve_ground_truth(catalogue, media_root=media_root, budgets=(CAPTION_PIXELS, CANDIDATE_PIXELS), port=port):
        ready.set()
        while True:
            time.sleep(3600)


@contextlib.contextmanager
def server_process(catalogue: Path, media_root: Path) -> Iterator[str]:
    """The ground-truth server in a process of its own, so it takes no time from the client's interpreter."""
    from fashionmv_builder.lmm.server import free_port

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(catalogue, media_root, port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(timeout=1800) or not proc.is_alive():
            raise RuntimeError("the ground-truth server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.join(timeout=30)


def _config(out: Path, catalogue: Path, url: str, workers: int) -> RunConfig:
    return validate_config(
        {
            "output_dir": str(out),
            "shard_size": 25,
            "workers": workers,
            "sources": [{"kind": "deepfashion", "dataset": "deepfashion", "root": str(catalogue / "deepfashion")}],
            "ingest": {"max_file_bytes": 30_000_000, "max_image_pixels": 40_000_000},
            "lmm": {
                "endpoints": [url],
                "model": MODEL_NAME,
                "words": TRUTH_WORDS,
                "image_max_pixels": CAPTION_PIXELS,
                "max_in_flight": 64,
                "breaker_min_products": 10**6,
            },
            "triplets": {"candidate_max_pixels": CANDIDATE_PIXELS, "top_k": 4},
        }
    )


def _ms(work: Callable[[], object], reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def view_profile(data: bytes) -> list[tuple[str, float]]:
    """Where one view's preparation goes: milliseconds of each step, single-threaded, median of 7."""
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        full = img.convert("RGB")
    scale = math.sqrt(CAPTION_PIXELS / (size[0] * size[1]))
    target = (round(size[0] * scale), round(size[1] * scale))
    small = full.resize(target)

    def decode(draft: int = 1) -> None:
        with Image.open(io.BytesIO(data)) as img:
            if draft > 1:
                img.draft("RGB", (size[0] // draft, size[1] // draft))
            img.convert("RGB")

    return [
        ("sha256 of the stored bytes", _ms(lambda: hashlib.sha256(data).digest())),
        ("full JPEG decode to RGB", _ms(decode)),
        ("JPEG decode at 1/2 size (draft)", _ms(lambda: decode(2))),
        (f"bicubic resize to {target[0]}×{target[1]}", _ms(lambda: full.resize(target))),
        (f"JPEG encode at {target[0]}×{target[1]}", _ms(lambda: small.save(io.BytesIO(), "JPEG", quality=90))),
        ("fit_to_pixels, caption budget", _ms(lambda: fit_to_pixels(data, CAPTION_PIXELS))),
        ("fit_to_pixels, candidate budget", _ms(lambda: fit_to_pixels(data, CANDIDATE_PIXELS))),
        ("prepare_views, both budgets", _ms(lambda: prepare_views(data, [CAPTION_PIXELS, CANDIDATE_PIXELS]))),
    ]


def _cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its finished children (ingest's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(config: RunConfig, stage: str) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds, products in and views in of one stage's run."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    reports = run_local(config, [stage])[stage]
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    errors = [r.error for r in reports if r.error]
    if errors:
        raise RuntimeError(f"{stage}: {errors}")
    products = sum(r.counts.get("products_in", 0) for r in reports)
    return elapsed, cpu, products, sum(r.counts["views_in"] for r in reports)


def main(smoke: bool = False, products: int | None = None, size: tuple[int, int] = (1000, 1250)) -> None:
    products = products or (30 if smoke else 120)
    size = (400, 500) if smoke else size
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        catalogue = base / "catalogue"
        generate_sample(catalogue, products=products, seed=7)
        photos = enlarge_photos(catalogue / "deepfashion", size)
        profile = view_profile(next((catalogue / "deepfashion").rglob("*.jpg")).read_bytes())
        out = base / "build"
        with server_process(catalogue, out) as url:
            config = _config(out, catalogue, url, workers=2)
            ingest_s, ingest_cpu, _, images = _timed(config, "ingest")
            _timed(config, "dedupe")
            cold = _timed(config, "caption")
            shutil.rmtree(out / "caption")  # its shards and stored answers: the next run asks the server again
            warm = _timed(config, "caption")
            verify = _timed(config, "verify")
            run_local(config, ["embed", "candidates"])
            select = _timed(config, "select")
    print(
        f"LMM stages on {photos} photos of {size[0]}×{size[1]} ({products} products), workers=2, at "
        f"{CAPTION_PIXELS} px (candidates {CANDIDATE_PIXELS} px), against the ground-truth server (instant answers)"
    )
    peer = images / ingest_s
    print(
        f"  ingest (the peer):                 {peer:7.1f} images/s ({ingest_s:.1f} s); "
        f"{images / ingest_cpu:.0f} images per CPU-second"
    )
    rows = [
        ("caption, image cache empty", cold, "products"),
        ("caption, images prepared ahead", warm, "products"),
        ("verify", verify, "products"),
        ("select (Stage 3)", select, "sources"),
    ]
    for name, (seconds, cpu, n, views), unit in rows:
        print(
            f"  {name + ':':34} {n / seconds:7.1f} {unit}/s ({seconds:.1f} s); its views {views / seconds:.0f}/s = "
            f"{views / seconds / peer:.2f}× ingest's images/s; {n / cpu:.1f} {unit} per CPU-second"
        )
    print("  where one view's preparation goes (one thread, median of 7):")
    for step, ms in profile:
        print(f"    {step + ':':40} {ms:6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--products", type=int)
    parser.add_argument("--size", type=int, nargs=2, default=(1000, 1250), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args()
    main(smoke=args.smoke, products=args.products, size=tuple(args.size))
