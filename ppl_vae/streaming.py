"""Training data that stays in host memory: minibatches gathered ahead by a background thread.

Backend-free. A run streams (`streams`) when ``data.stream = "on"``, or when it is "auto" and the
training array, as the device would hold it, is larger than ``data.device_memory_mb``; otherwise
the backends copy the whole array to the device once, as before. A streaming trainer never puts
the data set on the device: a `Prefetcher` draws the row indices of the coming steps, gathers
those rows from the host array (a NumPy array, or a read-only memory map of an ``npy`` source:
then only the rows drawn are read from disk) and queues them, while the device trains on the
current ones.

Which rows a step reads is a function of the run's random state at that step alone, never of
the window sizes or of how far ahead the thread has read, so a streamed run resumed from a
checkpoint repeats the straight run:

* NumPyro draws the very indices its in-memory window draws (the same key chain, evaluated on
  the host), so streaming changes nothing in the result.
* Pyro draws its in-memory indices from torch's global generator, interleaved with the other
  draws of a step, which a thread running ahead cannot reproduce; streamed, step t reads the
  rows `step_indices(train.seed, t, N, batch)`, a counter-based draw that needs no state in the
  checkpoint.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable

import numpy as np

from ppl_vae.data import DataError, Dataset
from ppl_vae.spec import Spec

#: Chunks of rows (each some steps' minibatches) the thread gathers ahead of the trainer.
PREFETCH_DEPTH = 2
#: Mixed into the seed of `step_indices`, so the rows drawn are independent of the other seeded
#: draws of a run (the split, static binarisation), which also start from train.seed.
_STREAM_TAG = 0x5EED


def device_bytes(spec: Spec, dataset: Dataset) -> int:
    """Bytes the training examples and labels take on the device (train.dtype, int32/64)."""
    n, d = dataset.x_train.shape
    return n * d * (8 if spec.train.dtype == "float64" else 4) + n * 8


def streams(spec: Spec, dataset: Dataset) -> bool:
    """Whether training reads minibatches from host memory: data.stream = "on", or "auto" with
    the training data larger than data.device_memory_mb (MiB)."""
    mode = spec.data.stream
    if mode != "auto":
        return mode == "on"
    return device_bytes(spec, dataset) > spec.data.device_memory_mb * 2**20


def step_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """(batch,) int64 row indices in 0..n−1, uniform with replacement, of step `step` (0-based)
    of a streamed Pyro run: a pure function of (seed, step), so resuming needs no saved state."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_TAG, step]))
    return rng.integers(0, n, size=batch, dtype=np.int64)


def gather(x: np.ndarray, labels: np.ndarray, idx: np.ndarray, dtype=np.float32):
    """The rows `idx` (any shape S) of x (N, D) and labels (N,): (S + (D,)) `dtype` and S int64.

    Reads the rows in increasing order (a memory map then reads the file forwards, each page
    once however often a row is drawn) and puts them back in the order drawn."""
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    rows = np.empty((len(flat), x.shape[1]), dtype)
    rows[order] = x[flat[order]]
    return rows.reshape(*idx.shape, x.shape[1]), labels[flat].reshape(idx.shape)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _produce(x, labels, draw, steps: int, dtype, out: queue.Queue, stop: threading.Event):
    """The thread: chunks of `steps` steps' rows into `out` until `stop`; a failure is queued
    for the trainer to raise. Holds no reference to the `Prefetcher`, so dropping the trainer
    stops it."""
    try:
        while not stop.is_set():
            item = gather(x, labels, draw(steps), dtype)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
    except BaseException as err:  # noqa: BLE001 - re-raised in the trainer's thread
        while not stop.is_set():
            try:
                out.put(_Failed(err), timeout=0.05)
                break
            except queue.Full:
                continue


class Prefetcher:
    """Minibatch rows of the coming steps, gathered from host arrays by a background thread.

    draw(k) returns the (k, batch) row indices of the next k steps (called only in the thread,
    in step order); chunks of `chunk_steps` steps are gathered ahead, at most `depth` waiting.
    `take(k)` returns the next k steps' rows whatever the chunking. `close()` stops the thread
    (dropping the prefetcher does too, once nothing `draw` holds refers to it); an exception in
    the thread is raised by `take` as a `DataError` with the exception as its cause.
    """

    def __init__(self, x: np.ndarray, labels: np.ndarray, draw: Callable[[int], np.ndarray],
                 chunk_steps: int, depth: int = PREFETCH_DEPTH, dtype=np.float32):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._held: list[tuple[np.ndarray, np.ndarray]] = []  # a chunk partly taken
        self._thread = threading.Thread(
            target=_produce, args=(x, labels, draw, chunk_steps, dtype, self._queue, self._stop),
            name="ppl-vae-prefetch", daemon=True)
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def _next_chunk(self):
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetching thread stopped without a reason") from None
                continue
            if isinstance(item, _Failed):  # a one-line error (exit 2), its cause chained
                self.close()
                err = item.error
                raise DataError(f"reading the training data's minibatches failed "
                                f"({type(err).__name__}: {err})") from err
            return item

    def take(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, batch, D) rows and (steps, batch) labels of the next `steps` steps."""
        ys, labs, need = [], [], steps
        while need:
            y, lab = self._held.pop() if self._held else self._next_chunk()
            if len(y) > need:
                self._held.append((y[need:], lab[need:]))
                y, lab = y[:need], lab[:need]
            ys.append(y)
            labs.append(lab)
            need -= len(y)
        if len(ys) == 1:
            return ys[0], labs[0]
        return np.concatenate(ys), np.concatenate(labs)

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the chunk it is gathering)."""
        self._stop.set()
        while self._thread.is_alive():
            try:  # make room, should it be waiting to put a chunk
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
