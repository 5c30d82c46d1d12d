"""Score-function (REINFORCE) gradients of non-reparameterised guide sites, in both backends'
`ScaledELBO` (issue 24): Bernoulli, Categorical and Poisson latents that are sampled, not summed
out.

Three kinds of check:

* **the same draws** (same seed): the loss equals the stock `Trace_ELBO`'s, and the gradient
  equals the stock `TraceGraph_ELBO`'s, which Rao-Blackwellises by provenance as ScaledELBO
  does (Pyro: also with its baselines and under ``poutine.scale`` for β ≠ 1; NumPyro at β = 1,
  its TraceGraph_ELBO having no baselines and another convention under scale, below);
* **gradient expectations** against the exact gradient of the (β-weighted) ELBO, computed by
  summing over the discrete values by hand and differentiating (truncated at k = 60 for the
  Poisson latent, where q(k) < 1e-30): each model is replicated M times with a copy of every
  parameter per replica, so one call gives M independent single-draw gradient estimates, whose
  mean must lie within 4.5 standard errors of the exact gradient (per component, the standard
  error from the M estimates). The tolerance is checked to be small against the gradient, and
  two estimators known to be wrong (NumPyro's Trace_ELBO, which has no score-function term,
  and its TraceGraph_ELBO under ``handlers.scale``, which scales the score) fail the same check;
* **by hand**: a baseline's value, gradient and decaying average on drawn values.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from ppl_vae.objective import BASELINE_AVERAGE

BACKENDS = ["pyro", "numpyro"]
Y0 = np.array([0.4, -1.2, 2.0, 0.1])  # N = 4 examples
K = 3  # categories
#: replicas of each model in the expectation tests: M independent single-draw estimates (the
#: Poisson latent's score-function estimates vary more: more replicas)
M = 6000
M_POISSON = 16000
#: the auxiliary site: enough replicas to see Trace_ELBO's bias there (about 0.2 of 1.8)
M_AUX = 40000
#: the tolerance of the expectation tests, in standard errors of the mean of M estimates (NumPyro's
#: are marked slow: the first of each model compiles every operation it meets, seconds each)
Z = 4.5
#: initial parameters, one copy (the replicated tests stack M of them)
BC_PARAMS = {"p_logit": np.array(-0.4), "pi": np.array([[0.2, -0.3, 0.1], [-0.5, 0.4, 0.0]]),
             "nu": np.array([[0.3, -0.8, 1.2], [-1.0, 0.5, 2.0]]), "w": np.array([0.3, 0.9]),
             "v": np.array([[0.1, 0.0, -0.2], [0.4, -0.3, 0.2]]),
             "u": np.array([0.5, -0.3, 0.2])}
POISSON_PARAMS = {"log_rate0": np.array(0.8), "g": np.array([0.5, 0.3])}
#: the affine baseline a + b·y (nats; the per-example ELBO here is about −3)
AFFINE = (-3.0, 0.2)


class Lib:
    """The few primitives in which the test models differ between the backends."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "pyro":
            import pyro
            import pyro.distributions as dist
            import torch

            self.ppl, self.dist, self.scale = pyro, dist, pyro.poutine.scale
            self.array = lambda x: torch.as_tensor(np.asarray(x),
                                                   dtype=torch.get_default_dtype())
            self.index = lambda b: b.long()
            self.gather = lambda x, i: x.gather(-1, i)
            self.exp, self.log_softmax = torch.exp, lambda x: torch.log_softmax(x, -1)
            self.log_sigmoid = torch.nn.functional.logsigmoid
            self.replicas = lambda m: torch.arange(m).repeat_interleave(len(Y0))
        else:
            jax = pytest.importorskip("jax")
            import jax.numpy as jnp
            import numpyro
            import numpyro.distributions as dist

            self.ppl, self.dist, self.scale = numpyro, dist, numpyro.handlers.scale
            self.mutable = numpyro.primitives.mutable
            self.array = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
            self.index = lambda b: b.astype(jnp.int32)
            self.gather = lambda x, i: jnp.take_along_axis(x, i, -1)
            self.exp, self.log_softmax = jnp.exp, lambda x: jax.nn.log_softmax(x, -1)
            self.log_sigmoid = jax.nn.log_sigmoid
            self.replicas = lambda m: jnp.repeat(jnp.arange(m), len(Y0))

    def elbo(self, **kwargs):
        if self.backend == "pyro":
            from ppl_vae.pyro.elbo import ScaledELBO
        else:
            from ppl_vae.numpyro.elbo import ScaledELBO
        return ScaledELBO(**kwargs)

    def zeros(self, n):
        return self.array(np.zeros(n))


def baseline_options(lib, name, y, kind, net=None):
    """The ``infer={"baseline": ...}`` options of site `name`: none, a decaying average (whose
    NumPyro state the guide declares, as SVI needs it), or an affine network of y with fixed
    weights (no expectation depends on a baseline's weights; its training is tested apart)."""
    if kind == "none":
        return {}
    if kind == "avg":
        if lib.backend == "numpyro":
            lib.mutable(BASELINE_AVERAGE + name, lib.zeros(y.shape))
        return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.5}}
    if net is None:
        net = lambda x: AFFINE[0] + AFFINE[1] * x  # noqa: E731
    return {"baseline": {"nn_baseline": net, "nn_baseline_input": y}}


