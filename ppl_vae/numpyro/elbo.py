"""`ScaledELBO` for NumPyro: loss = β · rate + λ · distortion + aux(encoder only), in nats.

The twin of `ppl_vae.pyro.elbo.ScaledELBO`, with the same site roles:

* latent: sample sites in both guide and model → β · (ln q − ln p), or β · KL(q‖p) when
  ``analytic_kl=True``, `kl_divergence` is registered for the pair and the guide site does not
  say ``infer={"analytic_kl": False}`` (else Monte Carlo, as `TraceMeanField_ELBO` does); a
  guide-only latent (an AutoGuide's joint draw, or one not marked auxiliary, which the stock
  `Trace_ELBO` counts so too, warning through `check_model_guide_match`) → β · ln q;
* distortion: observed sample sites and factor sites of the model → λ · (−log-density);
* aux: factor sites of the guide only → + their value (a guide factor enters ln q, so a value f
  adds +f to the loss, exactly as in the stock `Trace_ELBO`).

Sign convention: the loss is minimised; at β = λ = 1 with no aux site it is −ELBO and equals
`Trace_ELBO` (`TraceMeanField_ELBO` with ``analytic_kl=True``, whose mean-field check it makes
and warns with) for the same ``rng_key`` — the keys are split exactly as there. With β = b it
equals the stock ELBO under ``handlers.scale(scale=b)`` on the latent sites of model and guide
(Higgins et al. 2017).

**Discrete latents summed out**, as in the Pyro twin: a guide site marked
``infer={"enumerate": "parallel"}`` takes its whole support in a dimension left of the plates
(done here without funsor), every term becomes an expectation under q of those values and the
site's own rate is KL(q ‖ p) exactly; ``infer={..., "observed": mask}`` marks examples whose
value is known (the guide's mass is on it): their term is the distortion −ln p(value). At
β = λ = 1 it equals NumPyro's `TraceEnum_ELBO`. ``max_plate_nesting`` need not be given: as
`TraceEnum_ELBO`, the first call guesses it from the shapes of one unenumerated run.

**Discrete latents sampled** (score function, REINFORCE): a guide site that is neither
reparameterised nor enumerated (a Bernoulli, Categorical or Poisson latent; one marked
``"sequential"``, which warns) is sampled and trained by the surrogate
−ln q(z) · (c − b)|stopped, c its downstream cost (the weighted terms whose value depends on
the draw, found by provenance on the abstract program, `numpyro.ops.provenance`, as in NumPyro's
`TraceGraph_ELBO`) and b a baseline (`ppl_vae.objective.baselined_signal`). Value: the loss;
gradient: unbiased for the weighted objective. Two differences from the stock estimators:

* the score is the unscaled ln q (as in Pyro), so under ``handlers.scale`` (β, or subsampling)
  the gradient is that of the scaled objective; NumPyro's `TraceGraph_ELBO` multiplies the score
  by the site's scale too (its gradient is off by that factor there), while its `Trace_ELBO`
  has no score-function term at all (its gradient for such a site is biased);
* baselines, which NumPyro's `TraceGraph_ELBO` lacks, with Pyro's keys
  ``infer={"baseline": {...}}``: ``baseline_value`` (an array the guide computes, e.g. from
  a network's parameters: trained by its squared error to the cost), ``nn_baseline`` with
  ``nn_baseline_input`` (a callable), and ``use_decaying_avg_baseline`` / ``baseline_beta``,
  whose average is state between steps: the guide declares it,
  ``numpyro.primitives.mutable("__baseline_avg_downstream_cost_<site>", zeros)`` (zeros of
  the shape of the site's plates), and `SVI` carries it (`loss_with_mutable_state` returns
  the new average; with several particles, their mean).

``multi_sample_guide=True`` (a guide whose sites carry a leading dim of samples) scores the
model at each sample and sums, as the stock `Trace_ELBO`: Monte Carlo rates, ``bound="elbo"``,
``gradient="reparam"``, no free bits, capacity targets or score-function sites.

``bound="iwae"`` (the importance-weighted bound, equal to ``RenyiELBO(alpha=0)`` at β = λ = 1
for the same key: the keys are split as there), ``gradient="stl"`` / ``"dreg"``, ``free_bits``
and ``capacity_weight`` / ``capacity`` mean what they mean in the Pyro twin (its docstring gives
the estimators and objectives, and where each applies); the importance-weighted bound and free
bits refuse score-function sites, naming the site.

β, λ and the capacity targets may be traced: ``ScaledELBO(...).with_weights(beta, lam,
capacity)`` inside a jitted function takes them as arguments, so a schedule never recompiles::

    elbo = ScaledELBO(num_particles=1, capacity_weight={"z": 100.0})

    @jax.jit
    def update(params, opt_state, key, y, beta, capacity):
        loss = lambda p: elbo.with_weights(beta, 1.0, {"z": capacity}).loss(key, p, model,
                                                                           guide, y)
        value, grads = jax.value_and_grad(loss)(params)
        ...
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import random
from jax.scipy.special import logsumexp
from numpyro.distributions import kl_divergence
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import (
    ELBO,
    MultiFrameTensor,
    _check_mean_field_requirement,
    guess_max_plate_nesting,
)
from numpyro.ops.provenance import eval_provenance
from numpyro.primitives import Messenger
from numpyro.util import _validate_model, check_model_guide_match

from ppl_vae.objective import (
    BASELINE_AVERAGE,
    Piece,
    baseline_options,
    baselined_signal,
    bound_terms,
    check_estimator,
    check_score_function,
    downstream,
    free_bits_for,
    log_weight,
    missing_baseline_average,
    missing_guide_site,
    not_factorised,
    per_site_loss,
    score_inside_enumeration,
    sequential_enumeration_warning,
    shared_across_enumeration,
    weighted_terms,
)


def _log_prob(site) -> jax.Array:
    """ln p of a site per example, scaled as the site says (plates, handlers.scale); masks are
    inside fn."""
    if site["intermediates"]:
        log_prob = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        log_prob = site["fn"].log_prob(site["value"])
    return scale_and_mask(log_prob, site["scale"])


def _is_enumerated(site) -> bool:
    """A guide site that takes its whole support (marked for parallel enumeration)."""
    return site["infer"].get("_enumerate_dim") is not None


def _is_drawn(site) -> bool:
    """A reparameterised latent draw of the guide (what STL and DReG differentiate through)."""
    return (site["type"] == "sample" and not site["is_observed"]
            and not _is_enumerated(site) and site["fn"].has_rsample)


def _is_scored(site) -> bool:
    """A latent draw of the guide that is not reparameterised (nor enumerated): it gets a
    score-function term, as in NumPyro's TraceGraph_ELBO."""
    return (site["type"] == "sample" and not site["is_observed"]
            and not _is_enumerated(site) and not site["fn"].has_rsample)


