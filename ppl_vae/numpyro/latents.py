"""What the latent sites need from JAX beyond `numpyro.distributions` (the program,
`ppl_vae.program`, builds the priors and posteriors): the full-covariance Cholesky factor, an
inverse autoregressive flow step, and readers of a site's distribution for the hooks. The twin
of `ppl_vae/pyro/latents.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints
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
