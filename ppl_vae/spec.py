"""Model specs: frozen dataclasses, TOML loading, validation and dotted overrides.

A spec names components; each backend knows how to build each kind. The allowed kinds are the
registries below (one line each), so a new kind is declared once here and the parity tests pick it
up in both backends.

Every mistake (unknown key, wrong type, unknown kind, impossible combination) is a ``SpecError``
that names the file, the dotted key, the value given and what is allowed, raised before any data
is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---- registries of component kinds ---------------------------------------------------------
DATA_SOURCES = ("digits", "mnist", "npz", "npy", "dsprites")  # or "synthetic:<population>"
SYNTHETIC_POPULATIONS = ("bars",)  # data.source = "synthetic:bars"; see ppl_vae/populations.py
BINARIZE = ("none", "static", "dynamic")
PRIOR_KINDS = ("normal", "learned_normal", "mixture", "conditional")
POSTERIOR_KINDS = ("diagonal", "full", "iaf")
ENCODER_KINDS = ("mlp", "conv")
DECODER_KINDS = ("mlp", "conv", "autoregressive")
LIKELIHOOD_KINDS = ("bernoulli", "gaussian", "binomial", "categorical")
DISTORTIONS = ("nll", "mse", "l1")
SCHEDULE_KINDS = ("constant", "linear", "cyclical")
AUX_KINDS = ("infonce", "supervised")  # or a user function "package.module:function"
ACTIVATIONS = ("relu", "tanh", "elu", "softplus", "gelu", "leaky_relu")
DEVICES = ("auto", "cpu", "cuda")
MATMUL_PRECISIONS = ("highest", "high")

#: Image shapes of the built-in sources, known before loading (used by the conv checks).
SOURCE_IMAGE_SHAPES = {"digits": (8, 8), "mnist": (28, 28), "dsprites": (64, 64)}
#: Sources read from a file or folder (data.path); the others are bundled or generated.
PATH_SOURCES = ("mnist", "npz", "npy")
#: data.stream: read minibatches from host memory ("on"), copy the data to the device ("off"),
#: or decide by size against data.device_memory_mb ("auto"); see `ppl_vae.streaming`.
STREAM_MODES = ("auto", "on", "off")

_USER_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SITE_NAME = re.compile(r"^[A-Za-z_]\w*$")
#: Names a latent site may not take: the observed site, the plate, what posteriors read.
RESERVED_SITE_NAMES = ("y", "data", "label")
LABEL_SITE = "label"  # the site of a latent label (label.latent): p(label) and q(label|y)


class SpecError(ValueError):
    """A spec mistake: names the file, the dotted key, the value given and what is allowed."""

    def __init__(self, key: str, given: Any, allowed: str, source: str | None = None):
        self.key, self.given, self.allowed, self.source = key, given, allowed, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key} = {given!r} is not allowed; expected {allowed}")


def _choice(default: str, choices: tuple[str, ...]):
    return field(default=default, metadata={"choices": choices})


# ---- the spec ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and how it is prepared; values end up in [0, 1] for images."""

    source: str = "digits"
    """Where the examples come from: one of `DATA_SOURCES`, or "synthetic:<name>" with a name from
    `SYNTHETIC_POPULATIONS` (a population whose entropy H(y) is known exactly). `digits` is
    scikit-learn's 8x8 digits; `mnist` a folder of IDX files; `npz` one file with arrays `x`,
    `labels`, `x_test`, `labels_test` and an optional scalar `entropy`; `npy` a folder with a
    memory-mapped `x.npy`; `dsprites` rendered procedurally (checked in `validate`)."""
    path: str = ""
    """The data on disk: the IDX folder (mnist), the .npz file (npz) or the folder of .npy files
    (npy); relative to the working directory. Unused by the bundled and generated sources."""
    binarize: str = _choice("none", BINARIZE)
    """none: the values as they are; static: one seeded draw of Bernoulli pixels, once; dynamic:
    a fresh draw every step."""
    test_fraction: float = 0.2
    """Held-out share of the examples when the source has no test split of its own."""
    limit: int = 0
    """Use only the first `limit` examples of each split (0 = all); for quick runs."""
    size: int = 0
    """Generated sources (synthetic:*, dsprites): examples drawn, train + test (0 = 20000)."""
    labelled: int = 0
    """Keep the labels of only this many training examples, the rest become -1 (0 = all)."""
    stream: str = _choice("auto", STREAM_MODES)
    """Training data larger than `device_memory_mb` (MiB, as the device holds it) stays in host
    memory and is read in prefetched minibatches ("auto"); "on" and "off" force either way."""
    device_memory_mb: float = 2048.0
    """MiB: with stream = "auto", the training array (as the device holds it) streams above this."""


@dataclass(frozen=True)
class LatentSpec:
    """The one latent site z of a one-site spec (for several sites, `[[latents]]`)."""

    dim: int = 8
    """Dimension of z."""


