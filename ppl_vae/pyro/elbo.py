"""`ScaledELBO` for Pyro: loss = β · rate + λ · distortion + aux(encoder only), in nats.

A drop-in loss for ``pyro.infer.SVI`` (or the module form ``ScaledELBO(...)(model, guide)``) that
works on any model and guide. It classifies trace sites by role:

=============  =====================================================  ==========================
role           which sites                                            enters the loss as
=============  =====================================================  ==========================
latent         sample sites in both guide and model                   β · (ln q − ln p), or
                                                                      β · KL(q‖p) analytically
               guide-only sample sites: marked ``is_auxiliary``       β · ln q (an AutoGuide's
               (the AutoGuides' joint latent), or not (Trace_ELBO     joint draw: part of ln q)
               counts them so too, warning under validation)
distortion     observed sample sites and factor sites of the model    λ · (−log-density)
aux            factor sites of the guide only                         + their value
=============  =====================================================  ==========================

A guide site may opt out of the closed form with ``infer={"analytic_kl": False}`` (the spec
builder does so where it would be biased, `ppl_vae.graph.closed_form_rate_valid`).

**Discrete latents summed out exactly.** A guide sample site marked
``infer={"enumerate": "parallel"}`` (as `TraceEnum_ELBO` users mark it; without
``max_plate_nesting`` the first call guesses it, as `TraceEnum_ELBO` does) takes every value of
its support at once, in a tensor dimension left of the plates, and every term becomes an
expectation under the guide's probabilities of those values::

    term = Σ_k q(k|·) · term(k)                 (each enumerated site multiplies its q in)
    rate of the site itself = Σ_k q(k|·) (ln q(k|·) − ln p(k|·))  =  KL(q(k|·) ‖ p(k|·)), exact

so β applies to a discrete site as to a continuous one. Where the value is known for some
examples (labels), the guide puts all its mass on it and says which examples those are with
``infer={"enumerate": "parallel", "observed": mask}`` (mask: bool, the batch's shape): there the
site's term is the distortion −ln p(value) (it is data), elsewhere its rate. At β = λ = 1 the loss
equals `TraceEnum_ELBO` for the same seed (`TraceEnum_ELBO` has no closed-form KL: compare with
``analytic_kl=False``).

**Discrete latents sampled: score-function gradients.** A guide site that is neither
reparameterised nor enumerated (a Bernoulli, Categorical or Poisson latent; one marked
``"sequential"``, which warns under validation, as Trace_ELBO does) is sampled; its gradient is
the score-function (REINFORCE) estimator of `TraceGraph_ELBO` (Williams 1992; Schulman et al.
2015): the loss carries, with value 0, −Σ ln q_s(z_s) · (c_s − b_s)|detached for each such site
s, c_s its downstream cost (the weighted terms −w_t · term_t whose value depends on z_s,
w_t = β, λ or 1, found by provenance tracking as there, summed to s's plates; the others have
expectation zero against the score and are left out) and b_s a baseline. ln q_s is unscaled, so
at β ≠ 1 the gradient is that of the weighted objective, and equals `TraceGraph_ELBO`'s under
``poutine.scale`` on the same draws; its own ln q in the rate is detached (its gradient is the
score term). With ``analytic_kl=True`` a site whose KL is registered takes its own rate in
closed form, the score carrying the costs downstream of it. Baselines, with Pyro's keys
``infer={"baseline": {...}}`` (`ppl_vae.objective.baselined_signal`): ``use_decaying_avg_baseline``
/ ``baseline_beta`` (the averages belong to this estimator, `baseline_averages`, not to the
param store; a new batch shape starts one again), ``nn_baseline`` / ``nn_baseline_input``
(NVIL, Mnih & Gregor 2014) and ``baseline_value``, a learned one trained by Σ (c − b)²; a
baseline's shape must broadcast to the cost's. A sampled site upstream of an enumerated one is
fine (terms with enumerated dims depend on whatever the enumeration weights read); one drawn
inside an enumerated branch, ``bound="iwae"`` (VIMCO is not implemented; `RenyiELBO` gives such
a site no gradient at alpha = 0) and free bits or capacity targets are refused, naming the site.

Sign convention: the returned loss is minimised; at β = λ = 1 with no aux site it is −ELBO and
equals `Trace_ELBO` (`TraceMeanField_ELBO` when ``analytic_kl=True``) for the same random seed.
With β = b it equals the stock ELBO with ``poutine.scale(scale=b)`` on each latent site of both
model and guide (Higgins et al. 2017, β-VAE). Rate is Î(y, z) and distortion Ĥ(y|z) of the
lecture (McAllester, TTIC 31230, "VAEs": Î ≥ I, Ĥ ≥ H(y|z), H(y) = I + H(y|z)).

**Importance-weighted bound** (``bound="iwae"``, Burda et al. 2016). With K = ``num_particles``
draws z_k ~ q(z|y) per example, the loss is −Σ_n L_K(y_n) + aux,

    L_K = ln (1/K) Σ_k w_k,   ln w_k = Σ_s β_s (ln p_s − ln q_s) + Σ_o λ_o ln p_o(y | z_k),

w from the whole latent graph, one weight per element of the plates that every site shares (as
`RenyiELBO`). At β = λ = 1 it equals ``RenyiELBO(alpha=0, num_particles=K)`` for the same seed
(and ``vectorize_particles``), value and gradient, and L_K ≥ ELBO, → ln p(y) as K grows. With
β ≠ 1 it is the stock estimator with the latent sites scaled by β: **no longer a bound** on
ln p(y), a weighted objective. Enumerated sites are summed out inside each weight::

    w_k = Σ_c q(c|y) · w(c, z_k^c)   (a log-sum-exp over the values of ln q(c) + ln w(c, z_k^c))

with one draw z_k^c per value c (the guide draws them: its z reads c), an unbiased estimate of
p(y); at β = 1 ln q(c) cancels (w_k = Σ_c p(c) p(y, z_k^c | c) / q(z_k^c | y, c)), so the bound
does not train q(c|y): its signal is the aux term (M2's α-term). Where c is known (``observed``)
the sum is its one value. Aux sites (factors of the guide: encoder-only losses) are not part of
w; their value, averaged over the particles, is added to the loss. `terms` reports each site's
rate and distortion from the same draws, self-normalised: Σ_k w̃_k · term_k (w̃ = w / Σ w over
the particles and enumerated values, detached), so the accounting stays readable; ``loss`` is
−L_K + aux, not β · rate + λ · distortion. ``analytic_kl`` does not apply (the weights need
ln q − ln p at the draws).

**Gradient estimators** (surrogate losses: the value is the loss, the gradient the estimator's):

* ``gradient="reparam"``: the reparameterisation gradient (path and score terms of ln q);
* ``"stl"`` (sticking the landing, Roeder et al. 2017; ELBO only): ln q's score term removed,
  ln q − ln q(z̄) + ln q(z̄)|stopped, ln q(z̄) the guide re-run at the detached draws z̄ (whose
  gradient is the score: ψ enters only through the parameters there). Unbiased; zero variance
  at the exact posterior. Works for every reparameterised family, the IAF flow included (its
  ln q at a draw it did not make takes the flow's inverse: d MADE passes per step).
* ``"dreg"`` (doubly reparameterised, Tucker et al. 2019; IWAE only): the encoder's gradient
  Σ_k w̃_k² ∂ln w_k/∂z_k ∂z_k/∂ψ with ln q's parameters held fixed, the decoder's and prior's
  the ordinary Σ_k w̃_k ∂ln w_k/∂θ: the model and the guide are re-run at detached copies z' of
  the draws, g = ∂ln w/∂z' (`torch.autograd.grad`), and ln w_k gets the term
  w̃_k ⟨g_k, z_k − z̄_k⟩ (value 0). With enumerated sites the weights are per (particle,
  value): a draw shared by every value is refused.

**Free bits and capacity** (``bound="elbo"``; objective changes, not bounds: ``rate`` and
``rate/<site>`` stay the true rates, ``loss`` is the training objective;
`ppl_vae.objective.site_rate_loss`): ``free_bits`` λ nats per dimension replaces β_s · rate_s by
β_s · Σ_i max(λ, rate_i / B) · B (Kingma et al. 2016), rate_i the site's rate in dimension i
summed over the batch (the closed-form KL per dimension where the site's rate is closed-form,
else ln q_i − ln p_i at the draw; the site's q and p must factorise, Normal(...).to_event(1)),
B the batch size; ``capacity_weight`` γ and ``capacity`` C (nats per example) replace it by
γ · |rate_s / B − C| · B (Burgess et al. 2018). C is read at every call: fill the tensors in
place to change it per step (a CUDA graph replays them).

Unlike Pyro's own estimators it never calls ``.item()`` on the per-site terms, so a training loop
that uses `differentiable_terms` synchronises with the device only when it chooses to.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping

import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import MultiFrameTensor, get_dependent_plate_dims, is_validation_enabled
from pyro.ops.provenance import detach_provenance, get_provenance, track_provenance
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from ppl_vae.objective import (
    Piece,
    baseline_options,
    baselined_signal,
    bound_terms,
    check_estimator,
    check_score_function,
    downstream,
    free_bits_for,
    log_weight,
    missing_guide_site,
    not_factorised,
    score_inside_enumeration,
    sequential_enumeration_warning,
    shared_across_enumeration,
    weighted_terms,
)

Weight = float | torch.Tensor | Mapping[str, float]
PARTICLE_PLATE = "num_particles_vectorized"  # the plate of Pyro's vectorised particles


def _site_kind(site) -> str:
    if site["infer"].get("_deterministic"):
        return "deterministic"
    if site["is_observed"]:
        return "factor" if site["infer"].get("is_auxiliary") else "observed"
    return "latent"


def _is_enumerated(site) -> bool:
    """A guide site that takes its whole support (marked for parallel enumeration)."""
    return site["infer"].get("_enumerate_dim") is not None


def _is_drawn(site) -> bool:
    """A reparameterised latent draw of the guide (what STL and DReG differentiate through)."""
    return (site["type"] == "sample" and not site["is_observed"]
            and not _is_enumerated(site) and not site["infer"].get("_deterministic")
            and site["fn"].has_rsample)


def _is_scored(site) -> bool:
    """A latent draw of the guide that is not reparameterised (nor enumerated): it gets a
    score-function term (its score_parts has a score function, as Trace_ELBO reads it)."""
    return (site["type"] == "sample" and not site["is_observed"]
            and not _is_enumerated(site) and not site["infer"].get("_deterministic")
            and not isinstance(site["fn"], _Subsample)
            and not is_identically_zero(site["score_parts"].score_function))


def _stack(site) -> tuple:
    """The vectorised plates of a site (what Pyro's MultiFrameTensor sums over)."""
    return tuple(f for f in site["cond_indep_stack"] if f.vectorized)


class _TrackScored(Messenger):
    """Provenance tracking of the guide's non-reparameterised, non-enumerated draws
    (`pyro.infer.tracegraph_elbo.TrackNonReparam`, Wingate et al. 2011): every value computed
    from such a draw carries the draw's name, so each log-density knows which draws it depends
    on. Enumerated values are not tracked (their terms are exact expectations); a site seen
    before (the model's replay of a guide site) keeps the guide value's provenance."""

    def __init__(self):
        super().__init__()
        self._seen: set = set()

    def _pyro_post_sample(self, msg):
        if msg["type"] != "sample" or msg["name"] in self._seen:
            return
        self._seen.add(msg["name"])
        if (not msg["is_observed"] and not isinstance(msg["fn"], _Subsample)
                and not getattr(msg["fn"], "has_rsample", False)
                and msg["infer"].get("_enumerate_dim") is None):
            msg["value"] = track_provenance(msg["value"], frozenset({msg["name"]}))


def _factors(fn):
    """The distribution of the coordinates a site factorises into (batch (..., d)), or None."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1 and \
            not fn.base_dist.event_shape:
        return fn.base_dist
    return None


def _batch_size(site) -> float:
    """B of a site: the number of examples its plates hold (the particle plate aside), times
    its scale where that is a number (subsampling)."""
    size = math.prod(f.size for f in site["cond_indep_stack"]
                     if f.vectorized and f.name != PARTICLE_PLATE)
    scale = site["scale"]
    return size * (float(scale) if isinstance(scale, int | float) else 1.0)


def _path(log_q: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """ln q with the score term removed: its value, the gradient of the path through the draw
    only (`score` is ln q re-evaluated at the detached draw, whose gradient is the score)."""
    return log_q - score + score.detach()


class ScaledELBO(Trace_ELBO):
    """β · rate + λ · distortion + aux, as a Pyro ELBO (see the module docstring).

    :param beta: weight of the rate; a number (or 0-d tensor) or a dict {latent site: number}
        (sites not named get 1). Change it between steps by assignment (``elbo.beta = 0.5``), or
        fill the tensors in place; nothing is rebuilt.
    :param lam: weight of the distortion; likewise, keyed by distortion site.
    :param num_particles: Monte Carlo samples of z per example (averaged; K of the IWAE bound).
    :param analytic_kl: use ``kl_divergence(q, p)`` for the rate of a latent site when it is
        registered for the pair, else the Monte Carlo ln q − ln p (as `TraceMeanField_ELBO`).
        A guide site marked ``infer={"analytic_kl": False}`` always takes the Monte Carlo rate:
        mark a site whose prior reads a latent that the guide draws *from* it (bottom-up
        inference, q(z2|z1) with p̂(z1|z2)), where the KL at the drawn parent is biased.
        It applies to ``bound="elbo"`` with ``gradient="reparam"`` only: STL and the IWAE bound
        are defined on the Monte Carlo ln q − ln p.
    :param bound: ``"elbo"`` or ``"iwae"`` (the importance-weighted bound; see the module
        docstring).
    :param gradient: ``"reparam"``, ``"stl"`` (elbo) or ``"dreg"`` (iwae).
    :param free_bits: nats per dimension, a number (every reparameterised latent site) or
        {site: nats}: the site's rate enters the loss as Σ_i max(λ, batch-mean rate_i) · B.
    :param capacity_weight: {site: γ}: the site's β · rate becomes γ · |rate / B − C| · B.
    :param capacity: {site: C} (nats per example; numbers or 0-d tensors, read at every call,
        so a trainer fills them in place); sites with a weight and no target get C = 0.
    Other keyword arguments go to `pyro.infer.ELBO` (``vectorize_particles``,
    ``max_plate_nesting``, …).
    """

    def __init__(self, beta: Weight = 1.0, lam: Weight = 1.0, num_particles: int = 1,
                 analytic_kl: bool = True, bound: str = "elbo", gradient: str = "reparam",
                 free_bits: float | Mapping[str, float] | None = None,
                 capacity_weight: Mapping[str, float] | None = None,
                 capacity: Mapping[str, float | torch.Tensor] | None = None, **kwargs):
        check_estimator(bound, gradient, free_bits, capacity_weight)
        super().__init__(num_particles=num_particles, **kwargs)
        self.beta, self.lam, self.analytic_kl = beta, lam, analytic_kl
        self.bound, self.gradient = bound, gradient
        self.free_bits = free_bits or 0.0
        self.capacity_weight = dict(capacity_weight or {})
        self.capacity = capacity if capacity is not None else {}
        # the decaying-average baselines {site: tensor} (Pyro keeps them in its param store as
        # "__baseline_avg_downstream_cost_<site>"; here they belong to the estimator)
        self._baseline_averages: dict[str, torch.Tensor] = {}

    def with_weights(self, beta: Weight, lam: Weight, capacity=None) -> ScaledELBO:
        """The same estimator with other β, λ (and capacity targets {site: C}) (a copy; `self`
        is unchanged), as in the NumPyro twin. Assigning ``elbo.beta = b`` changes this one in
        place."""
        other = copy.copy(self)
        other.beta, other.lam = beta, lam
        if capacity is not None:
            other.capacity = capacity
        return other

    @property
    def baseline_averages(self) -> dict[str, torch.Tensor]:
        """{site: its decaying-average baseline so far} (nats, the shape of the site's plates;
        a copy): the state ``use_decaying_avg_baseline`` keeps, which Pyro's TraceGraph_ELBO
        keeps in the param store as ``__baseline_avg_downstream_cost_<site>``."""
        return dict(self._baseline_averages)

    # -- traces ---------------------------------------------------------------------------------
    def _get_traces(self, model, guide, args, kwargs):
        # Guide sites marked for parallel enumeration take their whole support in the dims left
        # of the plates, as in TraceEnum_ELBO; other sites are untouched. As there, the
        # enumeration wraps the particle plate, so that the plate broadcasts an enumerated
        # site's distribution before enumeration takes the site (inside it, model and guide
        # disagree on the site's batch shape).
        if self.max_plate_nesting == float("inf"):
            if self.vectorize_particles:  # Pyro's ELBO guesses it here too
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            else:
                # Trace_ELBO's first particle; where the guide marks a site for parallel
                # enumeration it was TraceEnum_ELBO's guess instead (the same draws: one
                # unenumerated run of guide and model), and the particles start again
                first = self._get_trace(model, guide, args, kwargs)
                if not any(site["type"] == "sample"
                           and site["infer"].get("enumerate") == "parallel"
                           for site in first[1].nodes.values()):
                    yield first
                    for _ in range(self.num_particles - 1):
                        yield self._get_trace(model, guide, args, kwargs)
                    return
                self._guess_from(*first)
        if self.vectorize_particles:
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
        guide = EnumMessenger(first_available_dim=-1 - self.max_plate_nesting)(guide)
        for _ in range(1 if self.vectorize_particles else self.num_particles):
            yield self._get_trace(model, guide, args, kwargs)

    def _guess_from(self, model_trace, guide_trace) -> None:
        """max_plate_nesting from one unenumerated run, as `ELBO._guess_max_plate_nesting`
        (which TraceEnum_ELBO calls) guesses it: the deepest vectorised plate."""
        dims = [f.dim for tr in (model_trace, guide_trace) for site in tr.nodes.values()
                if site["type"] == "sample" for f in site["cond_indep_stack"] if f.vectorized]
        self.max_plate_nesting = -min(dims) if dims else 0

    def _get_trace(self, model, guide, args, kwargs):
        # Trace_ELBO's (which checks that model and guide match when validation is on), without
        # its warning that enumerated sites need TraceEnum_ELBO; with the closed-form rate, the
        # mean-field check TraceMeanField_ELBO makes. The non-reparameterised draws carry
        # their names (provenance), as in TraceGraph_ELBO, for their score-function terms.
        with _TrackScored():
            model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting,
                                                            model, guide, args, kwargs)
        if is_validation_enabled():  # (Trace_ELBO warns there too, check_if_enumerated)
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and site["infer"].get("enumerate") == "sequential":
                    warnings.warn(sequential_enumeration_warning(name), stacklevel=5)
        if self._closed_form and is_validation_enabled() and not any(
                site["type"] == "sample" and site["infer"].get("analytic_kl") is False
                for site in guide_trace.nodes.values()):
            # (a guide that marks sites analytic_kl=False has already said where the closed
            # form would be wrong: the spec builder does, for bottom-up latent graphs; the scan
            # runs only under validation, off the training hot path)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace

    @property
    def _closed_form(self) -> bool:
        return self.analytic_kl and self.bound == "elbo" and self.gradient == "reparam"

    @property
    def _vectorized(self) -> bool:
        return self.vectorize_particles and self.num_particles > 1

    def _replay(self, fn, trace, values: dict, args, kwargs):
        """The trace of `fn` (model or guide, in the particle plate) replayed against `trace`
        with the latent values `values` {site: tensor} in place of the trace's, log-densities
        computed."""
        replayed = trace.copy()
        for name, value in values.items():
            replayed.nodes[name] = {**trace.nodes[name], "value": value}
        if self._vectorized:
            fn = self._vectorized_num_particles(fn)
        out = poutine.trace(poutine.replay(fn, trace=replayed), graph_type="flat").get_trace(
            *args, **kwargs)
        out = prune_subsample_sites(out)
        out.compute_log_prob()
        return out

    @staticmethod
    def _enumeration_log_weight(guide_trace) -> torch.Tensor | None:
        """ln q of each joint value of the enumerated guide sites, broadcastable against the
        sites' per-example log-densities; None when no site is enumerated."""
        log_q = None
        for site in guide_trace.nodes.values():
            if site["type"] != "sample" or not _is_enumerated(site):
                continue
            lq = site["fn"].log_prob(site["value"])  # the measure: unscaled
            log_q = lq if log_q is None else log_q + lq
        return log_q

    @classmethod
    def _enumeration_weight(cls, guide_trace) -> torch.Tensor | None:
        """q of each joint value of the enumerated guide sites, broadcastable against the
        sites' per-example log-densities; None when no site is enumerated."""
        log_q = cls._enumeration_log_weight(guide_trace)
        return None if log_q is None else log_q.exp()

    # -- the per-element terms of one particle ----------------------------------------------------
    def _parts(self, model_trace, guide_trace, closed_form: bool, score_trace=None,
               detach_q: bool = False):
        """Unweighted per-site terms of one particle, per element (the sites' batch shapes:
        enumerated values, particles, plates), before any sum: {"rate/<site>": ln q − ln p (or
        the closed-form KL), "distortion/<site>": −ln p, "aux/<site>": value}; and, for the
        sites with free bits, {site: (..., d) rate per dimension} and {site: B}.

        `score_trace` (STL): the guide replayed at the detached draws, so that ln q keeps only
        its path derivative. `detach_q` (DReG's value): the drawn sites' ln q detached. A
        non-reparameterised draw's ln q is detached too: its gradient is its score-function
        term (`_score_function_loss`), as in Trace_ELBO.

        Also returns the terms' `Piece`s (ln q and −ln p of a rate apart), which the
        score-function terms sort by the draws they depend on."""
        parts: dict[str, torch.Tensor] = {}
        dims: dict[str, torch.Tensor] = {}
        pieces: list[Piece] = []

        def add(key, value, site):
            parts[key] = parts[key] + value if key in parts else value
            pieces.append(Piece(key, value, _stack(site)))

        def log_q(name, gsite):
            if score_trace is not None and _is_drawn(gsite):
                return _path(gsite["log_prob"], score_trace.nodes[name]["log_prob"])
            if (detach_q and _is_drawn(gsite)) or not gsite["fn"].has_rsample:
                return gsite["log_prob"].detach()
            return gsite["log_prob"]

        for name, msite in model_trace.nodes.items():
            if msite["type"] != "sample":
                continue
            kind = _site_kind(msite)
            if kind in ("observed", "factor"):
                add(f"distortion/{name}", -msite["log_prob"], msite)
            elif kind == "latent":
                gsite = guide_trace.nodes.get(name)
                if gsite is None or gsite["type"] != "sample":
                    raise missing_guide_site(name, "pyro")
                if _is_enumerated(gsite):
                    observed = gsite["infer"].get("observed")
                    if observed is None:
                        add(f"rate/{name}", gsite["log_prob"], gsite)
                        add(f"rate/{name}", -msite["log_prob"], msite)
                    else:  # known values are data: −ln p; the rest carry the rate
                        add(f"rate/{name}", gsite["log_prob"] * ~observed, gsite)
                        add(f"rate/{name}", -(msite["log_prob"] * ~observed), msite)
                        add(f"distortion/{name}", -(msite["log_prob"] * observed), msite)
                    continue
                if free_bits_for(self.free_bits, name) > 0:
                    score = None if score_trace is None else score_trace.nodes[name]
                    dims[name] = self._rate_dims(name, msite, gsite, closed_form, score)
                    add(f"rate/{name}", dims[name].sum(-1), gsite)
                    continue
                kl = self._closed_form_rate(msite, gsite, closed_form)
                if kl is not None:
                    add(f"rate/{name}", kl, gsite)
                else:
                    add(f"rate/{name}", log_q(name, gsite), gsite)
                    add(f"rate/{name}", -msite["log_prob"], msite)
        for name, gsite in guide_trace.nodes.items():
            if gsite["type"] != "sample" or name in model_trace.nodes:
                continue
            kind = _site_kind(gsite)
            if kind in ("factor", "observed"):  # an encoder-only term (the stock ELBOs: +f)
                add(f"aux/{name}", gsite["log_prob"], gsite)
            elif kind == "latent":
                # a guide-only latent (an AutoGuide's joint draw, e.g. `_AutoNormal_latent`,
                # or one not marked auxiliary, which the stock ELBOs count so too, with Pyro's
                # warning under validation): its ln q is part of ln q(z|y), so of the rate
                add(f"rate/{name}", log_q(name, gsite), gsite)
        return parts, dims, pieces

    @staticmethod
    def _closed_form_rate(msite, gsite, closed_form: bool) -> torch.Tensor | None:
        """KL(q‖p) per element where the rate is closed-form and registered, else None."""
        if not (closed_form and gsite["infer"].get("analytic_kl", True)):
            return None
        try:
            kl = kl_divergence(gsite["fn"], msite["fn"])
        except NotImplementedError:
            return None
        kl = scale_and_mask(kl, scale=gsite["scale"], mask=gsite["mask"])
        if torch.is_tensor(kl):
            return kl
        # a number: a fully masked site (mask False gives 0.0), per batch element
        return gsite["value"].new_full(gsite["fn"].batch_shape, float(kl))

    @staticmethod
    def _rate_dims(name, msite, gsite, closed_form: bool, score) -> torch.Tensor:
        """The rate of a factorised site per dimension, (..., d): the closed-form KL of each
        coordinate where the site's rate is closed-form, else ln q_i − ln p_i at the draw."""
        q, p = _factors(gsite["fn"]), _factors(msite["fn"])
        if q is None or p is None:
            raise not_factorised(name, type(gsite["fn"]).__name__, type(msite["fn"]).__name__)
        value = gsite["value"]
        rate = None
        if closed_form and gsite["infer"].get("analytic_kl", True):
            try:
                rate = kl_divergence(q, p)
            except NotImplementedError:
                pass
        if rate is None:
            log_q = q.log_prob(value)
            if score is not None:
                log_q = _path(log_q, _factors(score["fn"]).log_prob(score["value"]))
            rate = log_q - p.log_prob(value)
        mask = gsite["mask"]
        return scale_and_mask(rate, gsite["scale"],
                              mask[..., None] if torch.is_tensor(mask) else mask)

    def _score_trace(self, guide, guide_trace, args, kwargs):
        """STL: the guide replayed at its detached draws (ln q's gradient there is the score)."""
        values = {n: s["value"].detach() for n, s in guide_trace.nodes.items() if _is_drawn(s)}
        return self._replay(guide, guide_trace, values, args, kwargs)

    # -- the ELBO -------------------------------------------------------------------------------
    def _elbo_terms(self, model, guide, args, kwargs) -> dict[str, torch.Tensor]:
        stl = self.gradient == "stl" and torch.is_grad_enabled()
        total: dict[str, torch.Tensor] = {}
        dims_total: dict[str, torch.Tensor] = {}
        sizes: dict[str, float] = {}
        surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            scored = {n: s for n, s in guide_trace.nodes.items()
                      if s["type"] == "sample" and _is_scored(s)}
            if scored:  # (before the parts: free bits would fail on such a site first)
                self._check_score_function(scored)
            score = self._score_trace(guide, guide_trace, args, kwargs) if stl else None
            parts, dims, pieces = self._parts(model_trace, guide_trace, self._closed_form,
                                              score)
            weight = self._enumeration_weight(guide_trace)
            surrogate = surrogate + self._score_function_loss(
                guide_trace, pieces, weight) / self.num_particles

            for key, value in parts.items():
                value = self._expectation(value, weight) / self.num_particles
                total[key] = total[key] + value if key in total else value
            for name, value in dims.items():
                value = self._expectation(value, weight, 1) / self.num_particles
                dims_total[name] = dims_total[name] + value if name in dims_total else value
            for name in (*dims, *self.capacity_weight):
                if name in model_trace.nodes:
                    sizes[name] = _batch_size(model_trace.nodes[name])
        zero = next(iter(total.values())).new_zeros(()) if total else torch.zeros(())
        out = weighted_terms(total, self.beta, self.lam, zero, free_bits=self.free_bits,
                             capacity_weight=self.capacity_weight, capacity=self.capacity,
                             rate_dims=dims_total, batch_sizes=sizes)
        out["loss"] = out["loss"] + surrogate
        return {k: detach_provenance(v) for k, v in out.items()}

    def _score_function_loss(self, guide_trace, pieces, weight):
        """The score-function (REINFORCE) surrogate of one particle's non-reparameterised,
        non-enumerated guide draws, value 0 (Williams 1992; Schulman et al. 2015): for each
        such site s,

            −Σ_elements ∇-carrying ln q_s(z_s) · (c_s − b_s)|stopped  + (b_s's own loss)

        c_s its downstream cost (`ppl_vae.objective.downstream`: −Σ_t w_t · piece_t over the
        pieces whose value depends on z_s by provenance, as TraceGraph_ELBO finds them;
        w_t = β, λ or 1), summed to s's plates, and b_s its baseline
        (`ppl_vae.objective.baselined_signal`). The score ln q_s is unscaled (Pyro's
        ``score_parts.score_function``): the weights and scales are in c_s, so E[∇ln q · c] is
        the gradient of the weighted (or subsampled) objective. With enumerated sites, a piece
        with enumerated dims is first its expectation under their (stopped) q, and depends on
        whatever their q depends on. Zero without a gradient or a scored site."""
        sites = {n: s for n, s in guide_trace.nodes.items()
                 if s["type"] == "sample" and _is_scored(s)}
        if not sites or not torch.is_grad_enabled():
            return 0.0
        enumerated = get_provenance(weight) if weight is not None else frozenset()
        provenances = [get_provenance(p.value) | (enumerated if self._has_enumerated_dims(
            p.value, weight) else frozenset()) for p in pieces]
        costs = downstream(pieces, provenances, sites, self.beta, self.lam)
        weight = None if weight is None else detach_provenance(weight).detach()
        surrogate = 0.0
        for name, site in sites.items():
            score = detach_provenance(site["score_parts"].score_function)
            if weight is not None and score.dim() > self.max_plate_nesting:
                raise score_inside_enumeration(name)
            cost = MultiFrameTensor()
            for stack, value in costs[name]:
                cost.add((stack, self._enumerated_mean(detach_provenance(value).detach(),
                                                       weight)))
            cost = cost.sum_to(_stack(site))
            if not torch.is_tensor(cost):  # nothing depends on the draw: no term
                continue
            options = baseline_options(name, site["infer"])
            average = None
            if options.decaying:
                # (a new batch shape, e.g. a smaller last batch, starts the average again)
                average = self._baseline_averages.get(name)
                if average is None or average.shape != cost.shape:
                    average = torch.zeros_like(cost)
            signal, baseline_loss, average = baselined_signal(
                name, options, cost, average, torch.Tensor.detach)
            if average is not None:
                self._baseline_averages[name] = average
            term = -(score * signal.detach()).sum() + baseline_loss
            surrogate = surrogate + term - term.detach()
        return surrogate

    def _has_enumerated_dims(self, value, weight) -> bool:
        return weight is not None and value.dim() > self.max_plate_nesting

    def _check_score_function(self, sites) -> None:
        name, site = next(iter(sites.items()))
        check_score_function(name, type(site["fn"]).__name__, self.bound, self.free_bits,
                             self.capacity_weight)

    def _enumerated_mean(self, value: torch.Tensor, weight) -> torch.Tensor:
        """A per-element tensor's expectation under the (detached) enumeration weights, the
        enumerated dims summed and the plates kept (a value without them is its own)."""
        if not self._has_enumerated_dims(value, weight):
            return value
        value = weight * value
        return value.sum(tuple(range(value.dim() - self.max_plate_nesting)))

    def _expectation(self, value: torch.Tensor, weight, event: int = 0) -> torch.Tensor:
        """Σ of a per-element tensor under the enumeration weights (its last `event` dims kept).
        A value without the enumerated dims (left of the plates) does not depend on the
        enumerated sites: its expectation is itself (weighting a value outside the data plate,
        such as M2's cross-entropy factor, would multiply it by the batch size)."""
        if weight is not None and value.dim() - event > self.max_plate_nesting:
            value = weight.reshape(weight.shape + (1,) * event) * value
        lead = value.dim() - event
        return value.sum(tuple(range(lead))) if lead else value

    # -- the importance-weighted bound ------------------------------------------------------------
    def _iwae_terms(self, model, guide, args, kwargs) -> dict[str, torch.Tensor]:
        dreg = self.gradient == "dreg" and torch.is_grad_enabled()
        log_w, paths, parts, aux = [], [], {}, {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            if dreg:
                model_trace, path = self._dreg_path(model, guide, guide_trace, args, kwargs)
            scored = {n: s for n, s in guide_trace.nodes.items()
                      if s["type"] == "sample" and _is_scored(s)}
            if scored:
                self._check_score_function(scored)
            element, _, _ = self._parts(model_trace, guide_trace, False, detach_q=dreg)
            sum_dims = get_dependent_plate_dims(
                [*model_trace.nodes.values(),
                 *(s for s in guide_trace.nodes.values()
                   if s["type"] == "sample" and not s["is_observed"])])
            element = {k: self._within_example(v, sum_dims) for k, v in element.items()}
            for key in [k for k in element if k.startswith("aux/")]:
                value = element.pop(key).sum() / self.num_particles
                aux[key] = aux[key] + value if key in aux else value
            a = log_weight(element, self.beta, self.lam)
            log_q = self._enumeration_log_weight(guide_trace)
            if log_q is not None:
                a = a + log_q
            shape = torch.broadcast_shapes(*(v.shape for v in element.values()),
                                           *((path.shape,) if dreg else ()), a.shape)
            log_w.append(a.expand(shape))
            if dreg:
                paths.append(self._within_example(path, sum_dims).expand(shape))
            for key, value in element.items():
                parts.setdefault(key, []).append(value.expand(shape))
        if dreg:
            if self.max_plate_nesting == float("inf"):
                # unknown (one particle at a time, nothing enumerated): guessed from the traces,
                # as the first call guesses it where a site is enumerated (`_guess_from`)
                self._guess_from(model_trace, guide_trace)
            self._check_dreg_sites(guide_trace, shape)
        log_w = self._particles_first(log_w)
        reduce = (0, *range(1, log_w.dim() - self._plate_dims(log_w)))
        normaliser = torch.logsumexp(log_w, reduce, keepdim=True)
        weights = (log_w - normaliser).exp().detach()  # w̃, self-normalised over (k, values)
        if dreg:  # the path derivative of ln w_k scaled by w̃_k: Σ_k w̃_k² ∂ln w_k/∂z_k ∂z_k/∂ψ
            normaliser = torch.logsumexp(log_w + weights * self._particles_first(paths), reduce,
                                         keepdim=True)
        bound = (normaliser - math.log(self.num_particles)).sum()
        terms = {k: (weights * self._particles_first(v)).sum() for k, v in parts.items()} | aux
        return bound_terms(terms, bound, bound.new_zeros(()))

    def _plate_dims(self, log_w) -> int:
        """How many trailing dims of a particles-first (K, …) tensor are plates."""
        plates = self.max_plate_nesting - (1 if self._vectorized else 0)
        return min(plates, log_w.dim() - 1)

    def _particles_first(self, values: list) -> torch.Tensor:
        """Per-particle tensors -> one (K, enumerated values…, plates…) tensor."""
        if self._vectorized:
            return values[0].movedim(-self.max_plate_nesting, 0)
        return torch.stack(values)

    def _check_dreg_sites(self, guide_trace, shape) -> None:
        """DReG with enumerated sites: each draw must be made once per enumerated value (its
        log-density has every enumerated dim of the per-particle weight's `shape`)."""
        for name, site in guide_trace.nodes.items():
            if not _is_drawn(site):
                continue
            log_q = site["log_prob"]
            for d in range(-len(shape), -self.max_plate_nesting):
                if (log_q.shape[d] if -log_q.dim() <= d else 1) != shape[d]:
                    raise shared_across_enumeration(name)

    @staticmethod
    def _within_example(value: torch.Tensor, sum_dims) -> torch.Tensor:
        """Sum a per-element tensor over the plates not common to every site (as RenyiELBO: one
        weight per element of the common plates), keeping the dims."""
        dims = [d for d in sum_dims if -value.dim() <= d]
        return value.sum(dims, keepdim=True) if dims else value

    def _dreg_path(self, model, guide, guide_trace, args, kwargs):
        """DReG (Tucker et al. 2019): the model re-run at detached copies z' of the draws, and
        the per-element path term ⟨∂ln w/∂z'|_{z'=z}, z − z̄⟩ (value 0; its gradient is the
        path derivative of ln w through the draws, ψ in ln q held fixed), where ln w =
        −Σ β (ln q − ln p) − Σ λ (−ln p) is taken at z' in model and guide.
        Returns (the model trace at z', the path term)."""
        leaves = {n: s["value"].detach().requires_grad_() for n, s in guide_trace.nodes.items()
                  if _is_drawn(s)}
        guide_at = self._replay(guide, guide_trace, leaves, args, kwargs)
        model_at = self._replay(model, guide_at, {}, args, kwargs)
        element, _, _ = self._parts(model_at, guide_at, False)
        lw = log_weight({k: v for k, v in element.items() if not k.startswith("aux/")},
                        self.beta, self.lam)
        grads = torch.autograd.grad(lw.sum(), list(leaves.values()), retain_graph=True,
                                    allow_unused=True)
        path = 0.0
        for name, grad in zip(leaves, grads):
            if grad is None:
                continue
            value = guide_trace.nodes[name]["value"]
            event = len(guide_trace.nodes[name]["fn"].event_shape)
            term = grad * (value - value.detach())
            path = path + (term.sum(tuple(range(-event, 0))) if event else term)
        if not torch.is_tensor(path):
            path = lw.new_zeros(())
        return model_at, path

    # -- public API ---------------------------------------------------------------------------
    def differentiable_terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The loss and its parts, differentiable, summed over the batch (nats).

        Keys: ``loss`` (the training objective, to minimise), ``rate``, ``distortion``,
        ``aux`` (unweighted totals, nats) and ``rate/<site>``, ``distortion/<site>``,
        ``aux/<site>``. ELBO: averaged over particles. IWAE: ``loss`` = −L_K + aux, the rates
        and distortions self-normalised over the particles (Σ_k w̃_k · term_k, w̃ detached).
        """
        if self.bound == "iwae":
            return self._iwae_terms(model, guide, args, kwargs)
        return self._elbo_terms(model, guide, args, kwargs)

    def terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """`differentiable_terms`, detached: 0-d tensors in nats, summed over the batch."""
        with torch.no_grad():
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
