"""NumPyro ScaledELBO against NumPyro's own estimators (same key, float64) and its invariants."""

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


def compiled(groups, params):
    """[[value_and_grad of each loss function of the parameters in a group] for each group],
    all in one compiled function: one compilation costs less than the eager calls (each a
    compilation per operation and shape) or one compilation per case."""
    return jax.jit(lambda p: [[jax.value_and_grad(f)(p) for f in g] for g in groups])(params)


def identities(rtol):
    """The identities with NumPyro's own ELBOs (rtol: float32's or float64's)."""
    data, key = jnp.asarray(DATA), jax.random.PRNGKey(3)

    def loss(elbo, *args):
        return lambda p: elbo.loss(key, p, model, guide, data, *args)

    pairs = [(loss(ScaledELBO(analytic_kl=False, num_particles=n)),
              loss(Trace_ELBO(num_particles=n))) for n in (1, 3)]
    pairs.append((loss(ScaledELBO(analytic_kl=True)), loss(TraceMeanField_ELBO())))
    b = 4.0  # (β < 1 is the same identity: the Pyro twin and the AutoGuide test take 0.25)
    pairs.append((loss(ScaledELBO(beta=b, analytic_kl=False)), loss(Trace_ELBO(), b)))
    pairs.append((loss(ScaledELBO(beta=b, analytic_kl=True)), loss(TraceMeanField_ELBO(), b)))
    for ours, stock in compiled(pairs, {k: jnp.asarray(v) for k, v in PARAMS.items()}):
        assert_same(ours, stock, rtol)


def graph_identities(rtol):
    """The spec-built two-layer model (tests/pyro/test_elbo.py: TWO_LAYER) at β = 1: ScaledELBO
    is Trace_ELBO, and TraceMeanField_ELBO with analytic_kl (z2's KL closed-form in both, z1's
    full-covariance rate Monte Carlo in both), values and gradients."""
    from ppl_vae.numpyro.hooks import Model
    from tests.pyro.test_elbo import TWO_LAYER

    dtype = "float64" if jax.config.jax_enable_x64 else "float32"
    model = Model(load_spec(Spec(), [*TWO_LAYER, f'train.dtype="{dtype}"']), 10, None, "cpu")
    y = jnp.asarray(np.random.default_rng(0).normal(size=(7, 10)), model.dtype)
    def loss(elbo):
        return lambda p: elbo.loss(jax.random.PRNGKey(2), p, model.built.model,
                                   model.built.guide, y)

    pairs = [(loss(ScaledELBO(analytic_kl=False, num_particles=2)), loss(Trace_ELBO(2))),
             (loss(ScaledELBO(analytic_kl=True)), loss(TraceMeanField_ELBO()))]
    with warnings.catch_warnings():  # the stock mean-field check warns: bottom-up order
        warnings.filterwarnings("ignore", "Failed to verify mean field")
        results = compiled(pairs, model.param_map)
    for a, b in results:
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

    data, key = jnp.asarray(DATA), jax.random.PRNGKey(3)

    def loss(elbo, *args):
        return lambda p: elbo.loss(key, p, enum_model, enum_guide, data, *args)

    pairs = [(loss(ScaledELBO(analytic_kl=False, max_plate_nesting=1), with_z),
              loss(TraceEnum_ELBO(max_plate_nesting=1), with_z)) for with_z in (True, False)]
    pairs += [(loss(ScaledELBO(beta=b, analytic_kl=False, max_plate_nesting=1), True),
               loss(TraceEnum_ELBO(max_plate_nesting=1), True, b)) for b in (0.25, 4.0)]
    for ours, stock in compiled(pairs, {k: jnp.asarray(v) for k, v in ENUM_PARAMS.items()}):
        assert_same(ours, stock, rtol)


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
    with_factor, without = jax.jit(lambda p: [elbo.terms(key, p, enum_model, g, y)
                                              for g in (guide, enum_guide)])(params)
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
        ours = jax.jit(lambda p, lab=lab: ScaledELBO(max_plate_nesting=1).terms(
            jax.random.PRNGKey(0), p, enum_model, enum_guide, jnp.asarray(DATA, jnp.float32),
            False, None, None if lab is None else jnp.asarray(lab)))(params)
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

    key, data = jax.random.PRNGKey(3), jnp.asarray(DATA)

    def loss(elbo, *args):
        return lambda p: elbo.loss(key, p, model, guide, data, *args)

    cases = [(1, None), (5, 2.5)]  # one particle and several, β = 1 and β ≠ 1
    triples = [(loss(RenyiELBO(alpha=0, num_particles=k), b),
                loss(ScaledELBO(beta=b or 1.0, bound="iwae", num_particles=k)),
                loss(ScaledELBO(beta=b or 1.0, bound="iwae", gradient="dreg",
                                num_particles=k))) for k, b in cases]
    for stock, ours, dreg in compiled(triples, {k: jnp.asarray(v) for k, v in PARAMS.items()}):
        assert_same(ours, stock, rtol)
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
    cases = [(k, labels) for k in (1, 3) for labels in (None, np.array([0, 2, -1, 1, -1]))]
    losses = [[lambda p, k=k, lab=labels: ScaledELBO(
        bound="iwae", num_particles=k, max_plate_nesting=1).loss(
        jax.random.PRNGKey(0), p, enum_model, enum_guide, jnp.asarray(DATA), False, None,
        None if lab is None else jnp.asarray(lab))] for k, labels in cases]
    for (_, labels), [(loss, grads)] in zip(cases, compiled(losses, params)):
        np.testing.assert_allclose(-loss, enum_log_evidence(labels), rtol=rtol)
        assert np.abs(grads["w"]).max() < 10 * rtol