@dataclass(frozen=True)
class PriorSpec:
    """P̂_Φ(z) of one latent site: `normal` N(0, I); `learned_normal` N(loc, diag scale²);
    `mixture` of `components` diagonal Gaussians; `conditional` p(z | parents, label) a diagonal
    Gaussian whose loc and scale come from an MLP (`hidden`) of the parent sites' values (and the
    one-hot label when ``label.prior``)."""

    kind: str = _choice("normal", PRIOR_KINDS)
    """normal: N(0, I), fixed; learned_normal: N(loc, diag scale²), learned; mixture: `components`
    learnable diagonal Gaussians; conditional: p(z | parents, label) from an MLP."""
    components: int = 10
    """mixture only: the number K of learnable diagonal Gaussians."""
    parents: tuple[str, ...] = ()
    """conditional only: the latent sites it reads."""
    hidden: tuple[int, ...] = ()
    """conditional only: MLP widths from the parents (and the label) to loc and scale
    ([] = linear in the parents)."""
    activation: str = _choice("relu", ACTIVATIONS)
    """conditional only: the MLP's activation."""


@dataclass(frozen=True)
class PosteriorSpec:
    """P_Ψ(z|·) of one latent site. `diagonal`: N(loc, diag scale²); `full`: N(loc, L Lᵀ) with a
    lower-triangular L; `iaf`: the diagonal Gaussian pushed through `flow_steps` inverse
    autoregressive flow steps (Kingma et al. 2016), each a MADE (`flow_hidden`) conditioned on
    the encoder's features. `inputs` are what it reads: "y" (the `[encoder]` network's features
    of the data) and/or other latent sites; `hidden` are MLP widths of its own on those inputs
    (graphs only: a one-site spec's encoder is `[encoder]`)."""

    kind: str = _choice("diagonal", POSTERIOR_KINDS)
    """diagonal: N(loc, diag scale²); full: N(loc, L Lᵀ), L lower-triangular; iaf: the diagonal
    Gaussian through `flow_steps` inverse autoregressive flow steps (Kingma et al. 2016)."""
    inputs: tuple[str, ...] = ("y",)
    """What it reads: "y" (the `[encoder]` network's features of the data) and/or other latent
    sites (graphs only; a one-site spec reads ["y"])."""
    hidden: tuple[int, ...] = ()
    """Graphs only: MLP widths of its own on its inputs ([] = linear)."""
    activation: str = _choice("relu", ACTIVATIONS)
    """The activation of its own MLP and of the IAF's MADE."""
    flow_steps: int = 2
    """iaf only: the number of flow steps."""
    flow_hidden: tuple[int, ...] = (64,)
    """iaf only: the MADE widths of each flow step ([] = a linear MADE)."""


@dataclass(frozen=True)
class SiteSpec:
    """One latent site of a graph (`[[latents]]`): its name, dimension, prior and posterior.
    Its β is ``objective.beta × beta`` (so a β schedule ramps every site together)."""

    name: str = ""
    """The site's name: letters, digits and _, not one of `RESERVED_SITE_NAMES`."""
    dim: int = 8
    """Dimension of the site."""
    beta: float = 1.0
    """This site's factor on `objective.beta`: its rate is weighted by objective.beta × beta."""
    prior: PriorSpec = PriorSpec()
    """Its prior P̂_Φ(z_site | parents): a `[prior]` table."""
    posterior: PosteriorSpec = PosteriorSpec()
    """Its posterior P_Ψ(z_site | inputs): a `[posterior]` table."""


@dataclass(frozen=True)
class LabelSpec:
    """Conditioning on labels (a conditional VAE): with `condition`, the one-hot label of
    `classes` classes is an input of every posterior and of the decoder, and with `prior` also
    of every `conditional` prior (p(z|label) when it has no parents).

    With `latent` the label is a latent variable where it is unknown (label −1; keep N labels
    with ``data.labelled = N``): the semi-supervised M2 model of Kingma et al. (2014). The model
    draws it from p(label) = Cat(π) (`class_prior`: uniform, or π learned), the guide from a
    classifier q(label|y) (an MLP with `hidden` widths and the encoder's activation), and
    `ScaledELBO` sums it out exactly; where the label is known it is data (−ln π_label)."""

    condition: bool = False
    """A conditional VAE: the one-hot label is an input of every posterior and of the decoder."""
    prior: bool = False
    """Also an input of every `conditional` prior (p(z|label) when it has no parents); needs
    `condition`."""
    classes: int = 10
    """The number of classes."""
    latent: bool = False
    """The label is a latent variable where it is unknown (label −1): M2 (needs `condition`)."""
    class_prior: str = _choice("uniform", ("uniform", "learned"))
    """latent only: p(label) = Cat(π) with π uniform, or π learned."""
    hidden: tuple[int, ...] = (256,)
    """latent only: the hidden widths of the classifier q(label|y)."""


@dataclass(frozen=True)
class EncoderSpec:
    """The network that reads the data for every posterior whose inputs include "y"."""

    kind: str = _choice("mlp", ENCODER_KINDS)
    """mlp: dense layers; conv: images whose sides divide by 2^len(channels)."""
    hidden: tuple[int, ...] = (256, 128)
    """mlp: hidden widths ([] = linear); conv: the dense layers after the convolutions."""
    channels: tuple[int, ...] = (32, 64)
    """conv only: one stride-2 4x4 convolution per entry."""
    activation: str = _choice("relu", ACTIVATIONS)
    """The activation between layers."""


