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

β and λ may be traced: ``ScaledELBO(...).with_weights(beta, lam)`` inside a jitted function
takes them as arguments, so a schedule never recompiles::

    elbo = ScaledELBO(num_particles=1)

    @jax.jit
    def update(params, opt_state, key, y, beta):
        loss = lambda p: elbo.with_weights(beta, 1.0).loss(key, p, model, guide, y)
        value, grads = jax.value_and_grad(loss)(params)
        ...
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
from jax import random
from numpyro.distributions import kl_divergence
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO
from numpyro.primitives import Messenger
from numpyro.util import _validate_model, check_model_guide_match

from ppl_vae.objective import (
    enumeration_needs_plate_nesting,
    missing_guide_site,
    not_reparameterised,
    per_site_loss,
    sequential_enumeration,
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


def _log_prob_sum(site) -> jax.Array:
    return jnp.sum(_log_prob(site))


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


def _enumeration_weight(guide_trace):
    """q of each joint value of the enumerated guide sites, broadcastable against the sites'
    per-example log-densities; None when no site is enumerated."""
    log_q = None
    for name, site in guide_trace.items():
        if site["type"] != "sample" or not site["infer"].get("enumerate"):
            continue
        if "_enumerate_dim" not in site["infer"]:
            raise enumeration_needs_plate_nesting(name)
        lq = site["fn"].log_prob(site["value"])  # the measure: unscaled
        log_q = lq if log_q is None else log_q + lq
    return None if log_q is None else jnp.exp(log_q)


class ScaledELBO(ELBO):
    """β · rate + λ · distortion + aux, as a NumPyro ELBO (see the module docstring).

    :param beta: weight of the rate; a number, a (traced) array, or {latent site: number}.
    :param lam: weight of the distortion; likewise, keyed by distortion site.
    :param num_particles: Monte Carlo draws of the latents (averaged).
    :param analytic_kl: closed-form KL(q‖p) for the rate where registered, except at guide
        sites marked ``infer={"analytic_kl": False}`` (see the Pyro twin: bottom-up inference).
    :param vectorize_particles: as in `numpyro.infer.ELBO` (vmap by default).
    :param max_plate_nesting: the number of nested plates; needed (only) to enumerate guide
        sites marked ``infer={"enumerate": "parallel"}``.
    :param sum_sites: as in the stock ELBOs: False makes `loss` a dict {site: weighted part}.
    :param multi_sample_guide: accepted for the stock signature; True is refused.
    """

    def __init__(self, beta=1.0, lam=1.0, num_particles: int = 1, analytic_kl: bool = True,
                 vectorize_particles=True, max_plate_nesting=None,
                 multi_sample_guide: bool = False, sum_sites: bool = True):
        if multi_sample_guide:
            raise NotImplementedError(
                "ScaledELBO: multi_sample_guide=True (a guide that proposes several samples of "
                "each site) is not supported; use the stock Trace_ELBO for such a guide.")
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.beta, self.lam, self.analytic_kl = beta, lam, analytic_kl
        self.max_plate_nesting = max_plate_nesting
        self.multi_sample_guide, self.sum_sites = multi_sample_guide, sum_sites

    def with_weights(self, beta, lam) -> ScaledELBO:
        """The same estimator with other β and λ (numbers or traced arrays)."""
        other = copy.copy(self)
        other.beta, other.lam = beta, lam
        return other

    # -- one particle ----------------------------------------------------------------------------
    def _particle_terms(self, rng_key, param_map, model, guide, args, kwargs) -> dict:
        model_seed, guide_seed = random.split(rng_key)  # as the stock ELBOs split it
        seeded_guide = seed(guide, guide_seed)
        if self.max_plate_nesting is not None:
            # outside the seed, as TraceEnum_ELBO wraps it: an enumerated site still takes its
            # key, so the continuous draws are TraceEnum_ELBO's
            seeded_guide = enumerate_parallel(seeded_guide, -1 - self.max_plate_nesting)
        guide_trace = trace(substitute(seeded_guide, data=param_map)).get_trace(*args, **kwargs)
        # mutable state (flax BatchNorm's batch_stats): the guide's new values feed the model,
        # and both come back, as in the stock Trace_ELBO
        mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
        model_trace = trace(substitute(replay(seed(model, model_seed), guide_trace),
                                       data={**param_map, **mutable})).get_trace(*args, **kwargs)
        mutable |= {n: s["value"] for n, s in model_trace.items() if s["type"] == "mutable"}
        weight = _enumeration_weight(guide_trace)
        if weight is None:  # the stock ELBOs' checks (an enumerated trace has other shapes)
            check_model_guide_match(model_trace, guide_trace)
            _validate_model(model_trace, plate_warning="loose")

        def total(value):
            """Σ of a per-example array under the enumeration weights. A value without the
            enumerated dims (left of the plates) does not depend on the enumerated sites: its
            expectation is itself (weighting a value outside the data plate, such as M2's
            cross-entropy factor, would multiply it by the batch size)."""
            if weight is None or jnp.ndim(value) <= self.max_plate_nesting:
                return jnp.sum(value)
            return jnp.sum(weight * value)

        terms = {}
        for name, msite in model_trace.items():
            if msite["type"] != "sample":
                continue
            if msite["is_observed"]:
                terms[f"distortion/{name}"] = -total(_log_prob(msite))
                continue
            gsite = guide_trace.get(name)
            if gsite is None or gsite["type"] != "sample":
                raise missing_guide_site(name, "numpyro")
            if gsite["infer"].get("enumerate"):
                difference = _log_prob(gsite) - _log_prob(msite)
                observed = gsite["infer"].get("observed")
                if observed is None:
                    terms[f"rate/{name}"] = total(difference)
                else:  # known values are data: −ln p; the rest carry the rate
                    terms[f"rate/{name}"] = total(jnp.where(observed, 0.0, difference))
                    terms[f"distortion/{name}"] = -total(
                        jnp.where(observed, _log_prob(msite), 0.0))
                continue
            if not gsite["fn"].has_rsample:
                raise not_reparameterised(name, type(gsite["fn"]).__name__, "NumPyro")
            terms[f"rate/{name}"] = self._rate(msite, gsite, total)
        for name, gsite in guide_trace.items():
            if gsite["type"] != "sample" or name in model_trace:
                continue
            if gsite["is_observed"] and gsite["infer"].get("is_auxiliary"):
                terms[f"aux/{name}"] = total(_log_prob(gsite))
            elif gsite["infer"].get("is_auxiliary"):
                # a guide-only latent (an AutoGuide's joint draw, `_Auto…_latent`): its ln q is
                # part of ln q(z|y), so of the rate (see the Pyro twin)
                terms[f"rate/{name}"] = total(_log_prob(gsite))
            else:
                raise stray_guide_site(name)
        return terms, mutable

    def _rate(self, msite, gsite, total) -> jax.Array:
        if self.analytic_kl and gsite["infer"].get("analytic_kl", True):
            try:
                kl = kl_divergence(gsite["fn"], msite["fn"])
            except NotImplementedError:
                pass
            else:
                return total(scale_and_mask(kl, scale=gsite["scale"]))
        return total(_log_prob(gsite) - _log_prob(msite))

    # -- public API ---------------------------------------------------------------------------
    def _terms_and_state(self, rng_key, param_map, model, guide, args, kwargs):
        def particle(key):
            return self._particle_terms(key, param_map, model, guide, args, kwargs)

        if self.num_particles == 1:
            total, mutable = particle(rng_key)
        else:
            keys = random.split(rng_key, self.num_particles)
            total, mutable = self.vectorize_particles_fn(particle, keys)
            total = jax.tree.map(lambda x: jnp.mean(x, 0), total)
            if mutable:
                warnings.warn("mutable state is currently ignored when num_particles > 1.",
                              stacklevel=3)
            mutable = {}
        zero = jnp.zeros((), jnp.result_type(*total.values()) if total else float)
        return weighted_terms(total, self.beta, self.lam, zero), mutable or None

    def differentiable_terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """The loss and its parts, averaged over particles, summed over the batch, in nats:
        ``loss`` (weighted, to minimise), ``rate``, ``distortion``, ``aux`` (unweighted totals)
        and ``rate/<site>``, ``distortion/<site>``, ``aux/<site>``. Differentiable: take
        `jax.grad` of any of them (what a training step does)."""
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
        t, mutable = self._terms_and_state(rng_key, param_map, model, guide, args, kwargs)
        loss = t["loss"] if self.sum_sites else per_site_loss(t, self.beta, self.lam)
        return {"loss": loss, "mutable_state": mutable}

