"""ProCIR, FashionMV's retriever: the model wrapper, FashionMV's data files, and its evaluation protocol.

`recall` and `data` need only numpy and PIL; `model`, `evaluate` and `tiny` need the `ml` extra (torch, transformers).
"""
