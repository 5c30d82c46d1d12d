"""`ScaledELBO` for NumPyro: loss = β · rate + λ · distortion + aux(encoder only), in nats.

The twin of `ppl_vae.pyro.elbo.ScaledELBO`, with the same site roles:

* latent: sample sites in both guide and model → β · (ln q − ln p), or β · KL(q‖p) when
  ``analytic_kl=True``, `kl_divergence` is registered for the pair and the guide site does not
  say ``infer={"analytic_kl": False}`` (else Monte Carlo, as `TraceMeanField_ELBO` does);
* distortion: observed sample sites and factor sites of the model → λ · (−log-density);
* aux: factor sites of the guide only → + their value (a guide factor enters ln q, so a value f
  adds +f to the loss, exactly as in the stock `Trace_ELBO`).

Sign convention: the loss is minimised; at β = λ = 1 with no aux site it is −ELBO and equals
`Trace_ELBO` (`TraceMeanField_ELBO` with ``analytic_kl=True``) for the same ``rng_key`` — the
keys are split exactly as there. With β = b it equals the stock ELBO under
``handlers.scale(scale=b)`` on the latent sites of model and guide (Higgins et al. 2017).

Discrete latents are summed out exactly, as in the Pyro twin: a guide site marked
``infer={"enumerate": "parallel"}`` takes its whole support in a dimension left of the plates
(``max_plate_nesting`` says where they end; done here without funsor), every term becomes an
expectation under q of those values and the site's own rate is KL(q ‖ p) exactly;
``infer={..., "observed": mask}`` marks examples whose value is known (the guide's mass is on it):
their term is the distortion −ln p(value). At β = λ = 1 it equals NumPyro's `TraceEnum_ELBO`.

``bound="iwae"`` (the importance-weighted bound, equal to ``RenyiELBO(alpha=0)`` at β = λ = 1
for the same key: the keys are split as there), ``gradient="stl"`` / ``"dreg"``, ``free_bits``
and ``capacity_weight`` / ``capacity`` mean what they mean in the Pyro twin (its docstring gives
the estimators and objectives, and where each applies).

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

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import random
from jax.scipy.special import logsumexp
from numpyro.distributions import kl_divergence
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO
from numpyro.primitives import Messenger
from numpyro.util import _validate_model, check_model_guide_match

from ppl_vae.objective import (
    bound_terms,
    check_estimator,
    enumeration_needs_plate_nesting,
    free_bits_for,
    log_weight,
    missing_guide_site,
    not_factorised,
    not_reparameterised,
    per_site_loss,
    sequential_enumeration,
    shared_across_enumeration,
    stray_guide_site,
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


def _is_drawn(site) -> bool:
    """A reparameterised latent draw of the guide (what STL and DReG differentiate through)."""
    return (site["type"] == "sample" and not site["is_observed"]
            and not site["infer"].get("enumerate") and site["fn"].has_rsample)


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
    `numpyro.contrib.funsor.enum` does for guide sites, without funsor."""

    def __init__(self, fn=None, first_available_dim: int = -2):
        self.next_dim = first_available_dim
        super().__init__(fn)

    def process_message(self, msg):
        enumerate_ = msg["infer"].get("enumerate") if msg["type"] == "sample" else None
        if enumerate_ is None or msg["is_observed"]:
            return
        if enumerate_ != "parallel":
            raise sequential_enumeration(msg["name"])
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
    for name, site in guide_trace.items():
        if site["type"] != "sample" or not site["infer"].get("enumerate"):
            continue
        if "_enumerate_dim" not in site["infer"]:
            raise enumeration_needs_plate_nesting(name)
        lq = site["fn"].log_prob(site["value"])  # the measure: unscaled
        log_q = lq if log_q is None else log_q + lq
    return log_q


def _enumeration_weight(guide_trace):
    """q of each joint value of the enumerated guide sites, broadcastable against the sites'
    per-example log-densities; None when no site is enumerated."""
    log_q = _enumeration_log_weight(guide_trace)
    return None if log_q is None else jnp.exp(log_q)


