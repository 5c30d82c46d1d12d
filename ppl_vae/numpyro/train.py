"""The NumPyro SVI loop: one compiled function runs a whole window of steps (`lax.scan`).

* The dataset is placed on the device once; minibatch indices, dynamic binarisation and the
  ELBO's draws come from JAX keys on the device.
* The per-step scalars (`ppl_vae.schedules.step_scalars`: β, the learning rate, the capacity
  targets) are scan inputs and λ a traced argument, so a schedule never recompiles. The learning
  rate scales Adam's direction (`optax.adam(1.0)`, then × lr_t): Adam's state is the one
  `optax.adam(train.lr)` keeps, and at a constant rate the update is the same to the bit.
* An update whose gradient norm is not finite or above train.skip_grad_norm is skipped
  (Child 2021): `jnp.where` keeps the parameters and Adam's state (moments and count).
* The window function is compiled once per window length (`Trainer.compilations` counts them):
  every window is `train.log_every` steps but a run's last one when `train.steps` is not a
  multiple of it. Windows are not padded to one length: a padding step needs a `lax.cond` (or a
  select over every parameter), and XLA on a GPU runs a conditional by copying its predicate to
  the host and waiting for it, a host synchronisation in every step. A scan's loop has a known
  trip count and needs none.
* The parameters, Adam's state and the key are donated to the window function, so XLA updates
  them in place instead of allocating a second copy each window.
* The driver (`ppl_vae.training`) receives one array per window: the only host transfer.
* Except for convolutional networks on a CPU: XLA runs a convolution inside a loop body many
  times slower than outside one (jax-ml/jax#12868; ~40x for the dSprites networks here), so they
  take one step per compiled call (`Trainer.steps_per_call`), the terms still kept on the device
  until the window ends. On a GPU they run inside the scan like every other network.
* Float32 products follow `train.matmul_precision` (`ppl_vae.numpyro.precision`), fixed when the
  window function is traced.
* train.devices > 1: the same window function, compiled once for a mesh of devices with the
  minibatch's rows split over it and everything else replicated (`ppl_vae.numpyro.devices`); it
  computes the one-device result. The model's `param_map` is then the first device's copy, so
  evaluation and `export_params` work as with one device.
* Streaming (`ppl_vae.streaming`: data.stream, data.device_memory_mb): the data set stays in host
  memory. A background thread computes, on the host's CPU, the indices the window would draw
  from the key (the same key chain) and gathers those rows; the window reads them as a scan
  input instead of indexing a device copy. Same key, same rows, same draws after them: a
  streamed run equals the in-memory run bit for bit, and its checkpoint is the same file.
"""

from __future__ import annotations

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppl_vae import init, schedules, streaming
from ppl_vae.data import Dataset
from ppl_vae.numpyro import devices
from ppl_vae.numpyro.elbo import ScaledELBO
from ppl_vae.numpyro.hooks import Model
from ppl_vae.numpyro.precision import with_precision
from ppl_vae.objective import site_betas, step_term_keys
from ppl_vae.spec import Spec

process_rank = devices.process_rank  # the driver's question: does this process write? (0 does)


@functools.partial(jax.jit, static_argnames=("steps", "batch", "n"))
def _window_indices(key, steps: int, *, batch: int, n: int):
    """The (steps, batch) minibatch indices `Trainer._window_fn` draws from `key` in its next
    `steps` steps, and the key after them: the same splits, so the same numbers."""

    def body(key, _):
        key, k_idx, _, _ = jax.random.split(key, 4)
        return key, jax.random.randint(k_idx, (batch,), 0, n)

    return jax.lax.scan(body, key, None, length=steps)


