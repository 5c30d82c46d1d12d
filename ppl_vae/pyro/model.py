"""`build(spec)`: the Pyro model (prior + decoder), guide (encoder + aux terms) and modules.

Sites, the same in both backends:

* ``z``  latent, in the plate ``data``: z ~ P̂_Φ(z) in the model, z ~ N(loc, diag scale²) =
  P_Ψ(z|y) in the guide; event shape (d,).
* ``y``  distortion, in the model: observed under the likelihood P̂_Φ(y|z) (``distortion =
  "nll"``), or a factor −Dist_Φ(y|z) (``"mse"``, ``"l1"``: a rate–distortion autoencoder).
* ``<aux name>`` factor sites of the guide: weight · aux loss, on the encoder alone.

Model and guide take ``(y, labels=None)``: y (B, D) in the data's units, labels (B,) int64 with
−1 for unknown (used by the ``supervised`` aux term only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae.backends import BackendError
from ppl_vae.diagnostics import log_weights_from_parts
from ppl_vae.objective import aux_site_names
from ppl_vae.pyro.networks import build_networks
from ppl_vae.spec import LikelihoodSpec, Spec, resolve_user_function


# ---- likelihood -----------------------------------------------------------------------------
def likelihood_dist(spec: LikelihoodSpec, params: torch.Tensor, log_scale=None):
    """P̂_Φ(y|z) with event shape (D,) from decoder outputs (..., D) or (..., D, K)."""
    if spec.kind == "bernoulli":
        # validate_args=False: grey values in [0, 1] are allowed as soft targets (cross-entropy).
        return dist.Bernoulli(logits=params, validate_args=False).to_event(1)
    if spec.kind == "gaussian":
        scale = log_scale.exp() if log_scale is not None else torch.full_like(params, spec.scale)
        return dist.Normal(params, scale.expand_as(params)).to_event(1)
    if spec.kind == "binomial":
        return dist.Binomial(total_count=spec.total_count, logits=params).to_event(1)
    return dist.Categorical(logits=params).to_event(1)


def observation(spec: LikelihoodSpec, y: torch.Tensor) -> torch.Tensor:
    """The value observed at site ``y``: counts for binomial, levels for categorical."""
    if spec.kind == "binomial":
        return torch.round(y * spec.total_count)
    if spec.kind == "categorical":
        return torch.round(y * (spec.categories - 1)).long()
    return y


def from_observation(spec: LikelihoodSpec, obs: torch.Tensor) -> torch.Tensor:
    """The inverse of `observation`: a value of site ``y`` back in the data's units."""
    if spec.kind == "binomial":
        return obs / spec.total_count
    if spec.kind == "categorical":
        return obs / (spec.categories - 1)
    return obs


def likelihood_mean(spec: LikelihoodSpec, params: torch.Tensor) -> torch.Tensor:
    """E[y|z] in the data's units ([0, 1] for all but gaussian): what mse/l1 compare with y."""
    if spec.kind in ("bernoulli", "binomial"):
        return torch.sigmoid(params)
    if spec.kind == "gaussian":
        return params
    levels = torch.arange(spec.categories, dtype=params.dtype, device=params.device)
    return (params.softmax(-1) * levels).sum(-1) / (spec.categories - 1)


