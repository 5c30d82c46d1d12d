"""What every trainer that `benchmarks/bench_peers.py` starts does the same way (stdlib and NumPy
only: it runs in every peer's environment, pythae's venv included).

A trainer is one process: ``PYTHON <adapter>.py --data WORK/train.npy --out WORK/<name>
--epochs E --batch-size 128 --lr 1e-3 --seed S --threads T [adapter options]``. It

* reads the training images from ``train.npy`` (uint8, (N, 784), written by bench_peers from the
  MNIST IDX files: every trainer sees the same images);
* starts a `Clock` when the data are in memory and the framework is imported, just before it
  builds the model (so the clock holds model building, compilation, the data pipeline and the
  steps, and not the imports);
* at the end of each epoch calls `Recorder.epoch_end` with the encoder's and decoder's weights:
  the clock is paused while they are written (``epoch_NNN.npz``, `SNAPSHOT_KEYS`, weights
  (out, in) as in torch) and a line ``{"epoch", "seconds", "cpu_seconds", "steps",
  "examples"}`` is appended to ``progress.jsonl`` (wall and process CPU seconds on the clock);
* writes ``done.json`` (framework versions, what the adapter changed, seconds paused) last.

bench_peers evaluates the snapshots afterwards, all with one NumPy estimator, while no trainer
runs.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: The arrays of a snapshot: h = relu(W1 y + b1); loc = loc.W h + loc.b; scale = f(scale.W h +
#: scale.b) with f named by ``scale_kind``; decoder logits = out.W relu(W1 z + b1) + out.b.
SNAPSHOT_KEYS = ("enc.W1", "enc.b1", "enc.loc.W", "enc.loc.b", "enc.scale.W", "enc.scale.b",
                 "dec.W1", "dec.b1", "dec.out.W", "dec.out.b")
#: How each library turns the encoder's second head into a standard deviation.
SCALE_KINDS = ("exp", "exp_half", "softplus")  # σ = e^r (Pyro's, NumPyro's examples);
# σ = e^(r/2) (pythae: r is log σ²); σ = softplus(r) + 1e-4 (ppl_vae)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="train.npy: uint8 images (N, 784)")
    parser.add_argument("--out", required=True, help="folder for snapshots and progress.jsonl")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")


def load_images(path) -> np.ndarray:
    """The training images as float32 in [0, 1], (N, 784)."""
    return np.load(path).astype(np.float32) / np.float32(255.0)


def _now() -> np.ndarray:
    """(wall seconds, CPU seconds of this process: all its threads, user + system)."""
    return np.array([time.perf_counter(), time.process_time()])


class Clock:
    """Wall and CPU seconds since `start`, less the time spent inside `pause()` and between
    `stop()` and `resume()`. CPU seconds are the process's own, so they say what the work cost
    when other processes share the cores (wall seconds then stretch, CPU seconds much less)."""

    def __init__(self):
        self.started = None
        self.stopped_at = None
        self.paused = np.zeros(2)

    def start(self) -> None:
        self.started = _now()

    def read(self) -> tuple[float, float]:
        """(wall, CPU) seconds on the clock."""
        now = self.stopped_at if self.stopped_at is not None else _now()
        wall, cpu = now - self.started - self.paused
        return float(wall), float(cpu)

    def seconds(self) -> float:
        return self.read()[0]

    @property
    def paused_seconds(self) -> float:
        return float(self.paused[0])

    def stop(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = _now()

    def resume(self) -> None:
        if self.stopped_at is not None:
            self.paused = self.paused + (_now() - self.stopped_at)
            self.stopped_at = None

    @contextmanager
    def pause(self):
        if self.stopped_at is not None:  # stopped already: resume() will count this time
            yield
            return
        t0 = _now()
        try:
            yield
        finally:
            self.paused = self.paused + (_now() - t0)


class Recorder:
    """Writes a trainer's snapshots and progress lines (see the module docstring)."""

    def __init__(self, out, clock: Clock, scale_kind: str, steps_per_epoch: int,
                 examples_per_epoch: int):
        if scale_kind not in SCALE_KINDS:
            raise ValueError(f"scale_kind {scale_kind!r}: one of {SCALE_KINDS}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.scale_kind = scale_kind
        self.steps_per_epoch = steps_per_epoch
        self.examples_per_epoch = examples_per_epoch
        self.epoch = 0

    def epoch_end(self, weights, stop: bool = False) -> None:
        """`weights`: a dict with `SNAPSHOT_KEYS`, or a function returning one (called with the
        clock paused, so copying parameters off a device is not timed). Reading the clock first
        closes the epoch; what follows is paused. `stop`: leave the clock stopped until the
        trainer calls ``clock.resume()`` as its next epoch starts (the examples' loops evaluate,
        print and plot between epochs)."""
        seconds, cpu_seconds = self.clock.read()
        if stop:
            self.clock.stop()
        with self.clock.pause():
            self.epoch += 1
            arrays = weights() if callable(weights) else weights
            missing = set(SNAPSHOT_KEYS) - set(arrays)
            if missing:
                raise KeyError(f"snapshot lacks {sorted(missing)}")
            np.savez(self.out / f"epoch_{self.epoch:03d}.npz", scale_kind=self.scale_kind,
                     **{k: np.asarray(arrays[k], dtype=np.float32) for k in SNAPSHOT_KEYS})
            with open(self.out / "progress.jsonl", "a") as fh:
                fh.write(json.dumps({"epoch": self.epoch, "seconds": seconds,
                                     "cpu_seconds": cpu_seconds,
                                     "steps": self.epoch * self.steps_per_epoch,
                                     "examples": self.epoch * self.examples_per_epoch}) + "\n")

    def done(self, **info) -> None:
        info = {"paused_seconds": self.clock.paused_seconds, "epochs": self.epoch} | info
        (self.out / "done.json").write_text(json.dumps(info, indent=2) + "\n")
