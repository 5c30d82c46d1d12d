"""What the latent sites need from JAX beyond `numpyro.distributions` (the program,
`ppl_vae.program`, builds the priors and posteriors): the full-covariance Cholesky factor, an
inverse autoregressive flow step, readers of a site's distribution for the hooks, and the
discrete sites' distributions (`Discrete` and its relaxation `Concrete`). The twin of
`ppl_vae/pyro/latents.py`."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.kl import kl_divergence
from numpyro.distributions.transforms import Transform


def lower_cholesky(scale, below):
    """L (..., d, d): `scale` on the diagonal, `below` (..., d(d−1)/2) under it, row by row (the
    order of `jnp.tril_indices(d, -1)`, as the Pyro twin)."""
    d = scale.shape[-1]
    L = scale[..., None] * jnp.eye(d, dtype=scale.dtype)
    if below is None:
        return L
    rows, cols = jnp.tril_indices(d, -1)
    below = jnp.broadcast_to(below, (*scale.shape[:-1], below.shape[-1]))
    return L.at[..., rows, cols].set(below)


class IAFStep(Transform):
    """One inverse autoregressive flow step, z ↦ σ ⊙ z + (1 − σ) ⊙ m with (m, logit σ) from
    ``params(z)``; ln |det J| = Σ ln σ (`ppl_vae.autoregressive`). ln σ is the intermediate a
    draw keeps, so ln q of the flow's own draw costs no MADE pass; the inverse takes d."""

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, params):
        self.params = params

    def __call__(self, x):
        return self.call_with_intermediates(x)[0]

    def call_with_intermediates(self, x):
        m, logit = self.params(x)
        gate = jax.nn.sigmoid(logit)
        return gate * x + (1 - gate) * m, jax.nn.log_sigmoid(logit)

    def _inverse(self, y):
        # after k passes the first k coordinates (in the step's order) are exact
        def update(_, x):
            m, logit = self.params(x)
            gate = jax.nn.sigmoid(logit)
            return (y - (1 - gate) * m) / gate

        return jax.lax.fori_loop(0, y.shape[-1], update, jnp.zeros_like(y))

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        log_gate = self.call_with_intermediates(x)[1] if intermediates is None else intermediates
        return log_gate.sum(-1)

    def tree_flatten(self):
        return (), ((), {"params": self.params})


def marginal_std(q):
    """Standard deviations of the coordinates of a Gaussian q (diagonal or full), (..., d)."""
    if isinstance(q, dist.MultivariateNormal):
        return jnp.sqrt(jnp.square(q.scale_tril).sum(-1))
    return q.base_dist.scale


def factorised_normal(fn):
    """The Normal whose coordinates a site's distribution factorises into, or None."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn if isinstance(fn, dist.Normal) else None


def site_log_prob(site):
    """ln p of a trace site's value, per example (a flow's draw scored from its intermediates)."""
    if site["intermediates"]:
        return site["fn"].log_prob(site["value"], site["intermediates"])
    return site["fn"].log_prob(site["value"])


# ---- discrete sites ---------------------------------------------------------------------------
def discrete_support(dim: int, categories: int | None) -> np.ndarray:
    """Every value of `dim` discrete variables, (S, width): the same order as the Pyro twin
    (`itertools.product`, the first variable slowest)."""
    values = np.array(list(itertools.product(range(categories or 2), repeat=dim)), np.int64)
    if categories is None:
        return values.astype(np.float64).reshape(-1, dim)
    return np.eye(categories)[values].reshape(len(values), dim * categories)


def _grouped(x, categories: int):
    """(..., d·K) -> (..., d, K)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // categories, categories)


def discrete_kl_per_dim(logits_q, logits_p, categories: int | None):
    """KL(q_i ‖ p_i) of each of the d variables, (..., d), nats (see the Pyro twin)."""
    if categories is None:
        p = jax.nn.sigmoid(logits_q)
        return (p * (jax.nn.log_sigmoid(logits_q) - jax.nn.log_sigmoid(logits_p))
                + (1 - p) * (jax.nn.log_sigmoid(-logits_q) - jax.nn.log_sigmoid(-logits_p)))
    log_q = jax.nn.log_softmax(_grouped(logits_q, categories), -1)
    log_p = jax.nn.log_softmax(_grouped(logits_p, categories), -1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)


def discrete_probs(logits, categories: int | None):
    """E[z] of a discrete site from its logits, in their layout (see the Pyro twin)."""
    if categories is None:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(_grouped(logits, categories), -1).reshape(logits.shape)


class _Factorised(dist.Distribution):
    """What the two discrete families share (see the Pyro twin): `logits` (..., width), event
    shape (width,), `expand` keeping the class."""

    pytree_aux_fields = ("categories",)

    def __init__(self, logits, categories, validate_args=None):
        self.logits, self.categories = logits, categories
        shape = jnp.shape(logits)
        super().__init__(batch_shape=shape[:-1], event_shape=shape[-1:],
                         validate_args=validate_args)

    @property
    def dim(self) -> int:
        return self.event_shape[0] // (self.categories or 1)

    @property
    def probs(self):
        return discrete_probs(self.logits, self.categories)


