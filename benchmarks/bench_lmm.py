"""LMM pipeline efficiency: products/s through Stage 1 ÷ the best raw throughput of the same requests.

The raw side sends the very requests the caption stage would send (same messages, images, schema and sampling)
straight to the same vLLM server with a bare AsyncOpenAI client, at concurrency 8, 32 and 64, and keeps the best.
The pipeline side runs the caption stage (answer store, validation, shard writing) on a fresh output folder. Runs are
interleaved, at least 5 repetitions; median and spread are printed. Target: efficiency >= 0.9.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI

from fashionmv_builder.core.build import Build
from fashionmv_builder.core.config import RunConfig, validate_config
from fashionmv_builder.lmm.calls import CircuitBreaker
from fashionmv_builder.lmm.client import LmmClient
from fashionmv_builder.lmm.harness import StageContext, media_cache
from fashionmv_builder.lmm.server import ServerSpec, VllmServer, free_port
from fashionmv_builder.pipeline import run_local
from fashionmv_builder.stages.caption import CaptionStage

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "build" / "sample-catalogue" / "deepfashion"
WORDS = {"view_caption": [2, 6], "long_caption": [10, 20], "short_caption": [4, 8]}


def _config(out: Path, url: str, max_in_flight: int) -> RunConfig:
    return validate_config(
        {
            "output_dir": str(out),
            "shard_size": 25,
            "workers": 2,
            "sources": [{"kind": "deepfashion", "dataset": "deepfashion", "root": str(CATALOGUE)}],
            "lmm": {
                "endpoints": [url],
                "words": WORDS,
                "max_in_flight": max_in_flight,
                "breaker_min_products": 10**6,
                "send_seed": False,
            },
            "caption": {"max_tokens": 1024},
        }
    )


def _requests(config: RunConfig, limit: int) -> list:
    stage = CaptionStage(config)
    client = LmmClient(list(config.lmm.endpoints), config.lmm.model)
    ctx = StageContext(
        config, client, media_cache(stage), Build(config.output_dir).answers("x"), CircuitBreaker(1, 1), 1
    )
    asks = []
    for task in stage.plan("deepfashion").tasks:
        asks += [stage.ask(item, ctx) for item in stage.load_items(task)]
    return [a.request for a in asks[:limit]]


async def _raw(url: str, requests: list, concurrency: int) -> float:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    slots = asyncio.Semaphore(concurrency)

    async def one(r) -> None:
        async with slots:
            await client.chat.completions.create(
                model="tiny-vlm",
                messages=list(r.messages),
                max_tokens=r.max_tokens,
                temperature=r.temperature,
                response_format={"type": "json_schema", "json_schema": {"name": r.schema_name, "schema": r.schema}},
            )

    start = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - start
    await client.close()
    return len(requests) / elapsed


def _pipeline(build: Path, work: Path, url: str, concurrency: int) -> float:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for stage in ("ingest", "dedupe"):
        shutil.copytree(build / stage, work / stage)
    config = _config(work, url, concurrency)
    start = time.perf_counter()
    reports = run_local(config, ["caption"])["caption"]
    elapsed = time.perf_counter() - start
    return sum(r.stats["counts"]["products_in"] for r in reports) / elapsed


def main(smoke: bool = False) -> None:
    reps, sweep = (1, (8,)) if smoke else (5, (8, 32, 64))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = VllmServer(
            ServerSpec(
                python=ROOT / ".venv-vllm" / "bin" / "python",
                model=ROOT / "build" / "models" / "tiny-qwen2.5-vl",
                served_name="tiny-vlm",
                port=free_port(),
                dtype="float32",
                max_model_len=16384,
                local_media_dir=base,
                env={"VLLM_CPU_KVCACHE_SPACE": "2"},
            ),
            base / "server",
        )
        url = server.start()
        try:
            build = base / "build"
            config = _config(build, url, max(sweep))
            run_local(config, ["ingest", "dedupe"])
            requests = _requests(config, 24 if smoke else 10**9)
            raw: dict[int, list[float]] = {c: [] for c in sweep}
            pipe: list[float] = []
            for _ in range(reps):
                for c in sweep:
                    raw[c].append(asyncio.run(_raw(url, requests, c)))
                best_c = max(sweep, key=lambda c: statistics.median(raw[c]))
                pipe.append(_pipeline(build, base / "work", url, best_c))
        finally:
            server.stop()
    best = max(sweep, key=lambda c: statistics.median(raw[c]))
    print(f"LMM stage 1 (captions), tiny random-weight model on vLLM CPU, {len(requests)} requests, {reps} reps")
    for c in sweep:
        print(f"  raw requests, concurrency {c:>2}: {statistics.median(raw[c]):6.1f} products/s")
    eff = [p / statistics.median(raw[best]) for p in pipe]
    print(f"  caption stage (concurrency {best}):  {statistics.median(pipe):6.1f} products/s")
    spread = f" (spread {min(eff):.2f}-{max(eff):.2f})" if reps > 1 else ""
    print(f"  pipeline efficiency = {statistics.median(eff):.2f}{spread}  (target >= 0.9)")
