"""What the latent sites need from PyTorch beyond `pyro.distributions` (the program,
`ppl_vae.program`, builds the priors and posteriors): the full-covariance Cholesky factor, an
inverse autoregressive flow step, one-hot labels, readers of a site's distribution for the
hooks, and the discrete sites' distributions (`Discrete`, its relaxation `Concrete`, the
temperatures of relaxed sites). The twin of `ppl_vae/numpyro/latents.py`."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.transforms import Transform
from torch.distributions.utils import clamp_probs
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


# ---- discrete sites ---------------------------------------------------------------------------
def discrete_support(dim: int, categories: int | None) -> np.ndarray:
    """Every value of `dim` discrete variables, (S, width) float64: S = 2^dim binary vectors
    (categories None) or S = K^dim one-hot rows flattened (dim × K), in `itertools.product`
    order (the first variable slowest), the order of the NumPyro twin."""
    values = np.array(list(itertools.product(range(categories or 2), repeat=dim)), np.int64)
    if categories is None:
        return values.astype(np.float64).reshape(-1, dim)
    return np.eye(categories)[values].reshape(len(values), dim * categories)


_SUPPORTS: dict = {}


def _support(dim: int, categories: int | None, dtype, device) -> torch.Tensor:
    """`discrete_support` as a tensor, made once per (shape, dtype, device): a training step
    that enumerates copies nothing from the host (a CUDA graph can capture it)."""
    key = (dim, categories, dtype, device)
    if key not in _SUPPORTS:
        _SUPPORTS[key] = torch.as_tensor(discrete_support(dim, categories), dtype=dtype,
                                         device=device)
    return _SUPPORTS[key]


def _grouped(x: torch.Tensor, categories: int) -> torch.Tensor:
    """(..., d·K) -> (..., d, K)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // categories, categories)