class Discrete(_Factorised):
    """d independent discrete variables (Bernoulli units, or with `categories` K one-hot
    categorical variables flattened): not reparameterised, its joint support enumerable,
    `kl_divergence` registered. The twin of `ppl_vae.pyro.latents.Discrete`."""

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = True
    pytree_data_fields = ("logits",)

    def __init__(self, logits, categories: int | None = None, *, validate_args=None):
        super().__init__(logits, categories, validate_args)

    def expand(self, batch_shape):
        batch_shape = tuple(batch_shape)
        return Discrete(jnp.broadcast_to(self.logits, batch_shape + self.event_shape),
                        self.categories)

    @property
    def mean(self):
        return self.probs

    def log_prob(self, value):
        if self.categories is None:
            return jnp.sum(value * self.logits - jax.nn.softplus(self.logits), -1)
        log_p = jax.nn.log_softmax(_grouped(self.logits, self.categories), -1)
        return jnp.sum(_grouped(value, self.categories) * log_p, (-2, -1))

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        if self.categories is None:
            return jax.random.bernoulli(key, jax.nn.sigmoid(self.logits), shape).astype(
                self.logits.dtype)
        logits = _grouped(self.logits, self.categories)
        index = jax.random.categorical(key, logits, shape=shape[:-1] + (self.dim,))
        return jax.nn.one_hot(index, self.categories, dtype=self.logits.dtype).reshape(shape)

    def enumerate_support(self, expand: bool = True):
        values = jnp.asarray(discrete_support(self.dim, self.categories), self.logits.dtype)
        values = values.reshape((len(values),) + (1,) * len(self.batch_shape)
                                + self.event_shape)
        if expand:
            values = jnp.broadcast_to(values, values.shape[:1] + self.batch_shape
                                      + self.event_shape)
        return values


class Concrete(_Factorised):
    """The Concrete / Gumbel-softmax relaxation of `Discrete` at `temperature` τ,
    reparameterised; `log_prob` the relaxed density; `kl_divergence` between two registered as
    the KL of the discrete variables they relax (by design: see the Pyro twin)."""

    arg_constraints = {"logits": constraints.real_vector, "temperature": constraints.positive}
    support = constraints.independent(constraints.unit_interval, 1)
    reparametrized_params = ["logits", "temperature"]
    pytree_data_fields = ("logits", "temperature")

    def __init__(self, temperature, logits, categories: int | None = None, *,
                 validate_args=None):
        self.temperature = jnp.asarray(temperature, jnp.result_type(logits))
        super().__init__(logits, categories, validate_args)

    def expand(self, batch_shape):
        batch_shape = tuple(batch_shape)
        return Concrete(self.temperature,
                        jnp.broadcast_to(self.logits, batch_shape + self.event_shape),
                        self.categories)

    @property
    def discrete(self) -> Discrete:
        return Discrete(self.logits, self.categories)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        dtype = jnp.result_type(self.logits)
        eps = jnp.finfo(dtype).eps
        u = jax.random.uniform(key, shape, dtype, minval=eps, maxval=1 - eps)
        if self.categories is None:
            return jax.nn.sigmoid((self.logits + jnp.log(u) - jnp.log1p(-u)) / self.temperature)
        gumbel = -jnp.log(-jnp.log(u))
        x = jax.nn.softmax(_grouped(self.logits + gumbel, self.categories) / self.temperature,
                           -1)
        return x.reshape(shape)

    def log_prob(self, value):
        eps = jnp.finfo(jnp.result_type(value)).eps
        x = jnp.clip(value, eps, 1 - eps)
        tau, logits = self.temperature, self.logits
        if self.categories is None:
            log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
            return jnp.sum(jnp.log(tau) + logits - (tau + 1) * (log_x + log_1mx)
                           - 2 * jnp.logaddexp(logits - tau * log_x, -tau * log_1mx), -1)
        k = self.categories
        log_x, logits = jnp.log(_grouped(x, k)), _grouped(logits, k)
        per = (math.lgamma(k) + (k - 1) * jnp.log(tau) + jnp.sum(logits - (tau + 1) * log_x, -1)
               - k * jax.scipy.special.logsumexp(logits - tau * log_x, -1))
        return jnp.sum(per, -1)


@kl_divergence.register(Discrete, Discrete)
def _kl_discrete(q, p):
    return jnp.sum(discrete_kl_per_dim(q.logits, p.logits, q.categories), -1)


@kl_divergence.register(Concrete, Concrete)
def _kl_concrete(q, p):
    # the discrete KL, by design (see the class docstring)
    return jnp.sum(discrete_kl_per_dim(q.logits, p.logits, q.categories), -1)


def discrete_log_prob_per_dim(fn, value):
    """ln q(z_i) of each of the d variables of a `Discrete` site at `value`, (..., d)."""
    if fn.categories is None:
        return value * fn.logits - jax.nn.softplus(fn.logits)
    log_p = jax.nn.log_softmax(_grouped(fn.logits, fn.categories), -1)
    return jnp.sum(_grouped(value, fn.categories) * log_p, -1)


def discrete_factors(fn):
    """The `Discrete` or `Concrete` distribution of a site, or None."""
    return fn if isinstance(fn, _Factorised) else None