@dataclass(frozen=True)
class DecoderSpec:
    """The network of P̂_Φ(y|z): from the latent sites it reads to the likelihood's parameters."""

    kind: str = _choice("mlp", DECODER_KINDS)
    """mlp: dense layers; conv: transposed convolutions; autoregressive: a MADE over the pixels,
    conditioned on z (it can model the data without z: see posterior collapse)."""
    hidden: tuple[int, ...] = (128, 256)
    """mlp: hidden widths; autoregressive: the masked hidden layers (MADE)."""
    channels: tuple[int, ...] = (64, 32)
    """conv only: transposed convolutions, from deep to shallow."""
    activation: str = _choice("relu", ACTIVATIONS)
    """The activation between layers."""
    reads: tuple[str, ...] = ("z",)
    """The latent sites whose values it reads (then the label, with label.condition)."""


@dataclass(frozen=True)
class LikelihoodSpec:
    """The family of P̂_Φ(y|z); its negative log-density is the distortion (with nll)."""

    kind: str = _choice("bernoulli", LIKELIHOOD_KINDS)
    """bernoulli: y in [0, 1] (grey values as probabilities); gaussian; binomial and categorical:
    y on a grid in [0, 1]."""
    scale: float | str = 0.1
    """gaussian: a fixed standard deviation, or "learned" (one per pixel)."""
    total_count: int = 16
    """binomial: y * total_count is the count, y in [0, 1]."""
    categories: int = 17
    """categorical: y * (categories - 1) is the level, y in [0, 1]."""


@dataclass(frozen=True)
class ScheduleSpec:
    """β(step): constant; a linear warm-up from `start` to β over `warmup` steps; cyclical: the
    warm-up repeated every `period` steps (Fu et al. 2019)."""

    kind: str = _choice("constant", SCHEDULE_KINDS)
    """constant: β throughout; linear: a warm-up from `start` to β; cyclical: the warm-up
    repeated every `period` steps."""
    start: float = 0.0
    """linear and cyclical: β at the start of a ramp."""
    warmup: int = 1000
    """linear: steps to reach β; cyclical: the ramp's length within each cycle."""
    period: int = 2000
    """cyclical: the cycle's length in steps."""


@dataclass(frozen=True)
class AuxSpec:
    """An encoder-only loss term. `kind` is infonce | supervised | "package.module:function"."""

    kind: str = "infonce"
    """One of `AUX_KINDS`, or a user function "package.module:function" called as
    fn(y=, z=, loc=, scale=, labels=, backend=) that returns a scalar loss."""
    weight: float = 1.0
    """The term's weight (≥ 0); it multiplies the term, in nats per example."""
    hidden: tuple[int, ...] = ()
    """supervised: hidden widths of the classifier head."""
    classes: int = 10
    """supervised: the number of classes."""
    site: str = ""
    """The latent site it reads ("" = the first); its posterior must be diagonal."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """loss = β · rate + λ · distortion + aux(encoder only), in nats per example."""

    beta: float = 1.0
    """β, the weight of the rate (β < 1 resists posterior collapse; β > 1 is the β-VAE)."""
    lam: float = 1.0
    """λ, the weight of the distortion."""
    distortion: str = _choice("nll", DISTORTIONS)
    """nll: −ln P̂_Φ(y|z); mse or l1: a rate–distortion autoencoder (RDA) in those units."""
    analytic_kl: bool = True
    """The rate in closed form, KL(q ‖ p), where it exists and is valid; else Monte Carlo."""
    num_particles: int = 1
    """Draws of z per example in each training step's estimate."""
    beta_schedule: ScheduleSpec = ScheduleSpec()
    """β over the steps: an `[objective.beta_schedule]` table."""
    aux: tuple[AuxSpec, ...] = ()
    """Encoder-only loss terms, any number: `[[objective.aux]]` tables."""


