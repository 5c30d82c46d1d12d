"""`Model`: a spec built on a device with parameters, and the hooks that backend-free code calls
(the CLI, `eval`, the plots, the experiments), NumPy in and out. The twin of
`ppl_vae/numpyro/hooks.py`: the same methods with the same meaning.

Arrays are per example; log-densities are in nats. A latent code is a dict {site: (N, d_site)}
(`Spec.sites`); a one-site model also takes its one array. Label-conditional models take the
labels (N,) wherever they read them.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.enum_messenger import EnumMessenger
from torch.distributions import kl_divergence

from ppl_vae import graph, schedules
from ppl_vae.backends import BackendError
from ppl_vae.diagnostics import log_weights_from_parts
from ppl_vae.objective import rate_sites, site_betas
from ppl_vae.pyro.elbo import ScaledELBO
from ppl_vae.pyro.latents import (
    discrete_factors,
    discrete_kl_per_dim,
    discrete_log_prob_per_dim,
    discrete_probs,
    factorised_normal,
    marginal_std,
)
from ppl_vae.pyro.likelihood import ancestral_sample, likelihood_mean
from ppl_vae.pyro.model import build
from ppl_vae.pyro.params import export_params, import_params
from ppl_vae.pyro.precision import matmul_precision
from ppl_vae.pyro.threads import intra_op_threads
from ppl_vae.spec import LABEL_SITE, Spec


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


def _inference(method):
    """A hook that computes without gradients, in the spec's `train.matmul_precision`, on its
    `train.threads`."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        tr = self.spec.train
        with torch.no_grad(), matmul_precision(tr.matmul_precision), \
                intra_op_threads(tr.threads):
            return method(self, *args, **kwargs)

    return run


def site_log_prob(site) -> torch.Tensor:
    """ln p of a trace site's value, per example (not summed over the batch)."""
    return site["fn"].log_prob(site["value"])


