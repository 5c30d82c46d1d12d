"""`build(spec)`: the Pyro model (priors + decoder), guide (posteriors + aux terms) and modules.

Sites, the same in both backends, all in the plate ``data``:

* one latent site per `Spec.sites` entry (``z`` in a one-site spec), event shape (d,): drawn
  from its prior P̂_Φ(z_s | parents, label) in the model, in `graph.model_order`, and from its
  posterior P_Ψ(z_s | inputs) in the guide, in `graph.guide_order`. A guide site whose
  closed-form rate would be biased carries ``infer={"analytic_kl": False}``
  (`graph.closed_form_rate_valid`), which `ScaledELBO` honours.
* ``y``  distortion, in the model: observed under the likelihood P̂_Φ(y | the decoder's sites,
  label) (``distortion = "nll"``), or a factor −Dist_Φ(y|z) (``"mse"``, ``"l1"``: a
  rate–distortion autoencoder).
* ``<aux name>`` factor sites of the guide: weight · aux loss, on the encoder alone.
* ``label`` (``label.latent``, the M2 model): Cat(π) in the model, the classifier q(label|y) in
  the guide, marked ``infer={"enumerate": "parallel", "observed": known}``: `ScaledELBO` sums it
  out where the label is unknown and takes the known ones as data. Its value is the class index;
  under enumeration it has shape (classes, 1) and every site after it one more leading axis.

Model and guide take ``(y, labels=None)``: y (B, D) in the data's units, labels (B,) int64 with
−1 for unknown (read by the ``supervised`` aux term, and as a one-hot input when
``label.condition``). Both return {site: value}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae import graph
from ppl_vae.objective import aux_site_names
from ppl_vae.pyro.aux import infonce_loss, label_cross_entropy, supervised_loss
from ppl_vae.pyro.latents import one_hot, posterior_dist, prior_dist
from ppl_vae.pyro.likelihood import (
    distortion_value,
    likelihood_dist,
    likelihood_mean,
    observation,
)
from ppl_vae.pyro.networks import build_networks, concat
from ppl_vae.spec import LABEL_SITE, Spec, resolve_user_function


@dataclass
class Built:
    """What `build` returns. `model`/`guide` are the training pair; `elbo_model` the model with
    the nll distortion (the same as `model` when ``distortion = "nll"``), for the ELBO metric;
    `posterior_guide` the guide without its aux factor sites (for drawing and scoring z). The
    functions below are the pieces model and guide are made of, for the `Model` hooks:

    * ``label_input(labels)`` -> the one-hot label (B, K), or None without conditioning;
    * ``prior_of(site, values, onehot)`` -> P̂_Φ(z_site | parents' values, label);
    * ``posterior_of(site, y, values, onehot)`` -> (q, loc, scale) of P_Ψ(z_site | inputs);
    * ``code(values, onehot)`` -> what the decoder reads: its sites' values, then the label;
    * ``label_logits(y)`` -> the classifier's logits (B, classes) of a latent label, and
      ``class_prior()`` -> p(label) (`Categorical`); None without a latent label.
    """

    spec: Spec
    model: Callable
    guide: Callable
    elbo_model: Callable
    posterior_guide: Callable
    modules: nn.ModuleDict
    label_input: Callable
    prior_of: Callable
    posterior_of: Callable
    code: Callable
    label_logits: Callable | None = None
    class_prior: Callable | None = None


def build(spec: Spec, data_dim: int, image_shape=None, register: bool = True) -> Built:
    """Model, guide and modules for `spec` on data with `data_dim` features.

    ``register=True`` calls ``pyro.module`` in model and guide so that ``pyro.infer.SVI`` with
    ``pyro.optim`` finds the parameters. Pyro's param store is global: when you build twice in one
    process and train with the stock SVI, run each in ``with pyro.get_param_store().scope():``
    (ppl_vae's own training optimises ``built.modules.parameters()`` directly and never reads it).
    """
    modules = nn.ModuleDict(build_networks(spec, data_dim, image_shape))
    decoder, likelihood = modules["decoder"], modules["likelihood"]
    lik_spec, objective, lab = spec.likelihood, spec.objective, spec.label
    sites = {s.name: s for s in spec.sites}
    model_order, guide_order = graph.model_order(spec), graph.guide_order(spec)
    closed_form = graph.closed_form_rate_valid(spec)
    one_site = not graph.is_graph(spec)
    aux_terms = list(zip(aux_site_names(spec), objective.aux))
    user_fns = {name: resolve_user_function(a.kind) for name, a in aux_terms
                if a.kind not in ("infonce", "supervised")}
    guide_names = [n for n in modules if n.startswith(("encoder", "aux_"))]
    model_names = [n for n in modules if n not in guide_names]

    def label_input(labels):
        if not lab.condition:
            return None
        if labels is None:
            raise ValueError("this model reads the label (label.condition = true): pass labels")
        return one_hot(labels, lab.classes, next(iter(modules.parameters())).dtype)

    def prior_of(name: str, values: dict, onehot):
        s = sites[name]
        inputs = None
        if s.prior.kind == "conditional":
            inputs = concat([values[p] for p in s.prior.parents]
                            + ([onehot] if lab.prior else []))
        return prior_dist(modules[graph.prior_module(spec, name)], inputs)

    def data_features(y):
        return modules["encoder"](y) if graph.has_feature_network(spec) else y

    def posterior_of(name: str, y, values: dict, onehot, features=None):
        s = sites[name]
        encoder = modules[graph.encoder_module(spec, name)]
        if one_site:
            loc, scale, below, h = encoder(y, onehot)
        else:
            if graph.DATA in s.posterior.inputs and features is None:
                features = data_features(y)
            parts = [features if i == graph.DATA else values[i] for i in s.posterior.inputs]
            loc, scale, below, h = encoder(None, concat(parts + ([onehot] if lab.condition
                                                                   else [])))
        return posterior_dist(encoder, loc, scale, below, h), loc, scale

    dtype = next(iter(modules.parameters())).dtype

    def label_logits(y):
        return modules[f"encoder_{LABEL_SITE}"](y)

    def class_prior():
        return dist.Categorical(logits=modules[f"prior_{LABEL_SITE}"].logits)

    def model_label(labels):
        """The one-hot label in the model: a latent site when the label is latent."""
        if not lab.latent:
            return label_input(labels)
        return one_hot(pyro.sample(LABEL_SITE, class_prior()), lab.classes, dtype)

    def guide_label(y, labels):
        """The one-hot label in the guide: q(label|y) where unknown, its value where known."""
        if not lab.latent:
            return label_input(labels), None
        logits = label_logits(y)
        probs = torch.softmax(logits, -1)
        if labels is None:
            known = torch.zeros(y.shape[:-1], dtype=torch.bool, device=y.device)
        else:
            known = labels >= 0
            probs = torch.where(known[..., None],
                                one_hot(labels.clamp(min=0), lab.classes, dtype), probs)
        value = pyro.sample(LABEL_SITE, dist.Categorical(probs),
                            infer={"enumerate": "parallel", "observed": known})
        return one_hot(value, lab.classes, dtype), logits

    def code(values: dict, onehot):
        return concat([values[r] for r in spec.decoder.reads]
                      + ([onehot] if lab.condition else []))

    def make_model(distortion: str):
        def model(y, labels=None):
            if register:
                for name in model_names:
                    pyro.module(name, modules[name])
            values = {}
            with pyro.plate("data", y.shape[0], device=y.device):
                onehot = model_label(labels)
                for name in model_order:
                    values[name] = pyro.sample(name, prior_of(name, values, onehot))
                params = decoder(code(values, onehot), y)  # y: teacher forcing (MADE)
                if distortion == "nll":
                    log_scale = getattr(likelihood, "log_scale", None)
                    pyro.sample("y", likelihood_dist(lik_spec, params, log_scale),
                                obs=observation(lik_spec, y))
                else:
                    mean = likelihood_mean(lik_spec, params)
                    pyro.factor("y", -distortion_value(distortion, y, mean))
            return values

        return model

    def make_guide(with_aux: bool):
        def guide(y, labels=None):
            if register:
                for name in guide_names:
                    pyro.module(name, modules[name])
            values, gaussians = {}, {}
            with pyro.plate("data", y.shape[0], device=y.device):
                onehot, logits = guide_label(y, labels)
                features = None if one_site else data_features(y)
                for name in guide_order:
                    q, loc, scale = posterior_of(name, y, values, onehot, features)
                    infer = {} if closed_form[name] else {"analytic_kl": False}
                    values[name] = pyro.sample(name, q, infer=infer)
                    gaussians[name] = (loc, scale)
            for name, aux in aux_terms if with_aux else ():
                site = graph.aux_site(spec, aux)
                if site == LABEL_SITE:  # cross-entropy of q(label|y) on the known labels
                    pyro.factor(name, aux.weight * label_cross_entropy(logits, labels),
                                has_rsample=True)
                    continue
                z, (loc, scale) = values[site], gaussians[site]
                if aux.kind == "infonce":
                    value = infonce_loss(z, loc, scale)
                elif aux.kind == "supervised":
                    value = supervised_loss(modules[f"aux_{name}"], loc, labels)
                else:
                    value = user_fns[name](y=y, z=z, loc=loc, scale=scale, labels=labels,
                                           backend="pyro")
                # has_rsample=True: the value is a differentiable function of reparameterised
                # draws.
                pyro.factor(name, aux.weight * value, has_rsample=True)
            return values

        return guide

    model = make_model(objective.distortion)
    elbo_model = model if objective.distortion == "nll" else make_model("nll")
    guide = make_guide(True)
    posterior_guide = make_guide(False) if aux_terms else guide
    return Built(spec, model, guide, elbo_model, posterior_guide, modules, label_input,
                 prior_of, posterior_of, code, label_logits if lab.latent else None,
                 class_prior if lab.latent else None)