# ---- the models: each replicated over `rep` (the replica of each of the M·N examples) ---------
def bc_model(lib, y, rep, baseline="none", *, coupled=True):
    """b ~ Bernoulli, c | b ~ Categorical(π_b), y | b, c ~ N(ν_bc, 0.8); uncoupled: c and y do
    not read b (b then matters only through the guide's q(c|b))."""
    p_logit, pi, nu = (lib.ppl.param(n) for n in ("p_logit", "pi", "nu"))
    with lib.ppl.plate("N", y.shape[0]):
        b = lib.ppl.sample("b", lib.dist.Bernoulli(logits=p_logit[rep]))
        row = lib.index(b) if coupled else 0
        c = lib.ppl.sample("c", lib.dist.Categorical(logits=pi[rep, row]))
        lib.ppl.sample("y", lib.dist.Normal(nu[rep, row, c], 0.8), obs=y)


def bc_guide(lib, y, rep, baseline="none", *, coupled=True, enumerate_c=False):
    """q(b|y) Bernoulli, q(c|b, y) Categorical: both sampled, or c summed out."""
    w, v, u = (lib.ppl.param(n) for n in ("w", "v", "u"))
    with lib.ppl.plate("N", y.shape[0]):
        b = lib.ppl.sample("b", lib.dist.Bernoulli(logits=w[rep, 0] + w[rep, 1] * y),
                           infer=baseline_options(lib, "b", y, baseline))
        infer = {"enumerate": "parallel"} if enumerate_c else baseline_options(lib, "c", y,
                                                                                baseline)
        lib.ppl.sample("c", lib.dist.Categorical(logits=v[rep, lib.index(b)]
                                                 + u[rep] * y[:, None]), infer=infer)


def poisson_model(lib, y, rep, baseline="none"):
    """z ~ Poisson(e^{r0}), y | z ~ N(z / 2, 1)."""
    log_rate0 = lib.ppl.param("log_rate0")
    with lib.ppl.plate("N", y.shape[0]):
        z = lib.ppl.sample("z", lib.dist.Poisson(lib.exp(log_rate0[rep])))
        lib.ppl.sample("y", lib.dist.Normal(0.5 * z, 1.0), obs=y)


def poisson_guide(lib, y, rep, baseline="none"):
    g = lib.ppl.param("g")
    with lib.ppl.plate("N", y.shape[0]):
        lib.ppl.sample("z", lib.dist.Poisson(lib.exp(g[rep, 0] + g[rep, 1] * y)),
                       infer=baseline_options(lib, "z", y, baseline))


def bc_exact(lib, params, y, beta, *, coupled=True):
    """The loss −Σ_n Σ_{b,c} q(b) q(c|b) [β (ln p(b) + ln p(c|b) − ln q(b) − ln q(c|b)) +
    ln p(y|b,c)] of one copy, exactly (the sum over the 2·K values)."""
    p, y = params, lib.array(y)
    logit_b = p["w"][0] + p["w"][1] * y
    log_q_b = lib.log_sigmoid(logit_b[:, None] * lib.array([-1.0, 1.0]))  # (N, 2)
    log_p_b = lib.log_sigmoid(p["p_logit"] * lib.array([-1.0, 1.0]))  # (2,)
    log_q_c = lib.log_softmax(p["v"][None] + p["u"] * y[:, None, None])  # (N, 2, K)
    rows = p["pi"] if coupled else p["pi"][0] + 0 * p["pi"]
    log_p_c = lib.log_softmax(rows)  # (2, K)
    nu = p["nu"] if coupled else p["nu"][0] + 0 * p["nu"]
    log_lik = lib.dist.Normal(nu, 0.8).log_prob(y[:, None, None])  # (N, 2, K)
    q = lib.exp(log_q_b[:, :, None] + log_q_c)
    term = beta * (log_p_b[:, None] + log_p_c - log_q_b[:, :, None] - log_q_c) + log_lik
    return -(q * term).sum()


def poisson_exact(lib, params, y, beta, kmax=60):
    p, y = params, lib.array(y)
    k = lib.array(np.arange(kmax + 1))
    q = lib.dist.Poisson(lib.exp(p["g"][0] + p["g"][1] * y)[:, None])
    log_q = q.log_prob(k)
    log_p = lib.dist.Poisson(lib.exp(p["log_rate0"])).log_prob(k)
    log_lik = lib.dist.Normal(0.5 * k, 1.0).log_prob(y[:, None])
    return -(lib.exp(log_q) * (beta * (log_p - log_q) + log_lik)).sum()


def aux_model(lib, y, rep=None, baseline="none"):
    """z ~ N(0, 1), y | z ~ N(z, 0.8) per example; the M replicas of the N examples in a plate
    of their own (y flat, M·N: each replica's rows)."""
    rows = y.reshape(-1, len(Y0))
    with lib.ppl.plate("R", rows.shape[0], dim=-2), lib.ppl.plate("N", len(Y0), dim=-1):
        z = lib.ppl.sample("z", lib.dist.Normal(0.0, 1.0))
        lib.ppl.sample("y", lib.dist.Normal(z, 0.8), obs=rows)