@dataclass(frozen=True)
class TrainSpec:
    """How the objective is optimised (Adam), logged, evaluated and checkpointed, and where."""

    steps: int = 2000
    """Training steps (minibatches)."""
    batch_size: int = 128
    """Examples per step: the global batch, split over `devices`."""
    lr: float = 1e-3
    """Adam's learning rate."""
    clip_norm: float = 0.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    seed: int = 0
    """Seeds the initial parameters, the minibatches and every draw."""
    log_every: int = 50
    """metrics.jsonl gets one train record per window of this many steps."""
    eval_every: int = 500
    """And a test record every this many steps (and at the end); a multiple of log_every."""
    checkpoint_every: int = 500
    """Steps between checkpoints; a multiple of log_every."""
    eval_batch_size: int = 1000
    """Examples per batch when evaluating on the test split."""
    device: str = _choice("auto", DEVICES)
    """auto: a GPU where the backend sees one, else the CPU; cuda where there is none is an
    error."""
    init: str = ""
    """Start from these parameters: a params.npz or a run folder, written by either backend
    ("" = fresh)."""
    dtype: str = _choice("float32", ("float32", "float64"))
    """Parameters and data in this precision (NumPyro's float64 needs JAX_ENABLE_X64=1)."""
    matmul_precision: str = _choice("highest", MATMUL_PRECISIONS)
    """float32 matrix products and convolutions on a GPU: "highest" = full float32 (the same
    numbers in both backends), "high" = TensorFloat-32 (faster on NVIDIA GPUs since Ampere,
    ~1e-3 relative error). A CPU computes in float32 either way."""
    cuda_graphs: str = _choice("auto", ("auto", "off"))
    """Pyro backend on CUDA: capture the SVI step in a CUDA graph and replay it ("auto"), or run
    it eagerly ("off"). NumPyro compiles its windows with XLA and ignores the key."""
    threads: int = 0
    """Pyro backend on a CPU: PyTorch's intra-op threads while training and evaluating (0 = the
    default, `ppl_vae.pyro.threads.DEFAULT_THREADS`). PyTorch's own default, one per core,
    collapses when other processes share the cores (benchmarks/bench_threads.py). NumPyro
    ignores the key."""
    devices: int | str = field(default=1, metadata={"words": ("all",)})
    """Data-parallel training: split each minibatch (train.batch_size, the global batch) over
    this many devices, 1, N or "all"; the result is the one-device result to float tolerance, so
    a run may resume on another number. NumPyro: a mesh of N devices in one process (on a CPU,
    XLA_FLAGS=--xla_force_host_platform_device_count=N simulates them). Pyro: one process per
    device under torchrun (`ppl-vae train --devices N` starts it)."""


@dataclass(frozen=True)
class Spec:
    """A model spec: one TOML file in `models/`, or the same dataclasses built in Python. Every
    key has a default, so a spec says only what differs."""

    name: str = "model"
    """The model's name (the default run folder is runs/<name>)."""
    description: str = ""
    """One line, shown by `ppl-vae models`."""
    data: DataSpec = DataSpec()
    """The `[data]` table."""
    latent: LatentSpec = LatentSpec()
    """The `[latent]` table: the one site z of a one-site spec."""
    prior: PriorSpec = PriorSpec()
    """The `[prior]` table of the one site z."""
    posterior: PosteriorSpec = PosteriorSpec()
    """The `[posterior]` table of the one site z."""
    latents: tuple[SiteSpec, ...] = ()
    """A latent graph, `[[latents]]` tables; empty = the one site z of `[latent]`."""
    label: LabelSpec = LabelSpec()
    """The `[label]` table."""
    encoder: EncoderSpec = EncoderSpec()
    """The `[encoder]` table."""
    decoder: DecoderSpec = DecoderSpec()
    """The `[decoder]` table."""
    likelihood: LikelihoodSpec = LikelihoodSpec()
    """The `[likelihood]` table."""
    objective: ObjectiveSpec = ObjectiveSpec()
    """The `[objective]` table."""
    train: TrainSpec = TrainSpec()
    """The `[train]` table."""
    source: str = field(default="", compare=False, metadata={"internal": True})
    """The file it was loaded from (not a key of the file: set by `load_spec`)."""

    def replace(self, **changes) -> Spec:
        return dataclasses.replace(self, **changes)

    @property
    def sites(self) -> tuple[SiteSpec, ...]:
        """The latent sites: `latents`, or the one site ``z`` of `latent`, `prior`, `posterior`."""
        if self.latents:
            return self.latents
        return (SiteSpec("z", self.latent.dim, 1.0, self.prior, self.posterior),)


# ---- conversion from plain data (TOML tables) ----------------------------------------------
def _type_name(tp) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return str(tp)


