"""Encoder-only loss terms (NumPyro): the twin of `ppl_vae/pyro/aux.py`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def infonce_loss(z, loc, scale):
    """−Σ_i InfoNCE_i (see the Pyro twin): z (..., B, d), loc/scale (B, d) -> (...,)."""
    diff = (z[..., :, None, :] - loc) / scale
    log_q = (-0.5 * (diff * diff).sum(-1) - jnp.log(scale).sum(-1)
             - 0.5 * z.shape[-1] * math.log(2 * math.pi))
    batch = z.shape[-2]
    bound = (jnp.diagonal(log_q, axis1=-2, axis2=-1) - jax.nn.logsumexp(log_q, -1)
             + math.log(batch))
    return -bound.sum(-1)


def supervised_loss(head, loc, labels):
    if labels is None:
        return jnp.zeros((), loc.dtype)
    return label_cross_entropy(head(loc), labels)


def label_cross_entropy(logits, labels):
    """−Σ ln softmax(logits)[label] over the examples whose label is known (labels ≥ 0), nats
    (see the Pyro twin)."""
    if labels is None:
        return jnp.zeros((), logits.dtype)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                               jnp.clip(labels, 0)[..., None], -1)[..., 0]
    return jnp.where(labels >= 0, nll, 0.0).sum()
