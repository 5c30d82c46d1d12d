"""Both backends trained from the same initial parameters, for several seeds: test ELBOs side by
side and their relative difference (the project's target: within 1%).

    python benchmarks/backend_parity.py --seeds 0 1 2 3 4 --steps 5000
    python benchmarks/backend_parity.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(args) -> list[dict]:
    import torch

    from ppl_vae.pyro.hooks import Model
    from ppl_vae.runs import save_params
    from ppl_vae.spec import load_spec
    from ppl_vae.training import fit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            every = min(args.steps, 500)
            spec = load_spec(args.spec, [f"train.steps={args.steps}", f"train.seed={seed}",
                                         f"train.log_every={every}",
                                         f"train.eval_every={args.steps}",
                                         f"train.checkpoint_every={args.steps}"])
            torch.manual_seed(1000 + seed)
            init = Path(tmp) / f"init{seed}.npz"
            save_params(init, Model(spec, 64, (8, 8), "cpu").export_params())
            row = {"seed": seed}
            for backend in ("pyro", "numpyro"):
                run = fit(spec, backend=backend, out_dir=Path(tmp) / f"{backend}{seed}",
                          progress=False, overrides=[f'train.init="{init}"'])
                row[backend] = run.final_test["elbo"]
            row["rel_diff"] = abs(row["pyro"] - row["numpyro"]) / abs(row["pyro"])
            rows.append(row)
            print(f"seed {seed}: pyro {row['pyro']:.3f}  numpyro {row['numpyro']:.3f}  "
                  f"|diff| {100 * row['rel_diff']:.2f}%", flush=True)
    diffs = np.array([r["rel_diff"] for r in rows])
    pyro = np.array([r["pyro"] for r in rows])
    numpyro = np.array([r["numpyro"] for r in rows])
    print(f"\ntest ELBO (nats) over {len(rows)} seeds: pyro {pyro.mean():.3f} ± {pyro.std():.3f}, "
          f"numpyro {numpyro.mean():.3f} ± {numpyro.std():.3f}; largest |diff| "
          f"{100 * diffs.max():.2f}% (target < 1%)")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default="vae_digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps = [0], 50
    return args


if __name__ == "__main__":
    main(parse_args())
