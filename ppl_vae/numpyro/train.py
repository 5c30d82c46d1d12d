"""The NumPyro SVI loop: one compiled function runs a whole window of steps (`lax.scan`).

* The dataset is placed on the device once; minibatch indices, dynamic binarisation and the
  ELBO's draws come from JAX keys on the device.
* β and λ enter as traced arrays, so a schedule never recompiles. The window function is compiled
  once per window length (`Trainer.compilations` counts them): every window is `train.log_every`
  steps but a run's last one when `train.steps` is not a multiple of it. Windows are not padded to
  one length: a padding step needs a `lax.cond` (or a select over every parameter), and XLA on a
  GPU runs a conditional by copying its predicate to the host and waiting for it, a host
  synchronisation in every step. A scan's loop has a known trip count and needs none.
* The parameters, Adam's state and the key are donated to the window function, so XLA updates
  them in place instead of allocating a second copy each window.
* The driver (`ppl_vae.training`) receives one array per window: the only host transfer.
* Except for convolutional networks on a CPU: XLA runs a convolution inside a loop body many
  times slower than outside one (jax-ml/jax#12868; ~40x for the dSprites networks here), so they
  take one step per compiled call (`Trainer.steps_per_call`), the terms still kept on the device
  until the window ends. On a GPU they run inside the scan like every other network.
* Float32 products follow `train.matmul_precision` (`ppl_vae.numpyro.precision`), fixed when the
  window function is traced.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppl_vae.data import Dataset
from ppl_vae.numpyro.elbo import ScaledELBO
from ppl_vae.numpyro.hooks import Model
from ppl_vae.numpyro.precision import with_precision
from ppl_vae.objective import site_betas, step_term_keys
from ppl_vae.spec import Spec


class Trainer:
    """State: params, Adam's state, the step count and the JAX random key (all explicit)."""

    checkpoint_name = "checkpoint.pkl"

    def __init__(self, spec: Spec, dataset: Dataset, device: str = "auto"):
        tr, obj = spec.train, spec.objective
        self.spec = spec
        init_key, self.key = jax.random.split(jax.random.PRNGKey(tr.seed))
        self.model = Model(spec, dataset.dim, dataset.image_shape, device, rng_key=init_key)
        self.device = self.model.device
        self.x = self.model.tensor(dataset.x_train)
        self.labels = jax.device_put(jnp.asarray(dataset.labels_train, jnp.int32), self.device)
        parts = [optax.clip_by_global_norm(tr.clip_norm)] if tr.clip_norm > 0 else []
        self.optimizer = optax.chain(*parts, optax.adam(tr.lr))
        self.opt_state = self.optimizer.init(self.model.param_map)
        self.elbo = ScaledELBO(num_particles=obj.num_particles, analytic_kl=obj.analytic_kl,
                               max_plate_nesting=1)
        self.step = 0
        self.compilations = 0
        convolutional = "conv" in (spec.encoder.kind, spec.decoder.kind)
        self.steps_per_call = (1 if convolutional and self.device.platform == "cpu"
                               else tr.log_every)
        self.step_mode = ("one step per call (convolutions on a CPU)" if self.steps_per_call == 1
                          else f"lax.scan, {self.steps_per_call} steps per call")
        self._window = jax.jit(with_precision(self._window_fn, tr.matmul_precision),
                               donate_argnums=(0, 1, 2))

    def _window_fn(self, params, opt_state, key, x, labels, betas, lam):
        """`len(betas)` SVI steps; returns the new state and the (len(betas), F) terms."""
        self.compilations += 1  # runs only while JAX traces, i.e. once per compilation
        tr, built = self.spec.train, self.model.built
        dynamic = self.spec.data.binarize == "dynamic"
        n, batch = x.shape[0], tr.batch_size

        keys = step_term_keys(self.spec)

        def loss_fn(p, k, y, lab, beta):
            t = self.elbo.with_weights(site_betas(self.spec, beta), lam).terms(
                k, p, built.model, built.guide, y, lab)
            return t["loss"] / batch, jnp.stack([t[name] for name in keys]) / batch

        def sgd_step(carry, beta):
            params, opt_state, key = carry
            key, k_idx, k_bin, k_elbo = jax.random.split(key, 4)
            idx = jax.random.randint(k_idx, (batch,), 0, n)
            y = x[idx]
            if dynamic:
                y = jax.random.bernoulli(k_bin, y).astype(y.dtype)
            (_, row), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, k_elbo, y, labels[idx], beta)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), row

        if len(betas) == 1:  # one step per call: no loop around it
            (params, opt_state, key), row = sgd_step((params, opt_state, key), betas[0])
            return params, opt_state, key, row[None]
        (params, opt_state, key), rows = jax.lax.scan(sgd_step, (params, opt_state, key), betas)
        return params, opt_state, key, rows

    def run_steps(self, betas: np.ndarray, lam: float) -> np.ndarray:
        """One SVI step per entry of `betas`; returns (len(betas), F) per-example values of
        `objective.step_fields`, nats."""
        dtype = self.model.dtype
        calls = []
        for start in range(0, len(betas), self.steps_per_call):
            chunk = betas[start:start + self.steps_per_call]
            params, self.opt_state, self.key, rows = self._window(
                self.model.param_map, self.opt_state, self.key, self.x, self.labels,
                jnp.asarray(chunk, dtype), jnp.asarray(lam, dtype))
            self.model.param_map = params
            calls.append(rows)  # stays on the device until the window ends
        self.step += len(betas)
        return np.asarray(jnp.concatenate(calls), np.float64)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        state = {"step": self.step, "params": jax.device_get(self.model.param_map),
                 "opt_state": jax.device_get(self.opt_state),
                 "key": np.asarray(jax.random.key_data(self.key)
                                   if jnp.issubdtype(self.key.dtype, jax.dtypes.prng_key)
                                   else self.key)}
        with open(path, "wb") as fh:
            pickle.dump(state, fh)

    def load_checkpoint(self, path) -> int:
        with open(path, "rb") as fh:
            state = pickle.load(fh)
        put = lambda tree: jax.device_put(tree, self.device)  # noqa: E731
        self.model.param_map = put(state["params"])
        self.opt_state = put(state["opt_state"])
        self.key = put(jnp.asarray(state["key"]))
        self.step = int(state["step"])
        return self.step
