"""bench_peers' trainer for Pyro's examples/vae/vae.py: its own `main(args)` loop, run unchanged
from an unmodified checkout of the example (``--example PATH/examples/vae/vae.py``; nothing of it
is in this repository).

What this adapter replaces, by name, in the imported example module (and why):

* ``setup_data_loaders``: MNIST from bench_peers' train.npy instead of torchvision's download.
  The loader is the example's kind (a per-index dataset of float tensors in [0, 1], a
  DataLoader that shuffles, no workers), with batch 128 instead of the example's hard-coded 256,
  and each minibatch binarised by one Bernoulli draw per pixel (``torch.bernoulli``) as it is
  handed out: the example trains on the grey values, the benchmark on dynamic binarisation. Its
  exhaustion marks the epoch's end (the snapshot); the clock stops there and restarts when the
  next epoch asks for its first minibatch (the loss print and the test evaluation are not
  timed). The test loader holds one minibatch: the example evaluates at epoch 0 and every
  ``-tf`` epochs, the benchmark evaluates the snapshots.
* ``nn``: the module namespace the example's networks read, with ``Softplus`` -> ``ReLU`` (the
  benchmark's network is 784-400-20 with ReLU); ``VAE`` is built with ``z_dim=20`` (default 50).
* ``visdom``, ``utils.mnist_cached`` and ``utils.vae_plots`` are stubbed (plots, downloads).

Everything else (the model, the guide, ``Trace_ELBO`` or ``--jit`` ``JitTrace_ELBO``, Pyro's
Adam, the loop, ``svi.step`` per minibatch) is the example's code.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import protocol  # noqa: E402


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    protocol.add_common_args(parser)
    parser.add_argument("--example", required=True, help="path to Pyro's examples/vae/vae.py")
    parser.add_argument("--jit", action="store_true", help="the example's --jit (JitTrace_ELBO)")
    args = parser.parse_args(argv)

    import pyro
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(args.threads)
    x = torch.from_numpy(protocol.load_images(args.data))
    clock = protocol.Clock()
    steps_per_epoch = -(-len(x) // args.batch_size)
    recorder = protocol.Recorder(args.out, clock, "exp", steps_per_epoch, len(x))
    built = {}

    def snapshot():
        enc, dec = built["vae"].encoder, built["vae"].decoder
        parts = {"enc.W1": enc.fc1.weight, "enc.b1": enc.fc1.bias, "enc.loc.W": enc.fc21.weight,
                 "enc.loc.b": enc.fc21.bias, "enc.scale.W": enc.fc22.weight,
                 "enc.scale.b": enc.fc22.bias, "dec.W1": dec.fc1.weight, "dec.b1": dec.fc1.bias,
                 "dec.out.W": dec.fc21.weight, "dec.out.b": dec.fc21.bias}
        return {k: v.detach().cpu().numpy().copy() for k, v in parts.items()}

    class BinarisedEpochs:
        """The training loader: binarises each minibatch; its end is the epoch's end."""

        def __init__(self, loader):
            self.loader, self.dataset = loader, loader.dataset

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            clock.resume()
            for images, labels in self.loader:
                yield torch.bernoulli(images), labels
            recorder.epoch_end(snapshot, stop=True)  # restarted as the next epoch starts

    def setup_data_loaders(dataset, use_cuda, batch_size, **kwargs):  # the example's signature
        labels = torch.zeros(len(x))
        train = DataLoader(TensorDataset(x, labels), batch_size=args.batch_size, shuffle=True,
                           num_workers=0, pin_memory=False)
        seeded = torch.Generator().manual_seed(1)
        test_images = torch.bernoulli(x[: args.batch_size], generator=seeded)
        test = DataLoader(TensorDataset(test_images, labels[: args.batch_size]),
                          batch_size=args.batch_size)
        return BinarisedEpochs(train), test

    def nothing(*a, **kw):
        return None

    _stub("visdom", Visdom=nothing)
    _stub("utils", __path__=[])
    _stub("utils.mnist_cached", MNISTCached=None, setup_data_loaders=setup_data_loaders)
    _stub("utils.vae_plots", mnist_test_tsne=nothing, plot_llk=nothing, plot_vae_samples=nothing)
    spec = importlib.util.spec_from_file_location("pyro_vae_example", args.example)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.nn = types.SimpleNamespace(**vars(torch.nn))
    example.nn.Softplus = torch.nn.ReLU
    upstream_vae = example.VAE

    def make_vae(**kwargs):
        built["vae"] = upstream_vae(z_dim=20, hidden_dim=400, **kwargs)
        return built["vae"]

    example.VAE = make_vae
    run_args = argparse.Namespace(num_epochs=args.epochs, test_frequency=args.epochs + 1,
                                  learning_rate=args.lr, cuda=False, jit=args.jit,
                                  visdom_flag=False, tsne_iter=args.epochs + 1)
    pyro.set_rng_seed(args.seed)
    np.random.seed(args.seed)
    clock.start()
    example.main(run_args)
    recorder.done(library=f"Pyro {pyro.__version__} examples/vae/vae.py"
                  + (" --jit" if args.jit else ""), example=str(Path(args.example).resolve()),
                  torch=torch.__version__, threads=torch.get_num_threads(),
                  changed="data loading (train.npy, batch 128, dynamic binarisation), Softplus "
                          "-> ReLU, z_dim 50 -> 20, test evaluation on one minibatch, no plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
