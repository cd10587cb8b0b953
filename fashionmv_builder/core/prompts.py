"""Prompt templates, versioned by file name: `prompts/<name>.v<N>.txt`. A run names the versions it uses.

The files ship inside the package (`fashionmv_builder.prompts`, mapped from the repository's `prompts/` folder), so
an installed wheel finds them as a clone does."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files


@dataclass(frozen=True)
class Prompt:
    id: str  # e.g. "caption.v1": name and version, recorded with every answer
    text: str


@cache
def load_prompt(prompt_id: str) -> Prompt:
    path = files("fashionmv_builder.prompts").joinpath(f"{prompt_id}.txt")
    try:
        return Prompt(prompt_id, path.read_text(encoding="utf-8").strip())
    except OSError as err:
        raise FileNotFoundError(f"prompt {prompt_id!r} not found: {path} ({err.strerror})") from None
