"""The likelihood P̂_Φ(y|z) (Pyro): distributions from decoder outputs, the observed values,
means, the rate–distortion autoencoder's distortions, and ancestral sampling of an
autoregressive decoder. The twin of `ppl_vae/numpyro/likelihood.py`."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ppl_vae.spec import LikelihoodSpec


def likelihood_dist(spec: LikelihoodSpec, params: torch.Tensor, log_scale=None):
    """P̂_Φ(y|z) with event shape (D,) from decoder outputs (..., D) or (..., D, K)."""
    if spec.kind == "bernoulli":
        # validate_args=False: grey values in [0, 1] are allowed as soft targets (cross-entropy).
        return dist.Bernoulli(logits=params, validate_args=False).to_event(1)
    if spec.kind == "gaussian":
        scale = log_scale.exp() if log_scale is not None else torch.full_like(params, spec.scale)
        return dist.Normal(params, scale.expand_as(params)).to_event(1)
    if spec.kind == "binomial":
        # the count as a device tensor: a Python number would be copied from the host each step
        total_count = params.new_full((), float(spec.total_count))
        return dist.Binomial(total_count=total_count, logits=params).to_event(1)
    return dist.Categorical(logits=params).to_event(1)


def observation(spec: LikelihoodSpec, y: torch.Tensor) -> torch.Tensor:
    """The value observed at site ``y``: counts for binomial, levels for categorical."""
    if spec.kind == "binomial":
        return torch.round(y * spec.total_count)
    if spec.kind == "categorical":
        return torch.round(y * (spec.categories - 1)).long()
    return y


def from_observation(spec: LikelihoodSpec, obs: torch.Tensor) -> torch.Tensor:
    """The inverse of `observation`: a value of site ``y`` back in the data's units."""
    if spec.kind == "binomial":
        return obs / spec.total_count
    if spec.kind == "categorical":
        return obs / (spec.categories - 1)
    return obs


def likelihood_mean(spec: LikelihoodSpec, params: torch.Tensor) -> torch.Tensor:
    """E[y|z] in the data's units ([0, 1] for all but gaussian): what mse/l1 compare with y."""
    if spec.kind in ("bernoulli", "binomial"):
        return torch.sigmoid(params)
    if spec.kind == "gaussian":
        return params
    levels = torch.arange(spec.categories, dtype=params.dtype, device=params.device)
    return (params.softmax(-1) * levels).sum(-1) / (spec.categories - 1)


def distortion_value(kind: str, y: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Dist_Φ(y|z) per example, (...,): squared (mse) or absolute (l1) error summed over pixels."""
    diff = y - mean
    return (diff * diff).sum(-1) if kind == "mse" else diff.abs().sum(-1)


def ancestral_sample(spec: LikelihoodSpec, decoder, code: torch.Tensor, data_dim: int,
                     log_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """y ~ P̂_Φ(y|z) = Π_i P̂_Φ(y_i | y_<i, z) for an autoregressive decoder, pixel by pixel
    (D decoder passes), with torch's random state; ``decoder(code, y)`` gives the parameters.

    code (..., C): what the decoder reads. Returns (y, means), each (..., D) in the data's
    units: the draw, and E[y_i | y_<i, z] at the drawn y_<i (what `decode_mean` shows).
    """
    y = code.new_zeros(*code.shape[:-1], data_dim)
    means = torch.zeros_like(y)
    pixel = torch.arange(data_dim, device=code.device)
    for i in range(data_dim):
        params = decoder(code, y)
        draw = from_observation(spec, likelihood_dist(spec, params, log_scale).sample())
        # torch.where, not an in-place write: y is an input of the graph when gradients flow
        y = torch.where(pixel == i, draw.to(y.dtype), y)
        means = torch.where(pixel == i, likelihood_mean(spec, params), means)
    return y, means
