"""`build(spec)`: the Pyro networks of a spec and its one generative program
(`ppl_vae.program`) over Pyro's primitives.

Parameters live in the `nn.ModuleDict` ``built.modules`` under their canonical names
(``prior.loc`` is ``modules["prior"].loc``); the program reads them from there, never from
Pyro's global param store.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae import graph
from ppl_vae.program import Program
from ppl_vae.pyro import aux, likelihood
from ppl_vae.pyro.latents import Concrete, Discrete, IAFStep, lower_cholesky, one_hot
from ppl_vae.pyro.networks import build_networks, concat
from ppl_vae.spec import Spec


class Primitives:
    """Pyro's side of `ppl_vae.program.Primitives`: effects from `pyro`, distributions from
    `pyro.distributions`, arrays made on the modules' device in their dtype."""

    name = "pyro"
    dist = dist
    likelihood = likelihood
    aux = aux
    concat = staticmethod(concat)
    lower_cholesky = staticmethod(lower_cholesky)
    iaf_step = IAFStep
    discrete = Discrete
    concrete = Concrete

    def __init__(self, modules: nn.ModuleDict, register: bool):
        self.modules = modules
        # Module.to() converts parameters in place, so this one always has the current
        # device and dtype
        self._ref = next(modules.parameters())
        self._register = register
        guide = [n for n in modules if n.startswith(("encoder", "aux_", "baseline"))]
        self._roles = {"guide": guide, "model": [n for n in modules if n not in guide]}

    def enter(self, role: str) -> None:
        if self._register:  # for pyro.infer.SVI with pyro.optim, which reads the param store
            for name in self._roles[role]:
                pyro.module(name, self.modules[name])

    @staticmethod
    def sample(name, fn, obs=None, infer=None):
        return pyro.sample(name, fn, obs=obs, infer=infer or {})

    @staticmethod
    def factor(name, value) -> None:
        # has_rsample: the value is a differentiable function of reparameterised draws
        pyro.factor(name, value, has_rsample=True)

    @staticmethod
    def plate(name, size, like) -> AbstractContextManager:
        return pyro.plate(name, size, device=like.device)

    def param(self, name, shape, init="zeros"):
        return self.modules.get_parameter(name)  # created (and initialised) with its module

    def temperature(self, site):
        return self.modules["temperature"].get_buffer(site)

    def network(self, name):
        module = self.modules[name]

        def call(*args, method=None):
            return getattr(module, method)(*args) if method else module(*args)

        return call

    def one_hot(self, labels, classes):
        return one_hot(labels, classes, self._ref.dtype)

    def zeros(self, shape):
        return self._ref.new_zeros(shape)

    @staticmethod
    def softmax(logits):
        return torch.softmax(logits, -1)

    where = staticmethod(torch.where)
    exp = staticmethod(torch.exp)

    @staticmethod
    def known(labels, like):
        if labels is None:
            return torch.zeros(like.shape[:-1], dtype=torch.bool, device=like.device)
        return labels >= 0

    @staticmethod
    def clamp_labels(labels):
        return labels.clamp(min=0)


class Built(Program):
    """The program of a spec with its Pyro modules (`modules`, canonical names)."""

    def __init__(self, plan: graph.Plan, modules: nn.ModuleDict, register: bool):
        self.modules = modules
        super().__init__(plan, Primitives(modules, register))

    def set_temperatures(self, values: dict) -> None:
        """The relaxed sites' temperatures {site: τ} from now on, written in place into their
        device buffers (a captured CUDA graph reads them); a trainer calls it every step with
        `ppl_vae.schedules.step_temperatures` of the step's scalars."""
        for site, value in values.items():
            self.modules["temperature"].get_buffer(site).fill_(float(value))


def build(spec: Spec, data_dim: int, image_shape=None, register: bool = True) -> Built:
    """Modules, model and guide for `spec` on data with `data_dim` features.

    ``register=True`` calls ``pyro.module`` in model and guide so that ``pyro.infer.SVI`` with
    ``pyro.optim`` finds the parameters. Pyro's param store is global: when you build twice in one
    process and train with the stock SVI, run each in ``with pyro.get_param_store().scope():``
    (ppl_vae's own training optimises ``built.modules.parameters()`` directly and never reads it).
    """
    plan = graph.plan(spec, data_dim, image_shape)
    return Built(plan, nn.ModuleDict(build_networks(plan)), register)
