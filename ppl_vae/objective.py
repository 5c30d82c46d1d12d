"""The objective, backend-free: β schedules, per-site weights, the weighted sum of the terms and
the site-role errors of both backends' `ScaledELBO`.

    loss = β · rate + λ · distortion + aux(Ψ)

rate = E[ln q_Ψ(z|y) − ln p̂_Φ(z)] (Î(y, z) in the lecture), distortion = E[−ln p̂_Φ(y|z)]
(Ĥ(y|z)) or any Dist_Φ(y|z), aux = a loss on the encoder alone (encoder autonomy). All in nats.
The backends' `ScaledELBO` compute the terms; this module decides the weights, and the objective
changes that are not bounds: free bits (Kingma et al. 2016) and capacity targets (Burgess et al.
2018) replace a site's β · rate in the loss (`site_rate_loss`), the reported rate staying the
true one. For the importance-weighted bound it combines the per-element terms into ln w
(`log_weight`) and the bound into the public terms (`bound_terms`); `check_estimator` refuses
the combinations that mean nothing, in both backends alike.

Non-reparameterised guide sites (Bernoulli, Categorical, Poisson latents that are not summed
out) are trained by score-function terms: the backends cut each particle's terms into `Piece`s,
find which drawn sites each piece depends on (provenance), and `downstream` gives each site its
weighted downstream cost; `baseline_options` / `baselined_signal` read and apply Pyro's
``infer={"baseline": {...}}`` (decaying average, NVIL's network, a given value).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppl_vae.spec import BOUNDS, GRADIENTS, LABEL_SITE, CapacitySpec, ObjectiveSpec, Spec


def beta_schedule(objective: ObjectiveSpec, steps: np.ndarray) -> np.ndarray:
    """β at each (0-based) step in `steps`, as float64 (len(steps),).

    constant: β. linear: start → β over `warmup` steps, then β (Bowman et al. 2016).
    cyclical: the linear ramp repeated every `period` steps (Fu et al. 2019).
    A schedule is a pure function of the step, so resuming at step k gives the same β.
    """
    sch = objective.beta_schedule
    steps = np.asarray(steps, dtype=np.float64)
    if sch.kind == "constant":
        return np.full(steps.shape, objective.beta)
    phase = steps if sch.kind == "linear" else np.mod(steps, sch.period)
    ramp = np.clip(phase / sch.warmup, 0.0, 1.0)
    return sch.start + (objective.beta - sch.start) * ramp


def site_betas(spec: Spec, beta) -> dict:
    """{rate site: β_s} at a step whose global β is `beta` (a number or a traced array): the
    schedule sets β, ``[[latents]] beta`` multiplies it per site (the label's multiplier is 1).
    Always a mapping over `rate_sites`, whatever the multipliers: the one shape in which the
    trainers hand per-site weights to `ScaledELBO`."""
    multipliers = {s.name: s.beta for s in spec.sites} | (
        {LABEL_SITE: 1.0} if spec.label.latent else {})
    return {name: beta * w for name, w in multipliers.items()}


def rate_sites(spec: Spec) -> tuple[str, ...]:
    """Every latent site with a rate: `Spec.sites`, then ``label`` when the label is latent."""
    return (*(s.name for s in spec.sites), *((LABEL_SITE,) if spec.label.latent else ()))


def step_term_keys(spec: Spec) -> tuple[str, ...]:
    """The `ScaledELBO` terms each training step reports, in the order of the trainers' rows:
    loss, rate, distortion, aux, then rate/<site> for each site of a latent graph, and the
    label's rate (its KL where unknown) when the label is latent."""
    per_site = tuple(f"rate/{s.name}" for s in spec.sites) if spec.latents else ()
    label = (f"rate/{LABEL_SITE}",) if spec.label.latent else ()
    return ("loss", "rate", "distortion", "aux", *per_site, *label)


def step_fields(spec: Spec) -> tuple[str, ...]:
    """The metric names of the trainers' rows: those of `step_term_keys` (the weighted loss is
    the ``objective``), then ``skipped`` (1 where the step's update was skipped, else 0) when
    train.skip_grad_norm > 0; the driver logs its count per window."""
    terms = tuple("objective" if k == "loss" else k for k in step_term_keys(spec))
    return (*terms, *(("skipped",) if spec.train.skip_grad_norm > 0 else ()))


def weight_for(weight, site: str):
    """β or λ of one site: `weight` is a number/array (every site), or a mapping {site: number}
    (sites not named get 1): what a user may pass to `ScaledELBO`."""
    if isinstance(weight, Mapping):
        return weight.get(site, 1.0)
    return weight


def free_bits_for(free_bits, site: str) -> float:
    """λ of one site's free bits (nats per dimension; 0 = off): `free_bits` is a number (every
    site the ELBO asks about) or a mapping {site: nats} (sites not named get 0)."""
    if isinstance(free_bits, Mapping):
        return float(free_bits.get(site, 0.0))
    return float(free_bits or 0.0)


def capacity_schedule(site_capacity: CapacitySpec, steps: np.ndarray) -> np.ndarray:
    """The capacity target C(t) = max · min(1, t / steps) at each (0-based) step in `steps`, in
    nats per example, as float64 (len(steps),) (Burgess et al. 2018). A pure function of the
    step, like `beta_schedule`; 0 everywhere for a site without a target (max = 0)."""
    steps = np.asarray(steps, dtype=np.float64)
    return site_capacity.max * np.minimum(1.0, steps / site_capacity.steps)


def _maximum(floor, x):
    """max(floor, x) elementwise with + and abs only, for any array type (torch, jax): at a tie
    the gradient is 1/2, in both backends."""
    return 0.5 * (floor + x + abs(x - floor))


def site_rate_loss(site: str, rate, beta, *, free_bits=0.0, capacity_weight=None,
                   capacity=None, rate_dims=None, batch_size=1):
    """The part of the loss one rate site contributes (nats, summed over the batch):

    * β_s · rate_s, the ELBO's;
    * with free bits λ > 0 (Kingma et al. 2016): β_s · Σ_i max(λ, rate_i / B) · B, rate_i the
      site's rate in dimension i summed over the batch (`rate_dims`, (d,)) and B the batch size:
      a dimension whose batch-mean rate is below λ nats costs λ and gets no gradient;
    * with a capacity weight γ (Burgess et al. 2018): γ · |rate_s / B − C_s| · B, C_s the target
      in nats per example (`capacity`, a number or a traced/in-place-filled 0-d array); β_s does
      not apply.

    Objective changes, not bounds: the reported rate stays rate_s.
    """
    if capacity_weight is not None:
        target = 0.0 if capacity is None else capacity
        return capacity_weight * abs(rate / batch_size - target) * batch_size
    if free_bits > 0:
        if rate_dims is None:
            raise ValueError(f"ScaledELBO: free bits on site {site!r} need its per-dimension "
                             "rate, which the ELBO did not supply")
        return weight_for(beta, site) * _maximum(free_bits * batch_size, rate_dims).sum()
    return weight_for(beta, site) * rate


def weighted_terms(terms: dict, beta, lam, zero, *, free_bits=None, capacity_weight=None,
                   capacity=None, rate_dims=None, batch_sizes=None) -> dict:
    """Per-site terms {"rate/<site>", "distortion/<site>", "aux/<site>": value} -> the same
    plus the unweighted totals `rate`, `distortion`, `aux` and the weighted `loss`

        loss = Σ_s β_s · rate_s + Σ_s λ_s · distortion_s + Σ_s aux_s,

    each rate site's part replaced by its free-bits or capacity objective where it has one
    (`site_rate_loss`: `free_bits` {site: nats per dimension} or a number, `capacity_weight`
    {site: γ}, `capacity` {site: C nats per example}, `rate_dims` {site: (d,) rate per dimension
    summed over the batch}, `batch_sizes` {site: B}). `rate` and `rate/<site>` stay the true
    rates; `loss` is the training objective.

    Works for any array type with +, *, abs and .sum() (torch tensors, jax arrays); `zero` is
    the 0-d zero of that type (so every total is an array even when a role has no site).
    """
    out = {"loss": zero, "rate": zero, "distortion": zero, "aux": zero}
    for key, value in terms.items():
        role, site = key.split("/", 1)
        out[role] = out[role] + value
        out["loss"] = out["loss"] + _site_loss(role, site, value, beta, lam, free_bits,
                                               capacity_weight, capacity, rate_dims,
                                               batch_sizes)
    out.update(terms)
    return out


def _site_loss(role, site, value, beta, lam, free_bits, capacity_weight, capacity, rate_dims,
               batch_sizes):
    if role == "distortion":
        return weight_for(lam, site) * value
    if role != "rate":
        return value
    capacity_weight = capacity_weight or {}
    return site_rate_loss(
        site, value, beta, free_bits=free_bits_for(free_bits, site),
        capacity_weight=capacity_weight.get(site),
        capacity=(capacity or {}).get(site), rate_dims=(rate_dims or {}).get(site),
        batch_size=(batch_sizes or {}).get(site, 1))


def per_site_loss(terms: dict, beta, lam, *, free_bits=None, capacity_weight=None,
                  capacity=None, rate_dims=None, batch_sizes=None) -> dict:
    """{site: its weighted part of the loss}: β·rate (or its free-bits / capacity objective),
    λ·distortion and aux terms by site (the stock ELBOs' ``sum_sites=False``), from the per-site
    terms of `weighted_terms` (same keyword arguments)."""
    out: dict = {}
    for key, value in terms.items():
        if "/" not in key:
            continue
        role, site = key.split("/", 1)
        part = _site_loss(role, site, value, beta, lam, free_bits, capacity_weight, capacity,
                          rate_dims, batch_sizes)
        out[site] = out.get(site, 0.0) + part
    return out


# ---- importance-weighted bounds ------------------------------------------------------------------
def log_weight(parts: dict, beta, lam):
    """ln w of each element (particle, enumerated value, example) from its per-element terms
    {"rate/<site>": ln q − ln p, "distortion/<site>": −ln p, …} (aux terms are not part of w):

        ln w = −Σ_s β_s · rate_s − Σ_s λ_s · distortion_s.

    At β = λ = 1 this is ln p(y, z) − ln q(z|y); with other weights each site's ln p − ln q
    enters times its β (then L_K is no longer a bound on ln p(y))."""
    out = 0.0
    for key, value in parts.items():
        role, site = key.split("/", 1)
        if role == "rate":
            out = out - weight_for(beta, site) * value
        elif role == "distortion":
            out = out - weight_for(lam, site) * value
    return out


def bound_terms(terms: dict, bound, zero) -> dict:
    """The public terms of an importance-weighted bound: the per-site terms `terms` (self-
    normalised: Σ w̃ · term, summed over the batch; aux terms averaged over the particles),
    their unweighted totals `rate`, `distortion`, `aux`, and ``loss = −bound + aux`` with
    `bound` = Σ_n ln (1/K) Σ_k w_nk (summed over the batch)."""
    out = {"loss": zero - bound, "rate": zero, "distortion": zero, "aux": zero}
    for key, value in terms.items():
        role = key.split("/", 1)[0]
        out[role] = out[role] + value
        if role == "aux":
            out["loss"] = out["loss"] + value
    out.update(terms)
    return out


def check_estimator(bound: str, gradient: str, free_bits, capacity_weight,
                    sum_sites: bool = True) -> None:
    """The combinations both `ScaledELBO`s refuse, each in one line (the spec refuses the same
    ones at load time, `ppl_vae.validation`)."""
    if bound not in BOUNDS:
        raise ValueError(f"ScaledELBO: bound={bound!r}; use one of {', '.join(BOUNDS)}")
    if gradient not in GRADIENTS:
        raise ValueError(f"ScaledELBO: gradient={gradient!r}; use one of {', '.join(GRADIENTS)}")
    if gradient == "dreg" and bound != "iwae":
        raise ValueError("ScaledELBO: gradient='dreg' is the IWAE bound's estimator; use it with "
                         "bound='iwae' (or gradient='stl' for the ELBO)")
    if gradient == "stl" and bound != "elbo":
        raise ValueError("ScaledELBO: gradient='stl' is biased for the IWAE bound; use "
                         "gradient='dreg' with bound='iwae'")
    fb = free_bits.values() if isinstance(free_bits, Mapping) else [free_bits or 0.0]
    if any(v < 0 for v in fb):
        raise ValueError(f"ScaledELBO: free_bits={free_bits!r}; use nats per dimension >= 0")
    capacity_weight = dict(capacity_weight or {})
    if any(v <= 0 for v in capacity_weight.values()):
        raise ValueError(f"ScaledELBO: capacity_weight={capacity_weight!r}; use γ > 0 per site")
    if bound == "iwae" and (any(v > 0 for v in fb) or capacity_weight):
        raise ValueError("ScaledELBO: free bits and capacity targets change the ELBO's rate "
                         "term, which bound='iwae' does not have; use bound='elbo'")
    both = [s for s in capacity_weight if free_bits_for(free_bits, s) > 0]
    if both:
        raise ValueError(f"ScaledELBO: site {both[0]!r} has both free bits and a capacity "
                         "target; give it one or the other")
    if bound == "iwae" and not sum_sites:
        raise NotImplementedError("ScaledELBO: sum_sites=False with bound='iwae': the "
                                  "importance-weighted bound has no per-site parts")


# ---- score-function (REINFORCE) terms for non-reparameterised sites -----------------------------
@dataclass(frozen=True)
class Piece:
    """One additive part of a per-site term of one particle: `key` the term ("rate/<site>",
    "distortion/<site>", "aux/<site>"), `value` its per-element array (the site's batch shape,
    enumerated dims included; in the term's units, nats: ln q, −ln p, the closed-form KL, a
    factor's value), `stack` the plates it lives in (the trace's cond_indep_stack). A rate is
    two pieces (ln q from the guide, −ln p from the model) because the two can depend on
    different upstream draws; the score-function terms keep, for each non-reparameterised
    site, the pieces that depend on its draw (`downstream`)."""

    key: str
    value: Any
    stack: tuple


def term_weight(key: str, beta, lam):
    """The weight of a term in the loss: β_s of "rate/<s>", λ_s of "distortion/<s>", 1 of an
    aux term (as in `weighted_terms`)."""
    role, site = key.split("/", 1)
    if role == "rate":
        return weight_for(beta, site)
    if role == "distortion":
        return weight_for(lam, site)
    return 1.0


def downstream(pieces, provenances, sites, beta, lam) -> dict:
    """{scored site: [(stack, cost)]}: for each non-reparameterised guide site in `sites`, the
    pieces whose value depends on its draw (`provenances[i]`, the set of scored sites that
    `pieces[i]` was computed from), each as its part of the weighted ELBO, −w · value with
    w = β_s, λ_s or 1 (`term_weight`), in nats (ln-w units, higher is better, as Pyro's
    downstream cost): the site's downstream cost before the plate sums (Schulman et al. 2015;
    TraceGraph_ELBO tracks the dependencies by provenance too). A piece that does not depend
    on the draw has expectation zero against the draw's score, so leaving it out changes no
    expectation and lowers the variance (Rao-Blackwellisation)."""
    out: dict = {name: [] for name in sites}
    for piece, provenance in zip(pieces, provenances, strict=True):
        for name in provenance & out.keys():
            out[name].append((piece.stack, -term_weight(piece.key, beta, lam) * piece.value))
    return out


BASELINE_OPTIONS = ("nn_baseline", "nn_baseline_input", "use_decaying_avg_baseline",
                    "baseline_beta", "baseline_value")
#: the name of a site's decaying-average baseline: Pyro's param-store name, which the NumPyro
#: twin uses for the mutable site (`numpyro.primitives.mutable`) that carries it between steps
BASELINE_AVERAGE = "__baseline_avg_downstream_cost_"


@dataclass(frozen=True)
class Baseline:
    """A non-reparameterised site's baseline, from ``infer={"baseline": {...}}`` with Pyro's
    keys (`pyro.infer.tracegraph_elbo`): a decaying average of the downstream cost
    (``use_decaying_avg_baseline``, its ``baseline_beta``, 0.9 by default), and/or a learned one:
    ``nn_baseline(nn_baseline_input)`` (NVIL's input-dependent baseline, Mnih & Gregor 2014; the
    input's gradient stopped) or a ``baseline_value`` the guide computed. A learned baseline is
    trained by the squared error to the downstream cost, added to the loss with value 0."""

    nn: Any = None
    nn_input: Any = None
    decaying: bool = False
    beta: float = 0.90
    value: Any = None

    @property
    def used(self) -> bool:
        return self.decaying or self.nn is not None or self.value is not None


def baseline_options(site: str, infer: Mapping) -> Baseline:
    """The site's `Baseline` from its ``infer`` dict; unknown keys and an impossible pair are
    refused in one line, as in Pyro."""
    options = dict(infer.get("baseline") or {})
    unknown = sorted(set(options) - set(BASELINE_OPTIONS))
    if unknown:
        raise ValueError(f"ScaledELBO: site {site!r}: unknown baseline option(s) "
                         f"{', '.join(unknown)}; use {', '.join(BASELINE_OPTIONS)}")
    out = Baseline(nn=options.get("nn_baseline"), nn_input=options.get("nn_baseline_input"),
                   decaying=bool(options.get("use_decaying_avg_baseline", False)),
                   beta=float(options.get("baseline_beta", 0.90)),
                   value=options.get("baseline_value"))
    if out.nn is not None and out.value is not None:
        raise ValueError(f"ScaledELBO: site {site!r} has both nn_baseline and baseline_value; "
                         "give it one of them")
    if out.nn is not None and out.nn_input is None:
        raise ValueError(f"ScaledELBO: site {site!r} has an nn_baseline but no "
                         "nn_baseline_input; give the input the network reads")
    if not 0.0 <= out.beta < 1.0:
        raise ValueError(f"ScaledELBO: site {site!r}: baseline_beta={out.beta}; use 0 <= "
                         "baseline_beta < 1")
    return out


def baselined_signal(site: str, options: Baseline, cost, average, stop):
    """(learning signal, baseline loss, new average) of one non-reparameterised site.

    `cost` is its downstream ELBO contribution summed to its plates (`downstream`: nats,
    higher is better; an array of the site's batch shape), `average` the decaying average so
    far (an array of that shape; None when the site has none), `stop` the backend's
    stop-gradient. The signal ``cost − baseline`` multiplies the site's score (stopped by the
    caller); the baseline loss Σ (cost − b)² trains a learned baseline. As Pyro's
    `_construct_baseline`, in the same order: the decaying average's old value, plus the
    network's or the given value; the new average is (1 − baseline_beta) · cost +
    baseline_beta · old. A baseline that does not depend on the site's draw changes no
    expectation, only the variance. Its shape must broadcast to the cost's (Pyro wants it
    equal; a network of the data, (N,), then also serves vectorised particles, (K, N))."""
    if not options.used:
        return cost, 0.0, None
    baseline = 0.0
    new_average = None
    if options.decaying:
        new_average = stop((1 - options.beta) * cost + options.beta * average)
        baseline = baseline + average
    if options.nn is not None:
        baseline = baseline + options.nn(stop(options.nn_input))
    elif options.value is not None:
        baseline = baseline + options.value
    shape, cost_shape = tuple(getattr(baseline, "shape", ())), tuple(cost.shape)
    try:
        fits = np.broadcast_shapes(shape, cost_shape) == cost_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"ScaledELBO: the baseline of site {site!r} has shape {shape}; its "
                         f"downstream cost has {tuple(cost.shape)}: give one value per "
                         "element of its plates (or a shape that broadcasts to it)")
    loss = 0.0
    if options.nn is not None or options.value is not None:
        loss = ((stop(cost) - baseline) ** 2).sum()
    return cost - baseline, loss, new_average