def aux_guide(lib, y, rep=None, baseline="none"):
    """A guide-only auxiliary Bernoulli a per replica (not reparameterised, the model lacks
    it), which z's posterior reads: q(a) q(z|a, y) = Bernoulli(σ(l)) N(m_a + 0.3 y, 0.7)."""
    q_logit, m = lib.ppl.param("q_logit"), lib.ppl.param("m")
    rows = y.reshape(-1, len(Y0))
    with lib.ppl.plate("R", rows.shape[0], dim=-2):
        a = lib.ppl.sample("a", lib.dist.Bernoulli(logits=q_logit[:, None]),
                           infer={"is_auxiliary": True,
                                  **baseline_options(lib, "a", rows.mean(-1)[:, None],
                                                     baseline)})
        with lib.ppl.plate("N", len(Y0), dim=-1):
            lib.ppl.sample("z", lib.dist.Normal(lib.gather(m, lib.index(a)) + 0.3 * rows, 0.7))


def aux_exact(lib, params, y, beta):
    """−Σ_a q(a) [E_q(z|a)(β (ln p(z) − ln q(z|a)) + ln p(y|z)) − β ln q(a)], the Gaussian
    expectations in closed form."""
    y = lib.array(y)
    log_q_a = lib.log_sigmoid(params["q_logit"] * lib.array([-1.0, 1.0]))  # (2,)
    mu, var = params["m"][:, None] + 0.3 * y, 0.49  # (2, N)
    log_2pi = float(np.log(2 * np.pi))
    prior = (-0.5 * log_2pi - 0.5 * (mu ** 2 + var)).sum(-1)
    likelihood = (-0.5 * (log_2pi + np.log(0.64)) - ((y - mu) ** 2 + var) / 1.28).sum(-1)
    entropy = len(Y0) * 0.5 * (log_2pi + 1 + np.log(var))
    per_value = beta * (prior + entropy) + likelihood - beta * log_q_a
    return -(lib.exp(log_q_a) * per_value).sum()


AUX_PARAMS = {"q_logit": np.array(1.0), "m": np.array([-0.5, 1.5])}


CASES = {  # name: (model, guide, exact loss, parameters, replicas)
    "bernoulli+categorical": (bc_model, bc_guide, bc_exact, BC_PARAMS, M),
    "bernoulli, categorical summed out": (
        functools.partial(bc_model, coupled=False),
        functools.partial(bc_guide, coupled=False, enumerate_c=True),
        functools.partial(bc_exact, coupled=False), BC_PARAMS, M),
    "poisson": (poisson_model, poisson_guide, poisson_exact, POISSON_PARAMS, M_POISSON),
    "auxiliary bernoulli": (aux_model, aux_guide, aux_exact, AUX_PARAMS, M_AUX),
}
#: the estimators: (baseline, analytic_kl): the closed-form KL of each site (registered for
#: these pairs; its score-function terms then carry the downstream costs only), or Monte Carlo
#: ln q − ln p (Trace_ELBO's), without and with each baseline
ESTIMATORS = {"kl": ("none", True), "mc": ("none", False), "mc+avg": ("avg", False),
              "mc+nn": ("nn", False)}
#: (estimator, β) of each case in Pyro: every estimator at β ≠ 1, where the weights enter the
#: costs (the stock estimator under scale), and the plain one at β = 1 (each estimator is also
#: compared with TraceGraph_ELBO on the same draws at both β below). Each case's expectation is
#: a separate model: the combinations cover estimators × cases, not the whole product.
PYRO_COMBOS = [("kl", 1.0), ("kl", 2.5), ("mc", 2.5), ("mc+avg", 2.5), ("mc+nn", 2.5)]
#: NumPyro: one estimator per case at β = 2.5 (every estimator once), all compiled in one
#: function per case; its ScaledELBO equals TraceGraph_ELBO on the same draws at β = 1 below,
#: and the Pyro twin's surrogate at given draws (tests/test_parity.py)
NUMPYRO_COMBOS = {"bernoulli+categorical": "mc+avg", "bernoulli, categorical summed out": "kl",
                  "poisson": "mc+nn", "auxiliary bernoulli": "mc"}