def _convert(value: Any, tp, key: str, meta: dict, source: str | None):
    """Check `value` against the annotation `tp` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(key, value, f"a table of {_field_list(tp)}", source)
        return _from_dict(tp, value, key, source)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise SpecError(key, value, f"a list of {_type_name(item_tp)}s", source)
        return tuple(_convert(v, item_tp, f"{key}[{i}]", {}, source) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        number = next(t for t in typing.get_args(tp) if t is not str)  # float | str, int | str
        words = meta.get("words", ("learned",))
        allowed = (f"a positive {'number' if number is float else 'integer'} or "
                   + " or ".join(f'"{w}"' for w in words))
        if isinstance(value, str):
            if value not in words:
                raise SpecError(key, value, allowed, source)
            return value
        try:
            return _convert(value, number, key, meta, source)
        except SpecError:
            raise SpecError(key, value, allowed, source) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(key, value, "true or false", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(key, value, "an integer", source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(key, value, "a number", source)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(key, value, "a string", source)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise SpecError(key, value, "one of " + ", ".join(repr(c) for c in choices), source)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file, not a spec


def _field_list(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal"))


def _from_dict(cls, table: dict, prefix: str, source: str | None):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise SpecError(key, value, f"a known key ({_field_list(cls)})", source)
        kwargs[name] = _convert(value, hints[name], key, fields[name].metadata, source)
    return cls(**kwargs)


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = _to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = [_to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        else:
            out[f.name] = v
    return out


def spec_from_dict(table: dict, source: str | None = None) -> Spec:
    """Build and validate a `Spec` from nested plain data (what `tomllib` returns)."""
    spec = _from_dict(Spec, table, "", source)
    spec = dataclasses.replace(spec, source=source or "")
    validate(spec)
    return spec


def spec_to_dict(spec: Spec) -> dict:
    return _to_dict(spec)


# ---- cross-field validation ----------------------------------------------------------------
def validate(spec: Spec) -> None:
    """Checks that need more than one field. Raises `SpecError`; returns None when valid."""
    src = spec.source or None

    def need(cond: bool, key: str, given: Any, allowed: str):
        if not cond:
            raise SpecError(key, given, allowed, src)

    d, lik, obj, tr = spec.data, spec.likelihood, spec.objective, spec.train
    population = d.source.split(":", 1)[1] if d.source.startswith("synthetic:") else None
    need(d.source in DATA_SOURCES or population in SYNTHETIC_POPULATIONS, "data.source",
         d.source, "one of " + ", ".join(repr(s) for s in DATA_SOURCES) + " or "
         + ", ".join(repr(f"synthetic:{p}") for p in SYNTHETIC_POPULATIONS))
    if d.source in PATH_SOURCES:
        need(bool(d.path), "data.path", d.path,
             f"a path (a folder of IDX files for mnist, an .npz file for npz, a folder of "
             f".npy files for npy) with source "
             f"{d.source!r}")
    else:
        need(not d.path, "data.path", d.path, f"empty for source {d.source!r}")
    generated = population is not None or d.source == "dsprites"
    need(d.size >= 0, "data.size", d.size, "an integer >= 0 (0 = the default, 20000)")
    need(generated or d.size == 0, "data.size", d.size,
         f"0 for source {d.source!r} (only generated sources, synthetic:* and dsprites, draw a "
         "number of examples)")
    need(d.labelled >= 0, "data.labelled", d.labelled, "an integer >= 0 (0 = keep every label)")
    need(0.0 < d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    need(d.limit >= 0, "data.limit", d.limit, "an integer >= 0 (0 = all)")
    need(d.device_memory_mb > 0, "data.device_memory_mb", d.device_memory_mb,
         "a number of MiB > 0 (training data larger than this is streamed when data.stream = "
         "'auto')")
    _validate_graph(spec, need)
    for part in ("encoder", "decoder"):
        net = getattr(spec, part)
        need(all(h >= 1 for h in net.hidden), f"{part}.hidden", list(net.hidden),
             "a list of positive widths ([] means linear)")
        need(all(c >= 1 for c in net.channels), f"{part}.channels", list(net.channels),
             "a list of positive channel counts")
        if net.kind == "conv":
            shape = SOURCE_IMAGE_SHAPES.get(d.source)
            need(d.source in ("mnist", "npz", "npy", "dsprites"), f"{part}.kind", "conv",
                 f"'mlp' for source {d.source!r} (conv needs 28x28 or 64x64 images: mnist, "
                 "dsprites, or an npz or npy of images)")
            need(len(net.channels) >= 1, f"{part}.channels", list(net.channels),
                 "at least one channel count for a conv network")
            if shape is not None:
                side = shape[0]
                need(side % 2 ** len(net.channels) == 0, f"{part}.channels", list(net.channels),
                     f"at most {_max_halvings(side)} entries: each halves the {side}x{side} image")
    if lik.kind == "gaussian":
        need(lik.scale == "learned" or (isinstance(lik.scale, float) and lik.scale > 0),
             "likelihood.scale", lik.scale, 'a positive number or "learned"')
    need(lik.total_count >= 1, "likelihood.total_count", lik.total_count, "an integer >= 1")
    need(lik.categories >= 2, "likelihood.categories", lik.categories, "an integer >= 2")
    if d.binarize != "none":
        need(lik.kind == "bernoulli", "data.binarize", d.binarize,
             f"'none' with a {lik.kind} likelihood (binarised data needs 'bernoulli')")
    need(d.source != "npy" or d.binarize != "static", "data.binarize", d.binarize,
         "'dynamic' or 'none' for source 'npy' (its arrays stay memory-mapped; binarising them "
         "statically would copy them: save binary values in x.npy instead)")
    need(obj.beta >= 0, "objective.beta", obj.beta, "a number >= 0")
    need(obj.lam > 0, "objective.lam", obj.lam, "a number > 0")
    need(obj.num_particles >= 1, "objective.num_particles", obj.num_particles, "an integer >= 1")
    sch = obj.beta_schedule
    need(sch.start >= 0, "objective.beta_schedule.start", sch.start, "a number >= 0")
    need(sch.warmup >= 1, "objective.beta_schedule.warmup", sch.warmup, "an integer >= 1")
    if sch.kind == "cyclical":
        need(sch.period >= sch.warmup, "objective.beta_schedule.period", sch.period,
             f"an integer >= warmup ({sch.warmup})")
    site_names = [s.name for s in spec.sites]
    for i, aux in enumerate(obj.aux):
        key = f"objective.aux[{i}]"
        if aux.site == LABEL_SITE or spec.label.latent:
            need(spec.label.latent and aux.kind == "supervised" and aux.site == LABEL_SITE,
                 f"{key}.site", aux.site or "(none)",
                 "'label' with kind 'supervised' (the classifier q(label|y) of a model with "
                 "label.latent = true; that model takes no other aux term)")
            need(aux.weight >= 0, f"{key}.weight", aux.weight, "a number >= 0")
            continue
        if aux.site:
            need(aux.site in site_names, f"{key}.site", aux.site,
                 "one of the latent sites " + ", ".join(repr(n) for n in site_names))
        need(aux.kind.rsplit(":", 1)[-1] not in site_names, f"{key}.kind", aux.kind,
             "a term whose name (its kind, or the function's name) is not a latent site's "
             "(both are sites of the guide); rename the site")
        aux_site = next(s for s in spec.sites if s.name == (aux.site or site_names[0]))
        need(aux_site.posterior.kind == "diagonal", f"{key}.site", aux.site or aux_site.name,
             f"a site with a diagonal posterior (aux terms read its loc and scale; "
             f"{aux_site.name!r} has posterior {aux_site.posterior.kind!r})")
        need(aux.kind in AUX_KINDS or bool(_USER_FN.match(aux.kind)), f"{key}.kind", aux.kind,
             "'infonce', 'supervised' or a user function 'package.module:function'")
        need(aux.weight >= 0, f"{key}.weight", aux.weight, "a number >= 0")
        need(aux.classes >= 2, f"{key}.classes", aux.classes, "an integer >= 2")
        if aux.kind not in AUX_KINDS:
            try:
                resolve_user_function(aux.kind)
            except (ImportError, AttributeError) as err:
                raise SpecError(f"{key}.kind", aux.kind,
                                f"an importable 'package.module:function' ({err})", src) from None
    need(tr.steps >= 1, "train.steps", tr.steps, "an integer >= 1")
    need(tr.batch_size >= 1, "train.batch_size", tr.batch_size, "an integer >= 1")
    need(tr.devices == "all" or tr.devices >= 1, "train.devices", tr.devices,
         'an integer >= 1 or "all"')
    need(tr.devices == "all" or tr.batch_size % tr.devices == 0, "train.batch_size",
         tr.batch_size, f"a multiple of train.devices ({tr.devices}): each device takes an "
         "equal slice of the minibatch")
    need(tr.lr > 0, "train.lr", tr.lr, "a number > 0")
    need(tr.clip_norm >= 0, "train.clip_norm", tr.clip_norm, "a number >= 0 (0 = off)")
    need(tr.threads >= 0, "train.threads", tr.threads, "an integer >= 0 (0 = the default)")
    for name in ("log_every", "eval_every", "checkpoint_every", "eval_batch_size"):
        need(getattr(tr, name) >= 1, f"train.{name}", getattr(tr, name), "an integer >= 1")
    need(tr.eval_every % tr.log_every == 0, "train.eval_every", tr.eval_every,
         f"a multiple of train.log_every ({tr.log_every})")
    need(tr.checkpoint_every % tr.log_every == 0, "train.checkpoint_every", tr.checkpoint_every,
         f"a multiple of train.log_every ({tr.log_every})")


def _validate_graph(spec: Spec, need) -> None:
    """The latent sites, their priors and posteriors, the decoder's reads and the label switch:
    names, dimensions, parents and inputs that exist, no cycles, every site used."""
    from ppl_vae import graph

    graph_spec = bool(spec.latents)
    if graph_spec:
        for name, default in (("latent", LatentSpec()), ("prior", PriorSpec()),
                              ("posterior", PosteriorSpec())):
            need(getattr(spec, name) == default, name, _to_dict(getattr(spec, name)),
                 f"no [{name}] table with [[latents]]: a graph declares each site's dim, prior "
                 "and posterior in its own [[latents]] table")

    def key(i: int, part: str) -> str:
        if graph_spec:
            return f"latents[{i}].{part}"
        return {"dim": "latent.dim", "name": "latent", "beta": "latent"}.get(part, part)

    names = [s.name for s in spec.sites]
    lab = spec.label
    for i, s in enumerate(spec.sites):  # names first: the other checks refer to them
        need(bool(_SITE_NAME.match(s.name)) and s.name not in RESERVED_SITE_NAMES,
             key(i, "name"), s.name, "a name of letters, digits and _ (not starting with a "
             f"digit), other than {', '.join(repr(r) for r in RESERVED_SITE_NAMES)}")
        need(s.name not in names[:i], key(i, "name"), s.name, "a name no other site has")
    for i, s in enumerate(spec.sites):
        need(s.dim >= 1, key(i, "dim"), s.dim, "an integer >= 1")
        need(s.beta >= 0, key(i, "beta"), s.beta, "a number >= 0")
        pr, post = s.prior, s.posterior
        need(pr.components >= 1, key(i, "prior.components"), pr.components, "an integer >= 1")
        need(all(h >= 1 for h in pr.hidden), key(i, "prior.hidden"), list(pr.hidden),
             "a list of positive widths ([] means linear)")
        others = [n for n in names if n != s.name]
        if pr.kind == "conditional":
            for p in pr.parents:
                need(p in others, key(i, "prior.parents"), list(pr.parents),
                     "names of other latent sites (" + (", ".join(repr(n) for n in others)
                                                       or "there are none") + ")")
            need(len(set(pr.parents)) == len(pr.parents), key(i, "prior.parents"),
                 list(pr.parents), "each parent once")
            need(bool(pr.parents) or lab.prior, key(i, "prior.parents"), list(pr.parents),
                 "at least one parent site, or label.prior = true (p(z|label))")
        else:
            need(not pr.parents, key(i, "prior.parents"), list(pr.parents),
                 f"[] for prior.kind {pr.kind!r} (only a 'conditional' prior reads parents)")
        need(bool(post.inputs), key(i, "posterior.inputs"), list(post.inputs),
             "at least one input: 'y' and/or latent sites")
        for inp in post.inputs:
            need(inp == graph.DATA or inp in others, key(i, "posterior.inputs"),
                 list(post.inputs), "'y' (the data) and/or names of other latent sites ("
                 + (", ".join(repr(n) for n in others) or "there are none") + ")")
        need(len(set(post.inputs)) == len(post.inputs), key(i, "posterior.inputs"),
             list(post.inputs), "each input once")
        if not graph_spec:
            need(post.inputs == (graph.DATA,), "posterior.inputs", list(post.inputs),
                 "['y'] in a one-site spec (declare [[latents]] for a graph of sites)")
            need(not post.hidden, "posterior.hidden", list(post.hidden),
                 "[] in a one-site spec: its encoder's layers are encoder.hidden")
        need(all(h >= 1 for h in post.hidden), key(i, "posterior.hidden"), list(post.hidden),
             "a list of positive widths ([] means linear)")
        need(post.flow_steps >= 1, key(i, "posterior.flow_steps"), post.flow_steps,
             "an integer >= 1")
        need(all(h >= 1 for h in post.flow_hidden), key(i, "posterior.flow_hidden"),
             list(post.flow_hidden), "a list of positive widths ([] means a linear MADE)")
    for order, part, what in ((graph.model_order, "prior.parents", "prior"),
                              (graph.guide_order, "posterior.inputs", "posterior")):
        try:
            order(spec)
        except graph.CycleError as err:
            i = names.index(err.cycle[0])
            field_value = getattr(getattr(spec.sites[i], what), part.split(".")[1])
            need(False, key(i, part), list(field_value),
                 f"no cycle; the {what}s read each other in a circle: {err}")
    need(any(graph.DATA in s.posterior.inputs for s in spec.sites), "posterior.inputs"
         if not graph_spec else "latents", names,
         "at least one site whose posterior reads 'y' (else the encoder never sees the data)")
    reads = spec.decoder.reads
    need(bool(reads), "decoder.reads", list(reads), "at least one latent site ("
         + ", ".join(repr(n) for n in names) + "): a decoder that reads nothing ignores z")
    for r in reads:
        need(r in names, "decoder.reads", list(reads),
             "names of latent sites (" + ", ".join(repr(n) for n in names) + ")")
    need(len(set(reads)) == len(reads), "decoder.reads", list(reads), "each site once")
    used = graph.ancestors_in_prior(spec, reads)
    for i, s in enumerate(spec.sites):
        need(s.name in used, key(i, "name"), s.name,
             "a site the decoder reads (decoder.reads) or that a prior on the way to it reads "
             "(prior.parents): otherwise it carries no information about y")
    need(lab.classes >= 2, "label.classes", lab.classes, "an integer >= 2")
    need(not lab.prior or lab.condition, "label.prior", lab.prior,
         "false unless label.condition = true (a label-conditional prior needs the label)")
    if lab.prior:
        need(any(s.prior.kind == "conditional" for s in spec.sites), "label.prior", lab.prior,
             "false, or a site with prior.kind = 'conditional' (parents may be [] for "
             "p(z|label))")
    need(not lab.latent or lab.condition, "label.latent", lab.latent,
         "false unless label.condition = true (the decoder and posteriors read the label)")
    need(all(h >= 1 for h in lab.hidden), "label.hidden", list(lab.hidden),
         "positive widths of the classifier's hidden layers")
    if lab.condition and not lab.latent:
        need(spec.data.labelled == 0, "data.labelled", spec.data.labelled,
             "0 with label.condition = true (a conditional VAE reads every example's label); "
             "set label.latent = true to infer the missing ones (M2)")


def _max_halvings(side: int) -> int:
    n = 0
    while side % 2 == 0:
        side //= 2
        n += 1
    return n


def resolve_user_function(path: str):
    """Import "package.module:function" and return the function."""
    module_name, fn_name = path.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


# ---- files, names and overrides ----------------------------------------------------------------
def models_dir() -> Path:
    """The bundled `models/` folder (next to the package in a source checkout)."""
    here = Path(__file__).resolve().parent.parent / "models"
    return here if here.is_dir() else Path.cwd() / "models"


def list_models() -> list[tuple[str, str]]:
    """(name, description) of each bundled spec in `models/`."""
    out = []
    for path in sorted(models_dir().glob("*.toml")):
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
        out.append((path.stem, str(table.get("description", ""))))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'objective.beta=4' -> ('objective.beta', 4.0); the value is read as a TOML value.

    A bare word that is not valid TOML (`encoder.kind=conv`) is taken as a string.
    """
    if "=" not in text:
        raise SpecError(text, text, "an override of the form section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(table: dict, overrides, source: str | None = None) -> dict:
    """Return a copy of `table` with dotted `overrides` set.

    Each override is an "a.b=v" string (what `--set` takes), a (key, value) pair, or a
    (key, value, origin) triple whose origin names where the value came from (``"--devices 2"``);
    a mistake in one names that origin, not the spec file.
    """
    import copy

    table = copy.deepcopy(table)
    for item in overrides:
        try:
            key, value, origin = _override_parts(item)
        except SpecError as err:  # no "=": the text itself is the origin
            raise SpecError(err.key, err.given, err.allowed, _override_source(f"--set {item}",
                                                                              source)) from None
        parts = key.split(".")
        node = table
        for i, part in enumerate(parts[:-1]):
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise SpecError(".".join(parts[: i + 1]), sub, "a table to set keys inside",
                                _override_source(origin, source))
            node = sub
        node[parts[-1]] = value
    return table


def _override_parts(item) -> tuple[str, Any, str]:
    """(key, value, origin) of one override; the origin says where it came from."""
    if isinstance(item, str):
        key, value = parse_override(item)
        return key, value, f"--set {item.strip()}"
    if len(item) == 3:
        return item[0], item[1], item[2]
    key, value = item
    return key, value, f"override {key}={value!r}"


def _override_source(origin: str, source: str | None) -> str:
    return f"{origin} (applied to {source})" if source else origin


def _blame(err: SpecError, overrides, source: str | None) -> SpecError:
    """`err` re-sourced to the override that set its key (the last one), else to the file and
    the overrides given with it: an error names where its value came from."""
    parsed = [_override_parts(item) for item in overrides]
    for key, _, origin in reversed(parsed):
        if (err.key == key or err.key.startswith((f"{key}.", f"{key}["))
                or key.startswith(f"{err.key}.")):
            return SpecError(err.key, err.given, err.allowed, _override_source(origin, source))
    if parsed:
        given = ", ".join(origin for _, _, origin in parsed)
        where = f"{source} with {given}" if source else given
        return SpecError(err.key, err.given, err.allowed, where)
    return err


def resolve_spec_path(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
        return path
    candidate = models_dir() / f"{path_or_name}.toml"
    if candidate.is_file():
        return candidate
    names = ", ".join(n for n, _ in list_models()) or "(none found)"
    raise FileNotFoundError(
        f"no spec file or bundled model named {str(path_or_name)!r}; bundled models: {names}"
    )


def load_spec(path_or_name: str | Path | Spec, overrides=()) -> Spec:
    """Load a spec from a TOML file or a bundled model name, apply dotted overrides, validate.

    >>> spec = load_spec("vae_digits", ["objective.beta=4", "latent.dim=16"])
    """
    if isinstance(path_or_name, Spec):
        table, source = spec_to_dict(path_or_name), path_or_name.source or None
    else:
        path = resolve_spec_path(path_or_name)
        source = str(path)
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise SpecError("(file)", path.name, f"valid TOML ({err})", source) from None
        except UnicodeDecodeError:  # a binary file: often data given where a spec belongs
            raise SpecError("(file)", path.name, "a TOML spec (this file is binary; data such "
                            "as an .npz goes in the spec's data.path)", source) from None
    overrides = list(overrides)
    table = apply_overrides(table, overrides, source)
    try:
        return spec_from_dict(table, source)
    except SpecError as err:
        raise _blame(err, overrides, source) from None


# ---- writing TOML (the resolved spec of a run) ----------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_table(table: dict, prefix: str, lines: list[str]) -> None:
    subtables, arrays = [], []
    for k, v in table.items():
        if isinstance(v, dict):
            subtables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in subtables:
        name = f"{prefix}.{k}" if prefix else k
        lines.extend(["", f"[{name}]"])
        _toml_table(v, name, lines)
    for k, items in arrays:
        name = f"{prefix}.{k}" if prefix else k
        for item in items:
            lines.extend(["", f"[[{name}]]"])
            _toml_table(item, name, lines)


def spec_to_toml(spec: Spec) -> str:
    """The resolved spec as TOML text; `load_spec` of it gives back an equal spec."""
    lines: list[str] = []
    table = spec_to_dict(spec)
    # only the tables of the spec's own form: [[latents]], or [latent], [prior], [posterior]
    for key in ("latent", "prior", "posterior") if spec.latents else ("latents",):
        del table[key]
    _toml_table(table, "", lines)
    return "\n".join(lines) + "\n"
