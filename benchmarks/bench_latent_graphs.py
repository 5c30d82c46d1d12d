"""Time per training step of the richer models against the one-layer VAE, in both backends.

The three models of `examples/latent_graphs.py` (MNIST, 784-200-200 tanh networks, batch 128):
the one-layer VAE (50 latents), two stochastic layers (100 + 50, `models/vae2_mnist.toml`) and
the IAF posterior (50 latents, two flow steps, `models/iaf_mnist.toml`), plus the conditional
VAE on the digits. Each (model, backend) trains in its own process (`ppl-vae compare`'s
machinery); ms/step is the median over the logging windows after the first (compilation and
warm-up excluded), and the ratio is against the one-layer VAE in the same backend.

    python benchmarks/bench_latent_graphs.py            # 1000 steps each (about 2 minutes)
    python benchmarks/bench_latent_graphs.py --smoke    # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

MODELS = {  # label -> (spec, overrides)
    "one layer (50)": ("iaf_mnist", ['posterior.kind="diagonal"']),
    "two layers (100, 50)": ("vae2_mnist", []),
    "IAF posterior (50, 2 steps)": ("iaf_mnist", []),
}


def main(argv=None) -> list[dict]:
    from ppl_vae import experiments
    from ppl_vae.compare import compare_backends

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true")
    experiments.add_mnist_argument(parser)
    args = parser.parse_args(argv)
    mnist = experiments.mnist_folder(args.mnist, parser.prog)
    steps = 40 if args.smoke else args.steps
    common = [f"train.steps={steps}", "train.log_every=20" if args.smoke else "train.log_every=100",
              f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    if args.smoke:
        common.append("data.limit=300")
    rows = []
    # the smoke run: one graph model in both backends (it checks that the machinery runs)
    models = {k: v for k, v in MODELS.items() if k.startswith("two")} if args.smoke else MODELS
    with tempfile.TemporaryDirectory() as tmp:
        for label, (spec, overrides) in models.items():
            extra = [f'data.path="{mnist}"', *overrides, *common]
            for row in compare_backends(spec, extra, Path(tmp) / spec / str(len(rows))):
                rows.append(row | {"model": label})
        for row in () if args.smoke else compare_backends("cvae_digits", common,
                                                           Path(tmp) / "cvae"):
            rows.append(row | {"model": "conditional VAE (digits, 4)"})
    base = {r["backend"]: 1000 / r["steps_per_second"] for r in rows
            if r["model"].startswith("one layer")}
    print(f"\nms per training step, batch 128, {steps} steps, CPU (compilation excluded)\n")
    print(f"{'model':<32}{'backend':>9}{'ms/step':>10}{'× one layer':>13}")
    for r in rows:
        ms = 1000 / r["steps_per_second"]
        ratio = (f"{ms / base[r['backend']]:.2f}" if r["backend"] in base
                 and "digits" not in r["model"] else "–")
        print(f"{r['model']:<32}{r['backend']:>9}{ms:>10.2f}{ratio:>13}")
    return rows


if __name__ == "__main__":
    main()
