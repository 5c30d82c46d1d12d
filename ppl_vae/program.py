"""The generative program of a spec, written once: the model P̂_Φ(z) P̂_Φ(y|z) and the guide
P_Ψ(z|y) (+ aux terms), over the primitives a backend supplies.

A backend (`ppl_vae.pyro.model`, `ppl_vae.numpyro.model`) builds its networks and hands this
module a `Primitives` object: the framework's effects (sample, factor, plate, param, a network
call), its distributions namespace (``pyro.distributions`` / ``numpyro.distributions``, which
share the constructors used here), a few array operations, and the constructors that truly
differ (the full-covariance Cholesky factor, an IAF step, the likelihood family, the aux
kernels). Everything else — which sites exist, in which order model and guide draw them, what
each network reads, the ``infer`` marks `ScaledELBO` honours — is decided here, once, from the
`ppl_vae.graph.Plan`, so the two backends cannot drift apart. (The shape follows einops'
``_backends.py``: one program, a small per-framework object; the backend is what is passed in,
never a global switch.)

Sites, the same in both backends, all in the plate ``data``:

* one latent site per `Spec.sites` entry (``z`` in a one-site spec), event shape (d,): drawn
  from its prior P̂_Φ(z_s | parents, label) in the model, in `Plan.model_order`, and from its
  posterior P_Ψ(z_s | inputs) in the guide, in `Plan.guide_order`. A guide site whose
  closed-form rate would be biased carries ``infer={"analytic_kl": False}``
  (`graph.closed_form_rate_valid`).
* a discrete site (``kind = "bernoulli"`` or ``"categorical"``), event shape (width,): d
  Bernoulli units or d one-hot categorical variables (flattened), `Discrete` with logits from
  its encoder in the guide and its prior's probabilities (uniform or learned) in the model. In
  the training pair (`model`, `guide`) it carries its estimator: ``estimator = "score"`` a
  sampled site with ``infer={"baseline": {"baseline_value": b(y)}}`` (NVIL's network, when it
  has one), ``"enumerate"`` ``infer={"enumerate": "parallel"}``, ``"relaxed"`` the `Concrete`
  relaxation of both q and p̂ at the site's temperature (`Primitives.temperature`). The
  evaluation pair (`eval_model`, `eval_guide`; and `elbo_model`, `posterior_guide`) draws every
  discrete site as what it is: `Discrete`, sampled, so that every estimator is scored on the
  same discrete model.
* ``y``  distortion, in the model: observed under the likelihood P̂_Φ(y | the decoder's sites,
  label) (``distortion = "nll"``), or a factor −Dist_Φ(y|z) (``"mse"``, ``"l1"``: a
  rate–distortion autoencoder).
* ``<aux name>`` factor sites of the guide (outside the plate): weight · aux loss, on the
  encoder alone.
* ``label`` (``label.latent``, the M2 model): Cat(π) in the model, the classifier q(label|y) in
  the guide, marked ``infer={"enumerate": "parallel", "observed": known}``: `ScaledELBO` sums it
  out where the label is unknown and takes the known ones as data. Its value is the class index.

Model and guide take ``(y, labels=None)``: y (B, D) in the data's units, labels (B,) integers
with −1 for unknown. Both return {site: value}.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ppl_vae.graph import DATA, LABEL, Plan
from ppl_vae.spec import resolve_user_function


class Primitives(Protocol):
    """What a backend supplies to the program. Arrays are the framework's (torch tensors, jax
    arrays); shapes carry any leading (particle, enumeration) axes before the batch axis."""

    name: str  #: "pyro" or "numpyro": passed to user aux functions as ``backend=``
    dist: Any  #: the distributions namespace: Normal, MultivariateNormal, MixtureSameFamily, …
    likelihood: Any  #: likelihood_dist, observation, likelihood_mean, distortion_value
    aux: Any  #: infonce_loss, supervised_loss, label_cross_entropy

    def enter(self, role: str) -> None:
        """Called first in the model (``role="model"``) and the guide (``"guide"``): register
        that side's parameters with the framework where it needs it."""

    def sample(self, name: str, fn, obs=None, infer: dict | None = None): ...

    def factor(self, name: str, value) -> None:
        """A factor site whose value is a differentiable function of reparameterised draws."""

    def plate(self, name: str, size: int, like) -> AbstractContextManager: ...

    def param(self, name: str, shape: tuple[int, ...], init: str = "zeros"):
        """The parameter with canonical name `name` (``prior.loc``); `init` ("zeros",
        "normal": N(0, 1), "uniform": U(0, 1)) is its initial value where the framework
        creates parameters lazily (the Pyro backend's modules create them)."""

    def network(self, name: str) -> Callable:
        """The module `name` as a callable; ``net(*args, method="flow_params")`` calls a method."""

    def concat(self, parts: list): ...

    def one_hot(self, labels, classes: int): ...

    def zeros(self, shape: tuple[int, ...]): ...

    def softmax(self, logits): ...

    def where(self, condition, a, b): ...

    def exp(self, x): ...

    def known(self, labels, like):
        """bool (B,): which labels are known (≥ 0); all False when `labels` is None."""

    def clamp_labels(self, labels):
        """labels with −1 replaced by 0 (a valid index; the value is masked out)."""

    def lower_cholesky(self, scale, below):
        """L (..., d, d): `scale` (..., d) on the diagonal, `below` (..., d(d−1)/2) under it."""

    def iaf_step(self, flow_params: Callable):
        """One inverse autoregressive flow step z ↦ σ ⊙ z + (1 − σ) ⊙ m, (m, logit σ) =
        flow_params(z) (`ppl_vae.autoregressive`)."""

    def discrete(self, logits, categories: int | None):
        """d independent Bernoulli units (categories None) or K-way categorical variables
        (one-hot, flattened) with `logits` (..., width): the backend's `latents.Discrete`."""

    def concrete(self, temperature, logits, categories: int | None):
        """Their Concrete / Gumbel-softmax relaxation at `temperature`: `latents.Concrete`."""

    def temperature(self, site: str):
        """The current temperature of the relaxed site `site` (a 0-d array)."""


