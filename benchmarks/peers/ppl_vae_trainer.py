"""bench_peers' trainer for ppl_vae: `ppl_vae.fit` on models/vae_mnist.toml, as a user calls it.

The spec is the bundled one (784-400-20 MLPs, ReLU, Bernoulli, dynamic binarisation, Adam,
analytic KL) with only what the benchmark must fix set by overrides: the steps (``--epochs`` ×
⌈N / batch⌉, ppl_vae draws minibatches with replacement, so an "epoch" is that many steps),
batch, lr, seed, threads, and a logging window that divides an epoch (so a checkpoint lands on
each epoch's last step). The data are handed to `fit` as a `Dataset` built from the same
train.npy the peers read.

Two of fit's module functions are wrapped (attribute replacement in this process only, nothing in
ppl_vae is edited): ``training._save`` (the checkpoint at each epoch's end, which a user with the
default ``checkpoint_every`` writes less often and the peers never write) and
``training.evaluate`` (ppl_vae's own test evaluation, at the last step only). Both run with the
benchmark's clock paused; the checkpoint's seconds are reported in done.json. The epoch's snapshot
is taken inside the checkpoint wrapper, from ``trainer.model.export_params()``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import protocol  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: ppl_vae's canonical parameter names -> the snapshot's.
CANONICAL = {
    "encoder.body.layers.0.weight": "enc.W1", "encoder.body.layers.0.bias": "enc.b1",
    "encoder.loc.weight": "enc.loc.W", "encoder.loc.bias": "enc.loc.b",
    "encoder.scale.weight": "enc.scale.W", "encoder.scale.bias": "enc.scale.b",
    "decoder.body.layers.0.weight": "dec.W1", "decoder.body.layers.0.bias": "dec.b1",
    "decoder.out.weight": "dec.out.W", "decoder.out.bias": "dec.out.b",
}


def log_window(steps_per_epoch: int, at_most: int = 100) -> int:
    """The largest divisor of `steps_per_epoch` that is at most `at_most` (the spec's 100)."""
    return max(d for d in range(1, min(at_most, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol.add_common_args(parser)
    parser.add_argument("--backend", choices=["numpyro", "pyro"], required=True)
    parser.add_argument("--spec", default=str(ROOT / "models" / "vae_mnist.toml"))
    parser.add_argument("--test-data", help="test.npy (uint8) for ppl_vae's own final "
                        "evaluation (default: the first 1000 training images)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="another spec override, after the "
                        "benchmark's (e.g. train.init=PARAMS.npz); repeatable")
    args = parser.parse_args(argv)

    import ppl_vae
    from ppl_vae import training
    from ppl_vae.backends import backend_module
    from ppl_vae.data import Dataset

    backend_module(args.backend, "train")  # import the framework before the clock starts
    x = protocol.load_images(args.data)
    x_test = protocol.load_images(args.test_data) if args.test_data else x[:1000]
    dataset = Dataset(x_train=x, x_test=x_test, labels_train=np.full(len(x), -1, np.int64),
                      labels_test=np.full(len(x_test), -1, np.int64), image_shape=(28, 28),
                      name=f"npy:{args.data}")
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    steps = args.epochs * steps_per_epoch
    overrides = [f"train.steps={steps}", f"train.batch_size={args.batch_size}",
                 f"train.lr={args.lr}", f"train.seed={args.seed}", f"train.threads={args.threads}",
                 f"train.log_every={log_window(steps_per_epoch)}", f"train.eval_every={steps}",
                 f"train.checkpoint_every={steps_per_epoch}", 'train.device="cpu"',
                 *args.overrides]
    spec = ppl_vae.load_spec(args.spec, overrides)

    clock = protocol.Clock()
    recorder = protocol.Recorder(args.out, clock, "softplus", steps_per_epoch,
                                 steps_per_epoch * args.batch_size)
    checkpoint_seconds = []
    save, evaluate = training._save, training.evaluate

    def timed_save(trainer, *rest):
        if trainer.step % steps_per_epoch == 0:
            recorder.epoch_end(lambda: {CANONICAL[k]: v for k, v in
                                        trainer.model.export_params().items() if k in CANONICAL})
        with clock.pause():
            t0 = time.perf_counter()
            save(trainer, *rest)
            checkpoint_seconds.append(time.perf_counter() - t0)

    def timed_evaluate(*a, **kw):
        with clock.pause():
            return evaluate(*a, **kw)

    training._save, training.evaluate = timed_save, timed_evaluate
    clock.start()
    ppl_vae.fit(spec, backend=args.backend, out_dir=Path(args.out) / "run", overwrite=True,
                progress=False, dataset=dataset)
    recorder.done(library=f"ppl_vae {ppl_vae.__version__} ({args.backend})", spec=args.spec,
                  overrides=overrides, checkpoint_seconds=sum(checkpoint_seconds),
                  checkpoints=len(checkpoint_seconds), steps_per_epoch=steps_per_epoch,
                  versions=_versions(args.backend))
    return 0


def _versions(backend: str) -> dict:
    from importlib.metadata import version

    names = ["jax", "numpyro", "flax", "optax"] if backend == "numpyro" else ["torch", "pyro-ppl"]
    return {n: version(n) for n in names}


if __name__ == "__main__":
    sys.exit(main())
