"""What the latent sites need from PyTorch beyond `pyro.distributions` (the program,
`ppl_vae.program`, builds the priors and posteriors): the full-covariance Cholesky factor, an
inverse autoregressive flow step, one-hot labels, and two readers of a site's distribution for
the hooks. The twin of `ppl_vae/numpyro/latents.py`."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform
from torch.nn import functional as F


def one_hot(labels: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    """(B,) int labels in 0..classes−1 -> (B, classes) one-hot rows. A comparison, not
    `F.one_hot`: that one checks the labels' range on the host (a device sync every step)."""
    return (labels[..., None] == torch.arange(classes, device=labels.device)).to(dtype)


def lower_cholesky(scale: torch.Tensor, below: torch.Tensor | None) -> torch.Tensor:
    """L (..., d, d): `scale` on the diagonal, `below` (..., d(d−1)/2) under it, row by row
    (the order of `torch.tril_indices(d, d, -1)` and of NumPy's `tril_indices(d, -1)`)."""
    d = scale.shape[-1]
    L = torch.diag_embed(scale)
    if below is None:
        return L
    rows, cols = torch.tril_indices(d, d, -1, device=scale.device)
    below = below.expand(*scale.shape[:-1], below.shape[-1])
    # a scatter into zeros, not an in-place write into L (an input of the autograd graph)
    flat = torch.zeros(*scale.shape[:-1], d * d, dtype=L.dtype, device=L.device)
    return L + flat.index_copy(-1, rows * d + cols, below).reshape(L.shape)


class IAFStep(Transform):
    """One inverse autoregressive flow step, z ↦ σ ⊙ z + (1 − σ) ⊙ m with (m, logit σ) from
    ``params(z)`` (`Encoder.flow_params`; see `ppl_vae.autoregressive`). ln |det J| = Σ ln σ.

    The forward pass caches ln σ for the z it saw, so that ln q of the flow's own draw costs no
    MADE pass; the inverse (for a z drawn elsewhere) takes d passes."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, params):
        super().__init__(cache_size=1)
        self.params = params
        self._log_gate = None  # (x, ln σ(x)) of the last forward pass

    def _call(self, x):
        m, logit = self.params(x)
        gate = torch.sigmoid(logit)
        self._log_gate = (x, F.logsigmoid(logit))
        return gate * x + (1 - gate) * m

    def _inverse(self, y):
        # x_i depends on x_<i only through m_i and σ_i: after k passes the first k coordinates
        # (in the step's order) are exact, after d passes all are.
        x = torch.zeros_like(y)
        for _ in range(y.shape[-1]):
            m, logit = self.params(x)
            gate = torch.sigmoid(logit)
            x = (y - (1 - gate) * m) / gate
        return x

    def log_abs_det_jacobian(self, x, y):
        if self._log_gate is not None and self._log_gate[0] is x:
            log_gate = self._log_gate[1]
        else:
            log_gate = F.logsigmoid(self.params(x)[1])
        return log_gate.sum(-1)


def marginal_std(q) -> torch.Tensor:
    """Standard deviations of the coordinates of a Gaussian q (diagonal or full), (..., d)."""
    if isinstance(q, dist.MultivariateNormal):
        return q.scale_tril.pow(2).sum(-1).sqrt()
    return q.base_dist.scale


def factorised_normal(fn):
    """The Normal whose coordinates a site's distribution factorises into (under
    `Independent`), or None (full covariance, flows, mixtures)."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, torch.distributions.Normal) else None
