"""`build(spec)`: the NumPyro model (priors + decoder) and guide (posteriors + aux terms); the
twin of `ppl_vae/pyro/model.py`, with the same sites, orders and ``infer`` marks.

Parameters live in a NumPyro param map: Flax trees ``<module>$params`` (via
`numpyro.contrib.module.flax_module`: ``encoder``, ``encoder_<site>``, ``decoder``, the
conditional priors ``prior`` / ``prior_<site>``, ``aux_<name>``) and arrays ``prior.loc``,
``prior_<site>.log_scale``, ``likelihood.log_scale`` …; `ppl_vae.numpyro.params` converts them
to and from the canonical names shared with the Pyro backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import flax_module

from ppl_vae import graph
from ppl_vae.numpyro.aux import infonce_loss, label_cross_entropy, supervised_loss
from ppl_vae.numpyro.latents import one_hot, posterior_dist, prior_dist
from ppl_vae.numpyro.likelihood import (
    distortion_value,
    likelihood_dist,
    likelihood_mean,
    observation,
)
from ppl_vae.numpyro.networks import (
    MADE,
    Classifier,
    Decoder,
    Encoder,
    Features,
    SupervisedHead,
    concat,
)
from ppl_vae.objective import aux_site_names
from ppl_vae.spec import LABEL_SITE, Spec, resolve_user_function


@dataclass
class Built:
    """What `build` returns (see the Pyro twin): the training pair, the nll model, the guide
    without aux sites, and the pieces they are made of (call them inside a handler that
    substitutes the param map: ``label_input``, ``prior_of``, ``posterior_of``, ``code``,
    ``decoder``), with `decoder_module` the decoder's Flax module."""

    spec: Spec
    model: Callable
    guide: Callable
    elbo_model: Callable
    posterior_guide: Callable
    label_input: Callable
    prior_of: Callable
    posterior_of: Callable
    code: Callable
    decoder: Callable
    decoder_module: object
    label_logits: Callable | None = None
    class_prior: Callable | None = None


