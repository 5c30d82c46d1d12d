"""bench_peers' trainer for NumPyro's examples/vae.py: its own `main(args)` loop, run unchanged
from an unmodified checkout of the example (``--example PATH/examples/vae.py``; nothing of it is
in this repository).

What this adapter replaces, by name (and why):

* ``numpyro.examples.datasets._load``: returns bench_peers' train.npy images ((N, 28, 28) float32
  in [0, 1], as NumPyro's MNIST loader gives them) instead of downloading; the example's own
  `load_dataset` (a fresh permutation per epoch, ⌊N / batch⌋ minibatches) and its dynamic
  binarisation (``random.bernoulli`` per minibatch inside the compiled epoch) are used as they
  are. The test split is one minibatch: the example evaluates every epoch, the benchmark
  evaluates the snapshots.
* ``stax``: the namespace the example's networks read, with ``Softplus`` -> ``Relu`` (the
  benchmark's network is 784-400-20 with ReLU); ``z_dim=20`` (default 50) through its args.
* ``plt``: ``imsave`` does nothing (the example writes two PNGs per epoch).
* ``SVI``: NumPyro's own, with ``get_params`` also closing the epoch: the example calls it on
  concrete values once per epoch, after the compiled epoch (``jax.block_until_ready`` waits for
  it there); its calls while tracing (inside ``svi.evaluate``) are left alone. The clock stops
  there and restarts when the next epoch calls the training split's ``init`` (`load_dataset`
  wrapped): the rest of the example's per-epoch reconstruction plot is not timed. Its test
  evaluation (one minibatch) comes before ``get_params`` and is timed: about a second in the
  first epoch (its compilation), nothing after.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import protocol  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol.add_common_args(parser)
    parser.add_argument("--example", required=True, help="path to NumPyro's examples/vae.py")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import numpyro
    import numpyro.examples.datasets as datasets
    from jax.example_libraries import stax
    from numpyro.infer import SVI

    images = protocol.load_images(args.data).reshape(-1, 28, 28)
    labels = np.zeros(len(images), np.int8)
    test = (np.random.default_rng(1).random((args.batch_size, 28, 28), np.float32),
            labels[: args.batch_size])

    def load(dset, num_datapoints=None):
        return {"train": (images, labels), "test": test}

    datasets._load = load
    clock = protocol.Clock()
    steps_per_epoch = len(images) // args.batch_size
    recorder = protocol.Recorder(args.out, clock, "exp", steps_per_epoch,
                                 steps_per_epoch * args.batch_size)

    def snapshot(params):
        (w1, b1), _, _, ((wl, bl), ((ws, bs), _)) = params["encoder$params"]
        (dw1, db1), _, (dw2, db2), _ = params["decoder$params"]
        # stax's Dense computes x @ W (W is (in, out)); the snapshot holds (out, in)
        parts = {"enc.W1": w1.T, "enc.b1": b1, "enc.loc.W": wl.T, "enc.loc.b": bl,
                 "enc.scale.W": ws.T, "enc.scale.b": bs, "dec.W1": dw1.T, "dec.b1": db1,
                 "dec.out.W": dw2.T, "dec.out.b": db2}
        return {k: np.asarray(v) for k, v in parts.items()}

    class EpochSVI(SVI):
        def get_params(self, svi_state):
            params = super().get_params(svi_state)
            if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
                return params  # inside a compiled function (svi.evaluate): not the epoch's end
            jax.block_until_ready(params)
            recorder.epoch_end(lambda: snapshot(params), stop=True)
            return params

    def load_dataset(*a, **kw):
        init, fetch = datasets.load_dataset(*a, **kw)
        if kw.get("split") != "train":
            return init, fetch

        def init_and_resume():  # the example calls it as each epoch starts
            clock.resume()
            return init()

        return init_and_resume, fetch

    spec = importlib.util.spec_from_file_location("numpyro_vae_example", args.example)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.stax = types.SimpleNamespace(**vars(stax))
    example.stax.Softplus = stax.Relu
    example.plt = types.SimpleNamespace(imsave=lambda *a, **kw: None)
    example.SVI = EpochSVI
    example.load_dataset = load_dataset
    example.key = lambda seed: jax.random.key(args.seed)  # the example seeds with key(0)
    run_args = argparse.Namespace(num_epochs=args.epochs, learning_rate=args.lr,
                                  batch_size=args.batch_size, z_dim=20, hidden_dim=400)
    clock.start()
    example.main(run_args)
    recorder.done(library=f"NumPyro {numpyro.__version__} examples/vae.py",
                  example=str(Path(args.example).resolve()), jax=jax.__version__,
                  changed="data loading (train.npy), Softplus -> Relu, z_dim 50 -> 20, test "
                          "evaluation on one minibatch, no PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
