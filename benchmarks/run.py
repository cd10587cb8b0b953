"""`make bench`: every benchmark, printed as ratios against a peer measured in the same run.

This machine is shared and noisy, so each figure is a median of interleaved repetitions and the headline is always a
ratio, never an absolute time. `--smoke` runs each benchmark on tiny inputs so none of them rots.
"""

from __future__ import annotations

import argparse

from benchmarks import (
    bench_dedupe,
    bench_encoders,
    bench_eval,
    bench_incremental,
    bench_ingest,
    bench_learns,
    bench_lmm,
    bench_mining,
    bench_photos,
    bench_train,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, one repetition: checks that it runs")
    args = parser.parse_args()
    bench_ingest.main(smoke=args.smoke)
    bench_dedupe.main(smoke=args.smoke)
    bench_encoders.main(smoke=args.smoke)
    bench_mining.main(smoke=args.smoke)
    bench_lmm.main(smoke=args.smoke)
    bench_incremental.main(smoke=args.smoke)
    bench_photos.main(smoke=args.smoke)
    bench_eval.main(smoke=args.smoke)
    bench_train.main(smoke=args.smoke)
    bench_learns.main(smoke=args.smoke)


if __name__ == "__main__":
    main()
