"""NumPyro ScaledELBO against NumPyro's own estimators (same key, float64) and its invariants."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO  # noqa: E402

from ppl_vae.numpyro.elbo import ScaledELBO  # noqa: E402
from ppl_vae.numpyro.model import build  # noqa: E402
from ppl_vae.spec import Spec, load_spec  # noqa: E402

DATA = np.array([0.4, -1.2, 2.0, 0.1, 0.7])


def scaled(b, fn):
    if b is None:
        return fn()
    with handlers.scale(scale=b):
        return fn()


def model(data, b=None):
    """z1 ~ N(m, 1), z2 | z1 ~ N(w z1, 0.8), y | z ~ N(z1 + z2, 0.7): two latent sites."""
    m = numpyro.param("m", 0.3)
    w = numpyro.param("w", 0.5)
    with numpyro.plate("N", len(data)):
        z1 = scaled(b, lambda: numpyro.sample("z1", dist.Normal(m, 1.0)))
        z2 = scaled(b, lambda: numpyro.sample("z2", dist.Normal(w * z1, 0.8)))
        numpyro.sample("y", dist.Normal(z1 + z2, 0.7), obs=data)


def guide(data, b=None):
    n = len(data)
    a = numpyro.param("a", jnp.linspace(-0.5, 0.5, n))
    s1 = numpyro.param("s1", jnp.full(n, 0.6), constraint=constraints.positive)
    c = numpyro.param("c", jnp.linspace(0.2, -0.2, n))
    s2 = numpyro.param("s2", jnp.full(n, 0.9), constraint=constraints.positive)
    with numpyro.plate("N", n):
        scaled(b, lambda: numpyro.sample("z1", dist.Normal(a + 0.1 * data, s1)))
        scaled(b, lambda: numpyro.sample("z2", dist.Normal(c, s2)))


PARAMS = {"m": 0.3, "w": 0.5, "a": np.linspace(-0.5, 0.5, 5), "s1": np.full(5, 0.6),
          "c": np.linspace(0.2, -0.2, 5), "s2": np.full(5, 0.9)}


def value_and_grad(elbo, *args):
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    key = jax.random.PRNGKey(3)
    return jax.value_and_grad(lambda p: elbo.loss(key, p, model, guide, *args))(params)


def assert_same(a, b, rtol):
    np.testing.assert_allclose(a[0], b[0], rtol=rtol)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=rtol, atol=1e-12, err_msg=k)


def identities(rtol):
    """The identities with NumPyro's own ELBOs; called in float32 here and float64 below."""
    data = jnp.asarray(DATA)
    for n in (1, 3):
        assert_same(value_and_grad(ScaledELBO(analytic_kl=False, num_particles=n), data),
                    value_and_grad(Trace_ELBO(num_particles=n), data), rtol)
    assert_same(value_and_grad(ScaledELBO(analytic_kl=True), data),
                value_and_grad(TraceMeanField_ELBO(), data), rtol)
    for b in (0.25, 4.0):
        assert_same(value_and_grad(ScaledELBO(beta=b, analytic_kl=False), data),
                    value_and_grad(Trace_ELBO(), data, b), rtol)
        assert_same(value_and_grad(ScaledELBO(beta=b, analytic_kl=True), data),
                    value_and_grad(TraceMeanField_ELBO(), data, b), rtol)


def graph_identities(rtol):
    """The spec-built two-layer model (tests/pyro/test_elbo.py: TWO_LAYER) at β = 1: ScaledELBO
    is Trace_ELBO, and TraceMeanField_ELBO with analytic_kl (z2's KL closed-form in both, z1's
    full-covariance rate Monte Carlo in both), values and gradients."""
    from ppl_vae.numpyro.hooks import Model
    from tests.pyro.test_elbo import TWO_LAYER

    dtype = "float64" if jax.config.jax_enable_x64 else "float32"
    model = Model(load_spec(Spec(), [*TWO_LAYER, f'train.dtype="{dtype}"']), 10, None, "cpu")
    y = jnp.asarray(np.random.default_rng(0).normal(size=(7, 10)), model.dtype)
    for ours, stock in ((ScaledELBO(analytic_kl=False, num_particles=2), Trace_ELBO(2)),
                        (ScaledELBO(analytic_kl=True), TraceMeanField_ELBO())):
        with warnings.catch_warnings():  # the stock mean-field check warns: bottom-up order
            warnings.filterwarnings("ignore", "Failed to verify mean field")
            a, b = (jax.jit(jax.value_and_grad(lambda p, e=e: e.loss(
                jax.random.PRNGKey(2), p, model.built.model, model.built.guide, y)))(
                    model.param_map) for e in (ours, stock))
        np.testing.assert_allclose(a[0], b[0], rtol=rtol)
        for x, z in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
            np.testing.assert_allclose(x, z, rtol=rtol, atol=rtol * np.abs(z).max())


