"""The objective, backend-free: β schedules, per-site weights, the weighted sum of the terms and
the site-role errors of both backends' `ScaledELBO`.

    loss = β · rate + λ · distortion + aux(Ψ)

rate = E[ln q_Ψ(z|y) − ln p̂_Φ(z)] (Î(y, z) in the lecture), distortion = E[−ln p̂_Φ(y|z)]
(Ĥ(y|z)) or any Dist_Φ(y|z), aux = a loss on the encoder alone (encoder autonomy). All in nats.
The backends' `ScaledELBO` compute the terms; this module decides the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ppl_vae.spec import LABEL_SITE, ObjectiveSpec, Spec


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


def weighted_terms(terms: dict, beta, lam, zero) -> dict:
    """Per-site terms {"rate/<site>", "distortion/<site>", "aux/<site>": value} -> the same
    plus the unweighted totals `rate`, `distortion`, `aux` and the weighted `loss`

        loss = Σ_s β_s · rate_s + Σ_s λ_s · distortion_s + Σ_s aux_s.

    Works for any array type with + and * (torch tensors, jax arrays); `zero` is the 0-d zero
    of that type (so every total is an array even when a role has no site).
    """
    out = {"loss": zero, "rate": zero, "distortion": zero, "aux": zero}
    for key, value in terms.items():
        role, site = key.split("/", 1)
        out[role] = out[role] + value
        if role == "rate":
            value = weight_for(beta, site) * value
        elif role == "distortion":
            value = weight_for(lam, site) * value
        out["loss"] = out["loss"] + value
    out.update(terms)
    return out


def per_site_loss(terms: dict, beta, lam) -> dict:
    """{site: its weighted part of the loss}: β·rate, λ·distortion and aux terms by site (the
    stock ELBOs' ``sum_sites=False``), from the per-site terms of `weighted_terms`."""
    out: dict = {}
    for key, value in terms.items():
        if "/" not in key:
            continue
        role, site = key.split("/", 1)
        weight = (weight_for(beta, site) if role == "rate" else
                  weight_for(lam, site) if role == "distortion" else 1.0)
        out[site] = out.get(site, 0.0) + weight * value
    return out


# ---- the site-role errors of both backends' ScaledELBO ----------------------------------------
def missing_guide_site(site: str, framework: str) -> ValueError:
    return ValueError(
        f"ScaledELBO: the model's latent site {site!r} has no sample site in the guide; add "
        f"`{framework}.sample({site!r}, ...)` to the guide or observe it.")


def not_reparameterised(site: str, distribution: str, framework: str) -> NotImplementedError:
    return NotImplementedError(
        f"ScaledELBO: the guide's site {site!r} ({distribution}) is not reparameterised; "
        "ScaledELBO needs reparameterised latents or discrete ones summed out. Use a "
        "reparameterised distribution (Normal, …), or mark the discrete site for enumeration "
        f"in the guide: {framework.lower()}.sample({site!r}, ..., infer={{\"enumerate\": "
        "\"parallel\"}) with ScaledELBO(max_plate_nesting=N).")


def sequential_enumeration(site: str) -> NotImplementedError:
    return NotImplementedError(
        f"ScaledELBO: the guide's site {site!r} asks for sequential enumeration; ScaledELBO sums "
        "discrete sites out in parallel only: infer={\"enumerate\": \"parallel\"}.")


def enumeration_needs_plate_nesting(site: str) -> ValueError:
    return ValueError(
        f"ScaledELBO: the guide's site {site!r} is marked for enumeration, but ScaledELBO does "
        "not know where the plates end: pass max_plate_nesting=N (the number of nested plates), "
        "as for TraceEnum_ELBO.")


def stray_guide_site(site: str) -> ValueError:
    return ValueError(
        f"ScaledELBO: the guide's sample site {site!r} is not in the model; a guide may add only "
        "factor sites of its own (encoder-only aux terms).")
