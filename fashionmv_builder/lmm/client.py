"""The one async OpenAI-compatible client every LMM call goes through.

Bounded in-flight requests, requests spread round-robin over one or more endpoints (data-parallel vLLM replicas),
JSON-schema structured output, timeouts, and retries with exponential backoff on connection errors, timeouts, 429
and 5xx (never on other 4xx: those are our bug and retrying them would burn GPU time for nothing).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import httpx
import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter


class LmmUnreachable(RuntimeError):
    pass


@dataclass(frozen=True)
class LmmRequest:
    key: str  # sha256 of the canonical request: the answer store's key
    messages: tuple[dict, ...]
    schema_name: str
    schema: dict
    max_tokens: int
    temperature: float
    seed: int | None  # None: not sent (the request key still records the attempt's seed)


@dataclass(frozen=True)
class LmmReply:
    text: str
    finish_reason: str
    tokens_in: int
    tokens_out: int
    seconds: float
    endpoint: str


def _transient(err: BaseException) -> bool:
    if isinstance(err, openai.APIConnectionError | openai.APITimeoutError | openai.RateLimitError):
        return True
    return isinstance(err, openai.APIStatusError) and err.status_code >= 500


class LmmClient:
    def __init__(
        self,
        endpoints: list[str],
        model: str,
        *,
        max_in_flight: int = 32,
        timeout_s: float = 300.0,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one LMM endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self._clients = {
            url: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=timeout_s, max_retries=0)
            for url in self.endpoints
        }
        self._next = itertools.cycle(self.endpoints)
        self._slots = asyncio.Semaphore(max_in_flight)

    async def check(self) -> None:
        """Fail early, with what to do, when a server is down or serves another model."""
        for url in self.endpoints:
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    models = [m["id"] for m in (await http.get(f"{url}/v1/models")).json()["data"]]
            except (httpx.HTTPError, ValueError, KeyError) as err:
                raise LmmUnreachable(
                    f"cannot reach the LMM server at {url} ({type(err).__name__}: {err}). Start one with "
                    "`fashionmv serve-lmm CONFIG`, or set lmm.endpoints to a running OpenAI-compatible server."
                ) from None
            if self.model not in models:
                raise LmmUnreachable(f"the LMM server at {url} serves {models}, not {self.model!r} (lmm.model)")

    async def complete(self, request: LmmRequest) -> LmmReply:
        async with self._slots:
            retrying = AsyncRetrying(
                retry=retry_if_exception(_transient),
                stop=stop_after_attempt(self.retries + 1),
                wait=wait_exponential_jitter(initial=self.backoff_s, max=60),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self._send(request, next(self._next))
        raise AssertionError("unreachable")

    async def _send(self, request: LmmRequest, url: str) -> LmmReply:
        start = time.perf_counter()
        response = await self._clients[url].chat.completions.create(
            model=self.model,
            messages=list(request.messages),
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed if request.seed is not None else openai.omit,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True},
            },
        )
        choice = response.choices[0]
        usage = response.usage
        return LmmReply(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason or "",
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
            seconds=time.perf_counter() - start,
            endpoint=url,
        )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
