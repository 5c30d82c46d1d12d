"""Many NumPyro runs in one process: same-shape sweep points trained together under `jax.vmap`.

Points of a sweep that differ only in what the window function takes as traced inputs (β, λ,
the seed, the run length: `ppl_vae.sweep.VMAPPABLE_KEYS`) compile to the same window. Here each
point is an ordinary `ppl_vae.fit` in a thread of its own, with its own `Trainer` (its own
parameters, Adam state, key and so minibatch stream, its own evaluation, checkpoints and run
folder, the same files as a lone run), except that the trainer's compiled window is replaced by
a rendezvous (`Batcher`): when every live point has asked for its next window, one call of

    jit(vmap(Trainer._window_fn))(params[K], opt_state[K], key[K], x, labels, β[K, L], λ[K], …)

runs all of them, and each point gets its own slice back. The window function is the first
point's bound method: every point of a group has the same spec but for the vmapped keys, so the
same networks, optimiser and ELBO. An argument that every point passes as the same object (the
data, shared when the points' data are equal; None) is not batched (``in_axes=None``); every
other argument is stacked along a new leading axis. Nothing here knows the order or meaning of
the window's arguments beyond "state first", so it follows the trainer as it changes.

A point that fails or diverges leaves the rendezvous and the others go on (the next call has
one point fewer, compiled once more); a point whose run is shorter leaves when it is done.
Points at different steps (some resumed) run together as long as their windows have the same
length; a window of another length (a run's last) runs in its own call.

The vmapped step computes each point's own arithmetic, but XLA may order a batched reduction
differently from the lone one: parameters agree with the point trained alone to float tolerance
(tests/test_sweep.py), not bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppl_vae.data import Dataset
from ppl_vae.numpyro.precision import with_precision
from ppl_vae.numpyro.train import Trainer
from ppl_vae.spec import Spec


class Batcher:
    """The rendezvous of `slots` points: `call(slot, *args)` blocks until every live point has
    called, then runs one vmapped window for each group of calls of equal shapes and returns
    each caller its own outputs. `leave(slot)` when a point's training ends (however it ends).

    `template()` gives the trainer whose `_window_fn` is batched (any point's: they are equal
    but for traced inputs)."""

    def __init__(self, slots: int, on_batch: Callable[[int], None] | None = None):
        self._cond = threading.Condition()
        #: Held by the one point thread that runs at a time: NumPyro's effect handlers keep a
        #: module-level stack, so two threads tracing a model at once corrupt each other's
        #: traces. A point holds it while it builds its trainer, evaluates or saves, and lets
        #: it go while it waits for its window; the batch runs under it.
        self.turn = threading.Lock()
        self._live = set(range(slots))
        self._pending: dict[int, tuple] = {}
        self._results: dict[int, tuple] = {}
        self._running = False
        self._trainers: dict[int, Trainer] = {}
        self._compiled: dict = {}
        self._stacked: dict[int, tuple] = {}  # slot -> (the state leaves handed out, stacked)
        self.calls = 0  # vmapped window calls run
        self.compilations = 0  # vmapped window functions compiled (one per K and in_axes)
        self._on_batch = on_batch or (lambda points: None)

    def register(self, slot: int, trainer: Trainer) -> None:
        with self._cond:
            self._trainers[slot] = trainer

    def leave(self, slot: int) -> None:
        with self._cond:
            self._live.discard(slot)
            self._pending.pop(slot, None)
            self._cond.notify_all()
        self._run_ready()

    def call(self, slot: int, *args):
        """Called holding `turn` (in a point's thread); returns holding it again."""
        with self._cond:
            self._pending[slot] = args
        self.turn.release()
        try:
            self._run_ready()
            with self._cond:
                while slot not in self._results:
                    self._cond.wait()
                out = self._results.pop(slot)
        finally:
            self.turn.acquire()
        if isinstance(out, BaseException):
            raise out
        return out

    def _run_ready(self) -> None:
        """Run the pending calls whenever every live point has one (in the calling thread)."""
        while True:
            with self._cond:
                if self._running or not self._live or set(self._pending) != self._live:
                    return
                batch, self._pending = self._pending, {}
                self._running = True
            results: dict[int, object] = {}
            try:
                with self.turn:  # every live point waits in `call`: it is free
                    self._run_all(batch, results)
            finally:
                with self._cond:
                    self._results.update(results)
                    self._running = False
                    self._cond.notify_all()

    def _run_all(self, batch: dict[int, tuple], results: dict) -> None:
        for slots in _same_shapes(batch):
            try:
                outs = self._run([batch[s] for s in slots], slots)
            except Exception as err:  # noqa: BLE001 - each point of the call sees it
                outs = [err] * len(slots)
            results.update(zip(slots, outs))
            self._on_batch(len(slots))

    def _run(self, calls: list[tuple], slots: list[int]) -> list:
        """One vmapped window over `calls` (the points' argument tuples, equal shapes); a
        point left alone runs its window unbatched."""
        if len(calls) == 1:
            if 1 not in self._compiled:
                template = self._trainers[slots[0]]
                self._compiled[1] = jax.jit(with_precision(
                    template._window_fn, template.spec.train.matmul_precision))
                self.compilations += 1
            self.calls += 1
            return [self._compiled[1](*calls[0])]
        n_args = len(calls[0])
        shared = tuple(all(c[i] is calls[0][i] for c in calls) for i in range(n_args))
        in_axes = tuple(None if s else 0 for s in shared)
        key = (len(calls), in_axes)
        if key not in self._compiled:
            template = self._trainers[slots[0]]
            fn = with_precision(template._window_fn, template.spec.train.matmul_precision)
            self._compiled[key] = jax.jit(jax.vmap(fn, in_axes=in_axes))
            self.compilations += 1
        args = []
        for i in range(n_args):
            if shared[i]:
                args.append(calls[0][i])
            elif i < 3:  # the state (params, optimiser state, key): often what we handed out
                args.append(self._stacked_state(i, calls, slots))
            else:
                args.append(_stack([c[i] for c in calls]))
        outs = self._compiled[key](*args)
        self.calls += 1
        per_point = [jax.tree_util.tree_map(lambda a, k=k: a[k], outs)
                     for k in range(len(calls))]
        for i in range(3):  # remember the stacked state, to skip re-stacking it next window
            leaves = tuple(jax.tree_util.tree_leaves(p[i]) for p in per_point)
            self._stacked[(i, tuple(slots))] = (leaves, outs[i])
        return per_point

    def _stacked_state(self, i: int, calls: list[tuple], slots: list[int]):
        """Argument `i` stacked: the previous call's stacked output where every point passes
        back exactly the slices it was handed (nothing imported or loaded since)."""
        cached = self._stacked.pop((i, tuple(slots)), None)
        if cached is not None:
            handed, stacked = cached
            given = tuple(jax.tree_util.tree_leaves(c[i]) for c in calls)
            if len(given) == len(handed) and all(
                    len(g) == len(h) and all(a is b for a, b in zip(g, h))
                    for g, h in zip(given, handed)):
                return stacked
        return _stack([c[i] for c in calls])


def _stack(trees: Sequence):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _shape_signature(args: tuple) -> tuple:
    return tuple((tuple(np.shape(leaf)), str(getattr(leaf, "dtype", type(leaf))))
                 for leaf in jax.tree_util.tree_leaves(args))


def _same_shapes(batch: dict[int, tuple]) -> list[list[int]]:
    """The slots of `batch` grouped by the shapes of their arguments, in slot order."""
    groups: dict[tuple, list[int]] = {}
    for slot in sorted(batch):
        groups.setdefault(_shape_signature(batch[slot]), []).append(slot)
    return list(groups.values())


class VmappedTrainer(Trainer):
    """A point's `Trainer` whose compiled window is the group's `Batcher`: everything else (its
    state, checkpoints, evaluation) is the trainer's own. `shared` holds the device arrays of
    data equal for the whole group (the first point's), passed as the same objects so that the
    batcher shares them instead of stacking K copies."""

    def __init__(self, spec: Spec, dataset: Dataset, device: str, *, batcher: Batcher, slot: int,
                 shared: dict | None = None):
        super().__init__(spec, dataset, device)
        if self.mesh is not None or self.streaming:  # the planner keeps these out of groups
            raise ValueError("a vmapped sweep point needs train.devices = 1 and its data on the "
                             "device (not streamed)")
        if shared is not None:
            if "x" in shared:
                self.x, self.labels = shared["x"], shared["labels"]
            else:
                shared.update(x=self.x, labels=self.labels)
        self._batcher, self._slot = batcher, slot
        self._window = self._batched_window
        batcher.register(slot, self)

    def _batched_window(self, *args):
        return self._batcher.call(self._slot, *args)


def _same_data(a: Dataset, b: Dataset) -> bool:
    return (a.x_train.shape == b.x_train.shape and np.array_equal(a.x_train, b.x_train)
            and np.array_equal(a.labels_train, b.labels_train))


def train_group(points: Sequence[dict], run_point: Callable[[dict, Callable], dict],
                progress: bool = False, desc: str = "vmapped points") -> list[dict]:
    """Train sweep points together, each in a thread running `run_point(point, make_trainer)`
    (`ppl_vae.sweep` calls `fit` with that trainer factory there and returns the point's
    result). `point["spec"]` is its `Spec` and `point["dataset"]` its loaded `Dataset`.
    Returns the results in the order of `points`.

    The threads share one `Batcher`; the data go to the device once when every point's data are
    equal (else each point's own, stacked)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(p["spec"].train.steps for p in points)
        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    lock = threading.Lock()
    batcher = Batcher(len(points))
    first = points[0]["dataset"]
    shared = {} if all(_same_data(first, p["dataset"]) for p in points[1:]) else None
    results: list[dict | None] = [None] * len(points)

    def factory(slot: int):
        def make(spec, dataset, device):
            trainer = VmappedTrainer(spec, dataset, device, batcher=batcher, slot=slot,
                                     shared=shared)
            run_steps = trainer.run_steps

            def counted(*args, **kwargs):  # the steps bar: this point's steps, as they end
                before = trainer.step
                out = run_steps(*args, **kwargs)
                if bar is not None:
                    with lock:
                        bar.update(trainer.step - before)
                return out

            trainer.run_steps = counted
            return trainer

        return make

    def work(slot: int) -> None:
        try:
            with batcher.turn:
                results[slot] = run_point(points[slot], factory(slot))
        finally:
            batcher.leave(slot)

    threads = [threading.Thread(target=work, args=(k,), name=f"sweep-point-{k}", daemon=True)
               for k in range(len(points))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a timeout, so that Ctrl-C reaches this (main) thread
    finally:
        if bar is not None:
            bar.close()
    return [r if r is not None else {"status": "failed", "error": "the point's thread ended "
                                     "without a result"} for r in results]