#: the identity groups (each a function of the relative tolerance) and their tolerances in
#: float64 (the float32 comparisons with the stock estimators are the rest of this file's, at
#: 2e-5: multi_sample_guide, the AutoGuides, guide-only sites, the guessed plate nesting)
IDENTITIES = {"trace": (identities, 1e-6), "graph": (graph_identities, 1e-6),
              "enum": (enum_identities, 1e-6), "iwae": (iwae_identities, 1e-6),
              "enum_iwae": (enum_iwae_identities, 1e-9)}


@pytest.mark.slow
@pytest.mark.parametrize("group", list(IDENTITIES))
def test_identities(group):
    """The identities with NumPyro's own estimators in float64 (``jax.enable_x64``, in this
    process), where the tolerances are tight."""
    check, rtol = IDENTITIES[group]
    with jax.enable_x64(True):
        check(rtol)


def test_terms_add_up_with_dict_weights():
    elbo = ScaledELBO(beta={"z1": 2.0, "z2": 0.5}, lam={"y": 3.0})
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    t = jax.jit(lambda p: elbo.terms(jax.random.PRNGKey(0), p, model, guide,
                                     jnp.asarray(DATA)))(params)
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


def test_a_non_reparameterised_latent_is_trained_by_its_score_function():
    """Once refused (issue 24): a Bernoulli latent that is not summed out is sampled, its loss
    is Trace_ELBO's and its gradient TraceGraph_ELBO's on the same draws (more in
    tests/test_score_function.py)."""
    from numpyro.infer import TraceGraph_ELBO

    def m():
        numpyro.sample("coin", dist.Bernoulli(0.5))

    def g():
        p = numpyro.param("p", 0.3, constraint=constraints.unit_interval)
        numpyro.sample("coin", dist.Bernoulli(p))

    def loss(elbo):
        return lambda p: elbo.loss(jax.random.PRNGKey(0), p, m, g)

    [[ours, graph, trace]] = compiled(
        [[loss(ScaledELBO(analytic_kl=False)), loss(TraceGraph_ELBO()), loss(Trace_ELBO())]],
        {"p": jnp.asarray(0.3)})
    assert_same(ours, graph, rtol=1e-6)
    np.testing.assert_allclose(ours[0], trace[0], rtol=1e-6)
    assert abs(float(ours[1]["p"])) > 0.1


