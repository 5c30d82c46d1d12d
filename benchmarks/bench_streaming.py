"""Throughput of streamed training data (`ppl_vae.streaming`) against the in-memory path.

For each backend, in a fresh process of its own, two trainers of the same spec train on the same
npy source folder (x.npy memory-mapped): one with data.stream = "off" (the training array copied
to the device once, indices drawn on the device) and one with data.stream = "on" (minibatch rows
gathered from the memory map by a background thread, one window ahead, and handed to the step).
Each times `Trainer.run_steps` (the training step alone: no evaluation, no checkpoints) after two
warm-up windows, the in-memory trainer first. It prints ms/step and the ratio streamed /
in-memory per backend (> 1: streaming costs more).

The data are vae_mnist's (60000 x 784 float32, 188 MB, from the MNIST files of --mnist,
default $PPL_VAE_MNIST, else ../shared/data/mnist beside the repository; random values in
[0, 1] of that size when they are missing), written to a temporary
folder first, so x.npy sits in the page cache: this measures the gather and hand-over, not a
disk. The spec is vae_mnist (784-400-20, batch 128). Nothing is asserted.

    python benchmarks/bench_streaming.py           # ~1 minute on 2 cores
    python benchmarks/bench_streaming.py --smoke   # a few steps on a small folder: checks
                                                   # that both ways run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_folder(folder: Path, smoke: bool, mnist: Path | None) -> str:
    """x.npy (and x_test.npy) of vae_mnist's size, from the MNIST folder `mnist` where there is
    one; returns where the values came from."""
    if smoke:
        x, where = np.random.default_rng(0).random((2000, 784), dtype=np.float32), "random"
    elif mnist is not None:
        from ppl_vae.data import load_data
        from ppl_vae.spec import load_spec

        d = load_data(load_spec("vae_mnist", [f'data.path="{mnist}"']))
        x, where = d.x_train, "MNIST"
        np.save(folder / "x_test.npy", d.x_test)
    else:
        x, where = np.random.default_rng(0).random((60000, 784), dtype=np.float32), "random"
    np.save(folder / "x.npy", x)
    if not (folder / "x_test.npy").exists():
        np.save(folder / "x_test.npy", x[:1000])
    return where


def worker(backend: str, folder: str, windows: int, window: int) -> None:
    """Time `windows` windows of `window` steps per way after two warm-up windows; print JSON."""
    from ppl_vae.backends import backend_module
    from ppl_vae.data import load_data
    from ppl_vae.schedules import step_scalars
    from ppl_vae.spec import load_spec

    train_mod = backend_module(backend, "train")
    out = {"backend": backend}
    for mode in ("off", "on"):
        spec = load_spec("vae_mnist", ['data.source="npy"', f'data.path="{folder}"',
                                       "train.batch_size=128", f"train.log_every={window}",
                                       f"data.stream={mode}"])
        trainer = train_mod.Trainer(spec, load_data(spec), "cpu")
        betas = step_scalars(spec, np.arange(window), trainer.n_train)
        for _ in range(2):  # compilation (NumPyro compiles again for its donated state),
            trainer.run_steps(betas, 1.0)  # allocation, Adam's state, the thread
        t0 = time.perf_counter()
        for _ in range(windows):
            trainer.run_steps(betas, 1.0)  # returns host values: the steps have finished
        out[mode] = (time.perf_counter() - t0) / (windows * window) * 1e3
        out[f"step_mode_{mode}"] = trainer.step_mode
        del trainer
    print(json.dumps(out))


def run_way(backend: str, folder: Path, windows: int, window: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, str(folder), "--windows",
           str(windows), "--window", str(window)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on a small folder")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "FOLDER"), help=argparse.SUPPRESS)
    from ppl_vae import experiments

    experiments.add_mnist_argument(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.windows, args.window)
        return
    mnist = None if args.smoke else experiments.optional_mnist(args.mnist, parser.prog)
    windows, window = (1, 5) if args.smoke else (args.windows, args.window)
    with tempfile.TemporaryDirectory(prefix="bench_streaming-") as tmp:
        where = write_folder(Path(tmp), args.smoke, mnist)
        for backend in ("numpyro", "pyro"):
            r = run_way(backend, Path(tmp), windows, window)
            for mode, label in (("off", "in memory"), ("on", "streamed ")):
                print(f"{backend:8s} {label}  {r[mode]:8.3f} ms/step  ({r[f'step_mode_{mode}']})",
                      flush=True)
            print(f"{backend:8s} streamed / in memory = {r['on'] / r['off']:.2f}  ({where} "
                  f"values, batch 128, {os.cpu_count()} CPU cores)", flush=True)


if __name__ == "__main__":
    main()
