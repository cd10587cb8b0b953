"""Prompt templates of every LMM call, versioned by file name (`<name>.v<N>.txt`).

Packaged as `fashionmv_builder.prompts` (pyproject.toml maps this folder)."""
