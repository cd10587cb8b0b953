"""The peer side of the dedupe benchmark; runs in .venv-bench: `python imagededup_search_peer.py CODES.npy RADIUS`.

imagededup is imported the same way as for the ingest benchmark (imagededup_peer.py: no torch, no matplotlib). The
codes become its encoding map (file name → 16-hex-digit hash) and `PHash.find_duplicates` runs with its defaults:
the Cython brute-force search, one worker process per core. Prints seconds, the pairs found and peak memory.
"""

import json
import resource
import sys
import time

import numpy as np
from imagededup_peer import PHash  # registers the bare imagededup packages first


def main() -> None:
    codes = np.load(sys.argv[1])
    radius = int(sys.argv[2])
    encodings = {str(i): f"{int(c):016x}" for i, c in enumerate(codes)}
    hasher = PHash(verbose=False)
    start = time.perf_counter()
    found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=radius)
    elapsed = time.perf_counter() - start
    pairs = sum(len(v) for v in found.values()) // 2  # each pair is listed under both of its images
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"seconds": elapsed, "pairs": pairs, "peak_mb": peak / 1024}))


if __name__ == "__main__":
    main()