def build(spec: Spec, data_dim: int, image_shape=None) -> Built:
    """Model, guide and the Flax modules of `spec`; both take ``(y, labels=None)``."""
    lik_spec, objective, lab, enc = spec.likelihood, spec.objective, spec.label, spec.encoder
    per_pixel = lik_spec.categories if lik_spec.kind == "categorical" else 1
    channels = tuple(enc.channels) if enc.kind == "conv" else None
    sites = {s.name: s for s in spec.sites}
    model_order, guide_order = graph.model_order(spec), graph.guide_order(spec)
    closed_form = graph.closed_form_rate_valid(spec)
    one_site = not graph.is_graph(spec)
    label_width = graph.label_width(spec)
    code_width = graph.decoder_input_width(spec)
    decoder_module = (
        MADE(data_dim, tuple(spec.decoder.hidden), per_pixel, spec.decoder.activation)
        if spec.decoder.kind == "autoregressive" else
        Decoder(spec.decoder, data_dim, image_shape, per_pixel))
    encoders, extra_widths = {}, {}
    for s in spec.sites:
        if one_site:
            encoders[s.name] = Encoder(tuple(enc.hidden), enc.activation, image_shape, channels,
                                       s.dim, s.posterior)
            extra_widths[s.name] = label_width
        else:
            encoders[s.name] = Encoder(tuple(s.posterior.hidden), s.posterior.activation, None,
                                       None, s.dim, s.posterior)
            extra_widths[s.name] = graph.posterior_extra_width(spec, s, data_dim, image_shape)
    features_module = Features(tuple(enc.hidden), enc.activation, image_shape, channels)
    aux_terms = list(zip(aux_site_names(spec), objective.aux))
    heads = {name: SupervisedHead(a) for name, a in aux_terms
             if a.kind == "supervised" and a.site != LABEL_SITE}
    classifier = (Classifier(tuple(lab.hidden), enc.activation, image_shape, channels,
                             classes=lab.classes) if lab.latent else None)
    dims = {s.name: s.dim for s in spec.sites}
    user_fns = {name: resolve_user_function(a.kind) for name, a in aux_terms
                if a.kind not in ("infonce", "supervised")}
    learned_scale = lik_spec.kind == "gaussian" and lik_spec.scale == "learned"

    def label_input(labels):
        if not lab.condition:
            return None
        if labels is None:
            raise ValueError("this model reads the label (label.condition = true): pass labels")
        return one_hot(labels, lab.classes, jnp.result_type(float))

    def prior_of(name: str, values: dict, onehot):
        s = sites[name]
        inputs = None
        if s.prior.kind == "conditional":
            inputs = concat([values[p] for p in s.prior.parents]
                            + ([onehot] if lab.prior else []))
        return prior_dist(s, graph.prior_module(spec, name), inputs,
                          graph.prior_input_width(spec, s))

    def data_features(y):
        if not graph.has_feature_network(spec):
            return y
        return flax_module("encoder", features_module, jnp.ones((1, data_dim)))(y)

    def posterior_of(name: str, y, values: dict, onehot, features=None):
        s = sites[name]
        prefix, width = graph.encoder_module(spec, name), extra_widths[name]
        example_extra = jnp.ones((1, width)) if width else None
        if one_site:
            net = flax_module(prefix, encoders[name], jnp.ones((1, data_dim)), example_extra)
            loc, scale, below, h = net(y, onehot)
        else:
            if graph.DATA in s.posterior.inputs and features is None:
                features = data_features(y)
            parts = [features if i == graph.DATA else values[i] for i in s.posterior.inputs]
            net = flax_module(prefix, encoders[name], None, example_extra)
            loc, scale, below, h = net(None, concat(parts + ([onehot] if lab.condition
                                                              else [])))

        def flow_params(x, step):
            return net(x, h, step, method="flow_params")

        q = posterior_dist(s.posterior.kind, loc, scale, below, flow_params,
                           s.posterior.flow_steps)
        return q, loc, scale

    def label_logits(y):
        return flax_module(f"encoder_{LABEL_SITE}", classifier, jnp.ones((1, data_dim)))(y)

    def class_prior():
        if lab.class_prior == "learned":
            logits = numpyro.param(f"prior_{LABEL_SITE}.logits", jnp.zeros(lab.classes))
        else:
            logits = jnp.zeros(lab.classes)
        return dist.Categorical(logits=logits)

    def model_label(labels):
        """The one-hot label in the model: a latent site when the label is latent."""
        if not lab.latent:
            return label_input(labels)
        value = numpyro.sample(LABEL_SITE, class_prior())
        return one_hot(value, lab.classes, jnp.result_type(float))

    def guide_label(y, labels):
        """The one-hot label in the guide: q(label|y) where unknown, its value where known."""
        if not lab.latent:
            return label_input(labels), None
        logits = label_logits(y)
        probs = jax.nn.softmax(logits, -1)
        if labels is None:
            known = jnp.zeros(y.shape[:-1], bool)
        else:
            known = labels >= 0
            probs = jnp.where(known[..., None], one_hot(jnp.maximum(labels, 0), lab.classes,
                                                        probs.dtype), probs)
        value = numpyro.sample(LABEL_SITE, dist.Categorical(probs),
                               infer={"enumerate": "parallel", "observed": known})
        return one_hot(value, lab.classes, jnp.result_type(float)), logits

    def code(values: dict, onehot):
        return concat([values[r] for r in spec.decoder.reads]
                      + ([onehot] if lab.condition else []))

    def decoder():
        return flax_module("decoder", decoder_module, jnp.ones((1, code_width)),
                           jnp.ones((1, data_dim)))

    def make_model(distortion: str):
        def model(y, labels=None):
            net = decoder()
            log_scale = (numpyro.param("likelihood.log_scale", jnp.zeros(data_dim))
                         if learned_scale else None)
            values = {}
            with numpyro.plate("data", y.shape[0]):
                onehot = model_label(labels)
                for name in model_order:
                    values[name] = numpyro.sample(name, prior_of(name, values, onehot))
                params = net(code(values, onehot), y)  # y: teacher forcing (MADE)
                if distortion == "nll":
                    numpyro.sample("y", likelihood_dist(lik_spec, params, log_scale),
                                   obs=observation(lik_spec, y))
                else:
                    mean = likelihood_mean(lik_spec, params)
                    numpyro.factor("y", -distortion_value(distortion, y, mean))
            return values

        return model

    def make_guide(with_aux: bool):
        def guide(y, labels=None):
            values, gaussians = {}, {}
            with numpyro.plate("data", y.shape[0]):
                onehot, logits = guide_label(y, labels)
                features = None if one_site else data_features(y)
                for name in guide_order:
                    q, loc, scale = posterior_of(name, y, values, onehot, features)
                    infer = {} if closed_form[name] else {"analytic_kl": False}
                    values[name] = numpyro.sample(name, q, infer=infer)
                    gaussians[name] = (loc, scale)
            for name, aux in aux_terms if with_aux else ():
                site = graph.aux_site(spec, aux)
                if site == LABEL_SITE:  # cross-entropy of q(label|y) on the known labels
                    numpyro.factor(name, aux.weight * label_cross_entropy(logits, labels))
                    continue
                z, (loc, scale) = values[site], gaussians[site]
                if aux.kind == "infonce":
                    value = infonce_loss(z, loc, scale)
                elif aux.kind == "supervised":
                    head = flax_module(f"aux_{name}", heads[name], input_shape=(1, dims[site]))
                    value = supervised_loss(head, loc, labels)
                else:
                    value = user_fns[name](y=y, z=z, loc=loc, scale=scale, labels=labels,
                                           backend="numpyro")
                numpyro.factor(name, aux.weight * value)
            return values

        return guide

    model = make_model(objective.distortion)
    elbo_model = model if objective.distortion == "nll" else make_model("nll")
    guide = make_guide(True)
    posterior_guide = make_guide(False) if aux_terms else guide
    return Built(spec, model, guide, elbo_model, posterior_guide, label_input, prior_of,
                 posterior_of, code, decoder, decoder_module,
                 label_logits if lab.latent else None, class_prior if lab.latent else None)
