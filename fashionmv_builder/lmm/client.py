"""The one async OpenAI-compatible client every LMM call goes through.

Bounded in-flight requests, requests spread round-robin over one or more endpoints (data-parallel vLLM replicas or
a hosted service), JSON-schema structured output, timeouts, and retries with exponential backoff on connection
errors, timeouts, 429 and 5xx; a 429's `Retry-After` is honoured. A provider's quota is kept by a budget of requests
and tokens per minute, shared by every client of the process that talks to the same model at the same endpoints.
Errors no retry fixes (400, 401, 403, 404) stop the stage at once with the setting to fix (`LmmRefused`).

The API key is read from the environment variable the config names, when the client is made; it is never logged,
stored or put in an error message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import itertools
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import httpx
import openai
from openai.types.chat import ChatCompletion
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from fashionmv_builder.core.config import ConfigError, LmmConfig


class LmmUnreachable(RuntimeError):
    pass


class LmmRefused(RuntimeError):
    """The server refused in a way no retry fixes: the stage stops, naming the setting to fix."""


# What to fix when a server answers with one of these; a retry would get the same answer.
REFUSALS = {
    400: "the server refused the request (does it support JSON-schema response_format, and this many images?): "
    "check the stage's lmm.model and its server",
    401: "the API key was refused: check the stage's lmm.api_key_env and the variable it names",
    403: "the API key may not use this model or endpoint: check the stage's lmm.api_key_env and lmm.model",
    404: "the model or endpoint does not exist there: check the stage's lmm.model and lmm.endpoints",
}
RETRY_AFTER_MAX_S = 300.0
# Image tokens for the token budget: Qwen-VL-style encoders spend one token per 28×28 pixels.
PIXELS_PER_IMAGE_TOKEN = 28 * 28


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


def retry_after(err: BaseException | None) -> float | None:
    """Seconds a 429 or 503 asks to wait (`Retry-After`: seconds or an HTTP date), capped; None if it does not say."""
    if not isinstance(err, openai.APIStatusError):
        return None
    value = err.response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # not a date either: back off as usual
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)  # "-0000": UTC, by RFC 5322
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


class RateBudget:
    """At most `requests` requests and `tokens` tokens in any 60 s, across threads and event loops."""

    def __init__(self, requests: int | None, tokens: int | None, window_s: float = 60.0) -> None:
        self.requests = requests
        self.tokens = tokens
        self.window_s = window_s
        self._sent: deque[tuple[float, int]] = deque()  # (when, tokens) of the requests in the window
        self._lock = threading.Lock()

    def _wait_s(self, tokens: int, now: float) -> float:
        while self._sent and self._sent[0][0] <= now - self.window_s:
            self._sent.popleft()
        waits = [0.0]
        if self.requests is not None and len(self._sent) >= self.requests:
            waits.append(self._sent[len(self._sent) - self.requests][0] + self.window_s - now)
        if self.tokens is not None:
            used = sum(t for _, t in self._sent)
            excess = used + min(tokens, self.tokens) - self.tokens
            for when, spent in self._sent:  # the oldest requests leave the window first
                if excess <= 0:
                    break
                excess -= spent
                waits.append(when + self.window_s - now)
        return max(waits)

    async def take(self, tokens: int) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                wait = self._wait_s(tokens, now)
                if wait <= 0:
                    self._sent.append((now, tokens))
                    return
            await asyncio.sleep(wait)


_BUDGETS: dict[tuple, RateBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def shared_budget(endpoints: tuple[str, ...], model: str, requests: int | None, tokens: int | None) -> RateBudget:
    """One budget per (endpoints, model, quota) in this process: the flow runs a client per shard thread."""
    key = (endpoints, model, requests, tokens)
    with _BUDGETS_LOCK:
        return _BUDGETS.setdefault(key, RateBudget(requests, tokens))


def api_key(lmm: LmmConfig) -> str:
    if lmm.api_key_env is None:
        return "none"  # servers started without --api-key accept any key
    key = os.environ.get(lmm.api_key_env)
    if not key:
        raise ConfigError(f"lmm.api_key_env: the environment variable {lmm.api_key_env} is not set")
    return key


def auth_headers(lmm: LmmConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(lmm)}"}


def _refused(err: openai.APIStatusError, url: str) -> LmmRefused:
    message = err.message.replace("\n", " ")[:200]
    return LmmRefused(
        f"the LMM server at {url} answered HTTP {err.status_code} ({message}); {REFUSALS[err.status_code]}"
    )


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
        key: str = "none",
        budget: RateBudget | None = None,
        image_tokens: int = 0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one LMM endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.budget = budget
        self.image_tokens = image_tokens  # the token budget's estimate of one image
        self._headers = {"Authorization": f"Bearer {key}"}
        self._clients = {
            url: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, timeout=timeout_s, max_retries=0)
            for url in self.endpoints
        }
        self._next = itertools.cycle(self.endpoints)
        self._slots = asyncio.Semaphore(max_in_flight)

    async def check(self) -> None:
        """Fail early, with what to do, when a server is down, refuses the key or serves another model."""
        for url in self.endpoints:
            try:
                async with httpx.AsyncClient(timeout=10, headers=self._headers) as http:
                    response = await http.get(f"{url}/v1/models")
                    if response.status_code in (401, 403):
                        raise LmmRefused(
                            f"the LMM server at {url} answered HTTP {response.status_code} to the model "
                            f"list; {REFUSALS[response.status_code]}"
                        )
                    models = [m["id"] for m in response.json()["data"]]
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
                wait=self._wait,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    if self.budget is not None:
                        await self.budget.take(self.token_estimate(request))
                    return await self.send_to(request, next(self._next))
        raise AssertionError("unreachable")

    def token_estimate(self, request: LmmRequest) -> int:
        """Prompt and answer tokens a request may use, counted before it is sent (about 4 characters a token)."""
        chars, images = 0, 0
        for message in request.messages:
            content = message["content"]
            for part in [content] if isinstance(content, str) else content:
                if isinstance(part, str):
                    chars += len(part)
                elif part.get("type") == "text":
                    chars += len(part["text"])
                else:
                    images += 1
        return math.ceil(chars / 4) + images * self.image_tokens + request.max_tokens

    def _wait(self, state: RetryCallState) -> float:
        """What the server asked for (Retry-After), else exponential backoff with jitter."""
        asked = retry_after(state.outcome.exception() if state.outcome else None)
        return asked if asked is not None else wait_exponential_jitter(initial=self.backoff_s, max=60)(state)

    async def send_to(self, request: LmmRequest, url: str) -> LmmReply:
        """One request to one endpoint, without retries (the canary)."""
        try:
            return await self._send(request, url)
        except openai.APIStatusError as err:
            if err.status_code in REFUSALS:
                raise _refused(err, url) from None
            raise

    async def _send(self, request: LmmRequest, url: str) -> LmmReply:
        start = time.perf_counter()
        body = {
            "model": self.model,
            "messages": list(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True},
            },
        }
        if request.seed is not None:
            body["seed"] = request.seed
        # The body is plain JSON already: the client's `post` sends it as it is, with the same key, timeouts and
        # connection pool. `chat.completions.create` would first walk all of it, every image's base64 text
        # included, to transform its typed dicts: about a fifth of the caption stage's CPU time once its views were
        # prepared (bench_photos profile, BENCHMARKS.md).
        response = await self._clients[url].post("/chat/completions", body=body, cast_to=ChatCompletion)
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


def lmm_client(lmm: LmmConfig, endpoints: list[str] | tuple[str, ...], max_in_flight: int | None = None) -> LmmClient:
    """The client for a stage's LMM settings: its key, its quota (shared in the process), its timeouts."""
    budget = None
    if lmm.requests_per_minute or lmm.tokens_per_minute:
        budget = shared_budget(tuple(endpoints), lmm.model, lmm.requests_per_minute, lmm.tokens_per_minute)
    return LmmClient(
        list(endpoints),
        lmm.model,
        max_in_flight=max_in_flight or lmm.max_in_flight,
        timeout_s=lmm.timeout_s,
        retries=lmm.retries,
        backoff_s=lmm.backoff_s,
        key=api_key(lmm),
        budget=budget,
        image_tokens=math.ceil(lmm.image_max_pixels / PIXELS_PER_IMAGE_TOKEN),
    )
