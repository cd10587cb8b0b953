"""Image vectors cached by content hash: a view is encoded once across reruns, shards and datasets.

One small file per image and encoder, `<cache>/<encoder key>/<sha256[:2]>/<sha256>.f32` (its dimension, then the
float32 vector), as the LMM answer store keeps one file per request: shards and worker processes write their own
files without locks, fsspec reads and writes them in batches on any filesystem, and a file cut short by a crash does
not match its recorded dimension and is encoded again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fashionmv_builder.core.config import digest


class VectorCache:
    def __init__(self, fs: Any, folder: str, identity: dict) -> None:
        self.fs = fs
        self.folder = f"{folder.rstrip('/')}/{digest(identity)[:16]}"

    def _path(self, sha256: str) -> str:
        return f"{self.folder}/{sha256[:2]}/{sha256}.f32"

    def get(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """The cached vectors of these image hashes (those not cached, or cut short, are left out)."""
        if not hashes:
            return {}
        wanted = {self.fs._strip_protocol(self._path(h)): h for h in set(hashes)}
        found = self.fs.cat(list(wanted), on_error="omit")
        vectors = {}
        for path, data in found.items():
            dim = int(np.frombuffer(data[:4], dtype=np.int32)[0]) if len(data) >= 4 else -1
            if len(data) == 4 + 4 * dim and dim > 0:  # a file cut short by a crash is encoded again
                vectors[wanted[self.fs._strip_protocol(path)]] = np.frombuffer(data[4:], dtype=np.float32)
        return vectors

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        """Store vectors by image hash: a 4-byte dimension, then the float32 values."""
        if not vectors:
            return
        for prefix in {h[:2] for h in vectors}:
            self.fs.makedirs(f"{self.folder}/{prefix}", exist_ok=True)
        files = {}
        for h, v in vectors.items():
            row = np.asarray(v, dtype=np.float32)
            files[self._path(h)] = np.int32(row.size).tobytes() + row.tobytes()
        self.fs.pipe(files)
