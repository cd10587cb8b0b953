"""Run a shard's LMM requests so that no answer is ever paid for twice, and a bad run stops early.

Every answer is written to the answer store the moment it arrives, keyed by the sha256 of its canonical request
(model and revision, prompt and schema versions, sampling parameters and seed, image content hashes, text). A killed
stage therefore resumes by replaying stored answers and sends only the rest. An answer that fails validation is
retried with the next seed (a new request, with its own key) a set number of times, then reported invalid; it never
raises. A circuit breaker stops the stage once the share of invalid or removed products passes a threshold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import fsspec
from pydantic import BaseModel, ValidationError

from fashionmv_builder.core.config import digest
from fashionmv_builder.lmm.client import LmmClient, LmmRequest


class CircuitOpen(RuntimeError):
    """Too many bad answers: stop before burning more GPU time."""


class AnswerStore:
    """One JSON file per answer under `<out>/<stage>/_answers/<key[:2]>/<key>.json`, on any fsspec filesystem."""

    def __init__(self, out: str, stage: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(out)
        self.base = f"{root.rstrip('/')}/{stage}/_answers"

    def _path(self, key: str) -> str:
        return f"{self.base}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(key)))
        except (FileNotFoundError, ValueError):
            return None  # absent, or cut short by a crash: ask again

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, json.dumps(record).encode())

    def count(self) -> int:
        return len(self.fs.glob(f"{self.base}/*/*.json"))


def request_key(canonical: dict) -> str:
    return digest(canonical)


@dataclass
class CallOutcome:
    answer: BaseModel | None  # None when every attempt was invalid
    error: str  # why the last attempt was invalid
    attempts: int
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    from_store: int = 0  # attempts answered by the store instead of the server
    key: str = ""


class CircuitBreaker:
    def __init__(self, threshold: float, min_items: int, setting: str = "the breaker threshold") -> None:
        self.threshold = threshold
        self.setting = setting
        self.min_items = min_items
        self.seen = 0
        self.bad = 0

    def record(self, bad: bool, what: str) -> None:
        self.seen += 1
        self.bad += bad
        if self.seen >= self.min_items and self.bad / self.seen > self.threshold:
            raise CircuitOpen(
                f"{self.bad} of {self.seen} products were {what} (over the threshold {self.threshold:.0%}); "
                f"stopping the stage. Check the model, the prompt and max_tokens, or raise {self.setting}."
            )


def _parse(text: str, finish_reason: str, model: type[BaseModel], check: Callable[[Any], str | None]) -> Any:
    if finish_reason == "length":
        raise ValueError("the answer was cut off at max_tokens")
    answer = model.model_validate_json(text)
    problem = check(answer)
    if problem:
        raise ValueError(problem)
    return answer


async def call_validated(
    client: LmmClient,
    store: AnswerStore,
    request: LmmRequest,
    canonical: dict,
    model: type[BaseModel],
    *,
    invalid_retries: int,
    retry_temperature: float,
    send_seed: bool = True,
    check: Callable[[Any], str | None] = lambda _: None,
) -> CallOutcome:
    """Ask (or replay) until the answer validates or the retries are used up.

    A re-ask changes the seed and samples at `retry_temperature`, so it is a new request with its own key."""
    outcome = CallOutcome(answer=None, error="", attempts=0)
    for attempt in range(invalid_retries + 1):
        temperature = request.temperature if attempt == 0 else retry_temperature
        seeded = {**canonical, "seed": request.seed + attempt}
        if attempt:
            seeded["temperature"] = temperature
        key = request_key(seeded)
        outcome.key = outcome.key or key
        record = store.get(key)
        if record is None:
            seed = request.seed + attempt if send_seed else None
            retry = replace(request, key=key, seed=seed, temperature=temperature)
            reply = await client.complete(retry)
            record = {
                "key": key,
                "text": reply.text,
                "finish_reason": reply.finish_reason,
                "tokens_in": reply.tokens_in,
                "tokens_out": reply.tokens_out,
                "seconds": reply.seconds,
                "endpoint": reply.endpoint,
            }
            store.put(key, record)
        else:
            outcome.from_store += 1
        outcome.attempts += 1
        outcome.tokens_in += record["tokens_in"]
        outcome.tokens_out += record["tokens_out"]
        outcome.seconds += record["seconds"]
        try:
            outcome.answer = _parse(record["text"], record["finish_reason"], model, check)
            outcome.error = ""
            return outcome
        except (ValidationError, ValueError) as err:
            outcome.error = str(err).replace("\n", " ")[:300]
    return outcome
