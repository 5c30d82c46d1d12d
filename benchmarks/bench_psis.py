"""Seconds that `ppl_vae.arviz_compat.psis` (Pareto-smoothed importance sampling, used by `eval`
for the IWAE estimate's k̂ diagnostics) takes for one evaluation set: 2000 examples x 1000
importance draws, the largest `eval` uses by default. It replaced a timed assert in the test suite
(issue 11: speed is measured here, by hand, never in the tests).

    python benchmarks/bench_psis.py            # a few seconds
    python benchmarks/bench_psis.py --smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np

TARGET_SECONDS = 5.0


def main(args) -> float:
    from ppl_vae import arviz_compat

    lw = np.random.default_rng(3).standard_normal((args.examples, args.draws))
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        arviz_compat.psis(lw)
        best = min(best, time.perf_counter() - start)
    met = "met" if best < TARGET_SECONDS else "NOT met"
    print(f"psis on ({args.examples}, {args.draws}) log weights: {best:.2f} s (best of "
          f"{args.repeats}); target < {TARGET_SECONDS:.0f} s for (2000, 1000): {met}")
    return best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.examples, args.draws, args.repeats = 20, 100, 1
    return args


if __name__ == "__main__":
    main(parse_args())
