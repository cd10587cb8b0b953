"""Where an LMM stage's requests go: the endpoints its settings name, or a vLLM server the run starts itself.

Each LMM stage may have its own settings (`caption.lmm`, `verify.lmm`, `triplets.lmm` over the run's `lmm`). A run
holds at most one server of its own at a time, as on a machine with one GPU: when the next stage needs another
`serve` spec, the current server is stopped and the next one started; consecutive stages with the same spec share
it. A server is started only when a stage has shards to do, so a resumed run starts only the servers it still needs.
Before a stage sends work its endpoints are checked: reachable, serving its model, and enforcing JSON schemas.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import httpx

from fashionmv_builder.core.build import Build
from fashionmv_builder.core.config import ConfigError, LmmConfig, RunConfig, digest
from fashionmv_builder.lmm.client import LmmRefused, auth_headers
from fashionmv_builder.lmm.harness import RequestSize
from fashionmv_builder.lmm.server import ServerSpec, VllmServer

if TYPE_CHECKING:
    from fashionmv_builder.lmm.harness import LmmStage

# A value an unconstrained model would not write by chance: a server that ignores the schema fails this canary.
CANARY_VALUE = "qx-7319-zv"
CANARY_SCHEMA = {
    "type": "object",
    "properties": {"canary": {"type": "string", "enum": [CANARY_VALUE]}},
    "required": ["canary"],
    "additionalProperties": False,
}


def where(lmm: LmmConfig) -> str:
    """What identifies a stage's server: its endpoints, or the spec of the server the run starts."""
    return digest(lmm.model_dump(mode="json", include={"endpoints", "serve"}))


def size_for(stages: Sequence[LmmStage], lmm: LmmConfig) -> RequestSize:
    """The largest request of the stages that share this server: what it must be started to hold."""
    sizes = [s.largest_request() for s in stages if s.lmm_settings is not None and where(s.lmm) == where(lmm)]
    if not sizes:
        return RequestSize(1, 1, "no stage")
    return RequestSize(max(z.images for z in sizes), max(z.tokens for z in sizes), "the stages sharing the server")


def lmm_stages(config: RunConfig) -> list[LmmStage]:
    from fashionmv_builder.core.stage import Work
    from fashionmv_builder.pipeline import build_stages

    return [s for s in build_stages(config) if s.work is Work.LMM]  # type: ignore[misc]


def context_length(size: RequestSize) -> int:
    """A context that holds the largest request with room to spare (the token counts are estimates): 1.5 times it,
    rounded up to 1024 tokens (a power of two could pass the model's own maximum)."""
    return math.ceil(1.5 * size.tokens / 1024) * 1024


def server_for(config: RunConfig, lmm: LmmConfig | None = None, size: RequestSize | None = None) -> VllmServer:
    """The server of `lmm.serve` (default: the run's `lmm`); its pidfile and log live in the output folder. Its
    context length and image limit default to what the largest request of the stages it serves needs."""
    lmm = lmm if lmm is not None else config.lmm
    serve = lmm.serve if lmm else None
    if lmm is None or serve is None:
        raise ConfigError("lmm.serve: no server to start is configured")
    size = size or size_for(lmm_stages(config), lmm)
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
        max_model_len=serve.max_model_len or context_length(size),
        max_images=serve.max_images or size.images,
        local_media_dir=out if lmm.share_disk else None,
        extra_args=serve.extra_args,
        env=serve.env,
    )
    out.mkdir(parents=True, exist_ok=True)
    # One folder for every spec: starting the next stage's server reaps a previous one left by a killed run.
    return VllmServer(spec, Build(config.output_dir).local_folder("_lmm_server"))


@contextmanager
def lmm_endpoints(config: RunConfig, lmm: LmmConfig, size: RequestSize | None = None) -> Iterator[list[str]]:
    """The endpoints to send requests to; a server started here is stopped on the way out."""
    if lmm.endpoints:
        yield list(lmm.endpoints)
        return
    server = server_for(config, lmm, size)
    url = server.start(timeout_s=lmm.serve.startup_timeout_s)
    try:
        yield [url]
    finally:
        server.stop()