# ---- discrete latents summed out: against TraceEnum_ELBO (funsor) -------------------------------
K = 3


def enum_model(data, with_z=True, b=None, labels=None):
    """The twin of tests/pyro/test_elbo.py's: c ~ Cat(π); z | c ~ N(μ_c, 1); y ~ N(z + ν_c)."""
    logits = numpyro.param("pi_logits", jnp.array([0.2, -0.4, 0.1]))
    mu = numpyro.param("mu", jnp.array([-1.0, 0.5, 2.0])) if with_z else None
    nu = numpyro.param("nu", jnp.array([0.3, -0.2, 0.6]))
    with numpyro.plate("N", len(data)):
        c = scaled(b, lambda: numpyro.sample("c", dist.Categorical(logits=logits)))
        z = scaled(b, lambda: numpyro.sample("z", dist.Normal(mu[c], 1.0))) if with_z else 0.0
        numpyro.sample("y", dist.Normal(z + nu[c], 0.7), obs=data)


def enum_guide(data, with_z=True, b=None, labels=None):
    w = numpyro.param("w", jnp.linspace(-0.3, 0.4, K))
    if with_z:
        a = numpyro.param("a", jnp.linspace(-0.5, 0.5, K))
        s = numpyro.param("s", jnp.full(K, 0.8), constraint=constraints.positive)
    with numpyro.plate("N", len(data)):
        probs = jax.nn.softmax(data[:, None] * w, -1)
        infer = {"enumerate": "parallel"}
        if labels is not None:
            known = labels >= 0
            probs = jnp.where(known[:, None], jax.nn.one_hot(jnp.maximum(labels, 0), K), probs)
            infer["observed"] = known
        c = scaled(b, lambda: numpyro.sample("c", dist.Categorical(probs), infer=infer))
        if with_z:
            scaled(b, lambda: numpyro.sample("z", dist.Normal(a[c] + 0.1 * data, s[c])))


ENUM_PARAMS = {"pi_logits": np.array([0.2, -0.4, 0.1]), "mu": np.array([-1.0, 0.5, 2.0]),
               "nu": np.array([0.3, -0.2, 0.6]), "w": np.linspace(-0.3, 0.4, K),
               "a": np.linspace(-0.5, 0.5, K), "s": np.full(K, 0.8)}


def enum_value_and_grad(elbo, with_z, *args):
    names = [k for k in ENUM_PARAMS if with_z or k not in ("mu", "a", "s")]
    params = {k: jnp.asarray(ENUM_PARAMS[k]) for k in names}
    key = jax.random.PRNGKey(3)
    return jax.value_and_grad(lambda p: elbo.loss(key, p, enum_model, enum_guide,
                                                  jnp.asarray(DATA), with_z, *args))(params)


def enum_identities(rtol):
    """ScaledELBO with an enumerated guide site equals NumPyro's TraceEnum_ELBO: with and
    without a continuous site depending on it, at β = 1 and under handlers.scale."""
    from numpyro.infer import TraceEnum_ELBO

    for with_z in (True, False):
        assert_same(enum_value_and_grad(ScaledELBO(analytic_kl=False, max_plate_nesting=1),
                                        with_z),
                    enum_value_and_grad(TraceEnum_ELBO(max_plate_nesting=1), with_z), rtol)
    for b in (0.25, 4.0):
        assert_same(enum_value_and_grad(ScaledELBO(beta=b, analytic_kl=False,
                                                   max_plate_nesting=1), True),
                    enum_value_and_grad(TraceEnum_ELBO(max_plate_nesting=1), True, b), rtol)


def test_a_factor_outside_the_plate_counts_once_beside_an_enumerated_site():
    """The twin of the Pyro test: the enumeration weights sum to the batch size over (c, n), so
    a guide value outside the data plate (M2's cross-entropy α-term) is its own expectation,
    not weighted by them; before the fix it was counted len(DATA) times."""
    def guide(data, *args):
        w = numpyro.param("w", jnp.linspace(-0.3, 0.4, K))
        numpyro.factor("ce", 0.7 * jnp.sum(w ** 2))
        enum_guide(data, *args)

    params = {k: jnp.asarray(v) for k, v in ENUM_PARAMS.items()}
    elbo = ScaledELBO(max_plate_nesting=1)
    key, y = jax.random.PRNGKey(0), jnp.asarray(DATA)
    with_factor = elbo.terms(key, params, enum_model, guide, y)
    without = elbo.terms(key, params, enum_model, enum_guide, y)
    expected = 0.7 * float(jnp.sum(params["w"] ** 2))
    np.testing.assert_allclose(with_factor["aux/ce"], expected, rtol=1e-6)
    np.testing.assert_allclose(with_factor["loss"] - without["loss"], expected, rtol=1e-5)


