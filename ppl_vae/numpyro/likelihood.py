"""The likelihood P̂_Φ(y|z) (NumPyro): the twin of `ppl_vae/pyro/likelihood.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from ppl_vae.spec import LikelihoodSpec


def likelihood_dist(spec: LikelihoodSpec, params, log_scale=None):
    """P̂_Φ(y|z) with event shape (D,) from decoder outputs (..., D) or (..., D, K)."""
    if spec.kind == "bernoulli":
        # Grey values in [0, 1] are allowed as soft targets (cross-entropy), as in the Pyro backend.
        return dist.Bernoulli(logits=params, validate_args=False).to_event(1)
    if spec.kind == "gaussian":
        scale = jnp.exp(log_scale) if log_scale is not None else spec.scale
        return dist.Normal(params, jnp.broadcast_to(scale, params.shape)).to_event(1)
    if spec.kind == "binomial":
        return dist.Binomial(total_count=spec.total_count, logits=params).to_event(1)
    return dist.Categorical(logits=params).to_event(1)


def observation(spec: LikelihoodSpec, y):
    if spec.kind == "binomial":
        return jnp.round(y * spec.total_count)
    if spec.kind == "categorical":
        return jnp.round(y * (spec.categories - 1)).astype(jnp.int32)
    return y


def from_observation(spec: LikelihoodSpec, obs):
    """The inverse of `observation`: a value of site ``y`` back in the data's units."""
    if spec.kind == "binomial":
        return obs / spec.total_count
    if spec.kind == "categorical":
        return obs / (spec.categories - 1)
    return obs


def likelihood_mean(spec: LikelihoodSpec, params):
    """E[y|z] in the data's units: what mse/l1 compare with y."""
    if spec.kind in ("bernoulli", "binomial"):
        return jax.nn.sigmoid(params)
    if spec.kind == "gaussian":
        return params
    levels = jnp.arange(spec.categories, dtype=params.dtype)
    return (jax.nn.softmax(params, -1) * levels).sum(-1) / (spec.categories - 1)


def distortion_value(kind: str, y, mean):
    diff = y - mean
    return (diff * diff).sum(-1) if kind == "mse" else jnp.abs(diff).sum(-1)


def ancestral_sample(spec: LikelihoodSpec, decode, code, data_dim: int, key, log_scale=None):
    """y ~ P̂_Φ(y|z) = Π_i P̂_Φ(y_i | y_<i, z) for an autoregressive decoder, pixel by pixel
    (`lax.fori_loop` over the D pixels); `decode(code, y)` gives the likelihood parameters.

    code (..., C): what the decoder reads; key a JAX key. Returns (y, means), each (..., D) in
    the data's units: the draw, and E[y_i | y_<i, z] at the drawn y_<i (what `decode_mean`
    shows as the picture of z).
    """

    def pixel(i, carry):
        y, means = carry
        params = decode(code, y)
        lik = likelihood_dist(spec, params, log_scale)
        draw = from_observation(spec, lik.sample(jax.random.fold_in(key, i))).astype(y.dtype)
        mean = likelihood_mean(spec, params)
        return y.at[..., i].set(draw[..., i]), means.at[..., i].set(mean[..., i])

    y = jnp.zeros((*code.shape[:-1], data_dim), code.dtype)
    return jax.lax.fori_loop(0, data_dim, pixel, (y, jnp.zeros_like(y)))
