"""PyTorch networks built from a spec: encoders, decoder, priors, likelihood parameters, aux
heads.

Parameter names are canonical (`params.npz` uses ``<module>.<state_dict key>``) and layouts are
PyTorch's: dense weights are (out, in), conv weights (out, in, kh, kw), transposed-conv weights
(in, out, kh, kw). The NumPyro backend converts to and from this layout. Module names follow the
latent graph (`ppl_vae.graph`): ``encoder``, ``prior`` in a one-site spec; ``encoder`` (the
data's features), ``encoder_<site>``, ``prior_<site>`` in a graph; ``decoder``, ``likelihood``
and ``aux_<name>`` in both.

Every network accepts extra leading dimensions (particles) before the batch dimension.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae import autoregressive, graph
from ppl_vae.pyro.latents import Temperatures
from ppl_vae.spec import (
    LABEL_SITE,
    AuxSpec,
    DecoderSpec,
    LikelihoodSpec,
    PosteriorSpec,
    PriorSpec,
)

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


def concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the last axis after broadcasting the leading (particle, batch) axes,
    e.g. features (B, H) with a drawn site (P, B, d) -> (P, B, H + d)."""
    if len(parts) == 1:  # nothing to join (the one site of a plain VAE): no copy per step
        return parts[0]
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*lead, p.shape[-1]) for p in parts], -1)


def scale_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """softplus(raw) + MIN_SCALE: a standard deviation from an unconstrained output."""
    return F.softplus(raw) + MIN_SCALE


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