def _stack(site) -> tuple:
    return tuple(site["cond_indep_stack"])


class _NeedsPlateNesting(Exception):
    """A guide site is marked for parallel enumeration but max_plate_nesting is not known:
    the ELBO guesses it (as TraceEnum_ELBO does) and runs the guide again."""


def _factors(fn):
    """The distribution of the coordinates a site factorises into (batch (..., d)), or None."""
    while isinstance(fn, dist.ExpandedDistribution):
        fn = fn.base_dist
    if isinstance(fn, dist.Independent) and fn.reinterpreted_batch_ndims == 1 and \
            not fn.base_dist.event_shape:
        return fn.base_dist
    return None


def _batch_size(site) -> float:
    """B of a site: the number of examples its plates hold, times its scale where that is a
    number (subsampling)."""
    size = math.prod(f.size for f in site["cond_indep_stack"])
    scale = site["scale"]
    return size * (float(scale) if isinstance(scale, int | float) else 1.0)


def _path(log_q, score):
    """ln q with the score term removed: its value, the gradient of the path through the draw
    only (`score` is ln q re-evaluated at the stopped draw, whose gradient is the score)."""
    return log_q - score + jax.lax.stop_gradient(score)


def _element_dims(model_trace, guide_trace) -> list[int]:
    """Dims of the plates not common to every latent and observed site: summed within one
    importance weight (as RenyiELBO: one weight per element of the common plates)."""
    stacks = [set(s["cond_indep_stack"]) for s in model_trace.values() if s["type"] == "sample"]
    stacks += [set(s["cond_indep_stack"]) for s in guide_trace.values()
               if s["type"] == "sample" and not s["is_observed"]]
    if not stacks:
        return []
    common = set.intersection(*stacks)
    return sorted({f.dim for f in set.union(*stacks) - common if f.dim is not None})


def _within_example(value, sum_dims):
    dims = tuple(d for d in sum_dims if -jnp.ndim(value) <= d)
    return jnp.sum(value, dims, keepdims=True) if dims else value


class enumerate_parallel(Messenger):
    """Parallel enumeration of the sample sites marked ``infer={"enumerate": "parallel"}``:
    each takes its whole support (``enumerate_support(expand=False)``) in a dimension of its own
    left of the plates, the first at `first_available_dim`, the next one left of it. What
    `numpyro.contrib.funsor.enum` does for guide sites, without funsor. With
    `first_available_dim` None (max_plate_nesting unknown) a marked site raises
    `_NeedsPlateNesting`."""

    def __init__(self, fn=None, first_available_dim: int | None = -2):
        self.next_dim = first_available_dim
        super().__init__(fn)

    def process_message(self, msg):
        enumerate_ = msg["infer"].get("enumerate") if msg["type"] == "sample" else None
        if enumerate_ != "parallel" or msg["is_observed"]:
            return  # (a site marked "sequential" is sampled: `ScaledELBO._traces` warns)
        if self.next_dim is None:
            raise _NeedsPlateNesting
        fn = msg["fn"]
        support = fn.enumerate_support(expand=False)
        event = support.shape[1 + len(fn.batch_shape):]
        msg["value"] = support.reshape((support.shape[0],) + (1,) * (-self.next_dim - 1) + event)
        msg["infer"] = {**msg["infer"], "_enumerate_dim": self.next_dim}
        self.next_dim -= 1


