"""Initial parameters that do not depend on the backend: drawn by NumPy from train.seed and
written over a backend's defaults in canonical form (`Model.export_params` names and PyTorch
layouts), so that both backends start from the same numbers.

* ``train.weight_init = "normal"``: the initialisation of Pyro's semi-supervised VAE example
  (examples/vae/ss_vae_M2.py, whose networks are `examples/vae/utils/custom_mlp.py`'s MLP):
  every *hidden* layer, one whose output goes through the network's activation to another
  layer, draws its weight and its bias from N(0, σ²), σ = train.weight_init_std (the example's
  ``layer.weight.data.normal_(0, 0.001)``, ``layer.bias.data.normal_(0, 0.001)``); every
  *output* layer (a posterior's loc, scale, tril heads, a decoder's or classifier's out layer,
  the last transposed convolution, a MADE's last layer, its context and direct connections)
  keeps PyTorch's default rule, which the example leaves its output layers at: weight and bias
  from U(−1/√fan_in, 1/√fan_in) (``nn.Linear.reset_parameters``; fan_in = shape[1] · the
  kernel's size, as ``torch.nn.init._calculate_fan_in_and_fan_out`` counts it). Parameters of
  priors and likelihoods that are not layers (loc, log_scale, logits) keep the backend's values.
* A VampPrior's pseudo-inputs (``<prior module>.pseudo_inputs``, (K, D); Tomczak & Welling
  2018) start as K distinct training images, drawn without replacement, as the data holds them
  (before dynamic binarisation), whatever `weight_init` says.

The two draws come from separate NumPy streams of train.seed (`numpy.random.SeedSequence`
entropy [seed, 0] and [seed, 1]), so one does not shift the other.
"""

from __future__ import annotations

import re

import numpy as np

from ppl_vae.spec import Spec

PSEUDO_INPUTS = "pseudo_inputs"
_WEIGHTS_STREAM, _PSEUDO_INPUTS_STREAM = 0, 1

#: Layers whose output goes through the activation to another layer (hidden), by the end of
#: their canonical path: an MLP body's layers, an encoder's convolutions, a conv decoder's
#: projection. Their index, if any, is the number at the end.
_HIDDEN = re.compile(r"(?:^|\.)(?:body\.layers\.\d+|convs\.\d+|project)$")
#: Output layers (heads), by the last part of their path.
_OUTPUT = ("loc", "scale", "tril", "out", "direct")
#: Stacks of layers whose last one is an output layer and the others hidden: a conv decoder's
#: transposed convolutions and a MADE's masked layers, with the context layers that add into
#: the same pre-activations (`ppl_vae.pyro.networks.MADE`).
_STACK = re.compile(r"^(?:(?P<owner>.*)\.)?(?P<stack>deconvs|layers|context)\.(?P<i>\d+)$")


def needed(spec: Spec) -> bool:
    """Whether `initial_params` changes anything for `spec` (weight_init = "normal", or a
    VampPrior's pseudo-inputs)."""
    return spec.train.weight_init == "normal" or any(s.prior.kind == "vamp" for s in spec.sites)


def initial_params(spec: Spec, params: dict[str, np.ndarray],
                   x_train: np.ndarray) -> dict[str, np.ndarray]:
    """`params` (canonical, a backend's fresh defaults) with the layers initialised as
    ``train.weight_init`` says and every VampPrior's pseudo-inputs set from `x_train` (N, D);
    a new dict, each array in its own dtype and shape. Unchanged arrays are the same objects."""
    out = dict(params)
    seed = spec.train.seed
    if spec.train.weight_init == "normal":
        rng = np.random.default_rng([seed, _WEIGHTS_STREAM])
        std = spec.train.weight_init_std
        for layer in sorted(layers(params)):  # a fixed order: the same draws in both backends
            weight = params[f"{layer}.weight"]
            bias = params.get(f"{layer}.bias")
            if is_hidden(layer, params):
                new_w = rng.normal(0.0, std, weight.shape)
                new_b = None if bias is None else rng.normal(0.0, std, bias.shape)
            else:
                bound = 1.0 / np.sqrt(fan_in(weight.shape))
                new_w = rng.uniform(-bound, bound, weight.shape)
                new_b = None if bias is None else rng.uniform(-bound, bound, bias.shape)
            out[f"{layer}.weight"] = new_w.astype(weight.dtype)
            if bias is not None:
                out[f"{layer}.bias"] = new_b.astype(bias.dtype)
    names = sorted(k for k in params if k.endswith(f".{PSEUDO_INPUTS}"))
    if names:
        rng = np.random.default_rng([seed, _PSEUDO_INPUTS_STREAM])
        for name in names:
            out[name] = pseudo_inputs(params[name], x_train, rng, name)
    return out


def layers(params: dict[str, np.ndarray]) -> list[str]:
    """The canonical paths of the dense and convolutional layers: every ``<path>.weight``."""
    return [k[: -len(".weight")] for k in params if k.endswith(".weight")]


def fan_in(shape: tuple[int, ...]) -> int:
    """PyTorch's fan-in of a weight of `shape`: shape[1] times the kernel's size ((out, in) for
    a dense layer, (out, in, kh, kw) for a convolution, (in, out, kh, kw) for a transposed one,
    counted as PyTorch counts it)."""
    return int(shape[1] * np.prod(shape[2:], dtype=np.int64))


def is_hidden(layer: str, params: dict[str, np.ndarray]) -> bool:
    """Whether the layer at canonical path `layer` is hidden (its output goes through the
    activation to another layer) rather than an output layer; a path of no known kind is an
    error, so that a new network says how it is initialised."""
    if _HIDDEN.search(layer):
        return True
    if layer.rsplit(".", 1)[-1] in _OUTPUT:
        return False
    match = _STACK.match(layer)
    if match:
        owner, stack, i = match["owner"], match["stack"], int(match["i"])
        # a MADE's context layer l adds into the pre-activation of its layer l
        stack = "layers" if stack == "context" else stack
        prefix = f"{owner}.{stack}." if owner else f"{stack}."
        last = max(int(k[len(prefix):].split(".")[0]) for k in params if k.startswith(prefix))
        return i < last
    raise ValueError(f"ppl_vae.init: the layer {layer!r} is neither a known hidden layer nor a "
                     "known output layer; add its name to ppl_vae/init.py")


def pseudo_inputs(current: np.ndarray, x_train: np.ndarray, rng: np.random.Generator,
                  name: str) -> np.ndarray:
    """K distinct rows of `x_train` (N, D), drawn without replacement, as `current` (K, D)'s
    dtype: a VampPrior's pseudo-inputs at the start."""
    k, d = current.shape
    n = len(x_train)
    if k > n:
        raise ValueError(f"{name}: the VampPrior has {k} components but the training set has "
                         f"only {n} images; use prior.components <= {n}")
    if x_train.shape[1] != d:
        raise ValueError(f"{name}: pseudo-inputs of width {d}, training images of width "
                         f"{x_train.shape[1]}")
    rows = np.sort(rng.choice(n, size=k, replace=False))  # sorted: a memory map reads in order
    return np.asarray(x_train[rows], dtype=current.dtype)