# ---- drop-in leftovers (issue 24): what the stock ELBOs take, ScaledELBO takes ----------------
def test_enumeration_guesses_max_plate_nesting_as_traceenum_elbo():
    """Without max_plate_nesting: where TraceEnum_ELBO().loss works (it guesses the nesting from
    one unenumerated run), so does ScaledELBO().loss, with its value and gradients; the guess
    is kept, as there."""
    from numpyro.infer import TraceEnum_ELBO

    elbo = ScaledELBO(analytic_kl=False)
    data = jnp.asarray(DATA)
    [[ours, stock]] = compiled([[
        lambda p, e=e: e.loss(jax.random.PRNGKey(3), p, enum_model, enum_guide, data)
        for e in (elbo, TraceEnum_ELBO())]], {k: jnp.asarray(v) for k, v in ENUM_PARAMS.items()})
    assert_same(ours, stock, rtol=2e-5)
    assert elbo.max_plate_nesting == 1


def sample_model(data, b=None):
    """One global latent and a local one per example, both in the guide's samples."""
    loc = scaled(b, lambda: numpyro.sample("loc", dist.Normal(0.0, 2.0)))
    with numpyro.plate("N", len(data)):
        z = scaled(b, lambda: numpyro.sample("z", dist.Normal(loc, 1.0)))
        numpyro.sample("y", dist.Normal(z, 0.7), obs=data)


def sample_guide(data, b=None, num_samples=4):
    """S = 4 samples of every site in one run (a leading dim), as multi_sample_guide expects."""
    m = numpyro.param("m", 0.2)
    a = numpyro.param("a", jnp.linspace(-0.5, 0.5, len(data)))
    with numpyro.plate("samples", num_samples, dim=-2):
        loc = scaled(b, lambda: numpyro.sample("loc", dist.Normal(m, 0.5)))
        with numpyro.plate("N", len(data)):
            scaled(b, lambda: numpyro.sample("z", dist.Normal(a + 0.5 * loc, 0.8)))


def test_multi_sample_guide_equals_the_stock_trace_elbo():
    """multi_sample_guide=True as NumPyro's Trace_ELBO takes it: the model scored at each of the
    guide's samples and summed; with β = b, the stock one under handlers.scale on the latents
    (β = 1 and 2.5 in one compiled function)."""
    params = {"m": jnp.asarray(0.2), "a": jnp.linspace(-0.5, 0.5, 5)}
    data = jnp.asarray(DATA)

    def loss(elbo, *args):
        return lambda p: elbo.loss(jax.random.PRNGKey(1), p, sample_model, sample_guide, data,
                                   *args)

    groups = [[loss(ScaledELBO(beta=1.0 if b is None else b, multi_sample_guide=True)),
               loss(Trace_ELBO(multi_sample_guide=True), b)] for b in (None, 2.5)]
    for ours, stock in compiled(groups, params):
        assert_same(ours, stock, rtol=2e-5)
    with pytest.raises(NotImplementedError, match="multi_sample_guide=True.*bound='iwae'"):
        ScaledELBO(multi_sample_guide=True, bound="iwae")