def _enumeration_log_weight(guide_trace):
    """ln q of each joint value of the enumerated guide sites, broadcastable against the sites'
    per-example log-densities; None when no site is enumerated."""
    log_q = None
    for site in guide_trace.values():
        if site["type"] != "sample" or not _is_enumerated(site):
            continue
        lq = site["fn"].log_prob(site["value"])  # the measure: unscaled
        log_q = lq if log_q is None else log_q + lq
    return log_q


def _enumeration_weight(guide_trace):
    """q of each joint value of the enumerated guide sites, broadcastable against the sites'
    per-example log-densities; None when no site is enumerated."""
    log_q = _enumeration_log_weight(guide_trace)
    return None if log_q is None else jnp.exp(log_q)


def _check_multi_sample(bound, gradient, free_bits, capacity_weight) -> None:
    fb = free_bits.values() if isinstance(free_bits, Mapping) else [free_bits or 0.0]
    if bound != "elbo" or gradient != "reparam" or capacity_weight or any(v > 0 for v in fb):
        raise NotImplementedError(
            "ScaledELBO: multi_sample_guide=True scores the model at each of the guide's "
            "samples, as the stock Trace_ELBO: with bound='elbo' and gradient='reparam', "
            f"without free bits or capacity targets (here bound={bound!r}, "
            f"gradient={gradient!r}).")


