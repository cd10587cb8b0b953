"""Where a run's LMM requests go: the configured endpoints, or a vLLM server the run starts and stops itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

from fashionmv_builder.core.build import Build
from fashionmv_builder.core.config import ConfigError, RunConfig
from fashionmv_builder.lmm.server import ServerSpec, VllmServer


def server_for(config: RunConfig) -> VllmServer:
    serve = config.lmm.serve if config.lmm else None
    if serve is None:
        raise ConfigError("lmm.serve: no server to start is configured")
    fs, root = fsspec.core.url_to_fs(config.output_dir)
    if fs.protocol not in ("file", ("file", "local")):
        raise ConfigError("lmm.serve: a server started by the run needs a local output_dir; use lmm.endpoints")
    out = Path(root)
    spec = ServerSpec(
        python=serve.python,
        model=serve.model,
        served_name=serve.served_name,
        port=serve.port,
        dtype=serve.dtype,
        max_model_len=serve.max_model_len,
        max_images=serve.max_images,
        local_media_dir=out if config.lmm.share_disk else None,
        extra_args=serve.extra_args,
        env=serve.env,
    )
    out.mkdir(parents=True, exist_ok=True)
    return VllmServer(spec, Build(config.output_dir).local_folder("_lmm_server"))


@contextmanager
def lmm_endpoints(config: RunConfig, keep_running: bool = False) -> Iterator[list[str]]:
    """The endpoints to send requests to; a server started here is stopped on the way out (unless kept)."""
    if config.lmm is None:
        raise ConfigError("lmm: this stage needs an lmm section (endpoints, or serve)")
    if config.lmm.endpoints:
        yield list(config.lmm.endpoints)
        return
    server = server_for(config)
    url = server.start(timeout_s=config.lmm.serve.startup_timeout_s)
    try:
        yield [url]
    finally:
        if not keep_running:
            server.stop()


def check_endpoints(config: RunConfig, endpoints: list[str]) -> None:
    """Fail early, with what to do, when a server is down or serves another model (LmmUnreachable)."""
    from fashionmv_builder.lmm.harness import lmm_client

    async def check() -> None:
        client = lmm_client(config, endpoints)
        try:
            await client.check()
        finally:
            await client.close()

    asyncio.run(check())
