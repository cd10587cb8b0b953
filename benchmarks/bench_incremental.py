"""Incremental builds: what adding 10% of products with interleaved ids costs, against a full build of the grown
catalogue measured in the same run (the peer: what every catalogue change cost before builds were incremental).

The sample's folder layout in shards of 25, answered by the ground-truth server (instant, so only our side and the
request counts are measured). Printed per stage: the first build's requests, the rerun's requests sent / replayed /
carried over, and the shards it redid and rewrote; then the rerun's requests and wall time as ratios of the full
build's. Target: Stage 3 sends requests only for the new sources.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fashionmv_builder.devtools.catalogue_changes import (
    bring_back,
    folder_products,
    interleaved,
    set_aside,
    truth_config,
)
from fashionmv_builder.devtools.ground_truth_server import serve_ground_truth
from fashionmv_builder.devtools.sample_catalogue import generate_sample
from fashionmv_builder.pipeline import run_local

STAGES = ("ingest", "dedupe", "caption", "verify", "embed", "candidates", "select")


def _run(config) -> tuple[dict[str, dict], float]:
    start = time.perf_counter()
    reports = run_local(config)
    return {stage: rs[0].run for stage, rs in reports.items()}, time.perf_counter() - start


def _sent(run: dict) -> int:
    return sum(run[s]["counts"].get("requests_sent", 0) for s in ("caption", "verify", "select") if s in run)


def main(smoke: bool = False) -> None:
    products = 60 if smoke else 200
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        base = Path(tmp)
        catalogue = base / "catalogue"
        generate_sample(catalogue, products=products, seed=0)
        root = catalogue / "folder"
        added = interleaved(folder_products(root), 0.1)
        set_aside(root, base / "aside", added)
        with serve_ground_truth(catalogue, media_root=base) as (url, _answerer):
            first, _ = _run(truth_config(root, base / "out", url))
            bring_back(root, base / "aside", added)
            rerun, rerun_seconds = _run(truth_config(root, base / "out", url))
            full, full_seconds = _run(truth_config(root, base / "full", url))
    print(f"\nincremental build: {products} products, +{len(added)} with interleaved ids, shards of 25")
    print(f"{'stage':<11} {'first: sent':>11} {'rerun: sent/replayed/carried':>29} {'redone/rewritten':>17}")
    for stage in STAGES:
        c, r = rerun[stage]["counts"], rerun[stage]
        asked = f"{c.get('requests_sent', '-')}/{c.get('answers_replayed', '-')}/{c.get('answers_carried_over', '-')}"
        sent = first[stage]["counts"].get("requests_sent", "-")
        print(f"{stage:<11} {sent:>11} {asked:>29} {r['shards_redone']:>8}/{r['shards_rewritten']:<8}")
    print(
        f"rerun ÷ full build of the grown catalogue: requests sent {_sent(rerun)}/{_sent(full)} = "
        f"{_sent(rerun) / max(1, _sent(full)):.2f}, Stage 3 {rerun['select']['counts'].get('requests_sent', 0)}/"
        f"{full['select']['counts'].get('requests_sent', 0)}, wall time {rerun_seconds / full_seconds:.2f}"
    )


if __name__ == "__main__":
    main()