def test_a_guide_only_latent_not_marked_auxiliary_counts_as_in_trace_elbo():
    """A guide sample site the model lacks, not marked auxiliary: once refused as stray; the
    stock Trace_ELBO counts its ln q (with check_model_guide_match's warning), and so does
    ScaledELBO, in the rate."""
    def guide_with_extra(data, b=None):
        guide(data, b)
        numpyro.sample("extra", dist.Normal(numpyro.param("e", 0.5), 1.0))

    params = {k: jnp.asarray(v) for k, v in PARAMS.items()} | {"e": jnp.asarray(0.5)}
    key, data = jax.random.PRNGKey(3), jnp.asarray(DATA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [[ours, stock]] = compiled([[lambda p, e=e: e.loss(key, p, model, guide_with_extra, data)
                                     for e in (ScaledELBO(analytic_kl=False), Trace_ELBO())]],
                                   params)
    assert_same(ours, stock, rtol=2e-5)
    assert sum("non-auxiliary vars in guide but not model" in str(w.message)
               for w in caught) == 2  # one from each
    with pytest.warns(UserWarning, match="non-auxiliary"):
        terms = ScaledELBO().terms(key, params, model, guide_with_extra, data)
    assert "rate/extra" in terms


def test_analytic_kl_warns_where_trace_mean_field_elbo_warns():
    """TraceMeanField_ELBO checks that the guide's sites come in the model's order (the
    mean-field condition) and warns; ScaledELBO(analytic_kl=True) makes the same check."""
    def reordered_guide(data, b=None):  # z2 before z1: not the model's order
        params = {k: numpyro.param(k, jnp.asarray(v)) for k, v in PARAMS.items()
                  if k not in ("m", "w")}
        with numpyro.plate("N", len(data)):
            numpyro.sample("z2", dist.Normal(params["c"], params["s2"]))
            numpyro.sample("z1", dist.Normal(params["a"] + 0.1 * data, params["s1"]))

    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}
    for elbo in (TraceMeanField_ELBO(), ScaledELBO(analytic_kl=True)):
        with pytest.warns(UserWarning, match="Failed to verify mean field"):
            elbo.loss(jax.random.PRNGKey(0), params, model, reordered_guide, jnp.asarray(DATA))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Monte Carlo rate needs no such condition
        ScaledELBO(analytic_kl=False).loss(jax.random.PRNGKey(0), params, model,
                                           reordered_guide, jnp.asarray(DATA))


def test_aux_gradients_reach_the_encoder_only():
    spec = load_spec(Spec(), ['prior.kind="learned_normal"', "latent.dim=3",
                              'objective.aux=[{kind="infonce"}, {kind="supervised"}]',
                              "encoder.hidden=[16]", "decoder.hidden=[16]"])
    built = build(spec, 12)
    from ppl_vae.numpyro.params import export_params, init_params

    params = jax.jit(lambda k: init_params(built, 12, k))(jax.random.PRNGKey(0))
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


@pytest.mark.parametrize("autoguide, betas", [
    *((g, (None, 0.25)) for g in ("AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal",
                                  "AutoLowRankMultivariateNormal")),
    # AutoDAIS's guide adds factor sites, which ScaledELBO counts as aux terms (not under β):
    # it equals the stock ELBO at β = 1 only
    ("AutoDAIS", (None,))], ids=lambda v: v if isinstance(v, str) else "")
def test_autoguides_equal_the_stock_elbo(autoguide, betas):
    """Guide-only latents marked is_auxiliary (``_AutoDiagonalNormal_latent``) belong to the
    rate; β = b equals Trace_ELBO with the model's latents and the whole guide scaled (each β
    in one compiled function)."""
    from numpyro.infer import autoguide as autoguides

    data = jnp.asarray(DATA, jnp.float32)
    guide = getattr(autoguides, autoguide)(constrained_model)
    svi = SVI(constrained_model, guide, optax.adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), data))
    key = jax.random.PRNGKey(7)

    def loss(elbo, g, *args):
        return lambda p: elbo.loss(key, p, constrained_model, g, data, *args)

    groups = [[loss(ScaledELBO(beta=1.0 if b is None else b, analytic_kl=False), guide),
               loss(Trace_ELBO(), guide if b is None else handlers.scale(guide, scale=b), b)]
              for b in betas]
    for ours, stock in compiled(groups, params):
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
