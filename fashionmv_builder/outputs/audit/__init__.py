"""Human audit of Stage-1 captions, as in FashionMV: a seeded sample of captioned products (the verifier's removals
included, its verdict hidden) labelled by hand on a local page, then scored against the verifier's verdicts.

Modules: `labels` (the sample and the labels file, pure functions), `data` (reading the build), `app` (the page),
`score` (rates and the verifier's precision/recall).
"""
