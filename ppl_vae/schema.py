"""The spec's schema: the registries of component kinds, the frozen dataclasses of a spec
(each field documented by the attribute docstring after it, which the generated reference
reads), `SpecError`, and the conversion between a spec and plain data (TOML tables).

A spec names components; each backend knows how to build each kind. The allowed kinds are the
registries below (one line each), so a new kind is declared once here and the parity tests pick
it up in both backends. Cross-field checks are `ppl_vae.validation`'s; loading, overrides and
the bundled models `ppl_vae.spec`'s (the public module, which re-exports this one's names).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# ---- registries of component kinds ---------------------------------------------------------
DATA_SOURCES = ("digits", "mnist", "npz", "npy", "dsprites")  # or "synthetic:<population>"
SYNTHETIC_POPULATIONS = ("bars",)  # "synthetic:bars"; see ppl_vae/groundtruth/populations.py
BINARIZE = ("none", "static", "dynamic")
PRIOR_KINDS = ("normal", "learned_normal", "mixture", "conditional", "vamp", "uniform",
               "learned_probs")
#: The priors of a discrete site: fixed uniform probabilities (its default: "normal", the default
#: of `PriorSpec.kind`, reads as "uniform" there) or learned ones.
DISCRETE_PRIOR_KINDS = ("uniform", "learned_probs")
#: What a latent site is: a Gaussian vector, d binary units, or d categorical variables of K values.
LATENT_KINDS = ("gaussian", "bernoulli", "categorical")
#: How a discrete site is trained: score-function gradients, summed out exactly, or relaxed.
ESTIMATORS = ("score", "enumerate", "relaxed")
#: The baseline of a score-function site: NVIL's network of the data, or none.
BASELINES = ("network", "none")
#: The most values a site's support may have for ``estimator = "enumerate"`` (all enumerated
#: sites together): each step evaluates the decoder once per value.
MAX_ENUMERATED = 1024
POSTERIOR_KINDS = ("diagonal", "full", "iaf", "ladder")
ENCODER_KINDS = ("mlp", "conv")
DECODER_KINDS = ("mlp", "conv", "autoregressive")
LIKELIHOOD_KINDS = ("bernoulli", "gaussian", "binomial", "categorical")
DISTORTIONS = ("nll", "mse", "l1")
SCHEDULE_KINDS = ("constant", "linear", "cyclical")
BOUNDS = ("elbo", "iwae")
GRADIENTS = ("reparam", "stl", "dreg")
LR_SCHEDULE_KINDS = ("constant", "exponential", "step", "cosine", "burda")
WEIGHT_INITS = ("default", "normal")
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
    balanced_labels: bool = False
    """With `labelled`: keep labelled / (number of classes) of each class (Pyro's ss_vae_M2
    protocol), instead of a random choice of `labelled` examples."""
    stream: str = _choice("auto", STREAM_MODES)
    """Training data larger than `device_memory_mb` (MiB, as the device holds it) stays in host
    memory and is read in prefetched minibatches ("auto"); "on" and "off" force either way."""
    device_memory_mb: float = 2048.0
    """MiB: with stream = "auto", the training array (as the device holds it) streams above this."""


@dataclass(frozen=True)
class CapacitySpec:
    """A capacity target (Burgess et al. 2018): the site's β · rate is replaced by
    weight · |rate − C(t)|, the target C(t) rising linearly from 0 to `max` nats per example over
    `steps` steps, then held. An objective change, not a bound: the logged ELBO stays the ELBO."""

    max: float = 0.0
    """C_max, nats per example (0 = no capacity target: the site's rate is weighted by β)."""
    steps: int = 1000
    """Steps over which C(t) rises from 0 to `max`; they must fit in train.steps."""
    weight: float = 1000.0
    """γ, the weight of |rate − C(t)|."""


@dataclass(frozen=True)
class TemperatureSpec:
    """The temperature τ of a relaxed discrete site (``estimator = "relaxed"``): the Concrete /
    Gumbel-softmax relaxation (Maddison et al. 2017; Jang et al. 2017) draws
    σ((logit + Logistic noise) / τ) for a binary unit and softmax((logits + Gumbel noise) / τ)
    for a categorical one; as τ → 0 the draws become the discrete values, with gradients of
    growing variance. τ moves geometrically from `start` to `end` over `steps` steps (as Jang et
    al.'s exp(−r t) annealing), then stays at `end`; evaluation always uses the discrete site."""

    start: float = 1.0
    """τ at the first step (> 0)."""
    end: float = 0.5
    """τ from step `steps` on (> 0; Jang et al. anneal to 0.5)."""
    steps: int = 0
    """Steps over which τ goes from `start` to `end`; 0 = the whole run (train.steps); at most
    train.steps."""


@dataclass(frozen=True)
class LatentSpec:
    """The one latent site z of a one-site spec (for several sites, `[[latents]]`)."""

    dim: int = 8
    """Dimension of z."""
    free_bits: float = 0.0
    """Free bits (Kingma et al. 2016), nats per dimension: each dimension's rate enters the
    loss as max(free_bits, its batch-mean rate) (0 = off); needs a factorised posterior and
    prior. An objective change, not a bound: the logged ELBO stays the ELBO."""
    capacity: CapacitySpec = CapacitySpec()
    """A capacity target for the rate: a `[latent.capacity]` table."""
    kind: str = _choice("gaussian", LATENT_KINDS)
    """gaussian: z real (dim coordinates); bernoulli: dim binary units; categorical: dim
    variables of `categories` values each (one-hot, read by the decoder as dim × categories
    numbers). A discrete site's posterior is Bernoulli / Categorical with logits from its
    encoder, its prior `prior.kind` = uniform (the default) or learned_probs."""
    categories: int = 10
    """categorical only: K, the values of each of the dim variables."""
    estimator: str = _choice("score", ESTIMATORS)
    """A discrete site's gradient estimator. score: sampled, with score-function (REINFORCE)
    terms and the `baseline` (`ScaledELBO`, as TraceGraph_ELBO); enumerate: summed out exactly
    (every value of its support at each step: at most `MAX_ENUMERATED` values, e.g. 10 binary
    units); relaxed: the Concrete / Gumbel-softmax relaxation at the `temperature` schedule,
    reparameterised. A relaxed site's rate is the KL of the discrete posterior to the discrete
    prior (with objective.analytic_kl = true, the default): the rate of the model evaluated,
    exact, so logged rate, β's weight and eval's rate are one quantity and the objective tends
    to the discrete ELBO as τ → 0; analytic_kl = false takes ln q − ln p̂ of the relaxed
    densities at the draw (Maddison et al.'s relaxed ELBO, of another model, diverging as
    τ → 0)."""
    baseline: str = _choice("network", BASELINES)
    """score only: network: NVIL's input-dependent baseline (Mnih & Gregor 2014), an MLP of the
    data (`baseline_hidden`) trained by the squared error to the downstream cost; none: plain
    REINFORCE."""
    baseline_hidden: tuple[int, ...] = (100,)
    """score with baseline = network: the baseline MLP's hidden widths ([] = linear in y)."""
    temperature: TemperatureSpec = TemperatureSpec()
    """relaxed only: the temperature schedule, a `[latent.temperature]` table."""


@dataclass(frozen=True)
class PriorSpec:
    """P̂_Φ(z) of one latent site: `normal` N(0, I); `learned_normal` N(loc, diag scale²);
    `mixture` of `components` diagonal Gaussians; `conditional` p(z | parents, label) a diagonal
    Gaussian whose loc and scale come from an MLP (`hidden`) of the parent sites' values (and the
    one-hot label when ``label.prior``). A discrete site's prior: `uniform` or `learned_probs`."""

    kind: str = _choice("normal", PRIOR_KINDS)
    """normal: N(0, I), fixed; learned_normal: N(loc, diag scale²), learned; mixture: `components`
    learnable diagonal Gaussians; conditional: p(z | parents, label) from an MLP; vamp: the
    VampPrior. A discrete site (`SiteSpec.kind`): uniform, fixed uniform probabilities (its
    default: "normal" reads as "uniform" there); learned_probs, probabilities learned
    (softmax of learned logits, per dimension)."""
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
    free_bits: float = 0.0
    """Free bits of this site, nats per dimension (see `LatentSpec.free_bits`; 0 = off)."""
    capacity: CapacitySpec = CapacitySpec()
    """A capacity target for this site's rate (see `CapacitySpec`)."""
    kind: str = _choice("gaussian", LATENT_KINDS)
    """gaussian, bernoulli or categorical (see `LatentSpec.kind`)."""
    categories: int = 10
    """categorical only: K, the values of each variable (see `LatentSpec.categories`)."""
    estimator: str = _choice("score", ESTIMATORS)
    """A discrete site's estimator: score, enumerate or relaxed (see `LatentSpec.estimator`)."""
    baseline: str = _choice("network", BASELINES)
    """score only: network or none (see `LatentSpec.baseline`)."""
    baseline_hidden: tuple[int, ...] = (100,)
    """score with baseline = network: the baseline MLP's hidden widths."""
    temperature: TemperatureSpec = TemperatureSpec()
    """relaxed only: the temperature schedule (see `TemperatureSpec`)."""

    @property
    def discrete(self) -> bool:
        """A bernoulli or categorical site."""
        return self.kind != "gaussian"

    @property
    def width(self) -> int:
        """How many numbers its value has: dim, or dim × categories for a categorical site
        (one-hot, flattened)."""
        return self.dim * (self.categories if self.kind == "categorical" else 1)


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
    """Draws of z per example in each training step's estimate (K of the IWAE bound)."""
    bound: str = _choice("elbo", BOUNDS)
    """elbo: the mean over the `num_particles` draws of ln p − ln q; iwae: the importance-weighted
    bound ln (1/K) Σ_k w_k (Burda et al. 2016) with K = num_particles, w from the whole latent
    graph. With β ≠ 1 each site's ln p − ln q enters w times its β: then no longer a bound."""
    gradient: str = _choice("reparam", GRADIENTS)
    """The encoder's gradient estimator: reparam (the path and score terms of
    reparameterisation), stl (sticking the landing, Roeder et al. 2017: the score term of q
    stopped; elbo), dreg (doubly reparameterised, Tucker et al. 2019; iwae)."""
    beta_schedule: ScheduleSpec = ScheduleSpec()
    """β over the steps: an `[objective.beta_schedule]` table."""
    aux: tuple[AuxSpec, ...] = ()
    """Encoder-only loss terms, any number: `[[objective.aux]]` tables."""


@dataclass(frozen=True)
class LRScheduleSpec:
    """The learning rate over the steps, train.lr times a factor: constant 1; exponential
    decay^(t / every); step decay^floor(t / every); cosine from 1 to `final` at train.steps;
    burda 10^(−i/7) in stage i = 0, 1, … of 3^i epochs (Burda et al. 2016: 3280 epochs for all
    eight stages). Any kind may start with a linear warm-up from 0 over `warmup` steps."""

    kind: str = _choice("constant", LR_SCHEDULE_KINDS)
    """constant | exponential | step | cosine | burda."""
    warmup: int = 0
    """Steps of linear warm-up from 0 to the schedule's value (0 = none)."""
    decay: float = 0.1
    """exponential, step: the factor per `every` steps."""
    every: int = 1000
    """exponential, step: steps per factor of `decay`."""
    final: float = 0.0
    """cosine: the factor reached at the last step."""
    epoch_steps: int = 0
    """burda: steps per epoch (0 = the training set's, ceil(n_train / batch_size))."""


@dataclass(frozen=True)
class TrainSpec:
    """How the objective is optimised (Adam), logged, evaluated and checkpointed, and where."""

    steps: int = 2000
    """Training steps (minibatches)."""
    batch_size: int = 128
    """Examples per step: the global batch, split over `devices`."""
    lr: float = 1e-3
    """Adam's learning rate (times `lr_schedule`'s factor at each step)."""
    lr_schedule: LRScheduleSpec = LRScheduleSpec()
    """The learning rate over the steps: a `[train.lr_schedule]` table."""
    clip_norm: float = 0.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    skip_grad_norm: float = 0.0
    """Skip an update whose gradient norm is not finite or above this (Child 2021); the
    skipped steps are counted in the metrics (`skipped`). 0 = never skip."""
    weight_init: str = _choice("default", WEIGHT_INITS)
    """The networks' initial weights: default (each framework's own, the same layouts) or normal:
    every hidden layer's weight and bias from N(0, weight_init_std²), output layers PyTorch's
    default rule U(±1/√fan_in) (as Pyro's ss_vae_M2.py, examples/vae/utils/custom_mlp.py);
    drawn once by NumPy from train.seed (`ppl_vae.init`), so both backends start equal."""
    weight_init_std: float = 0.001
    """weight_init = "normal": the standard deviation of the initial weights."""
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
        lat = self.latent
        return (SiteSpec("z", lat.dim, 1.0, self.prior, self.posterior, lat.free_bits,
                         lat.capacity, lat.kind, lat.categories, lat.estimator, lat.baseline,
                         lat.baseline_hidden, lat.temperature),)


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


def resolve_user_function(path: str):
    """Import "package.module:function" and return the function."""
    module_name, fn_name = path.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def spec_to_dict(spec: Spec) -> dict:
    return _to_dict(spec)