def check_endpoints(stage: LmmStage, endpoints: list[str]) -> None:
    """Fail early, with what to do: a server down, refusing the key or serving another model (LmmUnreachable,
    LmmRefused), one whose context cannot hold the stage's largest request (LmmRefused, before any request), or one
    that ignores JSON schemas (LmmRefused, from one tiny canary request per endpoint).

    A canary that passed is kept in the stage's answer store, keyed by endpoint and model like any answer, so a
    resumed or replayed build does not ask it again (and sends nothing at all when every answer is stored)."""
    from fashionmv_builder.lmm.client import LmmRequest, lmm_client

    lmm, answers = stage.lmm, stage.build.answers(stage.name)

    async def check() -> None:
        client = lmm_client(lmm, endpoints)
        try:
            await client.check()
            check_fits(stage, client.endpoints)
            for url in client.endpoints:
                key = digest({"canary": CANARY_SCHEMA, "endpoint": url, "model": lmm.model, "rev": lmm.model_revision})
                if answers.get(key) is not None:
                    continue
                canary = LmmRequest(
                    key=key,
                    messages=({"role": "user", "content": "Answer with a JSON object."},),
                    schema_name="canary",
                    schema=CANARY_SCHEMA,
                    max_tokens=256,  # a random-weight test model may pad with whitespace
                    temperature=0.0,
                    seed=None,
                )
                reply = await client.send_to(canary, url)
                try:
                    ok = json.loads(reply.text) == {"canary": CANARY_VALUE}
                except ValueError:
                    ok = False
                if not ok:
                    raise LmmRefused(
                        f'the LMM server at {url} does not enforce JSON schemas (asked for {{"canary": '
                        f'"{CANARY_VALUE}"}}, it answered {reply.text[:80]!r}): its answers could not be trusted to '
                        "parse. Use a server that honours response_format json_schema (vLLM: any recent release)"
                    )
                answers.put(key, {"key": key, "text": reply.text, "endpoint": url, "canary": True})
        finally:
            await client.close()

    asyncio.run(check())


def check_fits(stage: LmmStage, endpoints: list[str]) -> None:
    """Refuse, before any request, a stage whose largest request cannot fit the context length a server reports."""
    size = stage.largest_request()
    for url in endpoints:
        try:
            cards = httpx.get(f"{url}/v1/models", headers=auth_headers(stage.lmm), timeout=10).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            continue  # reachability was checked already; a server that lists no limits cannot be checked
        limit = next((c.get("max_model_len") for c in cards if c.get("id") == stage.lmm.model), None)
        if isinstance(limit, int) and size.tokens > limit:
            raise LmmRefused(
                f"{stage.name}: its largest request needs about {size.tokens} tokens ({size.detail}), but {url} "
                f"serves {stage.lmm.model} with max_model_len {limit}. Serve it with --max-model-len >= {size.tokens}, "
                "or lower the pixel budgets, the views, the candidates shown or max_tokens"
            )


class StageServers:
    """The endpoints of each LMM stage of a run, with at most one server of the run's own up at a time."""

    def __init__(self, config: RunConfig, stages: Sequence[LmmStage]) -> None:
        self.config = config
        self.stages = list(stages)
        self._where: str | None = None
        self._endpoints: list[str] = []
        self._server = ExitStack()

    def endpoints(self, stage: LmmStage) -> list[str]:
        """The stage's endpoints, checked; its server started (and another one stopped) if need be."""
        lmm = stage.lmm
        if where(lmm) != self._where:
            self.close()
            size = size_for(self.stages, lmm)
            self._endpoints = self._server.enter_context(lmm_endpoints(self.config, lmm, size))
            self._where = where(lmm)
        check_endpoints(stage, self._endpoints)
        return self._endpoints

    def close(self) -> None:
        self._server.close()
        self._where = None
