"""`Model`: a spec built with parameters on a device, and the hooks backend-free code calls
(NumPy in and out); the twin of `ppl_vae/pyro/hooks.py`, every hook a jitted function of the
param map (compiled once per shape)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import kl_divergence

from ppl_vae import graph, schedules
from ppl_vae.backends import BackendError
from ppl_vae.diagnostics import log_weights_from_parts
from ppl_vae.numpyro.elbo import ScaledELBO, _enumeration_weight, enumerate_parallel
from ppl_vae.numpyro.latents import (
    discrete_factors,
    discrete_kl_per_dim,
    discrete_log_prob_per_dim,
    discrete_probs,
    factorised_normal,
    marginal_std,
    site_log_prob,
)
from ppl_vae.numpyro.likelihood import ancestral_sample, likelihood_mean
from ppl_vae.numpyro.model import build
from ppl_vae.numpyro.params import export_params, import_params, init_params
from ppl_vae.numpyro.precision import with_precision
from ppl_vae.objective import rate_sites, site_betas
from ppl_vae.spec import LABEL_SITE, Spec


def resolve_device(device: str):
    """"auto" → the first GPU when JAX sees one, else the CPU; "cuda" without one is an error.
    This process's devices (a multi-process run's `jax.devices()` lists every process's)."""
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if device == "cuda" and not gpus:
        raise BackendError(
            f"device 'cuda' was asked for, but JAX ({jax.__version__}) sees no GPU; use --device "
            "cpu (or auto), or install jax with CUDA support (pip install 'jax[cuda12]')."
        )
    if device in ("cuda", "auto") and gpus:
        return gpus[0]
    return jax.local_devices(backend="cpu")[0]


def check_dtype(spec: Spec):
    if spec.train.dtype == "float64" and not jax.config.jax_enable_x64:
        raise BackendError("train.dtype = 'float64' with the numpyro backend needs JAX's 64-bit "
                           "mode: set the environment variable JAX_ENABLE_X64=1 before starting")
    return jnp.float64 if spec.train.dtype == "float64" else jnp.float32


def _traces(built, param_map, key, y, labels, enumerate_label: bool = False):
    """The posterior guide's trace and the nll model replayed on it (the key split as the
    ELBOs split it); with `enumerate_label`, a latent label takes all its values."""
    model_key, guide_key = jax.random.split(key)
    guide = handlers.seed(built.posterior_guide, guide_key)
    if enumerate_label:
        guide = enumerate_parallel(guide, -2)
    guide_trace = handlers.trace(handlers.substitute(guide, data=param_map)).get_trace(
        y, labels)
    model_trace = handlers.trace(handlers.substitute(handlers.replay(handlers.seed(
        built.elbo_model, model_key), guide_trace), data=param_map)).get_trace(y, labels)
    return guide_trace, model_trace