class Trainer:
    """State: params, Adam's state, the step count and the JAX random key (all explicit)."""

    checkpoint_name = "checkpoint.pkl"

    def __init__(self, spec: Spec, dataset: Dataset, device: str = "auto"):
        tr, obj = spec.train, spec.objective
        self.spec = spec
        devices.start_distributed(spec)  # before JAX initialises its devices
        init_key, self.key = jax.random.split(jax.random.PRNGKey(tr.seed))
        self.model = Model(spec, dataset.dim, dataset.image_shape, device, rng_key=init_key)
        if init.needed(spec):  # NumPy's draws: the key chain stays a default run's
            self.model.import_params(init.initial_params(spec, self.model.export_params(),
                                                         dataset.x_train))
        self.device = self.model.device
        self.n_train = len(dataset.x_train)
        # streamed: the data stay on the host (`_prefetcher` gathers each window's rows)
        self.streaming = streaming.streams(spec, dataset)
        self._host_data = (dataset.x_train, dataset.labels_train) if self.streaming else None
        self._prefetcher = None  # started at the first window, from the key at that step
        # a function of the key alone: the prefetching thread must not hold the trainer
        self._index_chain = functools.partial(_window_indices, batch=tr.batch_size,
                                              n=self.n_train)
        if self.streaming:
            self.x = self.labels = None
        else:
            self.x = self.model.tensor(dataset.x_train)
            self.labels = jax.device_put(jnp.asarray(dataset.labels_train, jnp.int32),
                                         self.device)
        # train.devices > 1: a mesh; the data, key and (in `run_steps`) the parameters replicated
        mesh_devices = devices.mesh_devices(spec, self.device) if tr.devices != 1 else []
        self.mesh = devices.DataParallel(mesh_devices) if len(mesh_devices) > 1 else None
        self._mesh_params = None  # (the param map on the mesh, its local copy in the model)
        if self.mesh is not None:
            self.x, self.labels, self.key = self.mesh.replicate((self.x, self.labels, self.key))
        parts = [optax.clip_by_global_norm(tr.clip_norm)] if tr.clip_norm > 0 else []
        # Adam's direction with the sign of a descent step; each step scales it by its own lr.
        # adam(1.0) keeps the state adam(train.lr) keeps (checkpoints stay readable).
        self.optimizer = optax.chain(*parts, optax.adam(1.0))
        self.opt_state = self.optimizer.init(self.model.param_map)
        if self.mesh is not None:
            self.opt_state = self.mesh.replicate(self.opt_state)
        else:  # committed to the device, as the window's outputs are: JAX keys its compiled
            # code on that too, so an uncommitted first input would compile the window twice
            self.key, self.opt_state = jax.device_put((self.key, self.opt_state), self.device)
        self.elbo = ScaledELBO(num_particles=obj.num_particles, analytic_kl=obj.analytic_kl,
                               max_plate_nesting=1, **schedules.elbo_options(spec))
        self.capacity_sites = schedules.capacity_sites(spec)
        self.step = 0
        self.compilations = 0
        convolutional = "conv" in (spec.encoder.kind, spec.decoder.kind)
        self.steps_per_call = (1 if convolutional and self.device.platform == "cpu"
                               else tr.log_every)
        self.step_mode = ("one step per call (convolutions on a CPU)" if self.steps_per_call == 1
                          else f"lax.scan, {self.steps_per_call} steps per call")
        if self.streaming:
            self.step_mode += ", minibatches streamed from host memory"
        shardings = {}
        if self.mesh is not None:
            self.step_mode += f", data-parallel over {self.mesh.size} devices"
            shardings = dict(in_shardings=self.mesh.replicated,
                             out_shardings=self.mesh.replicated)
        self._window = jax.jit(with_precision(self._window_fn, tr.matmul_precision),
                               donate_argnums=(0, 1, 2), **shardings)

    def _window_fn(self, params, opt_state, key, x, labels, scalars, lam, rows=None):
        """One SVI step per entry of `scalars` ({key: (steps,)}, `schedules.step_scalars`);
        returns the new state and the (steps, F) rows of `objective.step_fields`.

        Each step draws its minibatch's indices from the key and reads those rows of x (N, D)
        and labels (N,); streamed, x and labels are None and `rows` holds the rows those
        indices select, (steps, batch, D) and (steps, batch), one per step."""
        self.compilations += 1  # runs only while JAX traces, i.e. once per compilation
        tr, built = self.spec.train, self.model.built
        dynamic = self.spec.data.binarize == "dynamic"
        n, batch = self.n_train, tr.batch_size
        skip_above = tr.skip_grad_norm

        keys = step_term_keys(self.spec)

        def loss_fn(p, k, y, lab, scalar):
            capacity = ({site: scalar[f"capacity/{site}"] for site in self.capacity_sites}
                        if self.capacity_sites else None)
            elbo = self.elbo.with_weights(site_betas(self.spec, scalar["beta"]), lam,
                                          **({"capacity": capacity} if capacity else {}))
            with built.temperatures_at(schedules.step_temperatures(scalar)):
                t = elbo.differentiable_terms(k, p, built.model, built.guide, y, lab)
            return t["loss"] / batch, jnp.stack([t[name] for name in keys]) / batch

        def sgd_step(carry, inputs):
            params, opt_state, key = carry
            scalar, given = inputs  # given: this step's (rows, labels) when streamed, else None
            key, k_idx, k_bin, k_elbo = jax.random.split(key, 4)
            if given is None:
                idx = jax.random.randint(k_idx, (batch,), 0, n)  # = `_indices_fn`'s
                y, lab = x[idx], labels[idx]
            else:
                y, lab = given
            if self.mesh is not None:  # each device its rows; XLA all-reduces the gradients
                y, lab = self.mesh.shard_rows(y), self.mesh.shard_rows(lab)
            if dynamic:
                y = jax.random.bernoulli(k_bin, y).astype(y.dtype)
            (_, row), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, k_elbo, y, lab, scalar)
            updates, new_state = self.optimizer.update(grads, opt_state, params)
            lr = scalar["lr"]
            updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
            new_params = optax.apply_updates(params, updates)
            if skip_above > 0:  # Child (2021); the norm before clipping
                norm = optax.tree.norm(grads)
                skip = ~jnp.isfinite(norm) | (norm > skip_above)
                keep = functools.partial(jax.tree_util.tree_map,
                                         lambda new, old: jnp.where(skip, old, new))
                new_params, new_state = keep(new_params, params), keep(new_state, opt_state)
                row = jnp.concatenate([row, skip[None].astype(row.dtype)])
            return (new_params, new_state, key), row

        steps = len(scalars["beta"])
        if steps == 1:  # one step per call: no loop around it
            first = jax.tree_util.tree_map(lambda a: a[0], (scalars, rows))
            (params, opt_state, key), row = sgd_step((params, opt_state, key), first)
            return params, opt_state, key, row[None]
        (params, opt_state, key), terms = jax.lax.scan(sgd_step, (params, opt_state, key),
                                                       (scalars, rows))
        return params, opt_state, key, terms

    def _rows(self, steps: int):
        """Streamed: the next `steps` steps' rows, (steps, batch, D) in the model's dtype and
        (steps, batch) int32, from the prefetcher (started here from the current key)."""
        if self._prefetcher is None:
            key = self.key if self.mesh is None else self.mesh.local(self.key)
            # a copy on the host's CPU: the window donates (overwrites) the trainer's key
            state = {"key": jax.device_put(np.array(key), jax.devices("cpu")[0])}

            chain = self._index_chain

            def draw(k: int) -> np.ndarray:
                state["key"], idx = chain(state["key"], k)
                return np.asarray(idx)

            x, labels = self._host_data
            self._prefetcher = streaming.Prefetcher(x, labels, draw, self.spec.train.log_every,
                                                    dtype=np.dtype(self.model.dtype))
        y, labels = self._prefetcher.take(steps)
        rows = (y, labels.astype(np.int32))
        return rows if self.mesh is None else self.mesh.replicate(rows)

    def run_steps(self, scalars: dict[str, np.ndarray], lam: float) -> np.ndarray:
        """One SVI step per entry of the per-step `scalars` (`schedules.step_scalars`: beta,
        lr, capacity/<site>); returns (steps, F) per-example values of `objective.step_fields`
        (the terms, nats; then `skipped`, 0 or 1, where updates may be skipped)."""
        steps = schedules.check_scalars(self.spec, scalars)
        dtype = np.dtype(self.model.dtype)
        params = self._params()
        given = self._rows(steps) if self.streaming else None
        calls = []
        for start in range(0, steps, self.steps_per_call):
            stop = min(start + self.steps_per_call, steps)
            chunk = {k: np.asarray(v[start:stop], dtype) for k, v in scalars.items()}
            part = None if given is None else tuple(a[start:stop] for a in given)
            params, self.opt_state, self.key, rows = self._window(
                params, self.opt_state, self.key, self.x, self.labels, chunk,
                np.asarray(lam, dtype), part)
            calls.append(rows)  # stays on the device until the window ends
        self._set_params(params)
        self.step += steps
        if self.mesh is not None:
            calls = self.mesh.local(calls)
        return np.asarray(jnp.concatenate(calls), np.float64)

    def _params(self):
        """The parameters the window starts from: the model's, replicated on the mesh unless
        they are the local copy of the mesh's (set by the last window)."""
        if self.mesh is None:
            return self.model.param_map
        if self._mesh_params is None or self._mesh_params[1] is not self.model.param_map:
            return self.mesh.replicate(self.model.param_map)  # new: imported, or a checkpoint
        return self._mesh_params[0]

    def _set_params(self, params) -> None:
        if self.mesh is None:
            self.model.param_map = params
            return
        self.model.param_map = self.mesh.local(params)
        self._mesh_params = (params, self.model.param_map)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        """The same file with one device or a mesh (the first device's copies)."""
        opt_state = self.opt_state if self.mesh is None else self.mesh.local(self.opt_state)
        key = self.key if self.mesh is None else self.mesh.local(self.key)
        state = {"step": self.step, "params": jax.device_get(self.model.param_map),
                 "opt_state": jax.device_get(opt_state),
                 "key": np.asarray(jax.random.key_data(key)
                                   if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)}
        with open(path, "wb") as fh:
            pickle.dump(state, fh)

    def close(self) -> None:
        """Stop the prefetching thread of a streamed run (if any); the next window starts
        another. The driver calls it when training ends, however it ends."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def load_checkpoint(self, path) -> int:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
        put = lambda tree: jax.device_put(tree, self.device)  # noqa: E731
        self.model.param_map = put(state["params"])
        self.opt_state = put(state["opt_state"])
        self.key = put(jnp.asarray(state["key"]))
        self.close()  # a prefetcher ran ahead from another key: start again
        if self.mesh is not None:  # the parameters follow in `run_steps`
            self.opt_state, self.key = self.mesh.replicate((self.opt_state, self.key))
        self.step = int(state["step"])
        return self.step
