"""Pyro's examples/vae/ss_vae_M2.py on this machine, its own protocol, its own code: the peer of
the M2 rows of examples/mnist_table.py (issue 23), whose published accuracies (0.9319 at 100
labels, 0.9487 at 1000, 0.9582 at 3000) come from this script.

Run from an unmodified checkout of Pyro (``--example PATH/examples/vae/ss_vae_M2.py``; nothing of
it is in this repository). The script reads MNIST through torchvision, which this environment
lacks (torchvision pins its own torch build); this adapter stubs, by name:

* ``torchvision.datasets.MNIST``: the 60 000 training or the 10 000 test images and labels of
  the IDX files in ``--mnist`` (read by ``ppl_vae.data.read_idx``), as the uint8 ``data`` and
  int64 ``targets`` tensors torchvision's class holds. Everything after that is the example's
  ``utils/mnist_cached.py``: the grey values scaled to [0, 1] (no binarisation), the last
  10 000 training images as the validation set, the first ``sup_num / 10`` images of each class
  among the other 50 000 as the labelled ones, DataLoaders of ``-bs`` that shuffle.
* ``visdom`` (plots; ``--visualize`` is never given).

Everything else is the example's: the networks (``utils/custom_mlp.py``, its N(0, 0.001²)
initialisation), the model and guide, ``TraceEnum_ELBO`` with parallel enumeration, the α-term
as a second SVI, Pyro's Adam, the epoch loop that puts the labelled batches among the
unlabelled ones every ``50000 / sup_num`` batches, and its log: each epoch's validation and test
accuracy, and at the end the test accuracy at the best validation accuracy (the number Pyro's
tutorial tabulates) and the last one.

    python benchmarks/peers/pyro_m2_trainer.py \\
        --example /work/peers/pyro/examples/vae/ss_vae_M2.py \\
        --sup-num 100 --seed 0 --log /tmp/m2_100.log     # 47 s an epoch on one CPU thread

The remaining arguments go to the example unchanged (default: its README's command for the
tutorial's table, ``-n 50 --aux-loss -alm 46 -enum parallel -zd 50 -hl 500 -lr 0.00042 -b1 0.95
-bs 200``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The tutorial's command (Pyro's examples/vae/ss_vae_M2.py docstring), without --cuda.
TUTORIAL = ["-n", "50", "--aux-loss", "-alm", "46", "-enum", "parallel", "-zd", "50", "-hl", "500",
            "-lr", "0.00042", "-b1", "0.95", "-bs", "200"]


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _torchvision_stub(folder: Path) -> None:
    """`torchvision.datasets.MNIST` (and what pyro.contrib.examples.util imports with it) over
    the IDX files of `folder`."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from ppl_vae.data import MNIST_FILES, _find_file, read_idx

    class MNIST(torch.utils.data.Dataset):
        resources, mirrors = [], []

        def __init__(self, root=None, train=True, transform=None, target_transform=None,
                     download=False):
            images, labels = (_find_file(folder, n) for n in MNIST_FILES["train" if train
                                                                          else "test"])
            self.data = torch.from_numpy(np.ascontiguousarray(read_idx(images)))
            self.targets = torch.from_numpy(read_idx(labels).astype(np.int64))

        def __len__(self):
            return len(self.data)

    datasets = _stub("torchvision.datasets", MNIST=MNIST, URLError=OSError,
                     utils=types.SimpleNamespace())
    _stub("torchvision", datasets=datasets, transforms=_stub("torchvision.transforms"))


def main(argv=None) -> int:
    # no -h and no abbreviations: the example's own flags (-hl, -lr, …) pass through untouched
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--example", required=True, help="Pyro's examples/vae/ss_vae_M2.py")
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist",
                        help="the folder of the four MNIST IDX files")
    parser.add_argument("--sup-num", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--log", default="./ss_vae_M2.log", help="the example's -log file")
    args, rest = parser.parse_known_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    _torchvision_stub(args.mnist)
    _stub("visdom", Visdom=None)
    example_dir = str(Path(args.example).resolve().parent)
    sys.path.insert(0, example_dir)  # its utils/ package
    os.chdir(example_dir)  # (get_data_directory: a .data folder the stub never reads)
    spec = importlib.util.spec_from_file_location("ss_vae_M2", args.example)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example_args = [*(rest or TUTORIAL), "-sup", str(args.sup_num), "--seed", str(args.seed),
                    "-log", str(Path(args.log).resolve())]
    print("ss_vae_M2.py " + " ".join(example_args), flush=True)
    # the example's parser: its own main block builds it inline, so parse as it does
    parsed = _example_parser(args.example, vars(example)).parse_args(example_args)
    example.main(parsed)
    return 0


def _example_parser(path: str, names: dict) -> argparse.ArgumentParser:
    """The example's argparse parser, taken from its ``if __name__ == "__main__":`` block (the
    lines up to ``args = parser.parse_args()``, run among the module's `names`), so that every
    default is the example's. Its version assert (Pyro 1.9.1) is left out: this runs 1.9.x."""
    source = Path(path).read_text()
    block = source[source.index('if __name__ == "__main__":'):]
    body = block[block.index("\n") + 1:block.index("args = parser.parse_args()")]
    lines = [line[4:] for line in body.splitlines() if not line.strip().startswith("assert ")]
    namespace = dict(names)
    exec("\n".join(lines), namespace)  # noqa: S102 (the peer's own parser, from its file)
    return namespace["parser"]

if __name__ == "__main__":
    sys.exit(main())