def test_enumerated_terms_match_the_pyro_twin():
    """Same parameters, closed-form KLs: the same rate and distortion per site as the Pyro
    backend's ScaledELBO (which equals Pyro's TraceEnum_ELBO), with and without known labels."""
    import pyro
    import torch

    import tests.pyro.test_elbo as pt
    from ppl_vae.pyro.elbo import ScaledELBO as PyroScaledELBO

    labels = np.array([0, 2, -1, 1, -1])
    for lab in (None, labels):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False):
            ours_pyro = PyroScaledELBO(max_plate_nesting=1).terms(
                pt.enum_model, pt.enum_guide, torch.tensor(DATA, dtype=torch.float32), False,
                None, None, None if lab is None else torch.tensor(lab))
        params = {k: jnp.asarray(v, jnp.float32) for k, v in ENUM_PARAMS.items()
                  if k not in ("mu", "a", "s")}
        ours = ScaledELBO(max_plate_nesting=1).terms(
            jax.random.PRNGKey(0), params, enum_model, enum_guide,
            jnp.asarray(DATA, jnp.float32), False, None, None if lab is None else jnp.asarray(lab))
        assert set(ours) == set(ours_pyro)
        for k in ours:
            np.testing.assert_allclose(ours[k], ours_pyro[k].numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=k)


def iwae_identities(rtol):
    """bound="iwae" is RenyiELBO(alpha=0) on the same draws (the same key, split as the stock
    estimator splits it), values and gradients; with β = b, the stock estimator with the latent
    sites scaled by b in model and guide. DReG: the same value and the same gradient of the
    model's parameters (m, w), another one of the guide's."""
    from numpyro.infer import RenyiELBO

    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    key, data = jax.random.PRNGKey(3), jnp.asarray(DATA)

    def jitted(elbo, *args):
        return jax.jit(jax.value_and_grad(lambda p: elbo.loss(key, p, model, guide, data,
                                                              *args)))(params)

    for k in (1, 5):
        for b in (None, 2.5):
            beta = 1.0 if b is None else b
            stock = jitted(RenyiELBO(alpha=0, num_particles=k), b)
            assert_same(jitted(ScaledELBO(beta=beta, bound="iwae", num_particles=k)), stock,
                        rtol)
            dreg = jitted(ScaledELBO(beta=beta, bound="iwae", gradient="dreg",
                                     num_particles=k))
            np.testing.assert_allclose(dreg[0], stock[0], rtol=rtol)
            for name in ("m", "w"):
                np.testing.assert_allclose(dreg[1][name], stock[1][name], rtol=rtol, atol=1e-7)
            assert not np.allclose(dreg[1]["a"], stock[1]["a"], rtol=1e-3)


def enum_log_evidence(labels=None):
    """The twin of tests/pyro/test_elbo.py's: Σ_n ln p(y_n) (ln p(y_n, c_n) where known)."""
    p = ENUM_PARAMS
    log_pi = jax.nn.log_softmax(jnp.asarray(p["pi_logits"]))
    joint = log_pi + dist.Normal(jnp.asarray(p["nu"]), 0.7).log_prob(jnp.asarray(DATA)[:, None])
    out = jax.scipy.special.logsumexp(joint, -1)
    if labels is not None:
        known = labels >= 0
        out = jnp.where(known, jnp.take_along_axis(joint, jnp.maximum(labels, 0)[:, None], -1)[
            :, 0], out)
    return jnp.sum(out)


def enum_iwae_identities(rtol):
    """The twin of the Pyro test: an enumerated site summed out inside each weight makes L_K
    = ln p(y) exactly without another latent, and the classifier gets no gradient at β = 1."""
    params = {k: jnp.asarray(ENUM_PARAMS[k]) for k in ("pi_logits", "nu", "w")}
    for k in (1, 3):
        for labels in (None, jnp.asarray([0, 2, -1, 1, -1])):
            elbo = ScaledELBO(bound="iwae", num_particles=k, max_plate_nesting=1)
            loss, grads = jax.jit(jax.value_and_grad(lambda p, e=elbo, lab=labels: e.loss(
                jax.random.PRNGKey(0), p, enum_model, enum_guide, jnp.asarray(DATA), False,
                None, lab)))(params)
            np.testing.assert_allclose(-loss, enum_log_evidence(labels), rtol=rtol)
            assert np.abs(grads["w"]).max() < 10 * rtol


