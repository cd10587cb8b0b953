from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Torch's OpenMP threads busy-wait by default; on a shared 2-core machine that made forwards 20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 80), quality: int = 90) -> bytes:
    """A small JPEG with content that differs per seed (so perceptual hashes differ too)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def make_jpeg():
    return jpeg_bytes


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample_catalogue(tmp_path_factory) -> Path:
    """The sample catalogue, built once per session: the one `make setup` made, else a fresh one."""
    built = REPO / "build" / "sample-catalogue"
    if (REPO / "build" / ".stamps" / "sample").exists() and (built / "ground_truth.json").exists():
        return built
    from fashionmv_builder.devtools.sample_catalogue import generate_sample

    out = tmp_path_factory.mktemp("sample-catalogue")
    generate_sample(out, products=200, seed=0)
    return out


@pytest.fixture(scope="session")
def static_http_server():
    """A real HTTP server on 127.0.0.1 serving a folder: `start(folder) -> base_url`."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    servers = []

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    def start(folder: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# LMM word bounds small enough for the tiny CPU model to answer quickly; the schemas still enforce them.
SMALL_WORDS = {
    "view_caption": [2, 6],
    "long_caption": [10, 20],
    "short_caption": [4, 8],
    "verifier_reason": [1, 6],
    "wrong_claim": [1, 4],
    "modification_short": [4, 8],
    "modification_long": [8, 16],
}

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TINY_VLM = REPO / "build" / "models" / "tiny-qwen2.5-vl"


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One real vLLM server (CPU build, tiny random-weight Qwen2.5-VL) shared by every test that needs one.

    It may read images under the session's temporary folder (file:// URLs). Tests that kill it call `.start()`
    again; the fixture stops whatever is running at the end."""
    server = start_vllm(tmp_path_factory.getbasetemp(), TINY_VLM, "tiny-vlm", max_model_len=16384, kv_cache_gib=2)
    yield server
    server.stop()


def start_vllm(base: Path, model: Path, name: str, *, max_model_len: int, kv_cache_gib: int, extra_args=()):
    """A real vLLM server (CPU build) of a tiny model, reading images under `base`, its state in `base/<name>`."""
    from fashionmv_builder.lmm.server import ServerSpec, VllmServer, free_port

    if not VLLM_PYTHON.exists() or not (model / "config.json").exists():
        pytest.fail(f"the vLLM venv or {model.name} is missing: run `make setup` (tests need the real server)")
    spec = ServerSpec(
        python=VLLM_PYTHON,
        model=model,
        served_name=name,
        port=free_port(),
        dtype="float32",
        max_model_len=max_model_len,
        max_images=60,
        local_media_dir=base,
        extra_args=tuple(extra_args),
        env={"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)},
    )
    server = VllmServer(spec, base / f"vllm-server-{name}")
    server.start(timeout_s=600)
    return server


def _stage3_config(out: Path, catalogue: Path, url: str):
    from fashionmv_builder.core.config import validate_config

    return validate_config(
        {
            "output_dir": str(out),
            "shard_size": 25,
            "workers": 2,
            "sources": [{"kind": "deepfashion", "dataset": "deepfashion", "root": str(catalogue / "deepfashion")}],
            "lmm": {"endpoints": [url], "words": SMALL_WORDS, "send_seed": False},
            "caption": {"max_tokens": 1024},
            "verify": {"max_tokens": 1024, "remove": False},
            "triplets": {"val_ratio": 0.3, "min_targets": 1, "max_tokens": 1024},
            # the random-weight model's picks are noise: record them, reject nothing, so the outputs have triplets
            "discriminability": {"reject": False},
        }
    )


@pytest.fixture(scope="session")
def stage3_build(sample_catalogue, vllm_server, tmp_path_factory):
    """Ingest through Stage 3 on the sample's deepfashion layout with the real vLLM server, built once per session
    and shared read-only by the triplet, report and audit tests."""
    from fashionmv_builder.pipeline import run_local

    out = tmp_path_factory.mktemp("stage3")
    config = _stage3_config(out, sample_catalogue, vllm_server.spec.url)
    run_local(config)
    return config


def _gloo_rank(rank: int, port: int, work, args: tuple, out) -> None:
    import torch

    torch.set_num_threads(1)  # the parent's OpenMP thread pool does not survive fork: parallel regions would hang
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, work(rank, *args)))
    finally:
        torch.distributed.destroy_process_group()


def run_on_two_gloo_processes(work, *args, timeout: float = 120) -> dict[int, object]:
    """`work(rank, *args)` in two forked processes joined by a gloo process group; their results by rank."""
    import torch

    from fashionmv_builder.lmm.server import free_port

    context = torch.multiprocessing.get_context("fork")
    out = context.Queue()
    port = free_port()
    procs = [context.Process(target=_gloo_rank, args=(r, port, work, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return got


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Qwen3.5 (ProCIR backbone), built once through the CLI and shared read-only."""
    from typer.testing import CliRunner

    from fashionmv_builder.cli import app

    out = tmp_path_factory.mktemp("tiny-procir")
    result = CliRunner().invoke(app, ["build-tiny-procir", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out
