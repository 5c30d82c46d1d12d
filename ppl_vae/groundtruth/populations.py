"""Synthetic populations Pop(y) whose entropy H(y) is known exactly, for ``data.source =
"synthetic:<name>"``.

The lecture's identities are statements about H(y):

    H(y) = I(y, z) + H(y|z),   rate Î ≥ I,   distortion Ĥ ≥ H(y|z)

so every VAE has −ELBO = rate + distortion ≥ H(y), with equality only under universal
expressiveness. On real data H(y) is unknown; on these populations it is computed by summing
−Pop(y) ln Pop(y) over every one of the 2^D binary images (D ≤ 20), so a trained model's
(rate, distortion) point can be placed against the line R + D = H(y).

A population here is a mixture of product-Bernoulli components,

    Pop(y) = Σ_k w_k Π_i θ_ki^y_i (1 − θ_ki)^(1 − y_i),   y ∈ {0, 1}^D,

which is also a latent-variable model with a discrete latent k, so its component information
I(y; k) = H(y) − Σ_k w_k H(y|k) is known too: the nats a perfect clustering encoder would carry.
NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The largest D whose 2^D images are enumerated (2^20 rows of D float64: 160 MiB at most).
MAX_ENUMERATED_PIXELS = 20


@dataclass(frozen=True)
class BernoulliMixture:
    """Pop(y) = Σ_k w_k Π_i Bernoulli(y_i; θ_ki) over D binary pixels.

    weights (K,): mixture weights w_k, positive, summing to 1. probs (K, D): θ_ki = P(y_i = 1 | k),
    in (0, 1). image_shape: (H, W) with H·W = D, or None for flat data.
    """

    name: str
    weights: np.ndarray
    probs: np.ndarray
    image_shape: tuple[int, int] | None = None

    def __post_init__(self):
        w, p = np.asarray(self.weights, np.float64), np.asarray(self.probs, np.float64)
        if w.ndim != 1 or p.ndim != 2 or p.shape[0] != w.shape[0]:
            raise ValueError(f"weights (K,) and probs (K, D) expected; got {w.shape}, {p.shape}")
        if np.any(w <= 0) or not math.isclose(w.sum(), 1.0, rel_tol=1e-12):
            raise ValueError("weights must be positive and sum to 1")
        if np.any(p <= 0) or np.any(p >= 1):
            raise ValueError("probs must lie strictly inside (0, 1)")
        if p.shape[1] > MAX_ENUMERATED_PIXELS:
            raise ValueError(f"{p.shape[1]} pixels: H(y) is computed by enumerating 2^D images, "
                             f"so D <= {MAX_ENUMERATED_PIXELS}")

    @property
    def dim(self) -> int:
        """D, the number of binary pixels."""
        return int(self.probs.shape[1])

    def component_log_prob(self, y: np.ndarray) -> np.ndarray:
        """ln Pop(y|k) for y (N, D) in {0, 1}: (N, K) float64, nats."""
        y = np.asarray(y, np.float64)
        log_on, log_off = np.log(self.probs), np.log1p(-self.probs)
        return y @ log_on.T + (1.0 - y) @ log_off.T

    def log_prob(self, y: np.ndarray) -> np.ndarray:
        """ln Pop(y) for y (N, D) in {0, 1}: (N,) float64, nats."""
        joint = self.component_log_prob(y) + np.log(self.weights)
        peak = joint.max(axis=1, keepdims=True)
        return (np.log(np.exp(joint - peak).sum(axis=1, keepdims=True)) + peak)[:, 0]

    def all_images(self) -> np.ndarray:
        """Every y ∈ {0, 1}^D, (2^D, D) float64, in binary counting order (pixel 0 slowest)."""
        codes = np.arange(2**self.dim)[:, None]
        return ((codes >> np.arange(self.dim - 1, -1, -1)) & 1).astype(np.float64)

    def entropy(self) -> float:
        """H(y) = −Σ_y Pop(y) ln Pop(y), nats, exact: every one of the 2^D images is summed."""
        log_p = self.log_prob(self.all_images())
        return float(-(np.exp(log_p) * log_p).sum())

    def conditional_entropy(self) -> float:
        """H(y|k) = Σ_k w_k Σ_i H_b(θ_ki), nats (the pixels are independent given k)."""
        p = self.probs
        binary = -(p * np.log(p) + (1 - p) * np.log1p(-p))
        return float(self.weights @ binary.sum(axis=1))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n draws y ~ Pop: (images (n, D) float32 of 0/1, components k (n,) int64)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        y = (rng.random((n, self.dim)) < self.probs[k]).astype(np.float32)
        return y, k.astype(np.int64)


def bars(on: float = 0.9, off: float = 0.05) -> BernoulliMixture:
    """4x4 binary images, each one of 8 bars (4 rows, 4 columns; equally likely) with every
    pixel of the bar lit with probability `on` and every other pixel with probability `off`.

    The classic "bars" problem (Földiák 1990) with independent pixel noise: 16 pixels, 8
    components, H(y) ≈ 5.7 nats of which I(y; k) ≈ 2.0 nats name the bar. The label of an
    example is its bar: 0-3 the rows, 4-7 the columns.
    """
    probs = np.full((8, 4, 4), off)
    for i in range(4):
        probs[i, i, :] = on
        probs[4 + i, :, i] = on
    return BernoulliMixture("bars", np.full(8, 1 / 8), probs.reshape(8, 16), (4, 4))


#: data.source = "synthetic:<name>"; spec.SYNTHETIC_POPULATIONS lists the same names.
POPULATIONS = {"bars": bars}


def population(name: str) -> BernoulliMixture:
    """The population registered as `name` (see POPULATIONS)."""
    if name not in POPULATIONS:
        raise ValueError(f"no synthetic population {name!r}; choose one of {sorted(POPULATIONS)}")
    return POPULATIONS[name]()
