"""PyTorch networks built from a spec: encoder, decoder, prior, likelihood parameters, aux heads.

Parameter names are canonical (`params.npz` uses ``<module>.<state_dict key>``) and layouts are
PyTorch's: dense weights are (out, in), conv weights (out, in, kh, kw), transposed-conv weights
(in, out, kh, kw). The NumPyro backend converts to and from this layout.

Every network accepts extra leading dimensions (particles) before the batch dimension.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae import autoregressive
from ppl_vae.objective import aux_site_names
from ppl_vae.spec import AuxSpec, DecoderSpec, EncoderSpec, LikelihoodSpec, PriorSpec, Spec

#: The smallest posterior/likelihood standard deviation; keeps ln q finite when softplus -> 0.
MIN_SCALE = 1e-4

ACTIVATIONS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
}


def params_per_pixel(likelihood: LikelihoodSpec) -> int:
    """How many decoder outputs each pixel needs: K logits for categorical, else one."""
    return likelihood.categories if likelihood.kind == "categorical" else 1


class MLP(nn.Module):
    """Dense layers `layers.i` with the activation between them (and after the last one)."""

    def __init__(self, sizes: list[int], activation: str):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = self.act(layer(h))
        return h


class Encoder(nn.Module):
    """y (..., D) -> (loc, scale), each (..., d): the diagonal Gaussian q(z|y).

    conv: one 4x4 stride-2 conv per entry of `channels` (`convs.i`), flatten, then the MLP.
    scale = softplus(raw) + MIN_SCALE.
    """

    def __init__(self, spec: EncoderSpec, data_dim: int, latent_dim: int,
                 image_shape: tuple[int, int] | None):
        super().__init__()
        self.kind, self.image_shape = spec.kind, image_shape
        self.act = ACTIVATIONS[spec.activation]
        width = data_dim
        if spec.kind == "conv":
            chans = [1, *spec.channels]
            self.convs = nn.ModuleList(
                nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:])
            )
            side_h, side_w = (s // 2 ** len(spec.channels) for s in image_shape)
            width = spec.channels[-1] * side_h * side_w
        self.body = MLP([width, *spec.hidden], spec.activation)
        out = spec.hidden[-1] if spec.hidden else width
        self.loc = nn.Linear(out, latent_dim)
        self.scale = nn.Linear(out, latent_dim)

    def features(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            lead = y.shape[:-1]
            h = y.reshape(-1, 1, *self.image_shape)
            for conv in self.convs:
                h = self.act(conv(h))
            y = h.reshape(*lead, -1)
        return self.body(y)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(y)
        return self.loc(h), F.softplus(self.scale(h)) + MIN_SCALE


class Decoder(nn.Module):
    """z (..., d) -> likelihood parameters (..., D) or (..., D, K) for K categories.

    conv: the MLP, then a dense layer `project` to channels[0] x (H/2^L) x (W/2^L), then 4x4
    stride-2 transposed convs (`deconvs.i`), the last one to K output channels.
    """

    def __init__(self, spec: DecoderSpec, data_dim: int, latent_dim: int,
                 image_shape: tuple[int, int] | None, per_pixel: int):
        super().__init__()
        self.kind, self.image_shape, self.per_pixel = spec.kind, image_shape, per_pixel
        self.data_dim = data_dim
        self.act = ACTIVATIONS[spec.activation]
        self.body = MLP([latent_dim, *spec.hidden], spec.activation)
        width = spec.hidden[-1] if spec.hidden else latent_dim
        if spec.kind == "conv":
            self.low = tuple(s // 2 ** len(spec.channels) for s in image_shape)
            self.project = nn.Linear(width, spec.channels[0] * self.low[0] * self.low[1])
            chans = [*spec.channels, per_pixel]
            self.deconvs = nn.ModuleList(
                nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)
                for a, b in zip(chans[:-1], chans[1:])
            )
        else:
            self.out = nn.Linear(width, data_dim * per_pixel)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y is not used: this decoder's pixels are independent given z."""
        lead = z.shape[:-1]
        h = self.body(z)
        if self.kind == "conv":
            h = self.act(self.project(h)).reshape(-1, self.deconvs[0].in_channels, *self.low)
            for i, deconv in enumerate(self.deconvs):
                h = deconv(h)
                if i < len(self.deconvs) - 1:
                    h = self.act(h)
            # (B', K, H, W) -> (..., H*W, K): pixels in the same row-major order as the data.
            h = h.reshape(*lead, self.per_pixel, self.data_dim).transpose(-1, -2)
        else:
            h = self.out(h).reshape(*lead, self.data_dim, self.per_pixel)
        return h.squeeze(-1) if self.per_pixel == 1 else h


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight (out, in) is multiplied by a fixed 0/1 mask (a buffer that is not
    saved: it follows from the shapes, `ppl_vae.autoregressive`)."""

    def __init__(self, mask: np.ndarray, bias: bool = True):  # mask (in, out), as x @ W
        super().__init__(mask.shape[0], mask.shape[1], bias=bias)
        self.register_buffer("mask", torch.as_tensor(mask.T.copy()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class AutoregressiveDecoder(nn.Module):
    """(z (..., d), y (..., D)) -> likelihood parameters (..., D) or (..., D, K): a MADE over the
    pixels conditioned on z, so that the parameters of pixel i depend on y_<i and z only (see
    `ppl_vae.autoregressive` for the layers and masks). y is the data in its own units (the
    observed image, teacher forcing); draws come from `ancestral_sample`."""

    def __init__(self, spec: DecoderSpec, data_dim: int, latent_dim: int, per_pixel: int):
        super().__init__()
        self.data_dim, self.per_pixel = data_dim, per_pixel
        self.act = ACTIVATIONS[spec.activation]
        masks = autoregressive.layer_masks(data_dim, spec.hidden, per_pixel)
        self.layers = nn.ModuleList(MaskedLinear(m) for m in masks)
        self.context = nn.ModuleList(nn.Linear(latent_dim, m.shape[1], bias=False)
                                     for m in masks)
        if spec.hidden:
            self.direct = MaskedLinear(autoregressive.direct_mask(data_dim, per_pixel),
                                       bias=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("the autoregressive decoder needs the image y as well as z "
                             "(teacher forcing); draw images with `ancestral_sample`")
        lead = torch.broadcast_shapes(z.shape[:-1], y.shape[:-1])
        h = y
        for i, (layer, context) in enumerate(zip(self.layers, self.context)):
            h = layer(h) + context(z)
            if i < len(self.layers) - 1:
                h = self.act(h)
        if hasattr(self, "direct"):
            h = h + self.direct(y)
        h = h.reshape(*lead, self.data_dim, self.per_pixel)
        return h.squeeze(-1) if self.per_pixel == 1 else h


class Prior(nn.Module):
    """P̂_Φ(z): `normal` N(0, I) (no parameters), `learned_normal` N(loc, diag exp(log_scale)²),
    or `mixture`: sum_k softmax(logits)_k N(loc_k, diag exp(log_scale_k)²)."""

    def __init__(self, spec: PriorSpec, latent_dim: int):
        super().__init__()
        self.kind, self.dim = spec.kind, latent_dim
        if spec.kind == "learned_normal":
            self.loc = nn.Parameter(torch.zeros(latent_dim))
            self.log_scale = nn.Parameter(torch.zeros(latent_dim))
        elif spec.kind == "mixture":
            k = spec.components
            self.logits = nn.Parameter(torch.zeros(k))
            # Spread the components so they do not start identical (they would stay identical).
            self.loc = nn.Parameter(torch.randn(k, latent_dim))
            self.log_scale = nn.Parameter(torch.zeros(k, latent_dim))
        else:
            self.register_buffer("zero", torch.zeros(()), persistent=False)


class Likelihood(nn.Module):
    """Holds the learned per-pixel Gaussian log-scale (`log_scale`, (D,)) when there is one."""

    def __init__(self, spec: LikelihoodSpec, data_dim: int):
        super().__init__()
        if spec.kind == "gaussian" and spec.scale == "learned":
            self.log_scale = nn.Parameter(torch.zeros(data_dim))


class SupervisedHead(nn.Module):
    """Classifier on the posterior mean: loc (..., d) -> logits (..., classes)."""

    def __init__(self, spec: AuxSpec, latent_dim: int):
        super().__init__()
        self.body = MLP([latent_dim, *spec.hidden], "relu")
        self.out = nn.Linear(spec.hidden[-1] if spec.hidden else latent_dim, spec.classes)

    def forward(self, loc: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(loc))


def build_networks(spec: Spec, data_dim: int, image_shape) -> dict[str, nn.Module]:
    """All modules of a spec, by canonical module name. The prefix decides the role: `encoder`
    and `aux_*` belong to the guide (Ψ); `decoder`, `prior`, `likelihood` to the model (Φ)."""
    d, per_pixel = spec.latent.dim, params_per_pixel(spec.likelihood)
    decoder = (AutoregressiveDecoder(spec.decoder, data_dim, d, per_pixel)
               if spec.decoder.kind == "autoregressive" else
               Decoder(spec.decoder, data_dim, d, image_shape, per_pixel))
    modules: dict[str, nn.Module] = {
        "encoder": Encoder(spec.encoder, data_dim, d, image_shape),
        "decoder": decoder,
        "prior": Prior(spec.prior, d),
        "likelihood": Likelihood(spec.likelihood, data_dim),
    }
    for name, aux in zip(aux_site_names(spec), spec.objective.aux):
        if aux.kind == "supervised":
            modules[f"aux_{name}"] = SupervisedHead(aux, d)
    return modules
