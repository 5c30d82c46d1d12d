"""`ScaledELBO` for Pyro: loss = β · rate + λ · distortion + aux(encoder only), in nats.

A drop-in loss for ``pyro.infer.SVI`` (or the module form ``ScaledELBO(...)(model, guide)``) that
works on any model and guide. It classifies trace sites by role:

=============  =====================================================  ==========================
role           which sites                                            enters the loss as
=============  =====================================================  ==========================
latent         sample sites in both guide and model                   β · (ln q − ln p), or
                                                                      β · KL(q‖p) analytically
distortion     observed sample sites and factor sites of the model    λ · (−log-density)
aux            factor sites of the guide only                         + their value
=============  =====================================================  ==========================

A guide site may opt out of the closed form with ``infer={"analytic_kl": False}`` (the spec
builder does so where it would be biased, `ppl_vae.graph.closed_form_rate_valid`).

Sign convention: the returned loss is minimised; at β = λ = 1 with no aux site it is −ELBO and
equals `Trace_ELBO` (`TraceMeanField_ELBO` when ``analytic_kl=True``) for the same random seed.
With β = b it equals the stock ELBO with ``poutine.scale(scale=b)`` on each latent site of both
model and guide (Higgins et al. 2017, β-VAE). Rate is Î(y, z) and distortion Ĥ(y|z) of the
lecture (McAllester, TTIC 31230, "VAEs": Î ≥ I, Ĥ ≥ H(y|z), H(y) = I + H(y|z)).

Unlike Pyro's own estimators it never calls ``.item()`` on the per-site terms, so a training loop
that uses `differentiable_terms` synchronises with the device only when it chooses to.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from ppl_vae.objective import (
    missing_guide_site,
    not_reparameterised,
    stray_guide_site,
    weighted_terms,
)

Weight = float | torch.Tensor | Mapping[str, float]


def _site_kind(site) -> str:
    if site["infer"].get("_deterministic"):
        return "deterministic"
    if site["is_observed"]:
        return "factor" if site["infer"].get("is_auxiliary") else "observed"
    return "latent"


class ScaledELBO(Trace_ELBO):
    """β · rate + λ · distortion + aux, as a Pyro ELBO (see the module docstring).

    :param beta: weight of the rate; a number (or 0-d tensor) or a dict {latent site: number}
        (sites not named get 1). Change it between steps by assignment (``elbo.beta = 0.5``);
        nothing is rebuilt.
    :param lam: weight of the distortion; likewise, keyed by distortion site.
    :param num_particles: Monte Carlo samples of z per example (averaged).
    :param analytic_kl: use ``kl_divergence(q, p)`` for the rate of a latent site when it is
        registered for the pair, else the Monte Carlo ln q − ln p (as `TraceMeanField_ELBO`).
        A guide site marked ``infer={"analytic_kl": False}`` always takes the Monte Carlo rate:
        mark a site whose prior reads a latent that the guide draws *from* it (bottom-up
        inference, q(z2|z1) with p̂(z1|z2)), where the KL at the drawn parent is biased.
    Other keyword arguments go to `pyro.infer.ELBO` (``vectorize_particles``,
    ``max_plate_nesting``, …).
    """

    def __init__(self, beta: Weight = 1.0, lam: Weight = 1.0, num_particles: int = 1,
                 analytic_kl: bool = True, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)
        self.beta, self.lam, self.analytic_kl = beta, lam, analytic_kl

    # -- the per-particle terms -----------------------------------------------------------------
    def _particle_terms(self, model_trace, guide_trace) -> dict[str, torch.Tensor]:
        """Unweighted per-site terms of one particle, summed over the batch (scaled as the sites
        say): {"rate/<site>", "distortion/<site>", "aux/<site>"}."""
        terms: dict[str, torch.Tensor] = {}
        for name, msite in model_trace.nodes.items():
            if msite["type"] != "sample":
                continue
            kind = _site_kind(msite)
            if kind in ("observed", "factor"):
                terms[f"distortion/{name}"] = -msite["log_prob_sum"]
            elif kind == "latent":
                gsite = guide_trace.nodes.get(name)
                if gsite is None or gsite["type"] != "sample":
                    raise missing_guide_site(name, "pyro")
                if not gsite["fn"].has_rsample:
                    raise not_reparameterised(name, type(gsite["fn"]).__name__, "Pyro")
                terms[f"rate/{name}"] = self._rate(msite, gsite)
        for name, gsite in guide_trace.nodes.items():
            if gsite["type"] != "sample" or name in model_trace.nodes:
                continue
            kind = _site_kind(gsite)
            if kind == "factor":
                terms[f"aux/{name}"] = gsite["log_prob_sum"]
            elif kind != "deterministic":
                raise stray_guide_site(name)
        return terms

    def _rate(self, msite, gsite) -> torch.Tensor:
        if self.analytic_kl and gsite["infer"].get("analytic_kl", True):
            try:
                kl = kl_divergence(gsite["fn"], msite["fn"])
            except NotImplementedError:
                pass
            else:
                kl = scale_and_mask(kl, scale=gsite["scale"], mask=gsite["mask"])
                if torch.is_tensor(kl):
                    return kl.sum()
                return kl * torch.Size(gsite["fn"].batch_shape).numel()
        return gsite["log_prob_sum"] - msite["log_prob_sum"]

    # -- public API ---------------------------------------------------------------------------
    def differentiable_terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The loss and its parts, differentiable, averaged over particles, summed over the batch.

        Keys: ``loss`` (weighted, to minimise), ``rate``, ``distortion``, ``aux`` (unweighted
        totals, nats) and ``rate/<site>``, ``distortion/<site>``, ``aux/<site>``.
        """
        total: dict[str, torch.Tensor] = {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for key, value in self._particle_terms(model_trace, guide_trace).items():
                value = value / self.num_particles
                total[key] = total[key] + value if key in total else value
        zero = next(iter(total.values())).new_zeros(()) if total else torch.zeros(())
        return weighted_terms(total, self.beta, self.lam, zero)

    def terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """`differentiable_terms`, detached: 0-d tensors in nats, summed over the batch."""
        return {k: v.detach() for k, v in self.differentiable_terms(
            model, guide, *args, **kwargs).items()}

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.differentiable_terms(model, guide, *args, **kwargs)["loss"]

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The weighted loss as a float (−ELBO at β = λ = 1)."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backpropagate the weighted loss into every parameter it touches; return it as float."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()