def _expected(site, weight) -> torch.Tensor:
    """`site_log_prob`, averaged over an enumerated label (dim 0) under its weights q(c|y)."""
    log_prob = site_log_prob(site)
    return log_prob if weight is None else (weight * log_prob).sum(0)


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
        x = np.asarray(x)
        if not x.flags.writeable:  # e.g. an array that JAX handed out: torch wants to own one
            x = x.copy()
        return torch.as_tensor(x, device=self.device, dtype=self.dtype)

    def _labels(self, labels) -> torch.Tensor | None:
        return None if labels is None else torch.as_tensor(np.asarray(labels),
                                                            device=self.device)

    @contextmanager
    def _seeded(self, seed: int):
        """torch's random state seeded for a hook and restored after it, so that evaluating
        never changes training."""
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            yield

    def export_params(self) -> dict[str, np.ndarray]:
        return export_params(self.modules)

    def import_params(self, params: dict[str, np.ndarray]) -> None:
        import_params(self.modules, params)  # in place: an optimizer's references stay valid

    # -- posteriors -----------------------------------------------------------------------------
    @_inference
    def encode(self, x: np.ndarray, batch_size: int = 1000, labels=None,
               site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and coordinate standard deviations of the Gaussian posterior q(z_site|y), each
        (N, d), for a site whose posterior reads the data only (default: the first site) and is
        diagonal or full; other sites have no Gaussian q(z|y): use `posterior_draws`."""
        s = graph.gaussian_data_site(self.spec, site)
        locs, stds = [], []
        for i in range(0, len(x), batch_size):
            y = self.tensor(x[i:i + batch_size])
            onehot = self.built.label_input(self._labels(None if labels is None
                                                         else labels[i:i + batch_size]))
            q, loc, _ = self.built.posterior_of(s.name, y, {}, onehot)
            locs.append(loc)
            stds.append(marginal_std(q))
        return torch.cat(locs).cpu().numpy(), torch.cat(stds).cpu().numpy()

    @_inference
    def posterior_probs(self, x: np.ndarray, batch_size: int = 1000, labels=None,
                        site: str | None = None) -> np.ndarray:
        """The probabilities of a discrete site's posterior q(z_site|y), (N, width): q(z_i = 1|y)
        of each Bernoulli unit, or q(z_i = k|y) of each categorical variable (its K values in
        a row, flattened), for a site whose posterior reads the data only (default: the first
        site); sites that read other latents: the mean of `posterior_draws`."""
        s = graph.discrete_data_site(self.spec, site)
        out = []
        for i in range(0, len(x), batch_size):
            y = self.tensor(x[i:i + batch_size])
            onehot = self.built.label_input(self._labels(None if labels is None
                                                         else labels[i:i + batch_size]))
            logits = self.built.discrete_logits(s.name, y, {}, onehot)
            out.append(discrete_probs(logits, self.built.plan.site(s.name).categories))
        return torch.cat(out).cpu().numpy()

    @_inference
    def posterior_draws(self, x: np.ndarray, labels=None, num_samples: int = 1, seed: int = 0,
                        batch_size: int = 1000) -> dict[str, np.ndarray]:
        """Draws from the joint posterior q(z_1, ..., z_S | y): {site: (N, num_samples, d)}."""
        out: dict[str, list] = {s.name: [] for s in self.spec.sites}
        with self._seeded(seed):
            for i in range(0, len(x), batch_size):
                lab = self._labels(None if labels is None else labels[i:i + batch_size])
                with pyro.plate("particles", num_samples, dim=-2):
                    trace = poutine.trace(self.built.posterior_guide).get_trace(
                        self.tensor(x[i:i + batch_size]), lab)
                for name in out:
                    out[name].append(trace.nodes[name]["value"].transpose(0, 1))
        return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}

    # -- the model --------------------------------------------------------------------------
    @_inference
    def decode_mean(self, code, seed: int = 0, labels=None) -> np.ndarray:
        """E[y|z], (N, D). `code`: {site: (N, d)}, or the array of a one-site model; sites the
        decoder needs and `code` lacks are set to their prior means given their parents (so a
        top site alone can be traversed). Autoregressive decoders: E[y_i | y_<i, z] along a draw
        seeded by `seed`."""
        code = graph.as_code(self.spec, code)
        values = {k: self.tensor(v) for k, v in code.items()}
        n = next(iter(values.values())).shape[0]
        onehot = self.built.label_input(self._labels(labels))
        for name in graph.sites_to_fill(self.spec, values):
            mean = self.built.prior_of(name, values, onehot).mean
            values[name] = mean.expand(n, *mean.shape[-1:])
        decoder, lik = self.modules["decoder"], self.spec.likelihood
        code_tensor = self.built.code(values, onehot)
        if self.spec.decoder.kind == "autoregressive":
            log_scale = getattr(self.modules["likelihood"], "log_scale", None)
            with self._seeded(seed):
                return ancestral_sample(lik, decoder, code_tensor, self.data_dim,
                                        log_scale)[1].cpu().numpy()
        return likelihood_mean(lik, decoder(code_tensor)).cpu().numpy()

    @_inference
    def sample_prior(self, n: int, seed: int = 0, labels=None) -> dict[str, np.ndarray]:
        """n ancestral draws from P̂_Φ(z_1, ..., z_S) (given the labels (n,) of a
        label-conditional prior): {site: (n, d)}."""
        onehot = self.built.label_input(self._labels(labels))
        values = {}
        with self._seeded(seed), pyro.plate("data", n):
            for name in self.built.plan.model_order:
                values[name] = pyro.sample(name, self.built.prior_of(name, values, onehot))
        return {k: v.cpu().numpy() for k, v in values.items()}

    def prior_normal(self, site: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(loc, scale), each (d,), when the prior of `site` (default: the first) is a fixed or
        learned factorised normal; None otherwise."""
        name = site or self.spec.sites[0].name
        if self.built.plan.site(name).discrete:
            return None
        prior = self.modules[self.built.plan.site(name).prior_module]
        if prior.kind == "normal":
            return np.zeros(prior.dim), np.ones(prior.dim)
        if prior.kind == "learned_normal":
            return (prior.loc.detach().cpu().numpy().astype(np.float64),
                    prior.log_scale.detach().exp().cpu().numpy().astype(np.float64))
        return None

    # -- log-densities and the ELBO's terms -------------------------------------------------------
    def _traces(self, y, labels, enumerate_label: bool = False, enum_dim: int = -2):
        """The posterior guide's trace and the nll model replayed on it; with
        `enumerate_label`, a latent label takes all its values in dim `enum_dim`
        (`ScaledELBO`'s enumeration)."""
        guide = self.built.posterior_guide
        if enumerate_label:
            guide = EnumMessenger(first_available_dim=enum_dim)(guide)
        guide_trace = poutine.trace(guide).get_trace(y, labels)
        model_trace = poutine.trace(poutine.replay(self.built.elbo_model, trace=guide_trace)
                                    ).get_trace(y, labels)
        return guide_trace, model_trace

    @_inference
    def log_density_parts(self, x: np.ndarray, num_samples: int, seed: int = 0,
                          chunk: int = 500, labels=None) -> np.ndarray:
        """For K joint draws z_k ~ q(z|y): (N, K, 1 + 2S) float64, nats. Column 0 is
        ln p̂(y|z_k) (the likelihood, whatever distortion was trained); then, for each site s
        of `Spec.sites` in order, ln p̂(z_s,k | parents) and ln q(z_s,k | inputs). A latent
        label adds its pair (ln p̂(c), ln q(c|y)) last, and every column is then the
        expectation over the label under q(c|y) (z drawn for each class; `labels` unused):
        their sum is a draw of the ELBO with the label summed out.

        The importance log-weight is column 0 + the prior columns − the posterior columns
        (`log_weights_from_parts`); with K = 1, −column 0 is a per-example draw of the
        distortion and ln q − ln p̂ of a site a draw of its rate. Draws come in chunks of
        `chunk`, so that K in the thousands fits in memory.
        """
        y, lab = self.tensor(x), self._labels(labels)
        latent_label = self.spec.label.latent
        out = []
        with self._seeded(seed):
            for k in range(0, num_samples, chunk):
                with pyro.plate("particles", min(chunk, num_samples - k), dim=-2):
                    guide_trace, model_trace = self._traces(
                        y, None if latent_label else lab, enumerate_label=latent_label,
                        enum_dim=-3)
                weight = ScaledELBO._enumeration_weight(guide_trace)
                columns = [_expected(model_trace.nodes["y"], weight)]
                for name in rate_sites(self.spec):
                    columns += [_expected(model_trace.nodes[name], weight),
                                _expected(guide_trace.nodes[name], weight)]
                # the label's terms are exact: the same for every particle
                out.append(torch.stack(torch.broadcast_tensors(*columns), -1).double().cpu())
        return torch.cat(out).transpose(0, 1).contiguous().numpy()

    def log_weights(self, x: np.ndarray, num_samples: int, seed: int = 0,
                    chunk: int = 500, labels=None) -> np.ndarray:
        """Importance log-weights ln p̂(y, z_k) − ln q(z_k|y), z_k ~ q(z|y) jointly over the
        sites, (N, K) float64. With a latent label the label is summed out of both (the
        labels are not used): ln Σ_c p̂(c) p̂(z_k|c) p̂(y|c, z_k) − ln Σ_c q(c|y) q(z_k|y, c),
        (c_k, z_k) drawn from q, so that the IWAE bound is one of ln p̂(y)."""
        if not self.spec.label.latent:
            return log_weights_from_parts(self.log_density_parts(x, num_samples, seed, chunk,
                                                                 labels))
        return self._label_summed_log_weights(x, num_samples, seed, chunk)

    @_inference
    def _label_summed_log_weights(self, x, num_samples, seed, chunk) -> np.ndarray:
        y, names = self.tensor(x), [s.name for s in self.spec.sites]
        out = []
        with self._seeded(seed):
            for k in range(0, num_samples, chunk):
                with pyro.plate("particles", min(chunk, num_samples - k), dim=-2):
                    drawn = poutine.trace(self.built.posterior_guide).get_trace(y, None)
                    z = {n: drawn.nodes[n]["value"] for n in names}
                    # every class at the drawn z: the label in its own dim left of the plates
                    guide = EnumMessenger(first_available_dim=-3)(
                        poutine.condition(self.built.posterior_guide, data=z))
                    g = poutine.trace(guide).get_trace(y, None)
                    every = {**z, LABEL_SITE: g.nodes[LABEL_SITE]["value"]}
                    m = poutine.trace(poutine.condition(self.built.elbo_model, data=every)
                                      ).get_trace(y, None)
                log_q = sum(site_log_prob(g.nodes[n]) for n in [LABEL_SITE, *names])
                log_p = sum(site_log_prob(m.nodes[n]) for n in [LABEL_SITE, *names, "y"])
                log_w = log_p.logsumexp(0) - log_q.logsumexp(0)  # (particles, batch)
                out.append(log_w.double().cpu())
        return torch.cat(out).transpose(0, 1).contiguous().numpy()

    def _rate_per_dim(self, y, labels) -> dict[str, torch.Tensor]:
        """{site: (d,)} the rate of each coordinate summed over the batch, for sites whose
        posterior and prior both factorise into normals: the closed form KL where it is valid
        (`SitePlan.closed_form`), else ln q − ln p̂ of one draw."""
        guide_trace, model_trace = self._traces(y, labels, enumerate_label=True)
        weight = ScaledELBO._enumeration_weight(guide_trace)  # a latent label: q(label|y)
        out = {}
        for s in self.spec.sites:
            gsite, msite = guide_trace.nodes[s.name], model_trace.nodes[s.name]
            value = gsite["value"]
            closed_form = self.built.plan.site(s.name).closed_form
            q, p = discrete_factors(gsite["fn"]), discrete_factors(msite["fn"])
            if q is not None and p is not None:  # a discrete site: per variable
                per = (discrete_kl_per_dim(q.logits, p.logits, q.categories) if closed_form else
                       discrete_log_prob_per_dim(q, value) - discrete_log_prob_per_dim(p, value))
                per = per.expand(*value.shape[:-1], s.dim)
            else:
                q, p = factorised_normal(gsite["fn"]), factorised_normal(msite["fn"])
                if q is None or p is None:
                    continue
                per = kl_divergence(q, p) if closed_form else (q.log_prob(value)
                                                               - p.log_prob(value))
                per = per.expand(value.shape)
            if weight is not None:
                per = weight[..., None] * per
            out[s.name] = per.reshape(-1, s.dim).sum(0)
        return out

    def gradient_draws(self, x: np.ndarray, num_draws: int, seed: int = 0, labels=None,
                       prefix: str = "encoder") -> np.ndarray:
        """(num_draws, P) float64: independent draws of the gradient of the training objective
        per example (the loss over x divided by len(x), at the spec's β, λ and estimator; the
        training pair: each discrete site's estimator, a relaxed site at its current
        temperature) with respect to the parameters of the modules whose names start with
        `prefix` (default: the encoder's), in the order of their sorted canonical names, the
        data x fixed: Σ_i Var(g_i) over the draws is the estimator's gradient variance."""
        spec, obj = self.spec, self.spec.objective
        options = schedules.elbo_options(spec)
        if "capacity_weight" in options:  # the targets as at the end of the run
            options["capacity"] = {s.name: s.capacity.max for s in spec.sites
                                   if s.capacity.max > 0}
        elbo = ScaledELBO(beta=site_betas(spec, obj.beta), lam=obj.lam,
                          num_particles=obj.num_particles, analytic_kl=obj.analytic_kl,
                          vectorize_particles=obj.num_particles > 1, max_plate_nesting=1,
                          **options)
        named = sorted((n, p) for n, p in self.modules.named_parameters() if n.startswith(prefix))
        params = [p for _, p in named]
        y, lab = self.tensor(x), self._labels(labels)
        out = []
        with self._seeded(seed), matmul_precision(spec.train.matmul_precision), \
                intra_op_threads(spec.train.threads), pyro.validation_enabled(False):
            for _ in range(num_draws):
                loss = elbo.differentiable_loss(self.built.model, self.built.guide, y, lab)
                grads = torch.autograd.grad(loss / len(x), params, allow_unused=True)
                out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                      for p, g in zip(params, grads)]))
        return torch.stack(out).double().cpu().numpy()

    @_inference
    def eval_terms(self, x: np.ndarray, labels: np.ndarray | None, beta, lam: float,
                   seed: int = 0, batch_size: int = 1000,
                   num_particles: int | None = None) -> dict[str, float]:
        """Sums over the examples of x (nats): objective, rate, distortion, aux and nll (the
        distortion of the ELBO model); rate/<site> for each site, and rate/<site>/dim_<i> where
        the site's posterior and prior factorise (`_rate_per_dim`). `num_particles` draws of z
        per example, averaged (default: the spec's objective.num_particles); `beta` a number or
        {site: β}. With a latent label (M2)
        the terms sum the label out (the labels are not shown to the model: the test ELBO is
        that of ln p̂(y)), rate/label is its KL, and ``accuracy`` counts the examples whose
        known label is the classifier's most probable class."""
        obj = self.spec.objective
        k = num_particles or obj.num_particles
        latent_label = self.spec.label.latent
        elbo = ScaledELBO(beta=beta, lam=lam, num_particles=k, analytic_kl=obj.analytic_kl,
                          vectorize_particles=k > 1, max_plate_nesting=1)
        nll_elbo = ScaledELBO(num_particles=k, analytic_kl=obj.analytic_kl,
                              vectorize_particles=k > 1, max_plate_nesting=1)
        latent_label = self.spec.label.latent
        keys = ("loss", "rate", "distortion", "aux",
                *(f"rate/{name}" for name in rate_sites(self.spec)))
        extra = ("nll", "accuracy") if latent_label else ("nll",)
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                for k in (*keys, *extra)}
        dims: dict[str, torch.Tensor] = {}
        with self._seeded(seed):
            for i in range(0, len(x), batch_size):
                y = self.tensor(x[i:i + batch_size])
                lab = self._labels(None if labels is None else labels[i:i + batch_size])
                if latent_label:  # the test ELBO sums the label out; the classifier is scored
                    if lab is not None:
                        hit = self.built.label_logits(y).argmax(-1) == lab
                        sums["accuracy"] += (hit & (lab >= 0)).sum()
                    lab = None
                # the evaluation pair: discrete sites drawn as the discrete sites they are,
                # whatever their estimator
                t = elbo.terms(self.built.eval_model, self.built.eval_guide, y, lab)
                for k in keys:
                    sums[k] += t[k]
                if self.built.elbo_model is self.built.eval_model:
                    sums["nll"] += t["distortion"]
                else:
                    sums["nll"] += nll_elbo.terms(self.built.elbo_model, self.built.eval_guide,
                                                  y, lab)["distortion"]
                for name, per in self._rate_per_dim(y, lab).items():
                    dims[name] = dims[name] + per.double() if name in dims else per.double()
        out = {k: float(v) for k, v in sums.items()}
        out["objective"] = out.pop("loss")
        for name, per in dims.items():
            out |= {f"rate/{name}/dim_{i}": float(v) for i, v in enumerate(per.cpu())}
        return out