class Model:
    """The spec built with parameters on a device, with the hooks backend-free code calls
    (NumPy in and out); the same methods as the Pyro backend's `Model`."""

    def __init__(self, spec: Spec, data_dim: int, image_shape=None, device: str = "auto",
                 params: dict[str, np.ndarray] | None = None, rng_key=None):
        self.spec, self.data_dim, self.image_shape = spec, data_dim, image_shape
        self.device = resolve_device(device)
        self.dtype = check_dtype(spec)
        self.built = build(spec, data_dim, image_shape)
        key = jax.random.PRNGKey(spec.train.seed) if rng_key is None else rng_key
        with jax.default_device(self.device):
            # jitted: one compilation instead of op-by-op dispatch (5.5 s -> 2 s on a CPU for
            # the two-layer test model)
            param_map = jax.jit(lambda k: init_params(self.built, data_dim, k))(key)
            param_map = jax.tree_util.tree_map(lambda a: jnp.asarray(a, self.dtype), param_map)
            if params is not None:
                param_map = import_params(param_map, params)
        self.param_map = jax.device_put(param_map, self.device)
        self._jitted: dict[str, object] = {}

    def _jit(self, name: str, fn, **kwargs):
        """`fn` jitted once per Model (and per shape, as JAX does), its float32 products in
        the spec's `train.matmul_precision`."""
        if name not in self._jitted:
            self._jitted[name] = jax.jit(
                with_precision(fn, self.spec.train.matmul_precision), **kwargs)
        return self._jitted[name]

    def tensor(self, x):
        return jax.device_put(jnp.asarray(np.asarray(x), self.dtype), self.device)

    def _labels(self, labels):
        return None if labels is None else jax.device_put(
            jnp.asarray(np.asarray(labels), jnp.int32), self.device)

    def export_params(self) -> dict[str, np.ndarray]:
        return export_params(self.param_map)

    def import_params(self, params: dict[str, np.ndarray]) -> None:
        self.param_map = jax.device_put(import_params(self.param_map, params), self.device)

    # -- posteriors -----------------------------------------------------------------------------
    def encode(self, x: np.ndarray, batch_size: int = 1000, labels=None,
               site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and coordinate standard deviations of the Gaussian posterior q(z_site|y), each
        (N, d) (see the Pyro twin)."""
        s = graph.gaussian_data_site(self.spec, site)

        def encode(param_map, y, labels, name):
            with handlers.substitute(data=param_map):
                q, loc, _ = self.built.posterior_of(name, y, {}, self.built.label_input(labels))
            return loc, marginal_std(q)

        fn = self._jit("encode", encode, static_argnums=3)
        parts = [fn(self.param_map, self.tensor(x[i:i + batch_size]),
                    self._labels(None if labels is None else labels[i:i + batch_size]), s.name)
                 for i in range(0, len(x), batch_size)]
        return (np.concatenate([np.asarray(p[0]) for p in parts]),
                np.concatenate([np.asarray(p[1]) for p in parts]))

    def posterior_probs(self, x: np.ndarray, batch_size: int = 1000, labels=None,
                        site: str | None = None) -> np.ndarray:
        """The probabilities of a discrete site's posterior q(z_site|y), (N, width) (see the
        Pyro twin)."""
        s = graph.discrete_data_site(self.spec, site)
        categories = self.built.plan.site(s.name).categories

        def probs(param_map, y, labels, name):
            with handlers.substitute(data=param_map):
                logits = self.built.discrete_logits(name, y, {}, self.built.label_input(labels))
            return discrete_probs(logits, categories)

        fn = self._jit("probs", probs, static_argnums=3)
        return np.concatenate([
            np.asarray(fn(self.param_map, self.tensor(x[i:i + batch_size]),
                          self._labels(None if labels is None else labels[i:i + batch_size]),
                          s.name))
            for i in range(0, len(x), batch_size)])

    def posterior_draws(self, x: np.ndarray, labels=None, num_samples: int = 1, seed: int = 0,
                        batch_size: int = 1000) -> dict[str, np.ndarray]:
        """Draws from the joint posterior q(z_1, ..., z_S | y): {site: (N, num_samples, d)}."""

        def draws(param_map, key, y, labels, k):
            def one(key):
                trace = handlers.trace(handlers.substitute(handlers.seed(
                    self.built.posterior_guide, key), data=param_map)).get_trace(y, labels)
                return {s.name: trace[s.name]["value"] for s in self.spec.sites}

            return jax.vmap(one)(jax.random.split(key, k))

        fn = self._jit("draws", draws, static_argnums=4)
        key = jax.random.PRNGKey(seed)
        out: dict[str, list] = {s.name: [] for s in self.spec.sites}
        for b, i in enumerate(range(0, len(x), batch_size)):
            got = fn(self.param_map, jax.random.fold_in(key, b), self.tensor(x[i:i + batch_size]),
                     self._labels(None if labels is None else labels[i:i + batch_size]),
                     num_samples)
            for name, v in got.items():
                out[name].append(np.asarray(v).transpose(1, 0, 2))
        return {k: np.concatenate(v) for k, v in out.items()}

    # -- the model --------------------------------------------------------------------------
    def decode_mean(self, code, seed: int = 0, labels=None) -> np.ndarray:
        """E[y|z], (N, D), from {site: (N, d)} or a one-site model's array; missing sites the
        decoder needs are set to their prior means (see the Pyro twin)."""
        code = {k: self.tensor(v) for k, v in graph.as_code(self.spec, code).items()}
        fill = graph.sites_to_fill(self.spec, code)
        fn = self._jit(f"decode:{','.join(sorted(code))}",
                       functools.partial(self._decode_mean, fill=fill))
        return np.asarray(fn(self.param_map, code, self._labels(labels),
                             jax.random.PRNGKey(seed)))

    def _decode_mean(self, param_map, values, labels, key, fill):
        spec, built = self.spec, self.built
        values = dict(values)
        n = next(iter(values.values())).shape[0]
        with handlers.substitute(data=param_map):
            onehot = built.label_input(labels)
            for name in fill:
                mean = built.prior_of(name, values, onehot).mean
                values[name] = jnp.broadcast_to(mean, (n, mean.shape[-1]))
            net = built.decoder()
            code = built.code(values, onehot)
        if spec.decoder.kind == "autoregressive":
            return ancestral_sample(spec.likelihood, net, code, self.data_dim, key,
                                    param_map.get("likelihood.log_scale"))[1]
        return likelihood_mean(spec.likelihood, net(code, None))

    def sample_prior(self, n: int, seed: int = 0, labels=None) -> dict[str, np.ndarray]:
        """n ancestral draws from P̂_Φ(z_1, ..., z_S): {site: (n, d)} (see the Pyro twin)."""

        def draw(labels):
            onehot = self.built.label_input(labels)
            values = {}
            with numpyro.plate("data", n):
                for name in self.built.plan.model_order:
                    values[name] = numpyro.sample(name, self.built.prior_of(name, values,
                                                                             onehot))
            return values

        fn = handlers.seed(handlers.substitute(draw, data=self.param_map),
                           jax.random.PRNGKey(seed))
        fn = with_precision(fn, self.spec.train.matmul_precision)
        return {k: np.asarray(v) for k, v in fn(self._labels(labels)).items()}

    def prior_normal(self, site: str | None = None):
        """(loc, scale), each (d,), when the prior of `site` (default: the first) is a fixed or
        learned factorised normal; None otherwise."""
        s = self.built.plan.site(site or self.spec.sites[0].name)
        prefix = s.prior_module
        if s.discrete:
            return None
        if s.prior.kind == "normal":
            return np.zeros(s.dim), np.ones(s.dim)
        if s.prior.kind == "learned_normal":
            return (np.asarray(self.param_map[f"{prefix}.loc"], np.float64),
                    np.exp(np.asarray(self.param_map[f"{prefix}.log_scale"], np.float64)))
        return None

    # -- log-densities and the ELBO's terms -------------------------------------------------------
    def log_density_parts(self, x: np.ndarray, num_samples: int, seed: int = 0,
                          chunk: int = 500, labels=None) -> np.ndarray:
        """(N, K, 1 + 2S) float64, nats: ln p̂(y|z_k), then ln p̂(z_s,k | parents) and
        ln q(z_s,k | inputs) for each site (the twin of the Pyro backend's hook)."""
        fn = self._jit("parts", self._parts_chunk, static_argnums=4)
        y, lab = self.tensor(x), self._labels(labels)
        key = jax.random.PRNGKey(seed)
        out = [np.asarray(fn(self.param_map, jax.random.fold_in(key, i), y, lab,
                             min(chunk, num_samples - k)), np.float64)
               for i, k in enumerate(range(0, num_samples, chunk))]
        return np.concatenate(out).transpose(1, 0, 2).copy()

    def _parts_chunk(self, param_map, key, y, labels, k):
        latent_label = self.spec.label.latent

        def one(key):
            guide_trace, model_trace = _traces(self.built, param_map, key, y,
                                               None if latent_label else labels,
                                               enumerate_label=latent_label)
            weight = _enumeration_weight(guide_trace)

            def expected(site):  # under q(label|y) where the label is summed out (dim 0)
                log_prob = site_log_prob(site)
                return log_prob if weight is None else jnp.sum(weight * log_prob, 0)

            columns = [expected(model_trace["y"])]
            for name in rate_sites(self.spec):
                columns += [expected(model_trace[name]), expected(guide_trace[name])]
            return jnp.stack(jnp.broadcast_arrays(*columns), -1)

        return jax.vmap(one)(jax.random.split(key, k))

    def log_weights(self, x: np.ndarray, num_samples: int, seed: int = 0,
                    chunk: int = 500, labels=None) -> np.ndarray:
        """Importance log-weights ln p̂(y, z_k) − ln q(z_k|y), z_k ~ q(z|y) jointly over the
        sites, (N, K) float64; a latent label summed out of both (see the Pyro twin)."""
        if not self.spec.label.latent:
            return log_weights_from_parts(self.log_density_parts(x, num_samples, seed, chunk,
                                                                 labels))
        fn = self._jit("label_weights", self._label_summed_chunk, static_argnums=3)
        y, key = self.tensor(x), jax.random.PRNGKey(seed)
        out = [np.asarray(fn(self.param_map, jax.random.fold_in(key, i), y,
                             min(chunk, num_samples - k)), np.float64)
               for i, k in enumerate(range(0, num_samples, chunk))]
        return np.concatenate(out).T.copy()

    def _label_summed_chunk(self, param_map, key, y, k):
        names = [s.name for s in self.spec.sites]

        def one(key):
            drawn, _ = _traces(self.built, param_map, key, y, None)
            z = {n: drawn[n]["value"] for n in names}
            guide = enumerate_parallel(handlers.condition(self.built.posterior_guide, data=z),
                                       -2)
            g = handlers.trace(handlers.substitute(guide, data=param_map)).get_trace(y, None)
            every = {**z, LABEL_SITE: g[LABEL_SITE]["value"]}
            m = handlers.trace(handlers.substitute(handlers.condition(
                self.built.elbo_model, data=every), data=param_map)).get_trace(y, None)
            log_q = sum(site_log_prob(g[n]) for n in [LABEL_SITE, *names])
            log_p = sum(site_log_prob(m[n]) for n in [LABEL_SITE, *names, "y"])
            return (jax.scipy.special.logsumexp(log_p, 0)
                    - jax.scipy.special.logsumexp(log_q, 0))

        return jax.vmap(one)(jax.random.split(key, k))

    def _rate_per_dim(self, param_map, key, y, labels) -> dict:
        """{site: (d,)} per-coordinate rates summed over the batch (see the Pyro twin)."""
        guide_trace, model_trace = _traces(self.built, param_map, key, y, labels,
                                           enumerate_label=True)
        weight = _enumeration_weight(guide_trace)  # a latent label: q(label|y)
        out = {}
        for s in self.spec.sites:
            gsite, msite = guide_trace[s.name], model_trace[s.name]
            value = gsite["value"]
            closed_form = self.built.plan.site(s.name).closed_form
            q, p = discrete_factors(gsite["fn"]), discrete_factors(msite["fn"])
            if q is not None and p is not None:  # a discrete site: per variable
                per = (discrete_kl_per_dim(q.logits, p.logits, q.categories) if closed_form else
                       discrete_log_prob_per_dim(q, value) - discrete_log_prob_per_dim(p, value))
                per = jnp.broadcast_to(per, (*value.shape[:-1], s.dim))
            else:
                q, p = factorised_normal(gsite["fn"]), factorised_normal(msite["fn"])
                if q is None or p is None:
                    continue
                per = kl_divergence(q, p) if closed_form else (q.log_prob(value)
                                                               - p.log_prob(value))
                per = jnp.broadcast_to(per, value.shape)
            if weight is not None:
                per = weight[..., None] * per
            out[s.name] = per.reshape(-1, s.dim).sum(0)
        return out

    def gradient_draws(self, x: np.ndarray, num_draws: int, seed: int = 0, labels=None,
                       prefix: str = "encoder") -> np.ndarray:
        """(num_draws, P) float64 draws of the training objective's gradient per example with
        respect to the parameters of the modules named `prefix`… (see the Pyro twin; the same
        order: sorted canonical names, PyTorch layouts)."""
        spec, obj = self.spec, self.spec.objective
        options = schedules.elbo_options(spec)
        capacity = {s.name: s.capacity.max for s in spec.sites if s.capacity.max > 0}
        elbo = ScaledELBO(num_particles=obj.num_particles, analytic_kl=obj.analytic_kl,
                          max_plate_nesting=1, **options).with_weights(
            site_betas(spec, obj.beta), obj.lam, capacity or None)
        n = len(x)

        def grad(param_map, key, y, labels):
            mine = {k: v for k, v in param_map.items() if k.startswith(prefix)}

            def loss(sub):
                return elbo.loss(key, {**param_map, **sub}, self.built.model, self.built.guide,
                                 y, labels) / n

            return jax.grad(loss)(mine)

        fn = self._jit(f"gradient/{prefix}", grad)
        y, lab, key = self.tensor(x), self._labels(labels), jax.random.PRNGKey(seed)
        out = []
        for i in range(num_draws):
            flat = export_params(fn(self.param_map, jax.random.fold_in(key, i), y, lab))
            out.append(np.concatenate([np.ravel(flat[k]) for k in sorted(flat)]))
        return np.stack(out).astype(np.float64)

    def eval_terms(self, x: np.ndarray, labels, beta, lam: float, seed: int = 0,
                   batch_size: int = 1000, num_particles: int | None = None) -> dict[str, float]:
        """Sums over the examples of x (nats): objective, rate, distortion, aux, nll,
        rate/<site> and rate/<site>/dim_<i> (see the Pyro twin)."""
        k = num_particles or self.spec.objective.num_particles
        fn = self._jit(f"eval/{k}", functools.partial(self._eval_batch, k))
        key = jax.random.PRNGKey(seed)
        beta = jax.tree.map(lambda b: jnp.asarray(b, self.dtype), beta)
        sums: dict[str, np.ndarray] = {}
        for b, i in enumerate(range(0, len(x), batch_size)):
            got = fn(self.param_map, jax.random.fold_in(key, b), self.tensor(x[i:i + batch_size]),
                     self._labels(None if labels is None else labels[i:i + batch_size]), beta,
                     jnp.asarray(lam, self.dtype))
            for k, v in got.items():
                sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
        out = {k: float(v) for k, v in sums.items() if np.ndim(v) == 0}
        for name, per in ((k[len("dims/"):], v) for k, v in sums.items() if k.startswith("dims/")):
            out |= {f"rate/{name}/dim_{i}": float(v) for i, v in enumerate(per)}
        return out

    def _eval_batch(self, num_particles, param_map, key, y, labels, beta, lam):
        elbo = ScaledELBO(num_particles=num_particles, analytic_kl=self.spec.objective.analytic_kl,
                          max_plate_nesting=1)
        extra = {}
        if self.spec.label.latent:  # the label summed out; the classifier scored (Pyro twin)
            if labels is not None:
                hit = jnp.argmax(self._call(param_map, self.built.label_logits, y), -1)
                extra["accuracy"] = jnp.sum((hit == labels) & (labels >= 0))
            labels = None
        k1, k2 = jax.random.split(key)
        k3 = jax.random.fold_in(key, 2)
        # the evaluation pair: discrete sites drawn as what they are (see the Pyro twin)
        t = elbo.with_weights(beta, lam).terms(k1, param_map, self.built.eval_model,
                                               self.built.eval_guide, y, labels)
        if self.built.elbo_model is self.built.eval_model:
            nll = t["distortion"]
        else:
            nll = elbo.terms(k2, param_map, self.built.elbo_model, self.built.eval_guide, y,
                             labels)["distortion"]
        out = {"objective": t["loss"], "rate": t["rate"], "distortion": t["distortion"],
               "aux": t["aux"], "nll": nll}
        out |= {f"rate/{name}": t[f"rate/{name}"] for name in rate_sites(self.spec)}
        out |= {f"dims/{k}": v for k, v in self._rate_per_dim(param_map, k3, y, labels).items()}
        return out | extra

    @staticmethod
    def _call(param_map, fn, *args):
        """A piece of the built model (`Built.label_logits`, …) run with the param map."""
        return handlers.substitute(fn, data=param_map)(*args)
