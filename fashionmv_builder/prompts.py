"""Prompt templates, versioned by file name: `prompts/<name>.v<N>.txt`. A run names the versions it uses."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"


@dataclass(frozen=True)
class Prompt:
    id: str  # e.g. "caption.v1": name and version, recorded with every answer
    text: str


@cache
def load_prompt(prompt_id: str) -> Prompt:
    path = PROMPTS_DIR / f"{prompt_id}.txt"
    try:
        return Prompt(prompt_id, path.read_text().strip())
    except OSError as err:
        raise FileNotFoundError(f"prompt {prompt_id!r} not found: {path} ({err.strerror})") from None