def test_identities_float32():
    identities(rtol=2e-5)  # the spec-built graph's identities run in float64 only, below
    iwae_identities(rtol=2e-5)
    enum_iwae_identities(rtol=2e-5)


def test_identities_float64():
    code = ("import tests.numpyro.test_elbo as t; t.identities(rtol=1e-6); "
            "t.graph_identities(rtol=1e-6); t.enum_identities(rtol=1e-6); "
            "t.iwae_identities(rtol=1e-6); t.enum_iwae_identities(rtol=1e-9); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "JAX_ENABLE_X64": "1"}, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_terms_add_up_with_dict_weights():
    elbo = ScaledELBO(beta={"z1": 2.0, "z2": 0.5}, lam={"y": 3.0})
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    t = elbo.terms(jax.random.PRNGKey(0), params, model, guide, jnp.asarray(DATA))
    assert set(t) == {"loss", "rate", "distortion", "aux", "rate/z1", "rate/z2",
                      "distortion/y"}
    np.testing.assert_allclose(t["rate"], t["rate/z1"] + t["rate/z2"], rtol=1e-6)
    np.testing.assert_allclose(
        t["loss"], 2 * t["rate/z1"] + 0.5 * t["rate/z2"] + 3 * t["distortion/y"], rtol=1e-6)


def test_traced_beta_compiles_once():
    traces = []
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    elbo = ScaledELBO()

    @jax.jit
    def loss(beta):
        traces.append(1)
        return elbo.with_weights(beta, 1.0).loss(jax.random.PRNGKey(0), params, model, guide,
                                                 jnp.asarray(DATA))

    values = [float(loss(jnp.asarray(b))) for b in (0.0, 0.5, 1.0, 2.0)]
    assert len(traces) == 1
    assert values[0] < values[1] < values[2] < values[3]  # rate > 0 costs more with β


def test_stock_svi_accepts_it():
    svi = SVI(model, guide, optax.adam(0.05), loss=ScaledELBO(beta=4.0))
    result = svi.run(jax.random.PRNGKey(0), 200, jnp.asarray(DATA), progress_bar=False)
    assert result.losses[-20:].mean() < result.losses[:20].mean()


def test_non_reparameterised_latent_is_a_clear_error():
    def m():
        numpyro.sample("coin", dist.Bernoulli(0.5))

    def g():
        p = numpyro.param("p", 0.3, constraint=constraints.unit_interval)
        numpyro.sample("coin", dist.Bernoulli(p))

    with pytest.raises(NotImplementedError, match="'coin'.*not reparameterised"):
        ScaledELBO().loss(jax.random.PRNGKey(0), {"p": 0.3}, m, g)


def test_aux_gradients_reach_the_encoder_only():
    spec = load_spec(Spec(), ['prior.kind="learned_normal"', "latent.dim=3",
                              'objective.aux=[{kind="infonce"}, {kind="supervised"}]',
                              "encoder.hidden=[16]", "decoder.hidden=[16]"])
    built = build(spec, 12)
    from ppl_vae.numpyro.params import export_params, init_params

    params = init_params(built, 12, jax.random.PRNGKey(0))
    y = jnp.asarray(np.random.default_rng(0).integers(0, 2, (10, 12)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, -1, -1, 3, 4, 5, -1, 1])
    grads = jax.jit(jax.grad(lambda p: ScaledELBO().differentiable_terms(
        jax.random.PRNGKey(1), p, built.model, built.guide, y, labels)["aux"]))(params)
    for name, g in export_params(grads).items():
        if name.split(".")[0] in ("decoder", "prior", "likelihood"):
            assert not np.any(g), name
        elif name.endswith("weight"):
            assert np.any(g), name


# ---- where stock users go: AutoGuides, the stock keywords, mutable state (issue 13) -----------
def constrained_model(data, b=None):
    """loc ~ N(0, 2), scale ~ LogNormal(0, 0.5) (a constrained latent), y ~ N(loc, scale)."""
    loc = scaled(b, lambda: numpyro.sample("loc", dist.Normal(0.0, 2.0)))
    scale = scaled(b, lambda: numpyro.sample("scale", dist.LogNormal(0.0, 0.5)))
    with numpyro.plate("N", len(data)):
        numpyro.sample("y", dist.Normal(loc, scale), obs=data)


@pytest.mark.parametrize("autoguide, b", [
    *((g, b) for g in ("AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal",
                       "AutoLowRankMultivariateNormal") for b in (None, 0.25)),
    # AutoDAIS's guide adds factor sites, which ScaledELBO counts as aux terms (not under β):
    # it equals the stock ELBO at β = 1 only
    ("AutoDAIS", None)])
def test_autoguides_equal_the_stock_elbo(autoguide, b):
    """Guide-only latents marked is_auxiliary (``_AutoDiagonalNormal_latent``) belong to the
    rate; β = b equals Trace_ELBO with the model's latents and the whole guide scaled."""
    from numpyro.infer import autoguide as autoguides

    data = jnp.asarray(DATA, jnp.float32)
    guide = getattr(autoguides, autoguide)(constrained_model)
    svi = SVI(constrained_model, guide, optax.adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), data))
    key = jax.random.PRNGKey(7)
    stock_guide = guide if b is None else handlers.scale(guide, scale=b)

    def value_and_grads(elbo, g, *args):
        return jax.value_and_grad(lambda p: elbo.loss(key, p, constrained_model, g, data,
                                                      *args))(params)

    ours = value_and_grads(ScaledELBO(beta=1.0 if b is None else b, analytic_kl=False), guide)
    stock = value_and_grads(Trace_ELBO(), stock_guide, b)
    assert_same(ours, stock, rtol=2e-5)