def exact_gradient(lib, exact, params, beta):
    """{name: d loss / d parameter} of one copy, by the backend's autodiff."""
    if lib.backend == "pyro":
        import torch

        leaves = {k: lib.array(v).requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(exact(lib, leaves, Y0, beta), list(leaves.values()))
        return {k: g.numpy() for k, g in zip(leaves, grads)}
    import jax

    return {k: np.asarray(g) for k, g in jax.jit(jax.grad(lambda p: exact(lib, p, Y0, beta)))(
        {k: lib.array(v) for k, v in params.items()}).items()}


def replicated_gradients(lib, elbo, model, guide, params, replicas, *args, calls=1, seed=0):
    """{name: (replicas, ...) gradients}: the loss's gradient with respect to each replica's
    copy of each parameter, from the last of `calls` calls (the earlier ones fill a decaying
    average): replica m's row is one draw's estimate of the gradient for one copy."""
    y = lib.array(np.tile(Y0, replicas))
    rep = lib.replicas(replicas)
    stacked = {k: np.broadcast_to(v, (replicas, *np.shape(v))).copy()
               for k, v in params.items()}
    bound_model = functools.partial(model, lib)
    bound_guide = functools.partial(guide, lib)
    if lib.backend == "pyro":
        import pyro
        import torch

        pyro.clear_param_store()
        leaves = {k: pyro.param(k, lib.array(v)).unconstrained() for k, v in stacked.items()}
        for call in range(calls):
            pyro.set_rng_seed(seed + call)
            loss = elbo.differentiable_loss(bound_model, bound_guide, y, rep, *args)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return {k: g.numpy() for k, g in zip(leaves, grads)}
    import jax

    def loss(p, key, state):
        if hasattr(elbo, "differentiable_terms"):  # ScaledELBO: the baselines' state, too
            out = elbo.loss_with_mutable_state(key, {**p, **state}, bound_model, bound_guide,
                                               y, rep, *args)
            return out["loss"], out["mutable_state"] or {}
        return elbo.loss(key, p, bound_model, bound_guide, y, rep, *args), {}

    @jax.jit  # the calls in one compiled function: cheaper than the eager operations
    def run(p):
        state = {}
        for call in range(calls):
            grads, state = jax.grad(loss, has_aux=True)(p, jax.random.PRNGKey(seed + call),
                                                        state)
        return grads

    grads = run({k: lib.array(v) for k, v in stacked.items()})
    return {k: np.asarray(g) for k, g in grads.items()}


def within_monte_carlo_error(estimates: dict, exact: dict) -> tuple[bool, float, str]:
    """(every component of the mean of the M estimates within Z standard errors of the exact
    gradient, the largest tolerance relative to the exact gradient's largest component, a
    report of the worst component)."""
    worst, ok, resolution = "", True, 0.0
    for name, g in estimates.items():
        mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
        z = np.abs(mean - exact[name]) / np.maximum(se, 1e-12)
        ok &= bool(np.all(np.abs(mean - exact[name]) <= Z * se + 1e-6))
        resolution = max(resolution, float((Z * se).max() / np.abs(exact[name]).max()))
        worst += f"{name}: max z {z.max():.2f}; "
    return ok, resolution, worst


# ---- gradient expectations against the exact gradient --------------------------------------
@pytest.mark.parametrize("backend, case, estimator, beta", [
    *(("pyro", case, e, b) for case in CASES for e, b in PYRO_COMBOS),
    *(pytest.param("numpyro", case, e, 2.5, marks=pytest.mark.slow)
      for case, e in NUMPYRO_COMBOS.items())])
def test_gradient_expectation_is_the_exact_gradient(backend, case, estimator, beta):
    """E[∇ estimate] = ∇ of the β-weighted ELBO (at β ≠ 1: the stock ELBO with the latent sites
    scaled by β in model and guide), with the closed-form or the Monte Carlo rate, with each
    baseline (the decaying average after two calls have filled it)."""
    lib = Lib(backend)
    model, guide, exact, params, replicas = CASES[case]
    baseline, analytic_kl = ESTIMATORS[estimator]
    estimates = replicated_gradients(lib, lib.elbo(beta=beta, analytic_kl=analytic_kl), model,
                                     guide, params, replicas, baseline,
                                     calls=3 if baseline == "avg" else 1)
    ok, resolution, worst = within_monte_carlo_error(
        estimates, exact_gradient(lib, exact, params, beta))
    assert ok, worst
    assert resolution < 0.25, resolution  # the check resolves a quarter of the gradient


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bernoulli+categorical", "poisson"])
def test_the_check_rejects_estimators_known_to_be_wrong(case):
    """The same check on NumPyro's stock estimators: Trace_ELBO has no score-function term (a
    biased gradient for these sites), and TraceGraph_ELBO under handlers.scale(2.5) multiplies
    the score by the scale as well, so its gradient is not the scaled ELBO's; at β = 1
    TraceGraph_ELBO passes, as ScaledELBO does."""
    lib = Lib("numpyro")
    from numpyro.infer import Trace_ELBO, TraceGraph_ELBO
    from numpyro.primitives import Messenger

    class scale_latents(Messenger):
        """handlers.scale on the unobserved sample sites only: the stock β idiom."""

        def __init__(self, fn, scale):
            self.scale = scale
            super().__init__(fn)

        def process_message(self, msg):
            if msg["type"] == "sample" and not msg["is_observed"]:
                msg["scale"] = self.scale * (1.0 if msg["scale"] is None else msg["scale"])

    model, guide, exact, params, replicas = CASES[case]
    exact_1 = exact_gradient(lib, exact, params, 1.0)
    graph, trace, scaled = numpyro_replicated_gradients(lib, [
        (TraceGraph_ELBO(), model, guide), (Trace_ELBO(), model, guide),
        (TraceGraph_ELBO(), lambda *a: scale_latents(model, 2.5)(*a),
         lambda *a: scale_latents(guide, 2.5)(*a))], params, replicas)
    assert within_monte_carlo_error(graph, exact_1)[0]
    assert not within_monte_carlo_error(trace, exact_1)[0]
    assert not within_monte_carlo_error(scaled, exact_gradient(lib, exact, params, 2.5))[0]


def numpyro_replicated_gradients(lib, estimators, params, replicas, seed=0):
    """[`replicated_gradients` of each (elbo, model, guide)] for stock NumPyro estimators (no
    state between calls), in one compiled function."""
    import jax

    y, rep = lib.array(np.tile(Y0, replicas)), lib.replicas(replicas)
    stacked = {k: lib.array(np.broadcast_to(v, (replicas, *np.shape(v))))
               for k, v in params.items()}
    key = jax.random.PRNGKey(seed)

    @jax.jit
    def run(p):
        return [jax.grad(lambda q, e=e, m=m, g=g: e.loss(
            key, q, functools.partial(m, lib), functools.partial(g, lib), y, rep))(p)
            for e, m, g in estimators]

    return [{k: np.asarray(v) for k, v in grads.items()} for grads in run(stacked)]


# ---- the same draws as the stock estimators -------------------------------------------------
def mixed_model(lib, y, scale=None, baseline="none"):
    """b ~ Bernoulli, z | b ~ N(μ_b, 1) (reparameterised), c ~ Categorical, y ~ N(z + ν_c,
    0.7); the latents under `scale` (the stock β idiom)."""
    p_logit, mu, pi, nu = (lib.ppl.param(n) for n in ("p_logit", "mu", "pi", "nu"))
    with lib.ppl.plate("N", y.shape[0]):
        with lib.scale(scale=1.0 if scale is None else scale):
            b = lib.ppl.sample("b", lib.dist.Bernoulli(logits=p_logit))
            z = lib.ppl.sample("z", lib.dist.Normal(mu[lib.index(b)], 1.0))
            c = lib.ppl.sample("c", lib.dist.Categorical(logits=pi))
        lib.ppl.sample("y", lib.dist.Normal(z + nu[c], 0.7), obs=y)


def mixed_guide(lib, y, scale=None, baseline="none", nets=(None, None)):
    """q(b|y), q(z|b, y), q(c|y); `nets`: the nn baselines of b and c (torch modules)."""
    w, a, v, u = (lib.ppl.param(n) for n in ("w", "a", "v", "u"))
    with lib.ppl.plate("N", y.shape[0]), lib.scale(scale=1.0 if scale is None else scale):
        b = lib.ppl.sample("b", lib.dist.Bernoulli(logits=w[0] + w[1] * y),
                           infer=baseline_options(lib, "b", y, baseline, nets[0]))
        lib.ppl.sample("z", lib.dist.Normal(a[lib.index(b)] + 0.1 * y, 0.9))
        lib.ppl.sample("c", lib.dist.Categorical(logits=v + u * y[:, None]),
                       infer=baseline_options(lib, "c", y, baseline, nets[1]))


MIXED_PARAMS = {"p_logit": np.array(-0.4), "mu": np.array([-1.0, 1.5]),
                "pi": np.array([0.2, -0.3, 0.1]), "nu": np.array([0.3, -0.2, 0.6]),
                "w": np.array([0.1, 0.8]), "a": np.array([-0.5, 0.5]),
                "v": np.array([0.1, 0.0, -0.2]), "u": np.array([0.5, -0.3, 0.2])}


def pyro_loss_and_grads(elbo, model, guide, params, *args, seeds=(0,), modules=()):
    """(loss, {name: gradient}) of the last of the calls with `seeds` (Pyro, float64), the
    parameters fresh in the store; `loss_and_grads`, which every Pyro ELBO has."""
    import pyro

    lib = Lib("pyro")
    pyro.clear_param_store()
    leaves = {k: pyro.param(k, lib.array(v)).unconstrained() for k, v in params.items()}
    leaves |= {f"nn.{i}": p for i, m in enumerate(modules) for p in m.parameters()}
    for seed in seeds:
        for leaf in leaves.values():
            leaf.grad = None
        pyro.set_rng_seed(seed)
        loss = elbo.loss_and_grads(functools.partial(model, lib), functools.partial(guide, lib),
                                   *args)
    return loss, {k: leaf.grad.clone() for k, leaf in leaves.items() if leaf.grad is not None}


def assert_same(ours, stock, rtol):
    np.testing.assert_allclose(ours[0], stock[0], rtol=rtol)
    assert ours[1].keys() == stock[1].keys()
    for k in ours[1]:
        np.testing.assert_allclose(np.asarray(ours[1][k]), np.asarray(stock[1][k]), rtol=rtol,
                                   atol=1e-9, err_msg=k)


@pytest.fixture
def pyro64():
    torch = pytest.importorskip("torch")
    import pyro

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()


class Affine:
    """NVIL's input-dependent baseline, here a + b·y (a torch module)."""

    def __new__(cls):
        import torch

        class _Affine(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Parameter(torch.tensor(AFFINE[0]))
                self.b = torch.nn.Parameter(torch.tensor(AFFINE[1]))

            def forward(self, x):
                return self.a + self.b * x

        return _Affine()


PARTICLES = {"1": dict(num_particles=1), "2": dict(num_particles=2),
             "3vec": dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1)}


#: (baseline, β, particles): every baseline at both β, the particle settings spread over them
#: (NVIL's network not with vectorised particles, where TraceGraph_ELBO wants a baseline with
#: the particle dim and ScaledELBO broadcasts it)
SAME_DRAWS = [("none", 1.0, "3vec"), ("none", 2.5, "2"), ("avg", 1.0, "2"),
              ("avg", 2.5, "3vec"), ("avg", 2.5, "1"), ("nn", 1.0, "1"), ("nn", 2.5, "2")]


@pytest.mark.parametrize("baseline, beta, particles", SAME_DRAWS)
def test_pyro_equals_tracegraph_elbo_on_the_same_draws(pyro64, baseline, beta, particles):
    """The loss is Trace_ELBO's, the gradient TraceGraph_ELBO's (β ≠ 1: under poutine.scale on
    the latents of model and guide), with the same baselines: the decaying average over three
    steps, NVIL's network (whose own gradient, from the baseline loss, is compared too)."""
    particles = PARTICLES[particles]
    import torch
    from pyro.infer import Trace_ELBO, TraceGraph_ELBO

    y = torch.tensor(Y0)
    seeds = (0, 1, 2) if baseline == "avg" else (0,)
    nets = [(Affine(), Affine()), (Affine(), Affine())]  # b's and c's, for each estimator
    ours = pyro_loss_and_grads(
        Lib("pyro").elbo(beta=beta, analytic_kl=False, **particles), mixed_model,
        functools.partial(mixed_guide, nets=nets[0]), MIXED_PARAMS, y, None, baseline,
        seeds=seeds, modules=nets[0])
    scale = None if beta == 1.0 else beta
    stock = pyro_loss_and_grads(TraceGraph_ELBO(**particles), mixed_model,
                                functools.partial(mixed_guide, nets=nets[1]), MIXED_PARAMS, y,
                                scale, baseline, seeds=seeds, modules=nets[1])
    assert_same(ours, stock, rtol=1e-9)
    value = pyro_loss_and_grads(Trace_ELBO(**particles), mixed_model, mixed_guide,
                                MIXED_PARAMS, y, scale, "none", seeds=seeds)[0]
    assert ours[0] == pytest.approx(value, rel=1e-12)


def numpyro_value_and_grad(elbo, model, guide, params, *args, key=0, abstract=False):
    """(loss, {name: gradient}) (NumPyro, float32); `abstract`: only traced (`jax.eval_shape`,
    nothing compiled), for the refusals, which come while tracing."""
    import jax

    lib = Lib("numpyro")
    run = jax.value_and_grad(lambda p: elbo.loss(
        jax.random.PRNGKey(key), p, functools.partial(model, lib),
        functools.partial(guide, lib), *args))
    params = {k: lib.array(v) for k, v in params.items()}
    return jax.eval_shape(run, params) if abstract else run(params)


def numpyro_compiled(elbos, model, guide, params, *args, keys=(0,)):
    """[[(loss, {name: gradient}) of each estimator] for each key] (NumPyro, float32), all in
    one compiled function: cheaper than the eager calls, each of which compiles every operation
    it meets for the first time."""
    import jax

    lib = Lib("numpyro")
    model, guide = functools.partial(model, lib), functools.partial(guide, lib)

    def run(p):
        return [[jax.value_and_grad(lambda q, e=e, k=k: e.loss(
            jax.random.PRNGKey(k), q, model, guide, *args))(p) for e in elbos] for k in keys]

    return jax.jit(run)({k: lib.array(v) for k, v in params.items()})


def test_numpyro_equals_tracegraph_elbo_on_the_same_draws(num_particles=3):
    """The loss is Trace_ELBO's, the gradient TraceGraph_ELBO's (β = 1: NumPyro's TraceGraph_ELBO
    scales the score under handlers.scale, which ScaledELBO does not; see the check above), with
    vectorised particles (one particle: the auxiliary site's test below)."""
    lib = Lib("numpyro")
    from numpyro.infer import Trace_ELBO, TraceGraph_ELBO

    y = lib.array(Y0)
    [[ours, stock, value]] = numpyro_compiled(
        [lib.elbo(analytic_kl=False, num_particles=num_particles),
         TraceGraph_ELBO(num_particles=num_particles), Trace_ELBO(num_particles=num_particles)],
        mixed_model, mixed_guide, MIXED_PARAMS, y)
    assert_same(ours, stock, rtol=2e-5)
    np.testing.assert_allclose(ours[0], value[0], rtol=1e-6)


@pytest.mark.slow
def test_a_non_reparameterised_auxiliary_guide_site_gets_its_score_function_term(pyro64):
    """Issue 24's silent wrong gradient: a guide-only Bernoulli marked is_auxiliary had its ln q
    in the rate but no score-function term (the loss was right, d loss / d logit was not: the
    expectation tests above, "auxiliary bernoulli", fail that way). Its gradient is now
    TraceGraph_ELBO's on the same draws, in both backends. Pyro's Trace_ELBO gives another one:
    its cost for a score leaves out the guide-only site's own −ln q(a) (it sums the model's
    sites), a biased gradient, which the same expectation check rejects."""
    import torch
    from pyro.infer import Trace_ELBO, TraceGraph_ELBO

    one = {k: v[None] for k, v in AUX_PARAMS.items()}  # one replica
    y = torch.tensor(Y0)
    ours = pyro_loss_and_grads(Lib("pyro").elbo(analytic_kl=False), aux_model, aux_guide, one,
                               y)
    assert_same(ours, pyro_loss_and_grads(TraceGraph_ELBO(), aux_model, aux_guide, one, y),
                rtol=1e-9)
    assert abs(float(ours[1]["q_logit"])) > 0.1  # a score term of some size, to get right
    stock = pyro_loss_and_grads(Trace_ELBO(), aux_model, aux_guide, one, y)
    assert ours[0] == pytest.approx(stock[0], rel=1e-12)  # the same loss
    lib = Lib("pyro")
    exact = exact_gradient(lib, aux_exact, AUX_PARAMS, 1.0)
    assert not within_monte_carlo_error(replicated_gradients(
        lib, Trace_ELBO(), aux_model, aux_guide, AUX_PARAMS, M_AUX), exact)[0]

    lib = Lib("numpyro")
    from numpyro.infer import TraceGraph_ELBO

    for ours, stock in numpyro_compiled([lib.elbo(analytic_kl=False), TraceGraph_ELBO()],
                                        aux_model, aux_guide, one, lib.array(Y0),
                                        keys=range(3)):
        assert_same(ours, stock, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_site_marked_for_sequential_enumeration_warns_and_is_sampled(backend):
    """As the stock Trace_ELBO: a warning, then the site is drawn and gets its score-function
    term (ScaledELBO sums out parallel-marked sites only)."""
    lib = Lib(backend)

    def guide(lib, y):
        w = lib.ppl.param("w")
        with lib.ppl.plate("N", y.shape[0]):
            lib.ppl.sample("b", lib.dist.Bernoulli(logits=w[0] + w[1] * y),
                           infer={"enumerate": "sequential"})

    def model(lib, y):
        with lib.ppl.plate("N", y.shape[0]):
            b = lib.ppl.sample("b", lib.dist.Bernoulli(0.3))
            lib.ppl.sample("y", lib.dist.Normal(2.0 * b, 1.0), obs=y)

    params = {"w": np.array([0.1, 0.8])}
    y = lib.array(Y0)
    if backend == "pyro":
        from pyro.infer import TraceGraph_ELBO

        with pytest.warns(UserWarning, match="'b' is marked for sequential enumeration"):
            ours = pyro_loss_and_grads(lib.elbo(analytic_kl=False), model, guide, params, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pyro's own: "Found sample sites configured for"
            stock = pyro_loss_and_grads(TraceGraph_ELBO(), model, guide, params, y)
    else:
        from numpyro.infer import TraceGraph_ELBO

        with pytest.warns(UserWarning, match="'b' is marked for sequential enumeration"):
            [[ours, stock]] = numpyro_compiled([lib.elbo(analytic_kl=False), TraceGraph_ELBO()],
                                               model, guide, params, y)
    assert_same(ours, stock, rtol=1e-5)
    assert np.abs(np.asarray(ours[1]["w"])).max() > 0.05


# ---- baselines by hand, and the refusals ----------------------------------------------------
def coin_model(lib, y, options=None):
    with lib.ppl.plate("N", y.shape[0]):
        b = lib.ppl.sample("b", lib.dist.Bernoulli(0.3))
        lib.ppl.sample("y", lib.dist.Normal(2.0 * b - 1.0, 1.0), obs=y)


def coin_guide(lib, y, options=None):
    w = lib.ppl.param("w", lib.zeros(2))
    if options == "avg" and lib.backend == "numpyro":
        lib.mutable(BASELINE_AVERAGE + "b", lib.zeros(y.shape[0]))
    if options == "avg":
        options = {"use_decaying_avg_baseline": True, "baseline_beta": 0.75}
    elif options == "value":
        options = {"baseline_value": lib.ppl.param("theta", lib.zeros(y.shape[0]))}
    with lib.ppl.plate("N", y.shape[0]):
        lib.ppl.sample("b", lib.dist.Bernoulli(logits=w[0] + w[1] * y),
                       infer={"baseline": options or {}})


def coin_by_hand(b, w, y, beta=1.0):
    """(the downstream cost per example β(ln p(b) − ln q(b)) + ln p(y|b), d ln q(b) / d w)."""
    logit = w[0] + w[1] * y
    q1 = 1 / (1 + np.exp(-logit))
    log_q = np.where(b == 1, np.log(q1), np.log1p(-q1))
    log_p = np.where(b == 1, np.log(0.3), np.log(0.7))
    log_lik = -0.5 * (y - (2.0 * b - 1.0)) ** 2 - 0.5 * np.log(2 * np.pi)
    dlogq = (b - q1)[:, None] * np.stack([np.ones_like(y), y], -1)
    return beta * (log_p - log_q) + log_lik, dlogq


def test_numpyro_baselines_by_hand():
    """On the drawn values (the guide's key, split as the ELBO splits it): the gradient is
    −Σ_n ∇ln q(b_n) (c_n − baseline_n); a given baseline θ gets the gradient of Σ (c − θ)²,
    −2 (c − θ); the decaying average becomes (1 − 0.75) c + 0.75 · old, the state SVI
    carries."""
    jax = pytest.importorskip("jax")
    from numpyro.handlers import seed, substitute, trace

    lib = Lib("numpyro")
    y = lib.array(Y0)
    w, theta = np.array([0.1, 0.8]), np.array([-1.5, -2.0, -0.5, -1.0])
    key = jax.random.PRNGKey(4)
    guide_key = jax.random.split(key)[1]
    drawn = trace(seed(substitute(functools.partial(coin_guide, lib), {"w": lib.array(w)}),
                       guide_key)).get_trace(y)["b"]["value"]
    cost, dlogq = coin_by_hand(np.asarray(drawn), w, Y0)

    cost2, _ = coin_by_hand(np.asarray(drawn), w, Y0, beta=2.0)
    old = np.array([1.0, -2.0, 0.5, -4.0])
    model, guide = functools.partial(coin_model, lib), functools.partial(coin_guide, lib)
    name = BASELINE_AVERAGE + "b"

    @jax.jit  # (one compilation for the three)
    def run(w, theta, old):
        def loss(p, options, beta=1.0):
            return lib.elbo(beta=beta, analytic_kl=False).loss_with_mutable_state(
                key, p, model, guide, y, options)

        plain = jax.value_and_grad(lambda p: loss(p, None)["loss"])({"w": w})
        given = jax.value_and_grad(lambda p: loss(p, "value")["loss"])({"w": w, "theta": theta})
        # the decaying average: read from the guide's mutable site, the new one returned
        average = loss({"w": w, name: old}, "avg", beta=2.0)["mutable_state"][name]
        return plain, given, average

    (loss, grads), (loss_given, grads_given), average = run(lib.array(w), lib.array(theta),
                                                             lib.array(old))
    np.testing.assert_allclose(loss, -cost.sum(), rtol=1e-5)
    np.testing.assert_allclose(grads["w"], -(dlogq * cost[:, None]).sum(0), rtol=1e-4)
    np.testing.assert_allclose(loss_given, -cost.sum(), rtol=1e-5)  # no value changes
    np.testing.assert_allclose(grads_given["w"], -(dlogq * (cost - theta)[:, None]).sum(0),
                               rtol=1e-4)
    np.testing.assert_allclose(grads_given["theta"], -2 * (cost - theta), rtol=1e-4)
    np.testing.assert_allclose(average, 0.25 * cost2 + 0.75 * old, rtol=1e-5)


def test_numpyro_svi_trains_a_discrete_latent_and_carries_the_average():
    """SVI takes ScaledELBO as a loss that infers discrete latents (no warning that it cannot),
    carries the decaying average from step to step, and improves the ELBO."""
    jax = pytest.importorskip("jax")
    import optax
    from numpyro.infer import SVI

    lib = Lib("numpyro")
    y = lib.array(np.tile(Y0, 8))

    svi = SVI(functools.partial(coin_model, lib), functools.partial(coin_guide, lib, options="avg"),
              optax.adam(0.1), lib.elbo())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = svi.init(jax.random.PRNGKey(0), y)
    name = BASELINE_AVERAGE + "b"
    assert not np.any(state.mutable_state[name])
    update = jax.jit(svi.update)
    state, first = update(state, y)
    after_one = np.asarray(state.mutable_state[name])
    assert np.all(after_one != 0)
    losses = []
    for _ in range(150):
        state, loss = update(state, y)
        losses.append(float(loss))
    assert not np.allclose(state.mutable_state[name], after_one)
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_has_no_score_function_term_says_so(backend):
    """The importance-weighted bound and free bits refuse a non-reparameterised site, naming
    it; so do unknown baseline options and a baseline of the wrong shape; a decaying average
    in NumPyro without its state says how to declare it."""
    lib = Lib(backend)
    y = lib.array(Y0)
    params = {"w": np.array([0.1, 0.8])}
    run = pyro_loss_and_grads if backend == "pyro" else functools.partial(
        numpyro_value_and_grad, abstract=True)

    def guide_with(options):
        def guide(lib, y):
            w = lib.ppl.param("w")
            with lib.ppl.plate("N", y.shape[0]):
                lib.ppl.sample("b", lib.dist.Bernoulli(logits=w[0] + w[1] * y),
                               infer={"baseline": options})
        return guide

    for kwargs, match in ((dict(bound="iwae", num_particles=2), "'b'.*bound='iwae'"),
                          (dict(free_bits=0.1), "'b'.*free bits")):
        with pytest.raises(NotImplementedError, match=match):
            run(lib.elbo(**kwargs), coin_model, guide_with({}), params, y)
    with pytest.raises(ValueError, match="unknown baseline option.*baseline_betta"):
        run(lib.elbo(), coin_model, guide_with({"baseline_betta": 0.5}), params, y)
    with pytest.raises(ValueError, match="baseline of site 'b' has shape \\(2,\\)"):
        run(lib.elbo(), coin_model, guide_with({"baseline_value": lib.array([0.0, 1.0])}),
            params, y)
    if backend == "numpyro":
        with pytest.raises(ValueError, match="numpyro.primitives.mutable.*jnp.zeros\\(\\(4,\\)\\)"):
            run(lib.elbo(), coin_model, guide_with({"use_decaying_avg_baseline": True}),
                params, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_draw_inside_an_enumerated_branch_is_refused(backend):
    """A non-reparameterised site whose distribution reads an enumerated site is drawn once per
    value: its score-function term would need the draw shared, so it is refused, naming it."""
    lib = Lib(backend)

    def model(lib, y):
        with lib.ppl.plate("N", y.shape[0]):
            c = lib.ppl.sample("c", lib.dist.Bernoulli(0.5))
            b = lib.ppl.sample("b", lib.dist.Bernoulli(0.2 + 0.6 * c))
            lib.ppl.sample("y", lib.dist.Normal(b, 1.0), obs=y)

    def guide(lib, y):
        w = lib.ppl.param("w")
        with lib.ppl.plate("N", y.shape[0]):
            c = lib.ppl.sample("c", lib.dist.Bernoulli(logits=w[0] * y),
                               infer={"enumerate": "parallel"})
            lib.ppl.sample("b", lib.dist.Bernoulli(logits=w[1] * c))

    run = pyro_loss_and_grads if backend == "pyro" else functools.partial(
        numpyro_value_and_grad, abstract=True)
    with pytest.raises(NotImplementedError, match="'b' is drawn once per value"):
        run(lib.elbo(max_plate_nesting=1), model, guide, {"w": np.array([0.1, 0.8])},
            lib.array(Y0))
