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

import jax
import jax.numpy as jnp
from jax import random
from numpyro.distributions import kl_divergence
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO

from ppl_vae.objective import (
    missing_guide_site,
    not_reparameterised,
    stray_guide_site,
    weighted_terms,
)


def _log_prob_sum(site) -> jax.Array:
    """Σ ln p of a site, scaled as the site says (plates, handlers.scale); masks are inside fn."""
    if site["intermediates"]:
        log_prob = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        log_prob = site["fn"].log_prob(site["value"])
    return jnp.sum(scale_and_mask(log_prob, site["scale"]))


class ScaledELBO(ELBO):
    """β · rate + λ · distortion + aux, as a NumPyro ELBO (see the module docstring).

    :param beta: weight of the rate; a number, a (traced) array, or {latent site: number}.
    :param lam: weight of the distortion; likewise, keyed by distortion site.
    :param num_particles: Monte Carlo draws of the latents (averaged).
    :param analytic_kl: closed-form KL(q‖p) for the rate where registered, except at guide
        sites marked ``infer={"analytic_kl": False}`` (see the Pyro twin: bottom-up inference).
    :param vectorize_particles: as in `numpyro.infer.ELBO` (vmap by default).
    """

    def __init__(self, beta=1.0, lam=1.0, num_particles: int = 1, analytic_kl: bool = True,
                 vectorize_particles=True):
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.beta, self.lam, self.analytic_kl = beta, lam, analytic_kl

    def with_weights(self, beta, lam) -> ScaledELBO:
        """The same estimator with other β and λ (numbers or traced arrays)."""
        other = copy.copy(self)
        other.beta, other.lam = beta, lam
        return other

    # -- one particle ----------------------------------------------------------------------------
    def _particle_terms(self, rng_key, param_map, model, guide, args, kwargs) -> dict:
        model_seed, guide_seed = random.split(rng_key)  # as the stock ELBOs split it
        guide_trace = trace(substitute(seed(guide, guide_seed), data=param_map)).get_trace(
            *args, **kwargs)
        model_trace = trace(substitute(replay(seed(model, model_seed), guide_trace),
                                       data=param_map)).get_trace(*args, **kwargs)
        terms = {}
        for name, msite in model_trace.items():
            if msite["type"] != "sample":
                continue
            if msite["is_observed"]:
                terms[f"distortion/{name}"] = -_log_prob_sum(msite)
                continue
            gsite = guide_trace.get(name)
            if gsite is None or gsite["type"] != "sample":
                raise missing_guide_site(name, "numpyro")
            if not gsite["fn"].has_rsample:
                raise not_reparameterised(name, type(gsite["fn"]).__name__, "NumPyro")
            terms[f"rate/{name}"] = self._rate(msite, gsite)
        for name, gsite in guide_trace.items():
            if gsite["type"] != "sample" or name in model_trace:
                continue
            if gsite["is_observed"] and gsite["infer"].get("is_auxiliary"):
                terms[f"aux/{name}"] = _log_prob_sum(gsite)
            else:
                raise stray_guide_site(name)
        return terms

    def _rate(self, msite, gsite) -> jax.Array:
        if self.analytic_kl and gsite["infer"].get("analytic_kl", True):
            try:
                kl = kl_divergence(gsite["fn"], msite["fn"])
            except NotImplementedError:
                pass
            else:
                return jnp.sum(scale_and_mask(kl, scale=gsite["scale"]))
        return _log_prob_sum(gsite) - _log_prob_sum(msite)

    # -- public API ---------------------------------------------------------------------------
    def terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """The loss and its parts, averaged over particles, summed over the batch, in nats:
        ``loss`` (weighted), ``rate``, ``distortion``, ``aux`` (unweighted totals) and
        ``rate/<site>``, ``distortion/<site>``, ``aux/<site>``."""

        def particle(key):
            return self._particle_terms(key, param_map, model, guide, args, kwargs)

        if self.num_particles == 1:
            total = particle(rng_key)
        else:
            keys = random.split(rng_key, self.num_particles)
            total = jax.tree.map(lambda x: jnp.mean(x, 0),
                                 self.vectorize_particles_fn(particle, keys))
        zero = jnp.zeros((), jnp.result_type(*total.values()) if total else float)
        return weighted_terms(total, self.beta, self.lam, zero)

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs) -> jax.Array:
        """The weighted loss (−ELBO at β = λ = 1)."""
        return self.terms(rng_key, param_map, model, guide, *args, **kwargs)["loss"]

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        return {"loss": self.loss(rng_key, param_map, model, guide, *args, **kwargs),
                "mutable_state": None}