class ScaledELBO(ELBO):
    """β · rate + λ · distortion + aux, as a NumPyro ELBO (see the module docstring).

    :param beta: weight of the rate; a number, a (traced) array, or {latent site: number}.
    :param lam: weight of the distortion; likewise, keyed by distortion site.
    :param num_particles: Monte Carlo draws of the latents (averaged; K of the IWAE bound).
    :param analytic_kl: closed-form KL(q‖p) for the rate where registered, except at guide
        sites marked ``infer={"analytic_kl": False}`` (see the Pyro twin: bottom-up inference).
        ``bound="elbo"`` with ``gradient="reparam"`` only (STL and the IWAE bound are defined
        on the Monte Carlo ln q − ln p), and not with ``multi_sample_guide``. It also makes
        `TraceMeanField_ELBO`'s mean-field check (a warning), unless a guide site opts out.
    :param bound: ``"elbo"`` or ``"iwae"`` (see the module docstring).
    :param gradient: ``"reparam"``, ``"stl"`` (elbo) or ``"dreg"`` (iwae).
    :param free_bits: nats per dimension, a number (every reparameterised latent site) or
        {site: nats}: the site's rate enters the loss as Σ_i max(λ, batch-mean rate_i) · B.
    :param capacity_weight: {site: γ}: the site's β · rate becomes γ · |rate / B − C| · B.
    :param capacity: {site: C} (nats per example; numbers or traced arrays, as β: set per step
        with `with_weights`); sites with a weight and no target get C = 0.
    :param vectorize_particles: as in `numpyro.infer.ELBO` (vmap by default).
    :param max_plate_nesting: the number of nested plates, for the guide sites marked
        ``infer={"enumerate": "parallel"}``; guessed at the first call if not given (as
        `TraceEnum_ELBO` guesses it), and kept.
    :param sum_sites: as in the stock ELBOs: False makes `loss` a dict {site: weighted part}
        (not with ``bound="iwae"``, which has no per-site parts).
    :param multi_sample_guide: as in the stock `Trace_ELBO`: the guide proposes several
        samples of each site (a leading dim), and the model's log-density is summed over them.
    """

    #: SVI asks this before warning that a loss "does not support discrete latent variables"
    can_infer_discrete = True

    def __init__(self, beta=1.0, lam=1.0, num_particles: int = 1, analytic_kl: bool = True,
                 bound: str = "elbo", gradient: str = "reparam", free_bits=None,
                 capacity_weight=None, capacity=None, vectorize_particles=True,
                 max_plate_nesting=None, multi_sample_guide: bool = False,
                 sum_sites: bool = True):
        check_estimator(bound, gradient, free_bits, capacity_weight, sum_sites)
        if multi_sample_guide:
            _check_multi_sample(bound, gradient, free_bits, capacity_weight)
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.beta, self.lam, self.analytic_kl = beta, lam, analytic_kl
        self.bound, self.gradient = bound, gradient
        self.free_bits = free_bits or 0.0
        self.capacity_weight = dict(capacity_weight or {})
        self.capacity = capacity if capacity is not None else {}
        self.max_plate_nesting = max_plate_nesting
        self.multi_sample_guide, self.sum_sites = multi_sample_guide, sum_sites

    def with_weights(self, beta, lam, capacity=None) -> ScaledELBO:
        """The same estimator with other β and λ (numbers or traced arrays), and capacity
        targets {site: C} (likewise) where given."""
        other = copy.copy(self)
        other.beta, other.lam = beta, lam
        if capacity is not None:
            other.capacity = capacity
        return other

    @property
    def _closed_form(self) -> bool:
        return self.analytic_kl and self.bound == "elbo" and self.gradient == "reparam"

    # -- traces ---------------------------------------------------------------------------------
    def _traces(self, rng_key, param_map, model, guide, args, kwargs):
        """(model trace, guide trace, mutable state, the seeded model and guide) of one
        particle."""
        model_seed, guide_seed = random.split(rng_key)  # as the stock ELBOs split it
        seeded_model = seed(model, model_seed)
        try:
            seeded_guide = self._enumerated(seed(guide, guide_seed))
            guide_trace = trace(substitute(seeded_guide, data=param_map)).get_trace(*args,
                                                                                   **kwargs)
        except _NeedsPlateNesting:
            # as TraceEnum_ELBO: the deepest plate of one unenumerated run (shapes only), then
            # the particle afresh with the same keys (a seed handler consumes its key)
            self.max_plate_nesting = guess_max_plate_nesting(
                seeded_model, seed(guide, guide_seed), args, kwargs, param_map)
            seeded_model = seed(model, model_seed)
            seeded_guide = self._enumerated(seed(guide, guide_seed))
            guide_trace = trace(substitute(seeded_guide, data=param_map)).get_trace(*args,
                                                                                   **kwargs)
        for name, site in guide_trace.items():
            if site["type"] == "sample" and site["infer"].get("enumerate") == "sequential":
                warnings.warn(sequential_enumeration_warning(name), stacklevel=6)
        # mutable state (flax BatchNorm's batch_stats): the guide's new values feed the model,
        # and both come back, as in the stock Trace_ELBO
        mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
        model_trace = trace(substitute(replay(seeded_model, guide_trace),
                                       data={**param_map, **mutable})).get_trace(*args, **kwargs)
        mutable |= {n: s["value"] for n, s in model_trace.items() if s["type"] == "mutable"}
        if _enumeration_log_weight(guide_trace) is None:
            # the stock ELBOs' checks (an enumerated trace has other shapes)
            check_model_guide_match(model_trace, guide_trace)
            _validate_model(model_trace, plate_warning="loose")
        return model_trace, guide_trace, mutable, seeded_model, seeded_guide

    def _enumerated(self, seeded_guide):
        """The guide with its marked sites enumerated: a callable that enters a fresh
        `enumerate_parallel` at each run (the messenger counts the dims it hands out). Outside
        the seed, as TraceEnum_ELBO wraps it: an enumerated site still takes its key, so the
        continuous draws are TraceEnum_ELBO's."""
        first = None if self.max_plate_nesting is None else -1 - self.max_plate_nesting

        def guide(*args, **kwargs):
            return enumerate_parallel(seeded_guide, first)(*args, **kwargs)

        return guide

    @staticmethod
    def _guide_at(seeded_guide, param_map, values, args, kwargs):
        """The guide's trace with its draws set to `values` {site: array}."""
        return trace(substitute(seeded_guide, data={**param_map, **values})).get_trace(
            *args, **kwargs)

    # -- the per-element terms of one particle ----------------------------------------------------
    def _parts(self, model_trace, guide_trace, closed_form: bool, score_trace=None,
               detach_q: bool = False):
        """Unweighted per-site terms of one particle, per element (the sites' batch shapes:
        enumerated values, plates), before any sum: {"rate/<site>", "distortion/<site>",
        "aux/<site>"}; for the sites with free bits, {site: (..., d) rate per dimension}; and
        the terms' `Piece`s (ln q and −ln p of a rate apart, for the score-function terms).
        `score_trace` (STL) and `detach_q` (DReG's value) as in the Pyro twin; a
        non-reparameterised draw's ln q is stopped (its gradient is its score-function term,
        as in TraceGraph_ELBO)."""
        parts, dims, pieces = {}, {}, []

        def add(key, value, site):
            parts[key] = parts[key] + value if key in parts else value
            pieces.append(Piece(key, value, _stack(site)))

        def log_q(name, gsite):
            if score_trace is not None and _is_drawn(gsite):
                return _path(_log_prob(gsite), _log_prob(score_trace[name]))
            if (detach_q and _is_drawn(gsite)) or _is_scored(gsite):
                return jax.lax.stop_gradient(_log_prob(gsite))
            return _log_prob(gsite)

        for name, msite in model_trace.items():
            if msite["type"] != "sample":
                continue
            if msite["is_observed"]:
                add(f"distortion/{name}", -_log_prob(msite), msite)
                continue
            gsite = guide_trace.get(name)
            if gsite is None or gsite["type"] != "sample":
                raise missing_guide_site(name, "numpyro")
            rate = f"rate/{name}"
            if _is_enumerated(gsite):
                observed = gsite["infer"].get("observed")
                if observed is None:
                    add(rate, _log_prob(gsite), gsite)
                    add(rate, -_log_prob(msite), msite)
                else:  # known values are data: −ln p; the rest carry the rate
                    add(rate, jnp.where(observed, 0.0, _log_prob(gsite)), gsite)
                    add(rate, -jnp.where(observed, 0.0, _log_prob(msite)), msite)
                    add(f"distortion/{name}", -jnp.where(observed, _log_prob(msite), 0.0),
                        msite)
                continue
            if free_bits_for(self.free_bits, name) > 0:
                score = None if score_trace is None else score_trace[name]
                dims[name] = self._rate_dims(name, msite, gsite, closed_form, score)
                add(rate, jnp.sum(dims[name], -1), gsite)
                continue
            kl = self._closed_form_rate(msite, gsite, closed_form)
            if kl is not None:
                add(rate, kl, gsite)
            else:
                add(rate, log_q(name, gsite), gsite)
                add(rate, -_log_prob(msite), msite)
        for name, gsite in guide_trace.items():
            if gsite["type"] != "sample" or name in model_trace:
                continue
            if gsite["is_observed"]:  # a guide factor: an encoder-only term (the stock: +f)
                add(f"aux/{name}", _log_prob(gsite), gsite)
            else:
                # a guide-only latent (an AutoGuide's joint draw, `_Auto…_latent`, or one not
                # marked auxiliary, which the stock Trace_ELBO counts so too): its ln q is part
                # of ln q(z|y), so of the rate
                add(f"rate/{name}", log_q(name, gsite), gsite)
        return parts, dims, pieces

    @staticmethod
    def _closed_form_rate(msite, gsite, closed_form: bool):
        """KL(q‖p) per element where the rate is closed-form and registered, else None."""
        if not (closed_form and gsite["infer"].get("analytic_kl", True)):
            return None
        try:
            kl = kl_divergence(gsite["fn"], msite["fn"])
        except NotImplementedError:
            return None
        return jnp.broadcast_to(scale_and_mask(kl, scale=gsite["scale"]),
                                gsite["fn"].batch_shape)

    @staticmethod
    def _rate_dims(name, msite, gsite, closed_form: bool, score) -> jax.Array:
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
        rate = jnp.broadcast_to(rate, gsite["fn"].batch_shape + rate.shape[-1:])
        scale = gsite["scale"]
        return rate if scale is None else rate * jnp.expand_dims(scale, -1)

    # -- score-function terms -------------------------------------------------------------------
    def _has_enumerated_dims(self, value, weight) -> bool:
        return weight is not None and jnp.ndim(value) > self.max_plate_nesting

    def _enumerated_mean(self, value, weight):
        """A per-element array's expectation under the enumeration weights, the enumerated dims
        summed and the plates kept (a value without them is its own)."""
        if not self._has_enumerated_dims(value, weight):
            return value
        value = weight * value
        return jnp.sum(value, tuple(range(jnp.ndim(value) - self.max_plate_nesting)))

    def _provenances(self, param_map, model, guide, args, kwargs, mutable, values):
        """([the scored draws each piece depends on], those the enumeration weight depends on):
        the particle's program run again on abstract values with the draws `values`
        substituted (`numpyro.ops.provenance.eval_provenance`, as NumPyro's TraceGraph_ELBO
        finds its dependencies; no array is computed, and under jit it costs trace time only).
        The keys are fixed: which values a piece reads does not depend on them."""
        def pieces_of(**values):
            guide_trace = self._guide_at(self._enumerated(seed(guide, 0)), param_map, values,
                                         args, kwargs)
            model_trace = trace(substitute(replay(seed(model, 0), guide_trace),
                                           data={**param_map, **mutable})).get_trace(*args,
                                                                                     **kwargs)
            _, _, pieces = self._parts(model_trace, guide_trace, self._closed_form)
            log_q = _enumeration_log_weight(guide_trace)
            return [p.value for p in pieces], jnp.zeros(()) if log_q is None else log_q

        return eval_provenance(pieces_of, **values)

    def _score_function_terms(self, param_map, model, guide, args, kwargs, guide_trace,
                              mutable, pieces, weight):
        """({scored site: its surrogate, value 0}, {baseline state: new average}) of one
        particle: for each non-reparameterised, non-enumerated guide draw s,

            −Σ_elements ln q_s(z_s) · (c_s − b_s)|stopped  + (b_s's own loss)

        as in the Pyro twin (`_score_function_loss` there): c_s the downstream cost
        (`ppl_vae.objective.downstream`) summed to s's plates, ln q_s unscaled, b_s the
        baseline."""
        sites = {n: s for n, s in guide_trace.items() if _is_scored(s)}
        if not sites:
            return {}, {}
        provenances, enumerated = self._provenances(
            param_map, model, guide, args, kwargs, mutable,
            {n: s["value"] for n, s in sites.items()})
        provenances = [p | (enumerated if self._has_enumerated_dims(piece.value, weight)
                            else frozenset()) for p, piece in zip(provenances, pieces)]
        costs = downstream(pieces, provenances, sites, self.beta, self.lam)
        stop = jax.lax.stop_gradient
        weight = None if weight is None else stop(weight)
        surrogate, state = {}, {}
        for name, site in sites.items():
            score = site["fn"].log_prob(site["value"])  # unscaled (masks are inside fn)
            if weight is not None and jnp.ndim(score) > self.max_plate_nesting:
                raise score_inside_enumeration(name)
            cost = MultiFrameTensor()
            for stack, value in costs[name]:
                cost.add((stack, self._enumerated_mean(stop(value), weight)))
            if not cost:  # nothing depends on the draw: no term
                continue
            cost = cost.sum_to(site["cond_indep_stack"])
            options = baseline_options(name, site["infer"])
            average = self._baseline_average(name, guide_trace, param_map, cost) \
                if options.decaying else None
            signal, baseline_loss, average = baselined_signal(name, options, cost, average,
                                                              stop)
            if average is not None:
                state[BASELINE_AVERAGE + name] = average
            term = -jnp.sum(score * stop(signal)) + baseline_loss
            surrogate[name] = term - stop(term)
        return surrogate, state

    def _check_score_function(self, guide_trace) -> None:
        """Refuse the objectives without a score-function term where the guide has a site that
        needs one (`ppl_vae.objective.check_score_function`)."""
        scored = [(n, s) for n, s in guide_trace.items() if _is_scored(s)]
        if scored:
            name, site = scored[0]
            check_score_function(name, type(site["fn"]).__name__, self.bound, self.free_bits,
                                 self.capacity_weight, self.multi_sample_guide)

    @staticmethod
    def _baseline_average(name, guide_trace, param_map, cost):
        """The decaying average of site `name` so far: the guide's mutable site of
        that name (SVI substitutes the state it carries), else the parameter of that name;
        zeros when its shape is not the cost's (a new batch shape starts it again)."""
        key = BASELINE_AVERAGE + name
        site = guide_trace.get(key)
        if site is not None and site["type"] == "mutable":
            average = site["value"]
        elif key in param_map:
            average = param_map[key]
        else:
            raise missing_baseline_average(name, tuple(jnp.shape(cost)))
        if jnp.shape(average) != jnp.shape(cost):
            return jnp.zeros_like(cost)
        return average

    # -- the ELBO -------------------------------------------------------------------------------
    def _elbo_particle(self, rng_key, param_map, model, guide, args, kwargs, sizes: dict):
        """(Σ of each term, Σ of each free-bits site's rate per dimension, mutable state, the
        score-function surrogates {site: value 0}) of one particle; `sizes` gets the batch size
        B of the sites that need it."""
        if self.multi_sample_guide:
            return self._multi_sample_particle(rng_key, param_map, model, guide, args, kwargs)
        model_trace, guide_trace, mutable, _, seeded_guide = self._traces(
            rng_key, param_map, model, guide, args, kwargs)
        self._check_score_function(guide_trace)  # (before the parts: free bits fail first)
        if self._closed_form and not any(
                site["type"] == "sample" and site["infer"].get("analytic_kl") is False
                for site in guide_trace.values()):
            # TraceMeanField_ELBO's check (a guide marking sites analytic_kl=False has said
            # where the closed form would be wrong, as the spec builder does)
            _check_mean_field_requirement(model_trace, guide_trace)
        score = None
        if self.gradient == "stl":
            drawn = {n: jax.lax.stop_gradient(s["value"]) for n, s in guide_trace.items()
                     if _is_drawn(s) or _is_scored(s)}
            score = self._guide_at(seeded_guide, param_map, drawn, args, kwargs)
        parts, dims, pieces = self._parts(model_trace, guide_trace, self._closed_form, score)
        weight = _enumeration_weight(guide_trace)
        surrogate, state = self._score_function_terms(
            param_map, model, guide, args, kwargs, guide_trace,
            {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"},
            pieces, weight)

        def expectation(value, event=0):
            """Σ of a per-element array under the enumeration weights (its last `event` dims
            kept). A value without the enumerated dims (left of the plates) does not depend on
            the enumerated sites: its expectation is itself (weighting a value outside the data
            plate, such as M2's cross-entropy factor, would multiply it by the batch size)."""
            if weight is not None and jnp.ndim(value) - event > self.max_plate_nesting:
                value = jnp.reshape(weight, weight.shape + (1,) * event) * value
            return jnp.sum(value, tuple(range(jnp.ndim(value) - event)))

        for name in (*dims, *self.capacity_weight):
            if name in model_trace:
                sizes[name] = _batch_size(model_trace[name])
        return ({k: expectation(v) for k, v in parts.items()},
                {k: expectation(v, 1) for k, v in dims.items()}, mutable | state, surrogate)

    def _multi_sample_particle(self, rng_key, param_map, model, guide, args, kwargs):
        """`_elbo_particle` for a guide that proposes several samples of each site (a leading
        dim), as NumPyro's Trace_ELBO(multi_sample_guide=True) scores it: the model runs at
        each sample (vmap; the guide's plates substituted, so subsampling is shared) and its
        log-densities are summed over the samples; the guide's are taken once. Monte Carlo
        rates: rate/<site> = Σ ln q − Σ_samples Σ ln p."""
        model_seed, guide_seed = random.split(rng_key)
        guide_trace = trace(substitute(seed(guide, guide_seed), data=param_map)).get_trace(
            *args, **kwargs)
        self._check_score_function(guide_trace)
        mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
        params = {**param_map, **mutable}
        plates = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "plate"}
        latents = {n: s["value"] for n, s in guide_trace.items()
                   if (s["type"] == "sample" and jnp.size(s["value"]) > 0)
                   or s["type"] == "deterministic"}
        samples = [s for s in guide_trace.values() if s["type"] == "sample"]
        if not samples:
            raise ValueError("guide is missing `sample` sites.")
        observed: dict[str, bool] = {}  # filled while vmap traces the model (static facts)

        def model_log_probs(key, latent):
            with seed(rng_seed=key), substitute(data={**latent, **plates}):
                model_trace = trace(substitute(model, data=params)).get_trace(*args, **kwargs)
            _validate_model(model_trace, plate_warning="loose")
            out = {}
            for name, site in model_trace.items():
                if site["type"] == "sample":
                    observed[name] = site["is_observed"]
                    out[name] = jnp.sum(_log_prob(site))
            return out

        keys = random.split(model_seed, jnp.shape(samples[0]["value"])[0])
        log_p = {n: jnp.sum(v) for n, v in jax.vmap(model_log_probs)(keys, latents).items()}
        parts = {}
        for name, value in log_p.items():
            gsite = guide_trace.get(name)
            if observed[name]:
                parts[f"distortion/{name}"] = -value
            elif gsite is None or gsite["type"] != "sample":
                raise missing_guide_site(name, "numpyro")
            else:
                parts[f"rate/{name}"] = jnp.sum(_log_prob(gsite)) - value
        for name, gsite in guide_trace.items():
            if gsite["type"] == "sample" and name not in log_p:
                role = "aux" if gsite["is_observed"] else "rate"
                parts[f"{role}/{name}"] = jnp.sum(_log_prob(gsite))
        return parts, {}, mutable, {}

    def _elbo_terms(self, rng_key, param_map, model, guide, args, kwargs):
        sizes: dict = {}

        def particle(key):
            return self._elbo_particle(key, param_map, model, guide, args, kwargs, sizes)

        if self.num_particles == 1:
            total, dims, mutable, surrogate = particle(rng_key)
        else:
            keys = random.split(rng_key, self.num_particles)
            total, dims, mutable, surrogate = self.vectorize_particles_fn(particle, keys)
            total, dims, surrogate = jax.tree.map(lambda x: jnp.mean(x, 0),
                                                  (total, dims, surrogate))
            # the baselines' averages: the particles' mean; other state is dropped, with the
            # stock warning
            averages = {k: jnp.mean(v, 0) for k, v in mutable.items()
                        if k.startswith(BASELINE_AVERAGE)}
            if len(averages) < len(mutable):
                warnings.warn("mutable state is currently ignored when num_particles > 1.",
                              stacklevel=4)
            mutable = averages
        zero = jnp.zeros((), jnp.result_type(*total.values()) if total else float)
        options = dict(free_bits=self.free_bits, capacity_weight=self.capacity_weight,
                       capacity=self.capacity, rate_dims=dims, batch_sizes=sizes)
        terms = weighted_terms(total, self.beta, self.lam, zero, **options)
        terms["loss"] = terms["loss"] + sum(surrogate.values(), zero)
        return terms, mutable or None, options, surrogate

    # -- the importance-weighted bound ------------------------------------------------------------
    def _iwae_particle(self, rng_key, param_map, model, guide, args, kwargs):
        """Per-element arrays of one particle, all of one shape (enumerated values…, plates…):
        ``log_w`` (ln q of the enumerated values + ln w), ``path`` (DReG), ``part/<key>`` the
        terms; and the aux terms, summed."""
        model_trace, guide_trace, _, seeded_model, seeded_guide = self._traces(
            rng_key, param_map, model, guide, args, kwargs)
        self._check_score_function(guide_trace)
        dreg = self.gradient == "dreg"
        path = None
        if dreg:
            parts, path = self._dreg_path(param_map, seeded_model, seeded_guide, guide_trace,
                                          args, kwargs)
        else:
            parts, _, _ = self._parts(model_trace, guide_trace, False)
        sum_dims = _element_dims(model_trace, guide_trace)
        aux = {k: jnp.sum(v) for k, v in parts.items() if k.startswith("aux/")}
        parts = {k: _within_example(v, sum_dims) for k, v in parts.items()
                 if not k.startswith("aux/")}
        log_w = log_weight(parts, self.beta, self.lam)
        log_q = _enumeration_log_weight(guide_trace)
        if log_q is not None:
            log_w = log_w + log_q
        shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in parts.values()), jnp.shape(log_w),
                                     *(() if path is None else (jnp.shape(path),)))
        if dreg and self.max_plate_nesting is not None:
            for name, site in guide_trace.items():
                lq = jnp.shape(_log_prob(site)) if _is_drawn(site) else None
                if lq is not None and any(
                        (lq[d] if -len(lq) <= d else 1) != shape[d]
                        for d in range(-len(shape), -self.max_plate_nesting)):
                    raise shared_across_enumeration(name)
        out = {"log_w": jnp.broadcast_to(log_w, shape)}
        if path is not None:
            out["path"] = jnp.broadcast_to(_within_example(path, sum_dims), shape)
        out |= {f"part/{k}": jnp.broadcast_to(v, shape) for k, v in parts.items()}
        return out, aux

    def _dreg_path(self, param_map, seeded_model, seeded_guide, guide_trace, args, kwargs):
        """DReG (Tucker et al. 2019), as in the Pyro twin: (the per-element terms with the
        model at stopped copies z' of the draws and the draws' ln q stopped, the per-element
        path term ⟨∂ln w/∂z'|_{z'=z}, z − z̄⟩: value 0, its gradient the path derivative of
        ln w, ψ in ln q held fixed)."""
        drawn = {n: s["value"] for n, s in guide_trace.items() if _is_drawn(s)}

        def at(values):
            guide_at = self._guide_at(seeded_guide, param_map, values, args, kwargs)
            model_at = trace(substitute(replay(seeded_model, guide_at), data=param_map)
                             ).get_trace(*args, **kwargs)
            parts, _, _ = self._parts(model_at, guide_at, False)
            lw = log_weight({k: v for k, v in parts.items() if not k.startswith("aux/")},
                            self.beta, self.lam)
            # the value's terms: the model's at z' (θ's gradient), the draws' ln q stopped,
            # the enumerated sites' and the aux terms as the guide gave them
            return jnp.sum(lw), self._parts(model_at, guide_trace, False, detach_q=True)[0]

        (_, parts), grads = jax.value_and_grad(at, has_aux=True)(jax.lax.stop_gradient(drawn))
        path = 0.0
        for name, value in drawn.items():
            event = guide_trace[name]["fn"].event_dim
            term = jax.lax.stop_gradient(grads[name]) * (value - jax.lax.stop_gradient(value))
            path = path + jnp.sum(term, tuple(range(-event, 0)))
        return parts, path

    def _iwae_terms(self, rng_key, param_map, model, guide, args, kwargs):
        # the keys as RenyiELBO splits them, so that the draws are its draws
        plate_key, rng_key = random.split(rng_key)
        hide = ["sample", "prng_key", "control_flow"]
        model = seed(model, plate_key, hide_types=hide)
        guide = seed(guide, plate_key, hide_types=hide)
        keys = random.split(rng_key, self.num_particles)
        element, aux = self.vectorize_particles_fn(
            lambda key: self._iwae_particle(key, param_map, model, guide, args, kwargs), keys)
        log_w = element["log_w"]  # (K, enumerated values…, plates…)
        plates = (log_w.ndim - 1 if self.max_plate_nesting is None
                  else min(self.max_plate_nesting, log_w.ndim - 1))
        reduce = (0, *range(1, log_w.ndim - plates))
        normaliser = logsumexp(log_w, reduce, keepdims=True)
        weights = jax.lax.stop_gradient(jnp.exp(log_w - normaliser))  # w̃ over (k, values)
        if "path" in element:  # Σ_k w̃_k² ∂ln w_k/∂z_k ∂z_k/∂ψ
            normaliser = logsumexp(log_w + weights * element["path"], reduce, keepdims=True)
        bound = jnp.sum(normaliser - math.log(self.num_particles))
        terms = {k[len("part/"):]: jnp.sum(weights * v) for k, v in element.items()
                 if k.startswith("part/")}
        terms |= {k: jnp.mean(v) for k, v in aux.items()}
        return bound_terms(terms, bound, jnp.zeros((), bound.dtype)), None, {}, {}

    # -- public API ---------------------------------------------------------------------------
    def _terms_and_state(self, rng_key, param_map, model, guide, args, kwargs):
        if self.bound == "iwae":
            return self._iwae_terms(rng_key, param_map, model, guide, args, kwargs)
        return self._elbo_terms(rng_key, param_map, model, guide, args, kwargs)

    def differentiable_terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """The loss and its parts, summed over the batch, in nats: ``loss`` (the training
        objective, to minimise), ``rate``, ``distortion``, ``aux`` (unweighted totals) and
        ``rate/<site>``, ``distortion/<site>``, ``aux/<site>``; ELBO: averaged over particles,
        IWAE: ``loss`` = −L_K + aux and the rates and distortions self-normalised (Σ_k w̃_k ·
        term_k, w̃ stopped). Differentiable: take `jax.grad` of any of them (what a training
        step does); ``loss`` carries the score-function terms (value 0) of non-reparameterised
        sites, the parts do not."""
        return self._terms_and_state(rng_key, param_map, model, guide, args, kwargs)[0]

    def terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """`differentiable_terms` for reading, as in the Pyro twin: the same values with their
        gradients stopped (`jax.lax.stop_gradient`), so `jax.grad` of them is zero.
        Differentiate `differentiable_terms` or `loss`."""
        return jax.lax.stop_gradient(self.differentiable_terms(rng_key, param_map, model, guide,
                                                               *args, **kwargs))

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The weighted loss (−ELBO at β = λ = 1); with ``sum_sites=False`` a dict {site: its
        weighted part}, as the stock ELBO's."""
        return self.loss_with_mutable_state(rng_key, param_map, model, guide, *args,
                                            **kwargs)["loss"]

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """{"loss", "mutable_state"}: the state of mutable sites (flax BatchNorm,
        the decaying-average baselines) after this step, as the stock ELBO returns it (None
        when there is none; with num_particles > 1 only the baselines', with the stock
        warning)."""
        t, mutable, options, surrogate = self._terms_and_state(rng_key, param_map, model, guide,
                                                               args, kwargs)
        if self.sum_sites:
            loss = t["loss"]
        else:  # each site's score-function term (value 0) goes with the site's part
            loss = per_site_loss(t, self.beta, self.lam, **options)
            for site, term in surrogate.items():
                loss[site] = loss.get(site, 0.0) + term
        return {"loss": loss, "mutable_state": mutable}