def test_the_stock_keywords_are_accepted():
    data = jnp.asarray(DATA)
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    key = jax.random.PRNGKey(3)
    per_site = ScaledELBO(sum_sites=False, analytic_kl=False).loss(key, params, model, guide,
                                                                   data)
    assert set(per_site) == {"z1", "z2", "y"}
    total = ScaledELBO(analytic_kl=False).loss(key, params, model, guide, data)
    np.testing.assert_allclose(sum(per_site.values()), total, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="multi_sample_guide"):
        ScaledELBO(multi_sample_guide=True)


def test_model_and_guide_are_checked_as_the_stock_elbo_checks_them():
    """NumPyro's Trace_ELBO runs `check_model_guide_match` (and model validation) on its traces:
    a guide whose site has a plate the model's lacks is refused, by ScaledELBO as by the stock
    ELBO, with the same message (before, ScaledELBO broadcast the shapes and went on)."""
    from numpyro.infer import Trace_ELBO

    def unplated_model():
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    def plated_guide():
        loc = numpyro.param("loc", jnp.zeros(3))
        with numpyro.plate("N", 3):
            numpyro.sample("z", dist.Normal(loc, 1.0))

    params = {"loc": jnp.zeros(3)}
    for elbo in (Trace_ELBO(), ScaledELBO()):
        with pytest.raises(ValueError, match="Model and guide shapes disagree at site 'z'"):
            elbo.loss(jax.random.PRNGKey(0), params, unplated_model, plated_guide)


def test_batchnorm_state_is_carried_through_svi_run():
    """flax BatchNorm's batch_stats (numpyro.mutable) come back from the loss, as from the
    stock Trace_ELBO, so SVI.run trains several steps and updates them."""
    import flax.linen as nn
    from numpyro.contrib.module import flax_module

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
            return nn.Dense(3)(x)

    y = jax.random.normal(jax.random.PRNGKey(0), (16, 3))

    def bn_model(y):
        net = flax_module("net", Net(), input_shape=(1, 2), mutable=["batch_stats"])
        with numpyro.plate("N", y.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            numpyro.sample("y", dist.Normal(net(z), 1.0).to_event(1), obs=y)

    def bn_guide(y):
        loc = numpyro.param("loc", jnp.zeros((y.shape[0], 2)))
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    results = {}
    for name, elbo in (("ours", ScaledELBO(analytic_kl=False)), ("stock", Trace_ELBO())):
        svi = SVI(bn_model, bn_guide, optax.adam(1e-2), elbo)
        result = svi.run(jax.random.PRNGKey(1), 5, y, progress_bar=False)
        results[name] = result
    np.testing.assert_allclose(results["ours"].losses, results["stock"].losses, rtol=1e-5)
    stats = results["ours"].state.mutable_state["net$state"]["batch_stats"]["BatchNorm_0"]
    assert np.abs(np.asarray(stats["mean"])).sum() > 0  # updated from the initial zeros