class Program:
    """The model and the guide of one spec (`plan.spec`) over `primitives`.

    Besides the training pair (`model`, `guide`) it offers the nll model (`elbo_model`, the ELBO
    metric whatever the distortion), the guide without aux sites (`posterior_guide`, for
    drawing and scoring z) and the pieces they are made of, for a backend's `Model` hooks:

    * ``label_input(labels)`` -> the one-hot label (B, K), or None without conditioning;
    * ``prior_of(site, values, onehot)`` -> P̂_Φ(z_site | parents' values, label);
    * ``posterior_of(site, y, values, onehot)`` -> (q, loc, scale) of P_Ψ(z_site | inputs);
    * ``code(values, onehot)`` -> what the decoder reads: its sites' values, then the label;
    * ``discrete_logits(site, y, values, onehot)`` -> the logits of a discrete site's posterior;
    * ``label_logits(y)`` -> the classifier's logits (B, classes) of a latent label, and
      ``class_prior()`` -> p(label); None without a latent label.
    """

    def __init__(self, plan: Plan, primitives: Primitives):
        spec = plan.spec
        self.spec, self.plan, self.P = spec, plan, primitives
        self._user_fns = {a.name: resolve_user_function(a.spec.kind) for a in plan.aux
                          if a.spec.kind not in ("infonce", "supervised")}
        lik = spec.likelihood
        self._learned_scale = lik.kind == "gaussian" and lik.scale == "learned"
        # the training pair carries each discrete site's estimator; the evaluation pair draws
        # it as the discrete site it is (the same functions when the spec has no such site)
        distortion = spec.objective.distortion
        discrete = any(s.discrete for s in plan.sites)
        relaxed = any(s.relaxed for s in plan.sites)
        self.model = self._make_model(distortion, relaxed=True)
        self.eval_model = self._make_model(distortion, relaxed=False) if relaxed else self.model
        self.elbo_model = (self.eval_model if distortion == "nll"
                           else self._make_model("nll", relaxed=False))
        self.guide = self._make_guide(with_aux=True, train=True)
        self.eval_guide = self._make_guide(with_aux=True, train=False) if discrete else self.guide
        self.posterior_guide = (self._make_guide(with_aux=False, train=False)
                                if plan.aux or discrete else self.guide)
        if not spec.label.latent:
            self.label_logits = self.class_prior = None

    # -- the pieces ---------------------------------------------------------------------------
    def label_input(self, labels):
        """The one-hot label (B, classes) that posteriors and decoder read, or None."""
        lab = self.spec.label
        if not lab.condition:
            return None
        if labels is None:
            raise ValueError("this model reads the label (label.condition = true): pass labels")
        return self.P.one_hot(labels, lab.classes)

    def prior_of(self, name: str, values: dict, onehot, relaxed: bool = False):
        """P̂_Φ(z_name | parents' values, label), event shape (d,) (a discrete site: (width,),
        its relaxation with `relaxed` where it is trained relaxed)."""
        P, s = self.P, self.plan.site(name)
        D, d, kind = P.dist, s.dim, s.prior.kind
        if s.discrete:
            logits = (P.param(f"{s.prior_module}.logits", (s.width,))
                      if kind == "learned_probs" else P.zeros((s.width,)))
            return self._discrete(s, logits, relaxed)
        if kind == "normal":
            zero = P.zeros((d,))
            return D.Normal(zero, zero + 1.0).to_event(1)
        if kind == "learned_normal":
            loc = P.param(f"{s.prior_module}.loc", (d,))
            log_scale = P.param(f"{s.prior_module}.log_scale", (d,))
            return D.Normal(loc, P.exp(log_scale)).to_event(1)
        if kind == "conditional":
            return D.Normal(*self._conditional_prior(s, values, onehot)).to_event(1)
        k = s.prior.components
        if kind == "vamp":
            return self._vamp_prior(s)
        logits = P.param(f"{s.prior_module}.logits", (k,))  # mixture
        loc = P.param(f"{s.prior_module}.loc", (k, d), "normal")
        log_scale = P.param(f"{s.prior_module}.log_scale", (k, d))
        return D.MixtureSameFamily(D.Categorical(logits=logits),
                                   D.Normal(loc, P.exp(log_scale)).to_event(1))

    def _conditional_prior(self, s, values: dict, onehot):
        """(loc, scale), each (..., d), of a conditional prior at its parents' values."""
        inputs = self.P.concat([values[p] for p in s.parents]
                               + ([onehot] if self.spec.label.prior else []))
        return self.P.network(s.prior_module)(inputs)

    def _vamp_prior(self, s):
        """The VampPrior (Tomczak & Welling 2018): p̂(z) = (1/K) Σ_k q(z | u_k), the site's own
        posterior at K learned pseudo-inputs u_k (K, D) in data space (initialised from
        training images by `ppl_vae.init`). No closed-form KL: its rate is Monte Carlo."""
        P, k = self.P, s.prior.components
        pseudo = P.param(f"{s.prior_module}.pseudo_inputs", (k, self.plan.data_dim), "uniform")
        components, _, _ = self.posterior_of(s.name, pseudo, {}, None)  # batch (K,)
        return P.dist.MixtureSameFamily(P.dist.Categorical(logits=P.zeros((k,))), components)

    def data_features(self, y):
        """What a graph's posteriors read as "y": the `[encoder]` network's features of y, or
        y itself when that network is the identity."""
        return self.P.network("encoder")(y) if self.plan.feature_network else y

    def _discrete(self, s, logits, relaxed: bool):
        """A discrete site's distribution from its logits: `Discrete`, or where the site is
        trained relaxed and `relaxed` asks for it, its `Concrete` relaxation at the site's
        temperature."""
        if relaxed and s.relaxed:
            return self.P.concrete(self.P.temperature(s.name), logits, s.categories)
        return self.P.discrete(logits, s.categories)

    def posterior_of(self, name: str, y, values: dict, onehot, features=None,
                     relaxed: bool = False):
        """(q, loc, scale): P_Ψ(z_name | its inputs) and its base Gaussian's loc and scale; a
        discrete site's (q, logits, None), q relaxed with `relaxed` where it is trained so."""
        P, s = self.P, self.plan.site(name)
        net = P.network(s.encoder_module)
        if self.plan.one_site:
            loc, scale, below, h = net(y, onehot)
        else:
            if DATA in s.inputs and features is None:
                features = self.data_features(y)
            parts = [features if i == DATA else values[i] for i in s.inputs]
            label = [onehot] if self.spec.label.condition else []
            loc, scale, below, h = net(None, P.concat(parts + label))
        if s.discrete:  # loc: the logits
            return self._discrete(s, loc, relaxed), loc, None
        kind = s.posterior.kind
        if kind == "ladder":
            loc, scale = _precision_weighted(loc, scale,
                                             *self._conditional_prior(s, values, onehot))
        if kind == "full":
            q = P.dist.MultivariateNormal(loc, scale_tril=P.lower_cholesky(scale, below))
        else:
            q = P.dist.Normal(loc, scale).to_event(1)
        if kind == "iaf":
            steps = [P.iaf_step(lambda x, t=t: net(x, h, t, method="flow_params"))
                     for t in range(s.posterior.flow_steps)]
            q = P.dist.TransformedDistribution(q, steps)
        return q, loc, scale

    def code(self, values: dict, onehot):
        """What the decoder reads (..., code_width): its sites' values, then the label."""
        return self.P.concat([values[r] for r in self.spec.decoder.reads]
                             + ([onehot] if self.spec.label.condition else []))

    def label_logits(self, y):
        """The classifier q(label|y)'s logits (B, classes) of a latent label."""
        return self.P.network(f"encoder_{LABEL}")(y)

    def class_prior(self):
        """p(label) = Cat(softmax(logits)): uniform, or with learned logits."""
        lab = self.spec.label
        logits = (self.P.param(f"prior_{LABEL}.logits", (lab.classes,))
                  if lab.class_prior == "learned" else self.P.zeros((lab.classes,)))
        return self.P.dist.Categorical(logits=logits)

    # -- the label sites ------------------------------------------------------------------------
    def _model_label(self, labels):
        """The one-hot label in the model: a latent site when the label is latent."""
        if not self.spec.label.latent:
            return self.label_input(labels)
        return self.P.one_hot(self.P.sample(LABEL, self.class_prior()), self.spec.label.classes)

    def _guide_label(self, y, labels):
        """(one-hot label, classifier logits): q(label|y) where unknown, its value where known."""
        if not self.spec.label.latent:
            return self.label_input(labels), None
        P, classes = self.P, self.spec.label.classes
        logits = self.label_logits(y)
        probs = P.softmax(logits)
        known = P.known(labels, y)
        if labels is not None:
            probs = P.where(known[..., None], P.one_hot(P.clamp_labels(labels), classes), probs)
        value = P.sample(LABEL, P.dist.Categorical(probs),
                         infer={"enumerate": "parallel", "observed": known})
        return P.one_hot(value, classes), logits

    # -- model and guide --------------------------------------------------------------------
    def _make_model(self, distortion: str, relaxed: bool) -> Callable:
        P, plan, lik = self.P, self.plan, self.spec.likelihood

        def model(y, labels=None):
            P.enter("model")
            decoder = P.network("decoder")
            log_scale = (P.param("likelihood.log_scale", (plan.data_dim,))
                         if self._learned_scale else None)
            values = {}
            with P.plate("data", y.shape[0], y):
                onehot = self._model_label(labels)
                for name in plan.model_order:
                    values[name] = P.sample(name, self.prior_of(name, values, onehot,
                                                                relaxed=relaxed))
                params = decoder(self.code(values, onehot), y)  # y: teacher forcing (MADE)
                if distortion == "nll":
                    P.sample("y", P.likelihood.likelihood_dist(lik, params, log_scale),
                             obs=P.likelihood.observation(lik, y))
                else:
                    mean = P.likelihood.likelihood_mean(lik, params)
                    P.factor("y", -P.likelihood.distortion_value(distortion, y, mean))
            return values

        return model

    def _make_guide(self, with_aux: bool, train: bool) -> Callable:
        P, plan = self.P, self.plan

        def guide(y, labels=None):
            P.enter("guide")
            values, gaussians = {}, {}
            with P.plate("data", y.shape[0], y):
                onehot, logits = self._guide_label(y, labels)
                features = None if plan.one_site else self.data_features(y)
                for name in plan.guide_order:
                    q, loc, scale = self.posterior_of(name, y, values, onehot, features,
                                                      relaxed=train)
                    values[name] = P.sample(name, q, infer=self._infer(name, y, train))
                    gaussians[name] = (loc, scale)
            for aux in plan.aux if with_aux else ():
                P.factor(aux.name, aux.spec.weight * self._aux_value(
                    aux, y, labels, values, gaussians, logits))
            return values

        return guide

    def _infer(self, name: str, y, train: bool) -> dict:
        """The guide site's ``infer`` marks: the Monte Carlo rate where the closed form would
        be biased; in the training guide, a discrete site's estimator (score: its NVIL
        baseline's value b(y), trained by ScaledELBO's (cost − b)²; enumerate: summed out;
        relaxed: none, its q is the relaxation)."""
        s = self.plan.site(name)
        infer = {} if s.closed_form else {"analytic_kl": False}
        if not (train and s.discrete):
            return infer
        if s.estimator == "enumerate":
            infer["enumerate"] = "parallel"
        elif s.estimator == "score" and s.baseline_module is not None:
            infer["baseline"] = {"baseline_value": self.P.network(s.baseline_module)(y)}
        return infer

    def discrete_logits(self, name: str, y, values: dict, onehot):
        """The logits (..., width) of a discrete site's posterior q(z_name | its inputs)."""
        return self.posterior_of(name, y, values, onehot)[1]

    def _aux_value(self, aux, y, labels, values, gaussians, logits):
        """The loss of one encoder-only term (nats, before its weight)."""
        P = self.P
        if aux.site == LABEL:  # cross-entropy of q(label|y) on the known labels (M2's α-term)
            return P.aux.label_cross_entropy(logits, labels)
        z, (loc, scale) = values[aux.site], gaussians[aux.site]
        if aux.spec.kind == "infonce":
            return P.aux.infonce_loss(z, loc, scale)
        if aux.spec.kind == "supervised":
            return P.aux.supervised_loss(P.network(f"aux_{aux.name}"), loc, labels)
        return self._user_fns[aux.name](y=y, z=z, loc=loc, scale=scale, labels=labels,
                                        backend=P.name)


def _precision_weighted(loc, scale, prior_loc, prior_scale):
    """The ladder posterior's merge (Sønderby et al. 2016, eq. 19-20): the product of the
    bottom-up Gaussian N(loc, scale²) and the prior p̂(z | parents) = N(prior_loc, prior_scale²),
    renormalised: precision τ = scale⁻² + prior_scale⁻², mean (loc·scale⁻² + prior_loc·
    prior_scale⁻²) / τ, standard deviation τ^(−1/2). Plain arithmetic: any array type."""
    tau_bu, tau_prior = scale ** -2, prior_scale ** -2
    precision = tau_bu + tau_prior
    return (loc * tau_bu + prior_loc * tau_prior) / precision, precision ** -0.5