def check_score_function(site: str, distribution: str, bound: str, free_bits, capacity_weight,
                         multi_sample_guide: bool = False) -> None:
    """Refuse, in one line, the objectives that have no score-function term here (`site` the
    first non-reparameterised, non-enumerated guide site, `distribution` its class name)."""
    fb = free_bits.values() if isinstance(free_bits, Mapping) else [free_bits or 0.0]
    what = None
    if bound == "iwae":
        what = ("bound='iwae' (the importance-weighted bound's score-function estimator, VIMCO, "
                "is not implemented; the stock RenyiELBO gives such a site no gradient at "
                "alpha=0)")
    elif capacity_weight or any(v > 0 for v in fb):
        what = "free bits or capacity targets (their rate is not a sum over the draws)"
    elif multi_sample_guide:
        what = "multi_sample_guide=True (nor has NumPyro's Trace_ELBO)"
    if what is not None:
        raise NotImplementedError(
            f"ScaledELBO: the guide's site {site!r} ({distribution}) is not reparameterised, so "
            f"it needs a score-function (REINFORCE) term, which is not available with {what}. "
            "Use bound='elbo' without them, a reparameterised or relaxed posterior "
            "(RelaxedBernoulli, …), or sum the site out: infer={\"enumerate\": \"parallel\"}.")


