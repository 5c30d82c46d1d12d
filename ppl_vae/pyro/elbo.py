"""`ScaledELBO` for Pyro: loss = β · rate + λ · distortion + aux(encoder only), in nats.

A drop-in loss for ``pyro.infer.SVI`` (or the module form ``ScaledELBO(...)(model, guide)``) that
works on any model and guide. It classifies trace sites by role:

=============  =====================================================  ==========================
role           which sites                                            enters the loss as
=============  =====================================================  ==========================
latent         sample sites in both guide and model                   β · (ln q − ln p), or
                                                                      β · KL(q‖p) analytically
               guide-only sample sites marked ``is_auxiliary``        β · ln q (an AutoGuide's
               (the AutoGuides' joint latent)                         joint draw: part of ln q)
distortion     observed sample sites and factor sites of the model    λ · (−log-density)
aux            factor sites of the guide only                         + their value
=============  =====================================================  ==========================

A guide site may opt out of the closed form with ``infer={"analytic_kl": False}`` (the spec
builder does so where it would be biased, `ppl_vae.graph.closed_form_rate_valid`).

**Discrete latents are summed out exactly.** A guide sample site marked
``infer={"enumerate": "parallel"}`` (as `TraceEnum_ELBO` users mark it; ``max_plate_nesting``
must be given) takes every value of its support at once, in a tensor dimension left of the
plates, and every term becomes an expectation under the guide's probabilities of those values::

    term = Σ_k q(k|·) · term(k)                 (each enumerated site multiplies its q in)
    rate of the site itself = Σ_k q(k|·) (ln q(k|·) − ln p(k|·))  =  KL(q(k|·) ‖ p(k|·)), exact

so β applies to a discrete site as to a continuous one. Where the value is known for some
examples (labels), the guide puts all its mass on it and says which examples those are with
``infer={"enumerate": "parallel", "observed": mask}`` (mask: bool, the batch's shape): there the
site's term is the distortion −ln p(value) (it is data), elsewhere its rate. At β = λ = 1 the loss
equals `TraceEnum_ELBO` for the same seed (`TraceEnum_ELBO` has no closed-form KL: compare with
``analytic_kl=False``). Sites that are neither reparameterised nor enumerated are refused.

Sign convention: the returned loss is minimised; at β = λ = 1 with no aux site it is −ELBO and
equals `Trace_ELBO` (`TraceMeanField_ELBO` when ``analytic_kl=True``) for the same random seed.
With β = b it equals the stock ELBO with ``poutine.scale(scale=b)`` on each latent site of both
model and guide (Higgins et al. 2017, β-VAE). Rate is Î(y, z) and distortion Ĥ(y|z) of the
lecture (McAllester, TTIC 31230, "VAEs": Î ≥ I, Ĥ ≥ H(y|z), H(y) = I + H(y|z)).

Unlike Pyro's own estimators it never calls ``.item()`` on the per-site terms, so a training loop
that uses `differentiable_terms` synchronises with the device only when it chooses to.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import is_validation_enabled
from pyro.poutine.enum_messenger import EnumMessenger
from torch.distributions import kl_divergence

from ppl_vae.objective import (
    enumeration_needs_plate_nesting,
    missing_guide_site,
    not_reparameterised,
    sequential_enumeration,
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

    def with_weights(self, beta: Weight, lam: Weight) -> ScaledELBO:
        """The same estimator with other β and λ (a copy; `self` is unchanged), as in the
        NumPyro twin. Assigning ``elbo.beta = b`` changes this one in place."""
        other = copy.copy(self)
        other.beta, other.lam = beta, lam
        return other

    # -- the per-particle terms -----------------------------------------------------------------
    def _get_traces(self, model, guide, args, kwargs):
        # Guide sites marked for parallel enumeration take their whole support in the dims left
        # of the plates, as in TraceEnum_ELBO; other sites are untouched. As there, the
        # enumeration wraps the particle plate, so that the plate broadcasts an enumerated
        # site's distribution before enumeration takes the site (inside it, model and guide
        # disagree on the site's batch shape).
        if self.max_plate_nesting == float("inf"):
            yield from super()._get_traces(model, guide, args, kwargs)
            return
        if self.vectorize_particles:
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
        guide = EnumMessenger(first_available_dim=-1 - self.max_plate_nesting)(guide)
        for _ in range(1 if self.vectorize_particles else self.num_particles):
            yield self._get_trace(model, guide, args, kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        # Trace_ELBO's (which checks that model and guide match when validation is on), without
        # its warning that enumerated sites need TraceEnum_ELBO; with the closed-form rate, the
        # mean-field check TraceMeanField_ELBO makes.
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model,
                                                        guide, args, kwargs)
        if self.analytic_kl and is_validation_enabled() and not any(
                site["type"] == "sample" and site["infer"].get("analytic_kl") is False
                for site in guide_trace.nodes.values()):
            # (a guide that marks sites analytic_kl=False has already said where the closed
            # form would be wrong: the spec builder does, for bottom-up latent graphs; the scan
            # runs only under validation, off the training hot path)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace

    @staticmethod
    def _enumeration_weight(guide_trace) -> torch.Tensor | None:
        """q of each joint value of the enumerated guide sites, broadcastable against the
        sites' per-example log-densities; None when no site is enumerated."""
        log_q = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or not site["infer"].get("enumerate"):
                continue
            if site["infer"]["enumerate"] != "parallel":
                raise sequential_enumeration(name)
            if "_enumerate_dim" not in site["infer"]:
                raise enumeration_needs_plate_nesting(name)
            lq = site["fn"].log_prob(site["value"])  # the measure: unscaled
            log_q = lq if log_q is None else log_q + lq
        return None if log_q is None else log_q.exp()

    def _particle_terms(self, model_trace, guide_trace) -> dict[str, torch.Tensor]:
        """Unweighted per-site terms of one particle, summed over the batch (scaled as the sites
        say) and, where guide sites are enumerated, averaged over their values under q:
        {"rate/<site>", "distortion/<site>", "aux/<site>"}."""
        weight = self._enumeration_weight(guide_trace)

        def total(site_or_value, key="log_prob"):
            """Σ of a per-example tensor (or a site's log-density) under the weights. A value
            without the enumerated dims (left of the plates) does not depend on the enumerated
            sites: its expectation is itself (weighting a value outside the data plate, such
            as M2's cross-entropy factor, would multiply it by the batch size)."""
            value = site_or_value[key] if isinstance(site_or_value, dict) else site_or_value
            if weight is None or value.dim() <= self.max_plate_nesting:
                return (site_or_value[f"{key}_sum"] if isinstance(site_or_value, dict)
                        else value.sum())
            return (weight * value).sum()

        terms: dict[str, torch.Tensor] = {}
        for name, msite in model_trace.nodes.items():
            if msite["type"] != "sample":
                continue
            kind = _site_kind(msite)
            if kind in ("observed", "factor"):
                terms[f"distortion/{name}"] = -total(msite)
            elif kind == "latent":
                gsite = guide_trace.nodes.get(name)
                if gsite is None or gsite["type"] != "sample":
                    raise missing_guide_site(name, "pyro")
                if gsite["infer"].get("enumerate"):
                    observed = gsite["infer"].get("observed")
                    if observed is None:
                        terms[f"rate/{name}"] = total(gsite["log_prob"] - msite["log_prob"])
                    else:  # known values are data: −ln p; the rest carry the rate
                        terms[f"rate/{name}"] = total(
                            (gsite["log_prob"] - msite["log_prob"]) * ~observed)
                        terms[f"distortion/{name}"] = -total(msite["log_prob"] * observed)
                    continue
                if not gsite["fn"].has_rsample:
                    raise not_reparameterised(name, type(gsite["fn"]).__name__, "Pyro")
                terms[f"rate/{name}"] = self._rate(msite, gsite, total)
        for name, gsite in guide_trace.nodes.items():
            if gsite["type"] != "sample" or name in model_trace.nodes:
                continue
            kind = _site_kind(gsite)
            if kind == "factor":
                terms[f"aux/{name}"] = total(gsite)
            elif kind == "latent" and gsite["infer"].get("is_auxiliary"):
                # a guide-only latent (an AutoGuide's joint draw, e.g. `_AutoNormal_latent`):
                # its ln q is part of ln q(z|y), so of the rate
                terms[f"rate/{name}"] = total(gsite)
            elif kind != "deterministic":
                raise stray_guide_site(name)
        return terms

    def _rate(self, msite, gsite, total) -> torch.Tensor:
        if self.analytic_kl and gsite["infer"].get("analytic_kl", True):
            try:
                kl = kl_divergence(gsite["fn"], msite["fn"])
            except NotImplementedError:
                pass
            else:
                kl = scale_and_mask(kl, scale=gsite["scale"], mask=gsite["mask"])
                if torch.is_tensor(kl):
                    return total(kl)
                # a number: a fully masked site (mask False gives 0.0), per batch element
                return gsite["value"].new_tensor(kl * torch.Size(gsite["fn"].batch_shape).numel())
        return total(gsite) - total(msite)

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
