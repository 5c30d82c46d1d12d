"""The connectivity of the MADE networks, backend-free: both backends build their masked
layers from these NumPy masks. Two components use them: the autoregressive decoder
(``decoder.kind = "autoregressive"``) and the inverse autoregressive flow posterior
(``posterior.kind = "iaf"``, below).

The decoder is a MADE (Germain et al. 2015, "MADE: Masked Autoencoder for Distribution
Estimation") over the D pixels, conditioned on z:

    P̂_Φ(y|z) = Π_i P̂_Φ(y_i | y_<i, z)

Pixel i's likelihood parameters see y_1..y_{i-1} (in the data's row-major order) and all of z,
never y_i or later pixels. Layers, for hidden widths H_1..H_L:

    h_1 = act(M_0(y) + C_0 z),  h_l = act(M_{l-1}(h_{l-1}) + C_{l-1} z),
    out = M_L(h_L) + C_L z + A(y)

M_l are masked dense layers (`layers.l`), C_l dense layers from z without bias (`context.l`) and
A a masked direct connection from y to the outputs without bias (`direct`, present when L ≥ 1),
which makes the decoder at least a logistic autoregressive model (FVSBN) of y given z. With
hidden = [] it is out = M_0(y) + C_0 z. Such a decoder can model Pop(y) with z ignored, the
"universal expressiveness" under which posterior collapse is an optimum (the lecture).

Degrees (MADE §4): input pixel i has degree i (1-based); hidden unit j of a layer of width H has
degree 1 + ⌊j (D − 1) / H⌋, spread evenly over 1..D−1 whatever H is; output unit o = i·K + k
(pixel i, parameter k of K per pixel) has degree i + 1. A hidden unit sees the units of the
layer below whose degree is ≤ its own; an output sees those whose degree is < its own.

An inverse autoregressive flow posterior (``posterior.kind = "iaf"``; Kingma et al. 2016,
"Improving Variational Inference with Inverse Autoregressive Flow", eq. 10–14 with the gated
update of their §4): the encoder gives loc, scale and features h of its inputs; then

    z_0 = loc + scale ⊙ ε,  ε ~ N(0, I)
    [m_t, s_t] = MADE_t(z_{t−1}; h),  σ_t = sigmoid(s_t + IAF_GATE_BIAS)
    z_t = σ_t ⊙ z_{t−1} + (1 − σ_t) ⊙ m_t,        t = 1..T
    ln q(z_T|·) = ln N(z_0; loc, diag scale²) − Σ_t Σ_i ln σ_{t,i}

Each MADE has two outputs per dimension (m and s, `layer_masks(d, hidden, 2)`), so m_{t,i} and
s_{t,i} read only z_{t−1,<i}: the Jacobian of a step is triangular with diagonal σ_t. Odd steps
run in the reversed order of the dimensions (so that every dimension can depend on every
other after two steps). The rate of an IAF posterior is Monte Carlo (no closed-form KL).
Inverting a step (needed only for a z the flow did not draw itself) takes d MADE passes.
"""

from __future__ import annotations

import numpy as np

#: Added to the IAF gate's logit, so that a new flow starts near the identity (σ ≈ 0.88), as
#: Kingma et al. (2016) recommend and Pyro's `AffineAutoregressive(stable=True)` does.
IAF_GATE_BIAS = 2.0


def input_degrees(data_dim: int) -> np.ndarray:
    """Degrees of the D inputs: 1..D, (D,) int64."""
    return np.arange(1, data_dim + 1)


def hidden_degrees(data_dim: int, width: int) -> np.ndarray:
    """Degrees of a hidden layer of `width` units, spread evenly over 1..max(D−1, 1): (width,)."""
    return 1 + (np.arange(width) * max(data_dim - 1, 1)) // width


def output_degrees(data_dim: int, per_pixel: int) -> np.ndarray:
    """Degrees of the D·K outputs (pixel-major, K parameters per pixel): (D·K,)."""
    return np.repeat(np.arange(1, data_dim + 1), per_pixel)


def layer_masks(data_dim: int, hidden: tuple[int, ...], per_pixel: int) -> list[np.ndarray]:
    """Masks of `layers.0` .. `layers.L`, each (fan_in, fan_out) float32 of 0/1 (x @ (W·mask)).

    The hidden layers use ≥ (a unit may see inputs of its own degree), the output layer > (a
    pixel never sees itself or a later pixel).
    """
    degrees = [input_degrees(data_dim), *(hidden_degrees(data_dim, h) for h in hidden)]
    masks = [(d_out[None, :] >= d_in[:, None]) for d_in, d_out in zip(degrees[:-1], degrees[1:])]
    masks.append(output_degrees(data_dim, per_pixel)[None, :] > degrees[-1][:, None])
    return [m.astype(np.float32) for m in masks]


def direct_mask(data_dim: int, per_pixel: int) -> np.ndarray:
    """Mask of the direct y → output connection, (D, D·K) float32: pixel i sees y_<i."""
    out = output_degrees(data_dim, per_pixel)
    return (out[None, :] > input_degrees(data_dim)[:, None]).astype(np.float32)
