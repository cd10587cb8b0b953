"""Make PyPI's CUDA torchvision importable beside a CPU-only torch (the vLLM CPU venv only).

Its compiled ops need libtorch_cuda, so they never load, and `torchvision/_meta_registrations.py` then fails at import
registering fake kernels for ops that do not exist. We make those registrations conditional on the ops being
loaded. The pure-Python transforms, which is all the Qwen-VL processors use, then work; `torchvision.ops` does not.
"""

import importlib.util
from pathlib import Path

MARK = "_fashionmv_register_fake"


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    source = path.read_text()
    if MARK in source:
        print(f"already patched: {path}")
        return
    helper = (
        f"\n\ndef {MARK}(name):\n"
        "    if not torchvision.extension._has_ops():\n"
        "        return lambda fn: fn\n"
        "    return torch.library.register_fake(name)\n\n\n"
    )
    first = source.index("@register_meta(")
    patched = source[:first] + helper + source[first:].replace("@torch.library.register_fake(", f"@{MARK}(")
    path.write_text(patched)
    print(f"patched {path}")


if __name__ == "__main__":
    main()