def distortion_value(kind: str, y: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Dist_Φ(y|z) per example, (...,): squared (mse) or absolute (l1) error summed over pixels."""
    diff = y - mean
    return (diff * diff).sum(-1) if kind == "mse" else diff.abs().sum(-1)


def prior_dist(prior: nn.Module):
    """P̂_Φ(z) with event shape (d,)."""
    if prior.kind == "normal":
        zero = prior.zero
        return dist.Normal(zero, 1.0 + zero).expand([prior.dim]).to_event(1)
    if prior.kind == "learned_normal":
        return dist.Normal(prior.loc, prior.log_scale.exp()).to_event(1)
    components = dist.Normal(prior.loc, prior.log_scale.exp()).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(logits=prior.logits), components)


def ancestral_sample(spec: LikelihoodSpec, decoder: nn.Module, z: torch.Tensor,
                     log_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """y ~ P̂_Φ(y|z) = Π_i P̂_Φ(y_i | y_<i, z) for an autoregressive decoder, pixel by pixel
    (D decoder passes), with torch's random state.

    z (..., d). Returns (y, means), each (..., D) in the data's units: the draw, and
    E[y_i | y_<i, z] at the drawn y_<i (what `decode_mean` shows as the picture of z).
    """
    data_dim = decoder.data_dim
    y = z.new_zeros(*z.shape[:-1], data_dim)
    means = torch.zeros_like(y)
    pixel = torch.arange(data_dim, device=z.device)
    for i in range(data_dim):
        params = decoder(z, y)
        draw = from_observation(spec, likelihood_dist(spec, params, log_scale).sample())
        # torch.where, not an in-place write: y is an input of the graph when gradients flow
        y = torch.where(pixel == i, draw.to(y.dtype), y)
        means = torch.where(pixel == i, likelihood_mean(spec, params), means)
    return y, means


# ---- aux terms (encoder only) -------------------------------------------------------------------
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
    logits = head(loc)
    known = labels >= 0
    nll = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return torch.where(known, nll, torch.zeros_like(nll)).sum()


# ---- build ----------------------------------------------------------------------------------
@dataclass
class Built:
    """What `build` returns. `model`/`guide` are the training pair; `elbo_model` the model with
    the nll distortion (the same as `model` when ``distortion = "nll"``), for the ELBO metric."""

    spec: Spec
    model: object
    guide: object
    elbo_model: object
    modules: nn.ModuleDict

    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior loc and scale, each (B, d)."""
        return self.modules["encoder"](y)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[y|z], (..., D); for an autoregressive decoder E[y_i | y_<i, z] along one ancestral
        draw of y (torch's random state)."""
        decoder = self.modules["decoder"]
        if self.spec.decoder.kind == "autoregressive":
            log_scale = getattr(self.modules["likelihood"], "log_scale", None)
            return ancestral_sample(self.spec.likelihood, decoder, z, log_scale)[1]
        return likelihood_mean(self.spec.likelihood, decoder(z))

    def sample_prior(self, n: int) -> torch.Tensor:
        """n draws of z from P̂_Φ(z), (n, d)."""
        return prior_dist(self.modules["prior"]).sample((n,))


def build(spec: Spec, data_dim: int, image_shape=None, register: bool = True) -> Built:
    """Model, guide and modules for `spec` on data with `data_dim` features.

    ``register=True`` calls ``pyro.module`` in model and guide so that ``pyro.infer.SVI`` with
    ``pyro.optim`` finds the parameters. Pyro's param store is global: when you build twice in one
    process and train with the stock SVI, run each in ``with pyro.get_param_store().scope():``
    (ppl_vae's own training optimises ``built.modules.parameters()`` directly and never reads it).
    """
    modules = nn.ModuleDict(build_networks(spec, data_dim, image_shape))
    encoder, decoder = modules["encoder"], modules["decoder"]
    prior, likelihood = modules["prior"], modules["likelihood"]
    lik_spec, objective = spec.likelihood, spec.objective
    aux_terms = list(zip(aux_site_names(spec), objective.aux))
    user_fns = {name: resolve_user_function(a.kind) for name, a in aux_terms
                if a.kind not in ("infonce", "supervised")}
    model_names = ("decoder", "prior", "likelihood")

    def make_model(distortion: str):
        def model(y, labels=None):
            if register:
                for name in model_names:
                    pyro.module(name, modules[name])
            with pyro.plate("data", y.shape[0]):
                z = pyro.sample("z", prior_dist(prior))
                params = decoder(z, y)  # y: the autoregressive decoder's teacher forcing
                if distortion == "nll":
                    log_scale = getattr(likelihood, "log_scale", None)
                    pyro.sample("y", likelihood_dist(lik_spec, params, log_scale),
                                obs=observation(lik_spec, y))
                else:
                    mean = likelihood_mean(lik_spec, params)
                    pyro.factor("y", -distortion_value(distortion, y, mean))
            return z

        return model

    def guide(y, labels=None):
        if register:
            pyro.module("encoder", encoder)
            for name, _ in aux_terms:
                if f"aux_{name}" in modules:
                    pyro.module(f"aux_{name}", modules[f"aux_{name}"])
        with pyro.plate("data", y.shape[0]):
            loc, scale = encoder(y)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        for name, aux in aux_terms:
            if aux.kind == "infonce":
                value = infonce_loss(z, loc, scale)
            elif aux.kind == "supervised":
                value = supervised_loss(modules[f"aux_{name}"], loc, labels)
            else:
                value = user_fns[name](y=y, z=z, loc=loc, scale=scale, labels=labels,
                                       backend="pyro")
            # has_rsample=True: the value is a differentiable function of reparameterised draws.
            pyro.factor(name, aux.weight * value, has_rsample=True)
        return z

    model = make_model(objective.distortion)
    elbo_model = model if objective.distortion == "nll" else make_model("nll")
    return Built(spec, model, guide, elbo_model, modules)


# ---- canonical parameters -----------------------------------------------------------------
def export_params(modules: nn.ModuleDict) -> dict[str, np.ndarray]:
    """Canonical {"<module>.<name>": array}: every parameter and persistent buffer."""
    return {k: v.detach().cpu().numpy().copy() for k, v in modules.state_dict().items()}


def import_params(modules: nn.ModuleDict, params: dict[str, np.ndarray]) -> None:
    """Load canonical arrays into `modules` in place; names and shapes must match exactly."""
    own = modules.state_dict()
    missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
    if missing or extra:
        raise ValueError(f"parameters do not match the spec: missing {missing}, unexpected {extra}")
    for key, value in own.items():
        if tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(f"parameter {key!r}: shape {params[key].shape} in the file, "
                             f"{tuple(value.shape)} in the model")
    modules.load_state_dict({k: torch.as_tensor(params[k], dtype=own[k].dtype,
                                                 device=own[k].device) for k in own})


# ---- a built model with parameters on a device: the backend hooks ------------------------------
def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU is an error that says so."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            f"device 'cuda' was asked for, but this PyTorch ({torch.__version__}) sees no CUDA "
            "GPU; use --device cpu (or auto), or install a CUDA build of torch."
        )
    return torch.device(device)


class Model:
    """A spec built on a device, with the hooks that backend-free code calls (NumPy in and out).

    Both backends have a `Model` with these methods, so the CLI, diagnostics and plots are written
    once. Arrays are per example; log-densities are in nats.
    """

    def __init__(self, spec: Spec, data_dim: int, image_shape=None, device: str = "auto",
                 params: dict[str, np.ndarray] | None = None):
        self.spec, self.data_dim, self.image_shape = spec, data_dim, image_shape
        self.device = resolve_device(device)
        self.dtype = torch.float64 if spec.train.dtype == "float64" else torch.float32
        self.built = build(spec, data_dim, image_shape, register=False)
        self.modules = self.built.modules.to(device=self.device, dtype=self.dtype)
        if params is not None:
            import_params(self.modules, params)

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=self.device, dtype=self.dtype)

    def export_params(self) -> dict[str, np.ndarray]:
        return export_params(self.modules)

    def import_params(self, params: dict[str, np.ndarray]) -> None:
        import_params(self.modules, params)  # in place: an optimizer's references stay valid

    @torch.no_grad()
    def encode(self, x: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Posterior loc and scale of q(z|y), each (N, d)."""
        locs, scales = [], []
        for i in range(0, len(x), batch_size):
            loc, scale = self.built.encode(self.tensor(x[i:i + batch_size]))
            locs.append(loc)
            scales.append(scale)
        return torch.cat(locs).cpu().numpy(), torch.cat(scales).cpu().numpy()

    @torch.no_grad()
    def decode_mean(self, z: np.ndarray, seed: int = 0) -> np.ndarray:
        """E[y|z], (N, D); autoregressive decoders: E[y_i | y_<i, z] along a draw seeded by
        `seed`."""
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            return self.built.decode_mean(self.tensor(z)).cpu().numpy()

    @torch.no_grad()
    def sample_prior(self, n: int, seed: int = 0) -> np.ndarray:
        """n draws of z ~ P̂_Φ(z), (n, d)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.built.sample_prior(n).cpu().numpy()

    @torch.no_grad()
    def log_density_parts(self, x: np.ndarray, num_samples: int, seed: int = 0,
                          chunk: int = 500) -> np.ndarray:
        """ln p̂(y|z_k), ln p̂(z_k), ln q(z_k|y) for K draws z_k ~ q(z|y): (N, K, 3) float64, nats.

        p̂(y|z) is the likelihood (the nll distortion) whatever distortion was trained; draws
        come in chunks of `chunk` so that K in the thousands fits in memory. The importance
        log-weight is parts[..., 0] + parts[..., 1] − parts[..., 2] (`log_weights`); with K = 1,
        −parts[..., 0] is a per-example draw of the distortion and parts[..., 2] − parts[..., 1]
        one of the rate.
        """
        lik = self.spec.likelihood
        log_scale = getattr(self.modules["likelihood"], "log_scale", None)
        y = self.tensor(x)
        obs = observation(lik, y)
        loc, scale = self.built.encode(y)
        q = dist.Normal(loc, scale).to_event(1)
        prior = prior_dist(self.modules["prior"])
        out = []
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            for k in range(0, num_samples, chunk):
                z = q.rsample((min(chunk, num_samples - k),))  # (k, N, d)
                params = self.modules["decoder"](z, y)
                parts = (likelihood_dist(lik, params, log_scale).log_prob(obs),
                         prior.log_prob(z), q.log_prob(z))
                out.append(torch.stack(parts, -1).double().cpu())
        return torch.cat(out).transpose(0, 1).contiguous().numpy()

    def log_weights(self, x: np.ndarray, num_samples: int, seed: int = 0,
                    chunk: int = 500) -> np.ndarray:
        """Importance log-weights ln p̂(y, z_k) − ln q(z_k|y), z_k ~ q(z|y), (N, K) float64."""
        return log_weights_from_parts(self.log_density_parts(x, num_samples, seed, chunk))

    def prior_normal(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(loc, scale), each (d,), when the prior is a factorised normal; None otherwise."""
        prior = self.modules["prior"]
        if prior.kind == "normal":
            return np.zeros(prior.dim), np.ones(prior.dim)
        if prior.kind == "learned_normal":
            return (prior.loc.detach().cpu().numpy().astype(np.float64),
                    prior.log_scale.detach().exp().cpu().numpy().astype(np.float64))
        return None

    @torch.no_grad()
    def eval_terms(self, x: np.ndarray, labels: np.ndarray | None, beta: float, lam: float,
                   seed: int = 0, batch_size: int = 1000) -> dict[str, float]:
        """Sums over the examples of x (nats): objective, rate, distortion, aux and nll (the
        distortion of the ELBO model). One draw of z per example (num_particles from the spec);
        uses its own random stream, so evaluating never changes training."""
        from ppl_vae.pyro.elbo import ScaledELBO

        obj = self.spec.objective
        elbo = ScaledELBO(beta=beta, lam=lam, num_particles=obj.num_particles,
                          analytic_kl=obj.analytic_kl, vectorize_particles=obj.num_particles > 1,
                          max_plate_nesting=1)
        nll_elbo = ScaledELBO(num_particles=obj.num_particles, analytic_kl=obj.analytic_kl,
                              vectorize_particles=obj.num_particles > 1, max_plate_nesting=1)
        keys = ("loss", "rate", "distortion", "aux")
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in (*keys, "nll")}
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            for i in range(0, len(x), batch_size):
                y = self.tensor(x[i:i + batch_size])
                lab = None if labels is None else torch.as_tensor(
                    labels[i:i + batch_size], device=self.device)
                t = elbo.terms(self.built.model, self.built.guide, y, lab)
                for k in keys:
                    sums[k] += t[k]
                if self.built.elbo_model is self.built.model:
                    sums["nll"] += t["distortion"]
                else:
                    sums["nll"] += nll_elbo.terms(self.built.elbo_model, self.built.guide, y,
                                                  lab)["distortion"]
        out = {k: float(v) for k, v in sums.items()}
        out["objective"] = out.pop("loss")
        return out