def discrete_kl_per_dim(logits_q, logits_p, categories: int | None) -> torch.Tensor:
    """KL(q_i ‖ p_i) of each of the d variables, (..., d), nats: Bernoulli variables from their
    logits (categories None), or categorical ones from (..., d·K) logits."""
    if categories is None:
        p = torch.sigmoid(logits_q)
        return (p * (F.logsigmoid(logits_q) - F.logsigmoid(logits_p))
                + (1 - p) * (F.logsigmoid(-logits_q) - F.logsigmoid(-logits_p)))
    log_q = torch.log_softmax(_grouped(logits_q, categories), -1)
    log_p = torch.log_softmax(_grouped(logits_p, categories), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def discrete_probs(logits: torch.Tensor, categories: int | None) -> torch.Tensor:
    """The probabilities of (..., d) Bernoulli logits, or of (..., d·K) categorical logits (each
    group of K softmaxed), in the logits' layout: E[z] of the discrete site."""
    if categories is None:
        return torch.sigmoid(logits)
    return torch.softmax(_grouped(logits, categories), -1).reshape(logits.shape)


class _Factorised(dist.TorchDistribution):
    """What the two discrete families share: d independent variables with `logits` (..., d)
    (Bernoulli, `categories` None) or (..., d·K) (categorical, one-hot values flattened), event
    shape (width,), and `expand` keeping the class (a plate broadcasts the logits)."""

    def _set(self, logits, categories, validate_args, **extra):
        self.logits, self.categories = logits, categories
        for k, v in extra.items():
            setattr(self, k, v)
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def dim(self) -> int:
        return self.event_shape[0] // (self.categories or 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        new.categories = self.categories
        for k in self._extra:
            setattr(new, k, getattr(self, k))
        dist.TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def probs(self) -> torch.Tensor:
        return discrete_probs(self.logits, self.categories)


class Discrete(_Factorised):
    """d independent discrete variables with `logits` from an encoder or a prior: Bernoulli
    units (value (..., d) in {0, 1}) or, with `categories` K, categorical variables (value the
    one-hot rows flattened, (..., d·K)). Not reparameterised (a sampled site gets
    score-function terms); its support can be enumerated jointly (2^d or K^d values, for
    ``infer={"enumerate": "parallel"}``); `kl_divergence` between two is registered (the sum
    of the variables' KLs). The twin of `ppl_vae.numpyro.latents.Discrete`."""

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = True
    _extra = ()

    def __init__(self, logits: torch.Tensor, categories: int | None = None,
                 validate_args=None):
        self._set(logits, categories, validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        if self.categories is None:
            return (value * self.logits - F.softplus(self.logits)).sum(-1)
        log_p = torch.log_softmax(_grouped(self.logits, self.categories), -1)
        return (_grouped(value, self.categories) * log_p).sum((-2, -1))

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            if self.categories is None:
                return torch.bernoulli(torch.sigmoid(self.logits).expand(shape))
            logits = _grouped(self.logits, self.categories)
            index = torch.distributions.Categorical(logits=logits).sample(torch.Size(sample_shape))
            return one_hot(index, self.categories, self.logits.dtype).reshape(shape)

    def enumerate_support(self, expand: bool = True):
        values = _support(self.dim, self.categories, self.logits.dtype, self.logits.device)
        values = values.reshape((len(values),) + (1,) * len(self.batch_shape)
                                + self.event_shape)
        return values.expand((len(values),) + self.batch_shape + self.event_shape) if expand \
            else values


class Concrete(_Factorised):
    """The Concrete / Gumbel-softmax relaxation (Maddison et al. 2017; Jang et al. 2017) of
    `Discrete` at `temperature` τ: a binary unit draws σ((logit + L) / τ), L ~ Logistic(0, 1),
    and a categorical variable softmax((logits + G) / τ), G ~ Gumbel(0, 1), reparameterised
    (values in (0, 1), one-hot rows relaxed to the simplex). `log_prob` is the relaxed density
    (the binary Concrete and the Concrete densities, the draws clamped to [ε, 1 − ε]).

    `kl_divergence` between two is registered as the KL of the discrete variables they relax
    (`discrete`), not of the relaxed densities: the rate `ScaledELBO(analytic_kl=True)` gives a
    relaxed site (see `ppl_vae.schema.LatentSpec.estimator`). The twin of
    `ppl_vae.numpyro.latents.Concrete`."""

    arg_constraints = {"logits": constraints.real, "temperature": constraints.positive}
    support = constraints.independent(constraints.unit_interval, 1)
    has_rsample = True
    _extra = ("temperature",)

    def __init__(self, temperature, logits: torch.Tensor, categories: int | None = None,
                 validate_args=None):
        self._set(logits, categories, validate_args,
                  temperature=torch.as_tensor(temperature, dtype=logits.dtype,
                                              device=logits.device))

    @property
    def discrete(self) -> Discrete:
        """The discrete distribution this one relaxes."""
        return Discrete(self.logits, self.categories)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        u = clamp_probs(torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device))
        if self.categories is None:
            return torch.sigmoid((self.logits + u.log() - (-u).log1p()) / self.temperature)
        gumbel = -(-u.log()).log()
        x = torch.softmax(_grouped(self.logits + gumbel, self.categories) / self.temperature,
                          -1)
        return x.reshape(shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        eps = torch.finfo(value.dtype).eps
        x = value.clamp(eps, 1 - eps)
        tau, logits = self.temperature, self.logits
        if self.categories is None:
            log_x, log_1mx = x.log(), (-x).log1p()
            return (tau.log() + logits - (tau + 1) * (log_x + log_1mx)
                    - 2 * torch.logaddexp(logits - tau * log_x, -tau * log_1mx)).sum(-1)
        k = self.categories
        log_x, logits = _grouped(x, k).log(), _grouped(logits, k)
        per = (math.lgamma(k) + (k - 1) * tau.log() + (logits - (tau + 1) * log_x).sum(-1)
               - k * torch.logsumexp(logits - tau * log_x, -1))
        return per.sum(-1)


@register_kl(Discrete, Discrete)
def _kl_discrete(q: Discrete, p: Discrete) -> torch.Tensor:
    return discrete_kl_per_dim(q.logits, p.logits, q.categories).sum(-1)


@register_kl(Concrete, Concrete)
def _kl_concrete(q: Concrete, p: Concrete) -> torch.Tensor:
    # the discrete KL, by design (see the class docstring)
    return discrete_kl_per_dim(q.logits, p.logits, q.categories).sum(-1)


def discrete_log_prob_per_dim(fn, value) -> torch.Tensor:
    """ln q(z_i) of each of the d variables of a `Discrete` site at `value`, (..., d)."""
    if fn.categories is None:
        return value * fn.logits - F.softplus(fn.logits)
    log_p = torch.log_softmax(_grouped(fn.logits, fn.categories), -1)
    return (_grouped(value, fn.categories) * log_p).sum(-1)


def discrete_factors(fn):
    """The `Discrete` or `Concrete` distribution of a site, or None."""
    return fn if isinstance(fn, _Factorised) else None


class Temperatures(nn.Module):
    """The temperature τ of each relaxed site: 0-d buffers (not parameters, not saved) that
    follow the modules' device and dtype, filled in place step by step
    (`ppl_vae.pyro.model.Built.set_temperatures`), so a CUDA graph replays the new value."""

    def __init__(self, values: dict[str, float]):
        super().__init__()
        for name, value in values.items():
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64),
                                 persistent=False)