def score_inside_enumeration(site: str) -> NotImplementedError:
    return NotImplementedError(
        f"ScaledELBO: the guide's non-reparameterised site {site!r} is drawn once per value of "
        "an enumerated site (its distribution reads it); its score-function term needs one "
        "draw shared by every value: draw it before the enumerated site, or enumerate it too.")


def sequential_enumeration_warning(site: str) -> str:
    return (f"ScaledELBO: the guide's site {site!r} is marked for sequential enumeration, which "
            "ScaledELBO does not do: it is sampled and trained by a score-function term (as "
            "Trace_ELBO samples it); mark it infer={\"enumerate\": \"parallel\"} to sum it out.")


def missing_baseline_average(site: str, shape: tuple) -> ValueError:
    return ValueError(
        f"ScaledELBO: site {site!r} asks for use_decaying_avg_baseline; in NumPyro the average "
        "is state carried between steps: declare it in the guide, numpyro.primitives.mutable("
        f"'{BASELINE_AVERAGE}{site}', jnp.zeros({shape})) (the site's plates' shape), and "
        "train with SVI (which carries mutable state); or give the site a baseline_value or "
        "an nn_baseline.")


# ---- the site-role errors of both backends' ScaledELBO ----------------------------------------
def missing_guide_site(site: str, framework: str) -> ValueError:
    return ValueError(
        f"ScaledELBO: the model's latent site {site!r} has no sample site in the guide; add "
        f"`{framework}.sample({site!r}, ...)` to the guide or observe it.")


def not_factorised(site: str, posterior: str, prior: str) -> ValueError:
    return ValueError(
        f"ScaledELBO: free bits on site {site!r} need a rate per dimension, so a posterior and a "
        "prior that factorise over the last dimension (Normal(...).to_event(1)); here "
        f"{posterior} and {prior}. Use a diagonal posterior or drop the site's free bits.")


def shared_across_enumeration(site: str) -> NotImplementedError:
    return NotImplementedError(
        f"ScaledELBO: gradient='dreg' with enumerated sites needs every reparameterised site "
        f"drawn once per enumerated value; {site!r} is drawn once for all of them (make its "
        "posterior read the enumerated site, or use gradient='reparam').")
