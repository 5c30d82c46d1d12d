"""`build(spec)`: the Flax networks of a spec and its one generative program
(`ppl_vae.program`) over NumPyro's primitives.

Parameters live in a NumPyro param map: Flax trees ``<module>$params`` (via
`numpyro.contrib.module.flax_module`: ``encoder``, ``encoder_<site>``, ``decoder``, the
conditional priors ``prior`` / ``prior_<site>``, ``aux_<name>``) and arrays ``prior.loc``,
``prior_<site>.log_scale``, ``likelihood.log_scale`` …; `ppl_vae.numpyro.params` converts them
to and from the canonical names shared with the Pyro backend. Call the program's pieces
inside a handler that substitutes the param map.
"""

from __future__ import annotations

from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import flax_module

from ppl_vae import graph
from ppl_vae.numpyro import aux, likelihood
from ppl_vae.numpyro.latents import Concrete, Discrete, IAFStep, lower_cholesky
from ppl_vae.numpyro.networks import build_networks, concat
from ppl_vae.program import Program
from ppl_vae.spec import Spec


class Primitives:
    """NumPyro's side of `ppl_vae.program.Primitives`: effects from `numpyro`, distributions
    from `numpyro.distributions`, Flax modules through `flax_module` (each registers its
    parameters, made from example inputs of the widths the plan gives)."""

    name = "numpyro"
    dist = dist
    likelihood = likelihood
    aux = aux
    concat = staticmethod(concat)
    lower_cholesky = staticmethod(lower_cholesky)
    iaf_step = IAFStep
    discrete = Discrete
    concrete = Concrete

    def __init__(self, networks: dict, temperatures: dict):
        self.networks = networks  # name -> (Flax module, example input shapes or None)
        self.temperatures = temperatures  # relaxed site -> τ (`Built.temperatures_at`)

    def temperature(self, site):
        return jnp.asarray(self.temperatures[site], jnp.result_type(float))

    def enter(self, role: str) -> None:  # flax_module registers as it is called
        pass

    @staticmethod
    def sample(name, fn, obs=None, infer=None):
        return numpyro.sample(name, fn, obs=obs, infer=infer)

    @staticmethod
    def factor(name, value) -> None:
        numpyro.factor(name, value)

    @staticmethod
    def plate(name, size, like):
        return numpyro.plate(name, size)

    @staticmethod
    def param(name, shape, init="zeros"):
        if init == "zeros":
            return numpyro.param(name, jnp.zeros(shape))
        draw = {"normal": jax.random.normal, "uniform": jax.random.uniform}[init]
        return numpyro.param(name, lambda key: draw(key, shape))  # the param's own key

    def network(self, name):
        module, shapes = self.networks[name]
        examples = [None if s is None else jnp.ones(s) for s in shapes]
        net = flax_module(name, module, *examples)

        def call(*args, method=None):
            return net(*args, method=method) if method else net(*args)

        return call

    @staticmethod
    def one_hot(labels, classes):
        return jax.nn.one_hot(labels, classes, dtype=jnp.result_type(float))

    @staticmethod
    def zeros(shape):
        return jnp.zeros(shape)

    @staticmethod
    def softmax(logits):
        return jax.nn.softmax(logits, -1)

    where = staticmethod(jnp.where)
    exp = staticmethod(jnp.exp)

    @staticmethod
    def known(labels, like):
        return jnp.zeros(like.shape[:-1], bool) if labels is None else labels >= 0

    @staticmethod
    def clamp_labels(labels):
        return jnp.maximum(labels, 0)


class Built(Program):
    """The program of a spec with its Flax modules (`decoder_module`: the decoder's)."""

    def __init__(self, plan: graph.Plan, networks: dict):
        self.decoder_module = networks["decoder"][0]
        # a relaxed site's temperature outside `temperatures_at`: its schedule's last value
        super().__init__(plan, Primitives(
            networks, {s.name: s.temperature.end for s in plan.sites if s.relaxed}))

    @contextmanager
    def temperatures_at(self, values: dict):
        """Within the block the relaxed sites run at the temperatures {site: τ} (numbers or
        traced values: a trainer's jitted step passes the step's,
        `ppl_vae.schedules.step_temperatures`); the defaults again after it."""
        saved = self.P.temperatures
        self.P.temperatures = {**saved, **values}
        try:
            yield
        finally:
            self.P.temperatures = saved

    def decoder(self):
        """The decoder as a callable ``(code, y)`` (inside a handler with the param map)."""
        return self.P.network("decoder")


def build(spec: Spec, data_dim: int, image_shape=None) -> Built:
    """Model, guide and the Flax modules of `spec`; both take ``(y, labels=None)``."""
    plan = graph.plan(spec, data_dim, image_shape)
    return Built(plan, build_networks(plan))
