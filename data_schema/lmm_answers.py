"""The JSON answers every LMM call must give, as pydantic models built from the configured length bounds.

One model per call serves twice: its JSON schema goes to vLLM as `response_format`, so constrained decoding
enforces every bound (word counts as regex patterns, `maxLength`, `maxItems`, enums), and the same model validates
the answer that comes back. Even a random-weight model then answers in the right shape. Word bounds live in the
config, so a run can trade caption length for tokens; they are part of the schema and so of every request's key.

The models and their schemas are built once per set of arguments (`cache`): building them per item took about a fifth of
the caption stage's CPU time once its views were prepared (bench_photos profile, BENCHMARKS.md). Treat a returned
schema as read-only: every request of the same shape shares it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

VIEW_TYPES = ("front", "back", "side", "detail", "full", "other")
WEARER_LEFT = ("image_left", "image_right", "not_visible")  # on which side of the image the wearer's left is
GENDERS = ("men", "women", "unisex", "unknown")
# A word: printable ASCII without quote or backslash (they would need JSON escapes that constrained decoding then
# must also get right), at most 20 characters; this also bounds the tokens an answer can take.
_WORD = r"[!#-\[\]-~]{1,20}"


def words(low: int, high: int) -> type[str]:
    """A string of `low`..`high` words separated by single spaces, as a pattern constrained decoding can enforce."""
    pattern = rf"^{_WORD}( {_WORD}){{{low - 1},{high - 1}}}$"
    return Annotated[str, StringConstraints(pattern=pattern)]  # the pattern bounds the length too


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


class WordBounds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    view_caption: tuple[int, int] = (8, 40)
    long_caption: tuple[int, int] = (200, 400)
    short_caption: tuple[int, int] = (30, 60)
    verifier_reason: tuple[int, int] = (1, 40)
    wrong_claim: tuple[int, int] = (1, 20)
    modification_short: tuple[int, int] = (16, 32)
    modification_long: tuple[int, int] = (64, 128)


@cache
def caption_answer(bounds: WordBounds, n_views: int) -> type[_Answer]:
    """One caption per image, in image order: item k describes [Image k], so the schema fixes the count."""
    view = create_model(
        "ViewCaption",
        __base__=_Answer,
        view_type=(Literal[VIEW_TYPES], ...),
        wearer_left_on=(Literal[WEARER_LEFT], ...),
        caption=(words(*bounds.view_caption), ...),
    )
    return create_model(
        "CaptionAnswer",
        __base__=_Answer,
        views=(list[view], Field(min_length=n_views, max_length=n_views)),
        long_caption=(words(*bounds.long_caption), ...),
        short_caption=(words(*bounds.short_caption), ...),
        category=(Annotated[str, StringConstraints(pattern=r"^[a-z][a-z -]{0,30}$")], ...),
        gender=(Literal[GENDERS], ...),
        is_clothing=(bool, ...),
    )


@cache
def verdict_answer(bounds: WordBounds) -> type[_Answer]:
    return create_model(
        "VerdictAnswer",
        __base__=_Answer,
        verdict=(Literal["pass", "remove"], ...),
        reason=(words(*bounds.verifier_reason), ...),
        wrong_claims=(list[words(*bounds.wrong_claim)], Field(max_length=3)),
    )


@cache
def schema_of(model: type[BaseModel]) -> dict:
    return model.model_json_schema()


@cache
def schema_digest(model: type[BaseModel]) -> str:
    return hashlib.sha256(json.dumps(schema_of(model), sort_keys=True).encode()).hexdigest()[:16]


VIEWS_INVOLVED = ("front", "back", "side", "detail", "full")


@cache
def selection_answer(
    bounds: WordBounds,
    n_candidates: int,
    max_targets: int,
    min_targets: int = 0,
    min_views: int = 1,
    paraphrases: int = 1,
) -> type[_Answer]:
    """`min_targets`..`max_targets` choices among candidates 1..n, each with `paraphrases` short modification texts
    (the schema fixes their count; their distinctness is the stage's check: `uniqueItems` is not among the keywords
    every constrained decoder enforces), one long text and its views."""
    choice = create_model(
        "Choice",
        __base__=_Answer,
        candidate=(Literal[tuple(range(1, n_candidates + 1))], ...),
        views_involved=(list[Literal[VIEWS_INVOLVED]], Field(min_length=min_views, max_length=len(VIEWS_INVOLVED))),
        modifications_short=(
            list[words(*bounds.modification_short)],
            Field(min_length=paraphrases, max_length=paraphrases),
        ),
        modification_long=(words(*bounds.modification_long), ...),
    )
    count = Field(min_length=min(min_targets, n_candidates), max_length=max_targets)
    return create_model("SelectionAnswer", __base__=_Answer, choices=(list[choice], count))


@cache
def discrimination_answer(n_candidates: int) -> type[_Answer]:
    """The one candidate (1..n) a modification text describes."""
    return create_model(
        "DiscriminationAnswer", __base__=_Answer, candidate=(Literal[tuple(range(1, n_candidates + 1))], ...)
    )
