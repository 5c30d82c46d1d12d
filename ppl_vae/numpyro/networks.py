"""Flax networks built from a spec, the twins of `ppl_vae/pyro/networks.py`, and the conversion
between Flax parameter trees and the canonical (PyTorch-layout) names of `params.npz`.

Canonical ↔ Flax: ``<module>.<path>.weight|bias`` ↔ ``{path: {"kernel"|"bias"}}``
where a list member ``layers.0`` is Flax's ``layers_0``. Dense kernels are transposed ((out, in)
↔ (in, out)); 4-D kernels, Conv and ConvTranspose alike, map by ``transpose(2, 3, 1, 0)`` (PyTorch
OIHW ↔ Flax HWIO; for the transposed convolution with ``transpose_kernel=True`` this also gives
PyTorch's semantics — checked numerically in the parity tests). Images are NCHW in the data and
in the canonical flattening order; the Flax convs run NHWC and transpose back before flattening.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppl_vae import autoregressive, graph
from ppl_vae.spec import AuxSpec, DecoderSpec, PosteriorSpec

#: The smallest posterior standard deviation (the same as the Pyro backend's).
MIN_SCALE = 1e-4

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # PyTorch's default is the exact GELU
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
}


class MLP(nn.Module):
    sizes: Sequence[int]
    activation: str

    def setup(self):
        self.layers = [nn.Dense(h) for h in self.sizes]

    def __call__(self, h):
        act = ACTIVATIONS[self.activation]
        for layer in self.layers:
            h = act(layer(h))
        return h


def concat(parts):
    """Concatenate along the last axis after broadcasting the leading (particle, batch) axes."""
    if len(parts) == 1:
        return parts[0]
    lead = jnp.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return jnp.concatenate([jnp.broadcast_to(p, (*lead, p.shape[-1])) for p in parts], -1)


def scale_from_raw(raw):
    """softplus(raw) + MIN_SCALE: a standard deviation from an unconstrained output."""
    return jax.nn.softplus(raw) + MIN_SCALE


class Features(nn.Module):
    """(y (..., D) or None, extra (..., E) or None) -> features h (..., H): the twin of the
    Pyro backend's `Features` (convs of the image y when `channels` is given, the extra inputs
    appended, then the MLP `body`)."""

    hidden: Sequence[int]
    activation: str
    image_shape: tuple[int, int] | None
    channels: tuple[int, ...] | None

    def setup(self):
        if self.channels:
            self.convs = [nn.Conv(c, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)))
                          for c in self.channels]
        self.body = MLP(tuple(self.hidden), self.activation)

    def features(self, y, extra):
        parts = []
        if y is not None:
            if self.channels:
                act = ACTIVATIONS[self.activation]
                lead = y.shape[:-1]
                h = y.reshape(-1, *self.image_shape, 1)
                for conv in self.convs:
                    h = act(conv(h))
                y = h.transpose(0, 3, 1, 2).reshape(*lead, -1)  # flatten as (C, H, W), as torch
            parts.append(y)
        if extra is not None:
            parts.append(extra)
        return self.body(concat(parts))

    def __call__(self, y, extra=None):
        return self.features(y, extra)


class Encoder(Features):
    """`Features`, then the parameters of q(z|inputs): `loc`, `scale` (softplus + MIN_SCALE),
    `tril` (full covariance) and the IAF steps `flow_<t>`; the twin of the Pyro backend's."""

    latent_dim: int = 1
    posterior: PosteriorSpec = PosteriorSpec()

    def setup(self):
        super().setup()
        d, post = self.latent_dim, self.posterior
        self.loc = nn.Dense(d)
        self.scale = nn.Dense(d)
        if post.kind == "full" and d > 1:
            self.tril = nn.Dense(d * (d - 1) // 2)
        if post.kind == "iaf":
            self.flow = [MADE(d, tuple(post.flow_hidden), 2, post.activation)
                         for _ in range(post.flow_steps)]

    def __call__(self, y, extra=None):
        """-> (loc, scale, below-diagonal entries of L or None, features h)."""
        h = self.features(y, extra)
        loc, scale = self.loc(h), scale_from_raw(self.scale(h))
        below = self.tril(h) if self.posterior.kind == "full" and self.latent_dim > 1 else None
        if self.posterior.kind == "iaf" and self.is_initializing():
            for t in range(self.posterior.flow_steps):  # create the flow's parameters too
                self.flow_params(loc, h, t)
        return loc, scale, below, h

    def flow_params(self, x, h, step: int):
        """IAF step `step` at x (..., d) with context h: (m, gate logit), each (..., d)."""
        reverse = step % 2 == 1
        x = x[..., ::-1] if reverse else x
        out = self.flow[step](h, x)  # (..., d, 2)
        m, s = out[..., 0], out[..., 1]
        if reverse:
            m, s = m[..., ::-1], s[..., ::-1]
        return m, s + autoregressive.IAF_GATE_BIAS


class DiscreteEncoder(Features):
    """`Features`, then `out`: a discrete site's posterior logits (..., width); the twin of the
    Pyro backend's."""

    width: int = 1

    def setup(self):
        super().setup()
        self.out = nn.Dense(self.width)

    def __call__(self, y, extra=None):
        """-> (logits, None, None, features h)."""
        h = self.features(y, extra)
        return self.out(h), None, None, h


class Baseline(nn.Module):
    """NVIL's input-dependent baseline of a score-function site: an MLP `body` (relu) of y,
    then `out`, one number per example; the twin of the Pyro backend's."""

    hidden: tuple[int, ...]

    def setup(self):
        self.body = MLP(tuple(self.hidden), "relu")
        self.out = nn.Dense(1)

    def __call__(self, y):
        return self.out(self.body(y))[..., 0]


class Decoder(nn.Module):
    """code (..., C) -> likelihood parameters (..., D), or (..., D, K) when per_pixel = K > 1."""

    spec: DecoderSpec
    data_dim: int
    image_shape: tuple[int, int] | None
    per_pixel: int

    def setup(self):
        self.body = MLP(tuple(self.spec.hidden), self.spec.activation)
        if self.spec.kind == "conv":
            low = [s // 2 ** len(self.spec.channels) for s in self.image_shape]
            self.project = nn.Dense(self.spec.channels[0] * low[0] * low[1])
            chans = [*self.spec.channels[1:], self.per_pixel]
            self.deconvs = [nn.ConvTranspose(c, (4, 4), strides=(2, 2),
                                             padding=((2, 2), (2, 2)), transpose_kernel=True)
                            for c in chans]
        else:
            self.out = nn.Dense(self.data_dim * self.per_pixel)

    def __call__(self, code, y=None):
        """y is not used: this decoder's pixels are independent given the code."""
        lead = code.shape[:-1]
        h = self.body(code)
        if self.spec.kind == "conv":
            act = ACTIVATIONS[self.spec.activation]
            low = [s // 2 ** len(self.spec.channels) for s in self.image_shape]
            h = act(self.project(h)).reshape(-1, self.spec.channels[0], *low)
            h = h.transpose(0, 2, 3, 1)  # NCHW (torch's reshape order) -> NHWC
            for i, deconv in enumerate(self.deconvs):
                h = deconv(h)
                if i < len(self.deconvs) - 1:
                    h = act(h)
            h = h.reshape(*lead, self.data_dim, self.per_pixel)  # NHWC: pixels row-major, K last
        else:
            h = self.out(h).reshape(*lead, self.data_dim, self.per_pixel)
        return h[..., 0] if self.per_pixel == 1 else h


class MaskedDense(nn.Module):
    """Dense layer x @ (kernel · mask) (+ bias) with a fixed 0/1 mask (in, out), named like
    nn.Dense ("kernel", "bias") so the canonical names are those of a torch Linear. The mask is
    rebuilt from the layer's place (`layer` = index into `autoregressive.layer_masks`, or
    "direct") so that the module's fields stay small and hashable."""

    data_dim: int
    hidden: tuple[int, ...]
    per_pixel: int
    layer: int | str
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        if self.layer == "direct":
            mask = autoregressive.direct_mask(self.data_dim, self.per_pixel)
        else:
            mask = autoregressive.layer_masks(self.data_dim, self.hidden, self.per_pixel)[
                self.layer]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), mask.shape, x.dtype)
        h = x @ (kernel * jnp.asarray(mask, kernel.dtype))
        if self.use_bias:
            h = h + self.param("bias", nn.initializers.zeros, (mask.shape[1],), x.dtype)
        return h


class MADE(nn.Module):
    """(context (..., C), x (..., D)) -> (..., D) or (..., D, K): a MADE over x conditioned on
    the context (`ppl_vae.autoregressive`); the twin of the Pyro backend's, used as the
    autoregressive decoder and as each IAF step."""

    data_dim: int
    hidden: tuple[int, ...]
    per_pixel: int
    activation: str

    def setup(self):
        hidden = tuple(self.hidden)
        n = len(hidden) + 1
        widths = [*hidden, self.data_dim * self.per_pixel]
        self.layers = [MaskedDense(self.data_dim, hidden, self.per_pixel, i) for i in range(n)]
        self.context = [nn.Dense(w, use_bias=False) for w in widths]
        if hidden:
            self.direct = MaskedDense(self.data_dim, hidden, self.per_pixel, "direct",
                                      use_bias=False)

    def __call__(self, context, x=None):
        if x is None:
            raise ValueError("the autoregressive decoder needs the image y as well as z "
                             "(teacher forcing); draw images with `ancestral_sample`")
        act = ACTIVATIONS[self.activation]
        lead = jnp.broadcast_shapes(context.shape[:-1], x.shape[:-1])
        h = x
        for i, (layer, ctx) in enumerate(zip(self.layers, self.context)):
            h = layer(h) + ctx(context)
            if i < len(self.layers) - 1:
                h = act(h)
        if self.hidden:
            h = h + self.direct(x)
        h = h.reshape(*lead, self.data_dim, self.per_pixel)
        return h[..., 0] if self.per_pixel == 1 else h


class ConditionalPrior(nn.Module):
    """inputs (..., C) (parents' values, label) -> (loc, scale) of p̂(z|inputs): `body`, `loc`,
    `scale`, the twin of the Pyro backend's `Prior` of kind conditional."""

    hidden: tuple[int, ...]
    activation: str
    latent_dim: int

    def setup(self):
        self.body = MLP(tuple(self.hidden), self.activation)
        self.loc = nn.Dense(self.latent_dim)
        self.scale = nn.Dense(self.latent_dim)

    def __call__(self, inputs):
        h = self.body(inputs)
        return self.loc(h), scale_from_raw(self.scale(h))


class Classifier(Features):
    """q(label|y) of a latent label (M2): `Features` of y, then `out`: logits (..., classes);
    the twin of the Pyro backend's."""

    classes: int = 10

    def setup(self):
        super().setup()
        self.out = nn.Dense(self.classes)

    def __call__(self, y, extra=None):
        return self.out(self.features(y, extra))


class SupervisedHead(nn.Module):
    """Classifier on the posterior mean: loc (..., d) -> logits (..., classes)."""

    spec: AuxSpec

    def setup(self):
        self.body = MLP(tuple(self.spec.hidden), "relu")
        self.out = nn.Dense(self.spec.classes)

    def __call__(self, loc):
        return self.out(self.body(loc))


def build_networks(plan: graph.Plan) -> dict[str, tuple[nn.Module, tuple]]:
    """Every Flax module of a spec's plan: {canonical module name: (module, the shapes of
    example inputs `flax_module` initialises it from (None for an input it does not take))},
    the same names as the Pyro backend's `build_networks`."""
    spec, data_dim, image_shape = plan.spec, plan.data_dim, plan.image_shape
    enc, lik, lab = spec.encoder, spec.likelihood, spec.label
    per_pixel = lik.categories if lik.kind == "categorical" else 1
    channels = tuple(enc.channels) if enc.kind == "conv" else None
    data = (1, data_dim)
    out: dict[str, tuple[nn.Module, tuple]] = {}
    for s in plan.sites:
        extra = (1, s.posterior_width) if s.posterior_width else None
        if s.discrete:
            post = s.posterior
            out[s.encoder_module] = (
                DiscreteEncoder(tuple(enc.hidden), enc.activation, image_shape, channels,
                                s.width) if plan.one_site else
                DiscreteEncoder(tuple(post.hidden), post.activation, None, None, s.width),
                (data if plan.one_site else None, extra))
        elif plan.one_site:
            out[s.encoder_module] = (Encoder(tuple(enc.hidden), enc.activation, image_shape,
                                             channels, s.dim, s.posterior), (data, extra))
        else:
            post = s.posterior
            out[s.encoder_module] = (Encoder(tuple(post.hidden), post.activation, None, None,
                                             s.dim, post), (None, extra))
        if s.prior.kind == "conditional":
            out[s.prior_module] = (ConditionalPrior(tuple(s.prior.hidden), s.prior.activation,
                                                    s.dim), ((1, s.prior_width),))
    if plan.feature_network:
        out["encoder"] = (Features(tuple(enc.hidden), enc.activation, image_shape, channels),
                          (data,))
    decoder = (MADE(data_dim, tuple(spec.decoder.hidden), per_pixel, spec.decoder.activation)
               if spec.decoder.kind == "autoregressive" else
               Decoder(spec.decoder, data_dim, image_shape, per_pixel))
    out["decoder"] = (decoder, ((1, plan.code_width), data))
    for aux in plan.aux:
        if aux.spec.kind == "supervised" and aux.site != graph.LABEL:
            out[f"aux_{aux.name}"] = (SupervisedHead(aux.spec), ((1, plan.site(aux.site).dim),))
    if lab.latent:
        out[f"encoder_{graph.LABEL}"] = (Classifier(tuple(lab.hidden), enc.activation,
                                                    image_shape, channels, classes=lab.classes),
                                         (data,))
    for s in plan.sites:
        if s.baseline_module is not None:
            out[s.baseline_module] = (Baseline(tuple(s.baseline_hidden)), (data,))
    return out


# ---- canonical names ------------------------------------------------------------------------
_LIST_MEMBER = re.compile(r"^(.*)_(\d+)$")


def flax_to_canonical(module: str, tree) -> dict[str, np.ndarray]:
    """A Flax params tree (what `flax_module` stores at ``<module>$params``) ->
    {"<module>.<path>.weight|bias": PyTorch-layout array}."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [p.key for p in path]
        parts = []
        for k in keys[:-1]:
            m = _LIST_MEMBER.match(k)
            parts.extend([m.group(1), m.group(2)] if m else [k])
        leaf = np.asarray(leaf)
        if keys[-1] == "kernel":
            leaf = leaf.T if leaf.ndim == 2 else leaf.transpose(3, 2, 0, 1)
            parts.append("weight")
        else:
            parts.append(keys[-1])
        out[".".join([module, *parts])] = leaf
    return out


def canonical_to_flax(module: str, params: dict[str, np.ndarray], like) -> dict:
    """Inverse of `flax_to_canonical`, shaped like the Flax params tree `like`."""

    def leaf(path, ref):
        keys = [p.key for p in path]
        parts = []
        for k in keys[:-1]:
            m = _LIST_MEMBER.match(k)
            parts.extend([m.group(1), m.group(2)] if m else [k])
        name = ".".join([module, *parts, "weight" if keys[-1] == "kernel" else keys[-1]])
        if name not in params:
            raise KeyError(name)
        value = np.asarray(params[name])
        if keys[-1] == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
        if value.shape != ref.shape:
            raise ValueError(f"parameter {name!r}: shape {value.shape} does not fit {ref.shape}")
        return jnp.asarray(value, dtype=ref.dtype)

    return jax.tree_util.tree_map_with_path(leaf, like)
