"""The peer side of the ingest benchmark; runs in .venv-bench: `python imagededup_peer.py IMAGE_DIR`.

imagededup's package `__init__` files import torch (CNN) and matplotlib (plotting), which the PHash path never uses,
so the two sub-packages are registered bare before the hashing module is imported; scikit-learn (used only by the
CNN path) is stubbed. Encoding runs as a plain loop of `encode_image` in this one process: `encode_images` with
`num_enc_workers=0` still forks a worker.
"""

import importlib.util
import json
import sys
import time
import types
from pathlib import Path


def _bare_package(name: str) -> None:
    spec = importlib.util.find_spec(name)
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    sys.modules[name] = module


for _name in ("imagededup.utils", "imagededup.methods"):
    _bare_package(_name)
for _name in ("sklearn", "sklearn.metrics", "sklearn.metrics.pairwise"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
sys.modules["sklearn.metrics.pairwise"].cosine_similarity = None

from imagededup.methods.hashing import PHash  # noqa: E402


def main() -> None:
    files = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.suffix in (".jpg", ".jpeg", ".png"))
    hasher = PHash(verbose=False)
    start = time.perf_counter()
    encodings = [hasher.encode_image(image_file=str(p)) for p in files]
    elapsed = time.perf_counter() - start
    assert all(encodings), "imagededup failed to hash some files"
    print(json.dumps({"images": len(encodings), "seconds": elapsed}))


if __name__ == "__main__":
    main()