class ScaledELBO(ELBO):
    """β · rate + λ · distortion + aux, as a NumPyro ELBO (see the module docstring).

    :param beta: weight of the rate; a number, a (traced) array, or {latent site: number}.
    :param lam: weight of the distortion; likewise, keyed by distortion site.
    :param num_particles: Monte Carlo draws of the latents (averaged; K of the IWAE bound).
    :param analytic_kl: closed-form KL(q‖p) for the rate where registered, except at guide
        sites marked ``infer={"analytic_kl": False}`` (see the Pyro twin: bottom-up inference).
        ``bound="elbo"`` with ``gradient="reparam"`` only (STL and the IWAE bound are defined
        on the Monte Carlo ln q − ln p).
    :param bound: ``"elbo"`` or ``"iwae"`` (see the module docstring).
    :param gradient: ``"reparam"``, ``"stl"`` (elbo) or ``"dreg"`` (iwae).
    :param free_bits: nats per dimension, a number (every reparameterised latent site) or
        {site: nats}: the site's rate enters the loss as Σ_i max(λ, batch-mean rate_i) · B.
    :param capacity_weight: {site: γ}: the site's β · rate becomes γ · |rate / B − C| · B.
    :param capacity: {site: C} (nats per example; numbers or traced arrays, as β: set per step
        with `with_weights`); sites with a weight and no target get C = 0.
    :param vectorize_particles: as in `numpyro.infer.ELBO` (vmap by default).
    :param max_plate_nesting: the number of nested plates; needed (only) to enumerate guide
        sites marked ``infer={"enumerate": "parallel"}``.
    :param sum_sites: as in the stock ELBOs: False makes `loss` a dict {site: weighted part}
        (not with ``bound="iwae"``, which has no per-site parts).
    :param multi_sample_guide: accepted for the stock signature; True is refused.
    """

    def __init__(self, beta=1.0, lam=1.0, num_particles: int = 1, analytic_kl: bool = True,
                 bound: str = "elbo", gradient: str = "reparam", free_bits=None,
                 capacity_weight=None, capacity=None, vectorize_particles=True,
                 max_plate_nesting=None, multi_sample_guide: bool = False,
                 sum_sites: bool = True):
        if multi_sample_guide:
            raise NotImplementedError(
                "ScaledELBO: multi_sample_guide=True (a guide that proposes several samples of "
                "each site) is not supported; use the stock Trace_ELBO for such a guide.")
        check_estimator(bound, gradient, free_bits, capacity_weight, sum_sites)
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
        seeded_guide = self._enumerated(seed(guide, guide_seed))
        guide_trace = trace(substitute(seeded_guide, data=param_map)).get_trace(*args, **kwargs)
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
        if self.max_plate_nesting is None:
            return seeded_guide
        first = -1 - self.max_plate_nesting

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
        "aux/<site>"}; and, for the sites with free bits, {site: (..., d) rate per dimension}.
        `score_trace` (STL) and `detach_q` (DReG's value) as in the Pyro twin."""
        parts, dims = {}, {}

        def log_q(name, gsite):
            if score_trace is not None and _is_drawn(gsite):
                return _path(_log_prob(gsite), _log_prob(score_trace[name]))
            if detach_q and _is_drawn(gsite):
                return jax.lax.stop_gradient(_log_prob(gsite))
            return _log_prob(gsite)

        for name, msite in model_trace.items():
            if msite["type"] != "sample":
                continue
            if msite["is_observed"]:
                parts[f"distortion/{name}"] = -_log_prob(msite)
                continue
            gsite = guide_trace.get(name)
            if gsite is None or gsite["type"] != "sample":
                raise missing_guide_site(name, "numpyro")
            if gsite["infer"].get("enumerate"):
                difference = _log_prob(gsite) - _log_prob(msite)
                observed = gsite["infer"].get("observed")
                if observed is None:
                    parts[f"rate/{name}"] = difference
                else:  # known values are data: −ln p; the rest carry the rate
                    parts[f"rate/{name}"] = jnp.where(observed, 0.0, difference)
                    parts[f"distortion/{name}"] = -jnp.where(observed, _log_prob(msite), 0.0)
                continue
            if not gsite["fn"].has_rsample:
                raise not_reparameterised(name, type(gsite["fn"]).__name__, "NumPyro")
            if free_bits_for(self.free_bits, name) > 0:
                score = None if score_trace is None else score_trace[name]
                dims[name] = self._rate_dims(name, msite, gsite, closed_form, score)
                parts[f"rate/{name}"] = jnp.sum(dims[name], -1)
            else:
                parts[f"rate/{name}"] = self._rate(msite, gsite, closed_form,
                                                   log_q(name, gsite))
        for name, gsite in guide_trace.items():
            if gsite["type"] != "sample" or name in model_trace:
                continue
            if gsite["is_observed"] and gsite["infer"].get("is_auxiliary"):
                parts[f"aux/{name}"] = _log_prob(gsite)
            elif gsite["infer"].get("is_auxiliary"):
                # a guide-only latent (an AutoGuide's joint draw, `_Auto…_latent`): its ln q is
                # part of ln q(z|y), so of the rate (see the Pyro twin)
                parts[f"rate/{name}"] = log_q(name, gsite)
            else:
                raise stray_guide_site(name)
        return parts, dims

    @staticmethod
    def _rate(msite, gsite, closed_form: bool, log_q) -> jax.Array:
        if closed_form and gsite["infer"].get("analytic_kl", True):
            try:
                kl = kl_divergence(gsite["fn"], msite["fn"])
            except NotImplementedError:
                pass
            else:
                return scale_and_mask(kl, scale=gsite["scale"])
        return log_q - _log_prob(msite)

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

    # -- the ELBO -------------------------------------------------------------------------------
    def _elbo_particle(self, rng_key, param_map, model, guide, args, kwargs, sizes: dict):
        """(Σ of each term, Σ of each free-bits site's rate per dimension, mutable state) of
        one particle; `sizes` gets the batch size B of the sites that need it."""
        model_trace, guide_trace, mutable, _, seeded_guide = self._traces(
            rng_key, param_map, model, guide, args, kwargs)
        score = None
        if self.gradient == "stl":
            drawn = {n: jax.lax.stop_gradient(s["value"]) for n, s in guide_trace.items()
                     if _is_drawn(s)}
            score = self._guide_at(seeded_guide, param_map, drawn, args, kwargs)
        parts, dims = self._parts(model_trace, guide_trace, self._closed_form, score)
        weight = _enumeration_weight(guide_trace)

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
                {k: expectation(v, 1) for k, v in dims.items()}, mutable)

    def _elbo_terms(self, rng_key, param_map, model, guide, args, kwargs):
        sizes: dict = {}

        def particle(key):
            return self._elbo_particle(key, param_map, model, guide, args, kwargs, sizes)

        if self.num_particles == 1:
            total, dims, mutable = particle(rng_key)
        else:
            keys = random.split(rng_key, self.num_particles)
            total, dims, mutable = self.vectorize_particles_fn(particle, keys)
            total, dims = jax.tree.map(lambda x: jnp.mean(x, 0), (total, dims))
            if mutable:
                warnings.warn("mutable state is currently ignored when num_particles > 1.",
                              stacklevel=4)
            mutable = {}
        zero = jnp.zeros((), jnp.result_type(*total.values()) if total else float)
        options = dict(free_bits=self.free_bits, capacity_weight=self.capacity_weight,
                       capacity=self.capacity, rate_dims=dims, batch_sizes=sizes)
        return weighted_terms(total, self.beta, self.lam, zero, **options), mutable or None, \
            options

    # -- the importance-weighted bound ------------------------------------------------------------
    def _iwae_particle(self, rng_key, param_map, model, guide, args, kwargs):
        """Per-element arrays of one particle, all of one shape (enumerated values…, plates…):
        ``log_w`` (ln q of the enumerated values + ln w), ``path`` (DReG), ``part/<key>`` the
        terms; and the aux terms, summed."""
        model_trace, guide_trace, _, seeded_model, seeded_guide = self._traces(
            rng_key, param_map, model, guide, args, kwargs)
        dreg = self.gradient == "dreg"
        path = None
        if dreg:
            parts, path = self._dreg_path(param_map, seeded_model, seeded_guide, guide_trace,
                                          args, kwargs)
        else:
            parts, _ = self._parts(model_trace, guide_trace, False)
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
            parts, _ = self._parts(model_at, guide_at, False)
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
        return bound_terms(terms, bound, jnp.zeros((), bound.dtype)), None, {}

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
        step does)."""
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
        """{"loss", "mutable_state"}: the state of ``numpyro.mutable`` sites (flax BatchNorm)
        after this step, as the stock ELBO returns it (None when there is none, and with
        num_particles > 1, with the stock warning)."""
        t, mutable, options = self._terms_and_state(rng_key, param_map, model, guide, args,
                                                    kwargs)
        loss = t["loss"] if self.sum_sites else per_site_loss(t, self.beta, self.lam,
                                                              **options)
        return {"loss": loss, "mutable_state": mutable}
