"""Encoder-only loss terms (Pyro): InfoNCE and a classifier on the posterior mean. They read
the encoder alone, so they leave the optimum of the model P̂_Φ(y) unchanged (the lecture's
encoder autonomy). The twin of `ppl_vae/numpyro/aux.py`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def infonce_loss(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """−Σ_i InfoNCE_i, a batch lower bound on I_q(y; z) from the encoder alone (nats).

    InfoNCE_i = ln q(z_i|y_i) − ln (1/B) Σ_j q(z_i|y_j) ≤ ln B  (van den Oord et al. 2018;
    Poole et al. 2019). z (..., B, d), loc and scale (B, d). Returns (...,).
    """
    diff = (z.unsqueeze(-2) - loc) / scale  # (..., B_i, B_j, d)
    log_q = -0.5 * (diff * diff).sum(-1) - scale.log().sum(-1) - 0.5 * z.shape[-1] * math.log(
        2 * math.pi)
    batch = z.shape[-2]
    bound = log_q.diagonal(dim1=-2, dim2=-1) - log_q.logsumexp(-1) + math.log(batch)
    return -bound.sum(-1)


def supervised_loss(head: nn.Module, loc: torch.Tensor, labels) -> torch.Tensor:
    """Cross-entropy (nats) of a classifier on the posterior mean, summed over labelled examples
    (labels ≥ 0); 0 where no label is known."""
    if labels is None:
        return loc.new_zeros(())
    return label_cross_entropy(head(loc), labels)


def label_cross_entropy(logits: torch.Tensor, labels) -> torch.Tensor:
    """−Σ ln softmax(logits)[label] over the examples whose label is known (labels ≥ 0), nats;
    logits (B, classes). Kingma et al.'s (2014) α-term when logits are q(label|y)'s."""
    if labels is None:
        return logits.new_zeros(())
    known = labels >= 0
    nll = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return torch.where(known, nll, torch.zeros_like(nll)).sum()