class Features(nn.Module):
    """(y (..., D) or None, extra (..., E) or None) -> features h (..., H).

    conv (`channels` given): one 4x4 stride-2 conv of the image y per entry (`convs.i`), then
    flatten; the extra inputs are appended; then the MLP `body` (`hidden`, [] = none).
    """

    def __init__(self, data_dim: int, image_shape, extra_width: int, hidden: tuple[int, ...],
                 activation: str, channels: tuple[int, ...] | None = None):
        super().__init__()
        self.image_shape, self.conv = image_shape, bool(channels)
        self.act = ACTIVATIONS[activation]
        width = data_dim
        if channels:
            chans = [1, *channels]
            self.convs = nn.ModuleList(
                nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:])
            )
            width = graph.conv_width(channels, image_shape)
        width += extra_width
        self.body = MLP([width, *hidden], activation)
        self.width = hidden[-1] if hidden else width

    def forward(self, y: torch.Tensor | None, extra: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if y is not None:
            if self.conv:
                lead = y.shape[:-1]
                h = y.reshape(-1, 1, *self.image_shape)
                for conv in self.convs:
                    h = self.act(conv(h))
                y = h.reshape(*lead, -1)
            parts.append(y)
        if extra is not None:
            parts.append(extra)
        return self.body(concat(parts))


class Encoder(Features):
    """`Features`, then the parameters of a posterior q(z|inputs) over d dimensions:
    `loc`, `scale` (softplus + MIN_SCALE), `tril` (the d(d−1)/2 entries below the diagonal of
    the full-covariance scale L, row by row) and `flow.t` (the MADE of IAF step t, reading
    the features h as context; `ppl_vae.autoregressive`)."""

    def __init__(self, data_dim: int, image_shape, extra_width: int, hidden, activation: str,
                 latent_dim: int, posterior: PosteriorSpec, channels=None):
        super().__init__(data_dim, image_shape, extra_width, hidden, activation, channels)
        self.kind, self.latent_dim = posterior.kind, latent_dim
        self.loc = nn.Linear(self.width, latent_dim)
        self.scale = nn.Linear(self.width, latent_dim)
        if posterior.kind == "full" and latent_dim > 1:
            self.tril = nn.Linear(self.width, latent_dim * (latent_dim - 1) // 2)
        if posterior.kind == "iaf":
            self.flow = nn.ModuleList(
                MADE(latent_dim, posterior.flow_hidden, 2, self.width, posterior.activation)
                for _ in range(posterior.flow_steps))

    def forward(self, y, extra=None):
        """-> (loc, scale, below-diagonal entries of L or None, features h)."""
        h = super().forward(y, extra)
        below = self.tril(h) if hasattr(self, "tril") else None
        return self.loc(h), scale_from_raw(self.scale(h)), below, h

    def flow_params(self, x: torch.Tensor, h: torch.Tensor, step: int):
        """IAF step `step` at x (..., d) with context h: (m, gate logit), each (..., d)."""
        reverse = step % 2 == 1
        x = x.flip(-1) if reverse else x
        out = self.flow[step](h, x)  # (..., d, 2)
        m, s = out[..., 0], out[..., 1]
        if reverse:
            m, s = m.flip(-1), s.flip(-1)
        return m, s + autoregressive.IAF_GATE_BIAS


class DiscreteEncoder(Features):
    """`Features`, then `out`: the logits of a discrete site's posterior, (..., width) (d
    Bernoulli logits, or d groups of K categorical logits)."""

    def __init__(self, data_dim: int, image_shape, extra_width: int, hidden, activation: str,
                 width: int, channels=None):
        super().__init__(data_dim, image_shape, extra_width, hidden, activation, channels)
        self.out = nn.Linear(self.width, width)

    def forward(self, y, extra=None):
        """-> (logits, None, None, features h): the `Encoder` call's shape."""
        h = super().forward(y, extra)
        return self.out(h), None, None, h


class Baseline(nn.Module):
    """NVIL's input-dependent baseline (Mnih & Gregor 2014) of a score-function site: an MLP
    `body` (relu) of the data y (..., D), then `out`: one number per example (...)."""

    def __init__(self, data_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.body = MLP([data_dim, *hidden], "relu")
        self.out = nn.Linear(hidden[-1] if hidden else data_dim, 1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(y))[..., 0]


class Decoder(nn.Module):
    """code (..., C) -> likelihood parameters (..., D) or (..., D, K) for K categories; the code
    is the values of the sites the decoder reads, then the one-hot label.

    conv: the MLP, then a dense layer `project` to channels[0] x (H/2^L) x (W/2^L), then 4x4
    stride-2 transposed convs (`deconvs.i`), the last one to K output channels.
    """

    def __init__(self, spec: DecoderSpec, data_dim: int, code_width: int,
                 image_shape: tuple[int, int] | None, per_pixel: int):
        super().__init__()
        self.kind, self.image_shape, self.per_pixel = spec.kind, image_shape, per_pixel
        self.data_dim = data_dim
        self.act = ACTIVATIONS[spec.activation]
        self.body = MLP([code_width, *spec.hidden], spec.activation)
        width = spec.hidden[-1] if spec.hidden else code_width
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

    def forward(self, code: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y is not used: this decoder's pixels are independent given the code."""
        lead = code.shape[:-1]
        h = self.body(code)
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


class MADE(nn.Module):
    """(context (..., C), x (..., D)) -> (..., D) or (..., D, K): a MADE over x conditioned on
    the context, so that the K outputs of dimension i depend on x_<i and the context only
    (`ppl_vae.autoregressive`: layers `layers.l`, context layers `context.l`, `direct`).

    Two components: the autoregressive decoder (x the image, teacher forcing; the context the
    code; draws from `ancestral_sample`) and each step of an IAF posterior (x the latent, K = 2,
    the context the encoder's features)."""

    def __init__(self, data_dim: int, hidden: tuple[int, ...], per_pixel: int, context_dim: int,
                 activation: str):
        super().__init__()
        self.data_dim, self.per_pixel = data_dim, per_pixel
        self.act = ACTIVATIONS[activation]
        masks = autoregressive.layer_masks(data_dim, hidden, per_pixel)
        self.layers = nn.ModuleList(MaskedLinear(m) for m in masks)
        self.context = nn.ModuleList(nn.Linear(context_dim, m.shape[1], bias=False)
                                     for m in masks)
        if hidden:
            self.direct = MaskedLinear(autoregressive.direct_mask(data_dim, per_pixel),
                                       bias=False)

    def forward(self, context: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise ValueError("the autoregressive decoder needs the image y as well as z "
                             "(teacher forcing); draw images with `ancestral_sample`")
        lead = torch.broadcast_shapes(context.shape[:-1], x.shape[:-1])
        h = x
        for i, (layer, ctx) in enumerate(zip(self.layers, self.context)):
            h = layer(h) + ctx(context)
            if i < len(self.layers) - 1:
                h = self.act(h)
        if hasattr(self, "direct"):
            h = h + self.direct(x)
        h = h.reshape(*lead, self.data_dim, self.per_pixel)
        return h.squeeze(-1) if self.per_pixel == 1 else h


class Prior(nn.Module):
    """P̂_Φ(z) of one site: `normal` N(0, I) (no parameters), `learned_normal`
    N(loc, diag exp(log_scale)²), `mixture` Σ_k softmax(logits)_k N(loc_k, diag exp(log_scale_k)²),
    `vamp` (1/K) Σ_k q(z | pseudo_inputs_k) (the pseudo-inputs (K, D) its only parameter), or
    `conditional` N(loc(h), diag scale(h)²) with h = body(parents, label): `body`, `loc`,
    `scale` as in an encoder; a discrete site's `learned_probs` its `logits` (width,) (zeros:
    uniform at first; uniform has no parameters)."""

    def __init__(self, spec: PriorSpec, latent_dim: int, in_width: int = 0, data_dim: int = 0,
                 width: int = 0, discrete: bool = False):
        super().__init__()
        self.kind, self.dim = spec.kind, latent_dim
        if discrete:  # "normal" (the default) and "uniform": no parameters
            self.kind = "learned_probs" if spec.kind == "learned_probs" else "uniform"
            if spec.kind == "learned_probs":
                self.logits = nn.Parameter(torch.zeros(width))
        elif spec.kind == "learned_normal":
            self.loc = nn.Parameter(torch.zeros(latent_dim))
            self.log_scale = nn.Parameter(torch.zeros(latent_dim))
        elif spec.kind == "mixture":
            k = spec.components
            self.logits = nn.Parameter(torch.zeros(k))
            # Spread the components so they do not start identical (they would stay identical).
            self.loc = nn.Parameter(torch.randn(k, latent_dim))
            self.log_scale = nn.Parameter(torch.zeros(k, latent_dim))
        elif spec.kind == "vamp":  # U(0, 1) images until `ppl_vae.init` sets training images
            self.pseudo_inputs = nn.Parameter(torch.rand(spec.components, data_dim))
        elif spec.kind == "conditional":
            self.body = MLP([in_width, *spec.hidden], spec.activation)
            width = spec.hidden[-1] if spec.hidden else in_width
            self.loc = nn.Linear(width, latent_dim)
            self.scale = nn.Linear(width, latent_dim)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A `conditional` prior's (loc, scale), each (..., d), at its inputs (..., C)."""
        h = self.body(inputs)
        return self.loc(h), scale_from_raw(self.scale(h))


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


class Classifier(Features):
    """q(label|y) of a latent label (M2): `Features` of y, then `out`: logits (..., classes)."""

    def __init__(self, data_dim: int, image_shape, hidden, activation: str, classes: int,
                 channels=None):
        super().__init__(data_dim, image_shape, 0, hidden, activation, channels)
        self.out = nn.Linear(self.width, classes)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.out(super().forward(y))


class ClassPrior(nn.Module):
    """p(label) = Cat(softmax(logits)): `logits` learned (zeros at first), or uniform (no
    parameter)."""

    def __init__(self, classes: int, learned: bool):
        super().__init__()
        if learned:
            self.logits = nn.Parameter(torch.zeros(classes))


def build_networks(plan: graph.Plan) -> dict[str, nn.Module]:
    """All modules of a spec's plan, by canonical module name. The prefix decides the role:
    `encoder*`, `aux_*` and `baseline*` (a score-function site's NVIL baseline) belong to the
    guide (Ψ); `decoder`, `prior*`, `likelihood` to the model (Φ); `temperature` holds the
    relaxed sites' temperatures (buffers, not parameters)."""
    spec, data_dim, image_shape = plan.spec, plan.data_dim, plan.image_shape
    enc, per_pixel = spec.encoder, params_per_pixel(spec.likelihood)
    channels = enc.channels if enc.kind == "conv" else None
    # The decoder is made first: initial weights drawn in the order they always were (so a
    # seed gives the run it gave before latent graphs), while the dict lists the encoder first.
    decoder = (MADE(data_dim, spec.decoder.hidden, per_pixel, plan.code_width,
                    spec.decoder.activation)
               if spec.decoder.kind == "autoregressive" else
               Decoder(spec.decoder, data_dim, plan.code_width, image_shape, per_pixel))
    modules: dict[str, nn.Module] = {}
    if plan.one_site:
        (s,) = plan.sites
        modules["encoder"] = (
            DiscreteEncoder(data_dim, image_shape, s.posterior_width, enc.hidden,
                            enc.activation, s.width, channels) if s.discrete else
            Encoder(data_dim, image_shape, s.posterior_width, enc.hidden, enc.activation,
                    s.dim, s.posterior, channels))
    elif plan.feature_network:
        modules["encoder"] = Features(data_dim, image_shape, 0, enc.hidden, enc.activation,
                                      channels)
    for s in () if plan.one_site else plan.sites:
        post = s.posterior
        modules[s.encoder_module] = (
            DiscreteEncoder(0, None, s.posterior_width, post.hidden, post.activation, s.width)
            if s.discrete else
            Encoder(0, None, s.posterior_width, post.hidden, post.activation, s.dim, post))
    modules["decoder"] = decoder
    for s in plan.sites:
        modules[s.prior_module] = Prior(s.prior, s.dim, s.prior_width, data_dim, s.width,
                                        s.discrete)
    modules["likelihood"] = Likelihood(spec.likelihood, data_dim)
    for aux in plan.aux:
        if aux.spec.kind == "supervised" and aux.site != LABEL_SITE:
            modules[f"aux_{aux.name}"] = SupervisedHead(aux.spec, plan.site(aux.site).dim)
    if spec.label.latent:  # made last: the other modules' initial weights stay as they were
        lab = spec.label
        modules[f"encoder_{LABEL_SITE}"] = Classifier(data_dim, image_shape, lab.hidden,
                                                      enc.activation, lab.classes, channels)
        modules[f"prior_{LABEL_SITE}"] = ClassPrior(lab.classes, lab.class_prior == "learned")
    for s in plan.sites:  # made after the rest, as the label's modules
        if s.baseline_module is not None:
            modules[s.baseline_module] = Baseline(data_dim, s.baseline_hidden)
    relaxed = {s.name: s.temperature.end for s in plan.sites if s.relaxed}
    if relaxed:
        modules["temperature"] = Temperatures(relaxed)
    return modules
