"""ScaledELBO against Pyro's own estimators (same seed, float64) and its own invariants."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints

from ppl_vae.pyro.elbo import ScaledELBO
from ppl_vae.pyro.model import build
from ppl_vae.spec import Spec, load_spec

RTOL = 1e-6


def scaled(b, fn, *args, **kwargs):
    """Run fn under poutine.scale(b) unless b is None (the stock β idiom)."""
    if b is None:
        return fn(*args, **kwargs)
    with poutine.scale(scale=b):
        return fn(*args, **kwargs)


def two_latent_model(data, beta_latent=None, lam_obs=None):
    """z1 ~ N(m, 1), z2 | z1 ~ N(0.5 z1, 0.8), y | z ~ N(z1 + z2, 0.7): two latent sites."""
    m = pyro.param("m", torch.tensor(0.3))
    w = pyro.param("w", torch.tensor(0.5))
    with pyro.plate("N", len(data)):
        z1 = scaled(beta_latent, pyro.sample, "z1", dist.Normal(m, 1.0))
        z2 = scaled(beta_latent, pyro.sample, "z2", dist.Normal(w * z1, 0.8))
        scaled(lam_obs, lambda: pyro.sample("y", dist.Normal(z1 + z2, 0.7), obs=data))


def two_latent_guide(data, beta_latent=None, lam_obs=None):
    n = len(data)
    a = pyro.param("a", torch.linspace(-0.5, 0.5, n))
    s1 = pyro.param("s1", torch.full((n,), 0.6), constraint=constraints.positive)
    b = pyro.param("b", torch.linspace(0.2, -0.2, n))
    s2 = pyro.param("s2", torch.full((n,), 0.9), constraint=constraints.positive)
    with pyro.plate("N", n):
        scaled(beta_latent, pyro.sample, "z1", dist.Normal(a + 0.1 * data, s1))
        scaled(beta_latent, pyro.sample, "z2", dist.Normal(b, s2))


DATA = torch.tensor([0.4, -1.2, 2.0, 0.1, 0.7], dtype=torch.float64)


def loss_and_grads(elbo, model, guide, *args, seed=0):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, *args)
    names = sorted(pyro.get_param_store().keys())
    params = [pyro.param(n).unconstrained() for n in names]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), dict(zip(names, grads))


def assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=RTOL, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=RTOL, atol=1e-12, msg=k)


@pytest.mark.parametrize("num_particles", [1, 3])
def test_beta_one_equals_trace_elbo(float64, num_particles):
    data = DATA
    ours = loss_and_grads(ScaledELBO(analytic_kl=False, num_particles=num_particles),
                          two_latent_model, two_latent_guide, data)
    stock = loss_and_grads(Trace_ELBO(num_particles=num_particles), two_latent_model,
                           two_latent_guide, data)
    assert_same(ours, stock)


def test_analytic_kl_equals_trace_mean_field_elbo(float64):
    ours = loss_and_grads(ScaledELBO(analytic_kl=True), two_latent_model, two_latent_guide, DATA)
    stock = loss_and_grads(TraceMeanField_ELBO(), two_latent_model, two_latent_guide, DATA)
    assert_same(ours, stock)
    mc = loss_and_grads(ScaledELBO(analytic_kl=False), two_latent_model, two_latent_guide, DATA)
    assert not torch.isclose(ours[0], mc[0])  # the analytic path was really taken


@pytest.mark.parametrize("analytic_kl, stock_cls", [(False, Trace_ELBO),
                                                    (True, TraceMeanField_ELBO)])
@pytest.mark.parametrize("b", [0.25, 4.0])
def test_beta_equals_stock_under_scale_on_latents(float64, b, analytic_kl, stock_cls):
    ours = loss_and_grads(ScaledELBO(beta=b, analytic_kl=analytic_kl), two_latent_model,
                          two_latent_guide, DATA)
    stock = loss_and_grads(stock_cls(), two_latent_model, two_latent_guide, DATA, b)
    assert_same(ours, stock)


def test_per_site_beta_and_lam(float64):
    def model(data):
        two_latent_model(data)

    # β only on z2 and λ on y: scale exactly those sites in the stock version.
    def model_stock(data):
        m = pyro.param("m", torch.tensor(0.3))
        w = pyro.param("w", torch.tensor(0.5))
        with pyro.plate("N", len(data)):
            z1 = pyro.sample("z1", dist.Normal(m, 1.0))
            with poutine.scale(scale=3.0):
                z2 = pyro.sample("z2", dist.Normal(w * z1, 0.8))
            with poutine.scale(scale=0.5):
                pyro.sample("y", dist.Normal(z1 + z2, 0.7), obs=data)

    def guide_stock(data):
        n = len(data)
        a = pyro.param("a", torch.linspace(-0.5, 0.5, n))
        s1 = pyro.param("s1", torch.full((n,), 0.6), constraint=constraints.positive)
        b = pyro.param("b", torch.linspace(0.2, -0.2, n))
        s2 = pyro.param("s2", torch.full((n,), 0.9), constraint=constraints.positive)
        with pyro.plate("N", n):
            pyro.sample("z1", dist.Normal(a + 0.1 * data, s1))
            with poutine.scale(scale=3.0):
                pyro.sample("z2", dist.Normal(b, s2))

    ours = loss_and_grads(ScaledELBO(beta={"z2": 3.0}, lam={"y": 0.5}, analytic_kl=False),
                          model, two_latent_guide, DATA)
    stock = loss_and_grads(Trace_ELBO(), model_stock, guide_stock, DATA)
    assert_same(ours, stock)


def test_terms_add_up_and_name_sites(float64):
    elbo = ScaledELBO(beta={"z1": 2.0, "z2": 0.5}, lam=3.0, analytic_kl=True)
    pyro.set_rng_seed(1)
    t = elbo.terms(two_latent_model, two_latent_guide, DATA)
    assert set(t) == {"loss", "rate", "distortion", "aux", "rate/z1", "rate/z2",
                      "distortion/y"}
    torch.testing.assert_close(t["rate"], t["rate/z1"] + t["rate/z2"])
    torch.testing.assert_close(
        t["loss"], 2.0 * t["rate/z1"] + 0.5 * t["rate/z2"] + 3.0 * t["distortion/y"])
    assert t["aux"] == 0
    # terms is the same computation as the loss, at the same seed
    pyro.set_rng_seed(1)
    torch.testing.assert_close(
        torch.tensor(elbo.loss(two_latent_model, two_latent_guide, DATA)), t["loss"])


def test_beta_changes_per_step_without_rebuilding(float64):
    elbo = ScaledELBO(analytic_kl=True)
    values = []
    for b in (0.0, 1.0, 2.0):
        elbo.beta = b
        pyro.set_rng_seed(0)
        t = elbo.terms(two_latent_model, two_latent_guide, DATA)
        values.append((t["loss"], t["rate"], t["distortion"]))
    (l0, r, d), (l1, _, _), (l2, _, _) = values
    torch.testing.assert_close(l0, d)
    torch.testing.assert_close(l1, r + d)
    torch.testing.assert_close(l2, 2 * r + d)


def test_stock_svi_accepts_it():
    adam = pyro.optim.Adam({"lr": 0.05})
    svi = pyro.infer.SVI(two_latent_model, two_latent_guide, adam, loss=ScaledELBO(beta=4.0))
    data = DATA.float()
    first = svi.evaluate_loss(data)
    for _ in range(100):
        svi.step(data)
    assert svi.evaluate_loss(data) < first


def test_a_non_reparameterised_latent_is_trained_by_its_score_function(float64):
    """Once refused (issue 24): a Bernoulli latent that is not summed out is sampled; its loss
    is Trace_ELBO's and its gradient TraceGraph_ELBO's on the same draws (more in
    tests/test_score_function.py)."""
    from pyro.infer import TraceGraph_ELBO

    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        pyro.sample("coin", dist.Bernoulli(p))

    def run(elbo):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        loss = elbo.loss_and_grads(model, guide)
        return torch.tensor(loss), {"p": pyro.param("p").unconstrained().grad}

    ours = run(ScaledELBO(analytic_kl=False))
    assert_same(ours, run(TraceGraph_ELBO()))
    assert float(ours[0]) == pytest.approx(float(run(Trace_ELBO())[0]), rel=1e-12)
    assert abs(float(ours[1]["p"])) > 0.1


def test_a_guide_only_latent_not_marked_auxiliary_counts_as_in_trace_elbo(float64):
    """A guide sample site the model lacks, not marked auxiliary: once refused as stray; the
    stock Trace_ELBO counts its ln q (warning under validation), and so does ScaledELBO, in the
    rate."""
    def guide_with_extra(data):
        two_latent_guide(data)
        pyro.sample("extra", dist.Normal(pyro.param("e", torch.tensor(0.5)), 1.0))

    results = []
    for elbo in (ScaledELBO(analytic_kl=False), Trace_ELBO()):
        with pytest.warns(UserWarning, match="non-auxiliary vars in guide but not model"):
            results.append(loss_and_grads(elbo, two_latent_model, guide_with_extra, DATA))
    assert_same(*results)
    with pyro.validation_enabled(False):
        assert "rate/extra" in ScaledELBO().terms(two_latent_model, guide_with_extra, DATA)


def test_model_latent_without_guide_site_is_a_clear_error():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    # (Pyro's own validation would warn first; the error must come without it too.)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="'z' has no sample"):
        ScaledELBO().loss(model, lambda: None)


# ---- discrete latents summed out: against TraceEnum_ELBO --------------------------------------
K = 3
LABELS = torch.tensor([0, 2, -1, 1, -1])  # -1: unknown


def enum_model(data, with_z=True, beta_latent=None, lam_obs=None, labels=None):
    """c ~ Cat(π); z | c ~ N(μ_c, 1) (when with_z); y | c, z ~ N(z + ν_c, 0.7)."""
    logits = pyro.param("pi_logits", torch.tensor([0.2, -0.4, 0.1]))
    mu = pyro.param("mu", torch.tensor([-1.0, 0.5, 2.0])) if with_z else None
    nu = pyro.param("nu", torch.tensor([0.3, -0.2, 0.6]))
    with pyro.plate("N", len(data)):
        c = scaled(beta_latent, pyro.sample, "c", dist.Categorical(logits=logits))
        z = scaled(beta_latent, pyro.sample, "z", dist.Normal(mu[c], 1.0)) if with_z else 0.0
        scaled(lam_obs, lambda: pyro.sample("y", dist.Normal(z + nu[c], 0.7), obs=data))


def enum_guide(data, with_z=True, beta_latent=None, lam_obs=None, labels=None):
    n = len(data)
    w = pyro.param("w", torch.linspace(-0.3, 0.4, K))
    if with_z:
        a = pyro.param("a", torch.linspace(-0.5, 0.5, K))
        s = pyro.param("s", torch.full((K,), 0.8), constraint=constraints.positive)
    with pyro.plate("N", n):
        probs = torch.softmax(data[:, None] * w, -1)
        infer = {"enumerate": "parallel"}
        if labels is not None:  # known labels: all the mass on them
            known = labels >= 0
            probs = torch.where(known[:, None], torch.nn.functional.one_hot(
                labels.clamp(min=0), K).to(probs), probs)
            infer["observed"] = known
        c = scaled(beta_latent, pyro.sample, "c", dist.Categorical(probs), infer=infer)
        if with_z:
            scaled(beta_latent, pyro.sample, "z", dist.Normal(a[c] + 0.1 * data, s[c]))


@pytest.mark.parametrize("with_z", [True, False])
def test_enumerated_site_equals_traceenum_elbo(float64, with_z):
    ours = loss_and_grads(ScaledELBO(analytic_kl=False, max_plate_nesting=1), enum_model,
                          enum_guide, DATA, with_z)
    stock = loss_and_grads(TraceEnum_ELBO(max_plate_nesting=1), enum_model, enum_guide, DATA,
                           with_z)
    assert_same(ours, stock)


def test_enumeration_guesses_max_plate_nesting_as_traceenum_elbo(float64):
    """Without max_plate_nesting: where TraceEnum_ELBO works (it guesses the nesting from one
    unenumerated run), so does ScaledELBO, with its value and gradients on the same draws."""
    elbo = ScaledELBO(analytic_kl=False)
    ours = loss_and_grads(elbo, enum_model, enum_guide, DATA)
    assert_same(ours, loss_and_grads(TraceEnum_ELBO(), enum_model, enum_guide, DATA))
    assert elbo.max_plate_nesting == 1


def enum_guide_with_factor(data, *args, **kwargs):
    """enum_guide and a guide factor outside the data plate (as M2's cross-entropy α-term;
    first, as TraceEnum_ELBO's plate-order check wants)."""
    w = pyro.param("w", torch.linspace(-0.3, 0.4, K))
    pyro.factor("ce", 0.7 * w.square().sum(), has_rsample=True)
    enum_guide(data, *args, **kwargs)


def test_a_factor_outside_the_plate_counts_once_beside_an_enumerated_site(float64):
    """The enumeration weights q(c_n|y_n) sum to the batch size over (c, n): a value outside the
    data plate (no enumerated dims) is its own expectation, not weighted by them. TraceEnum_ELBO
    adds the factor once; ScaledELBO multiplied it by the batch size before the fix."""
    ours = loss_and_grads(ScaledELBO(analytic_kl=False, max_plate_nesting=1), enum_model,
                          enum_guide_with_factor, DATA)
    stock = loss_and_grads(TraceEnum_ELBO(max_plate_nesting=1), enum_model,
                           enum_guide_with_factor, DATA)
    assert_same(ours, stock)
    pyro.set_rng_seed(0)
    terms = ScaledELBO(max_plate_nesting=1).terms(enum_model, enum_guide_with_factor, DATA)
    torch.testing.assert_close(terms["aux/ce"], 0.7 * pyro.param("w").detach().square().sum())


def test_enumerated_site_with_vectorized_particles_equals_traceenum_elbo(float64):
    """Several particles in one vectorised pass (M2 with objective.num_particles > 1): the
    particle plate is inside the enumeration, as in TraceEnum_ELBO, so under validation model
    and guide agree on the enumerated site's batch shape, and the draws are the stock ones."""
    kwargs = dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    ours = loss_and_grads(ScaledELBO(analytic_kl=False, **kwargs), enum_model, enum_guide, DATA)
    stock = loss_and_grads(TraceEnum_ELBO(**kwargs), enum_model, enum_guide, DATA)
    assert_same(ours, stock)


@pytest.mark.parametrize("b", [0.25, 4.0])
def test_enumerated_beta_equals_traceenum_under_scale(float64, b):
    ours = loss_and_grads(ScaledELBO(beta=b, analytic_kl=False, max_plate_nesting=1),
                          enum_model, enum_guide, DATA)
    stock = loss_and_grads(TraceEnum_ELBO(max_plate_nesting=1), enum_model, enum_guide, DATA,
                           True, b)
    assert_same(ours, stock)


def test_enumerated_terms_are_exact_expectations(float64):
    """rate/c = KL(q(c|y) ‖ π) in closed form; rate/z = Σ_k q(k) KL(q(z|y,k) ‖ p(z|k))."""
    pyro.set_rng_seed(0)
    terms = ScaledELBO(analytic_kl=True, max_plate_nesting=1).terms(enum_model, enum_guide, DATA)
    q = torch.softmax(DATA[:, None] * pyro.param("w"), -1)
    log_pi = torch.log_softmax(pyro.param("pi_logits"), -1)
    kl_c = (q * (q.log() - log_pi)).sum()
    mu, a, s = pyro.param("mu"), pyro.param("a"), pyro.param("s")
    qz = dist.Normal(a + 0.1 * DATA[:, None], s)
    kl_z = (q * torch.distributions.kl_divergence(qz, dist.Normal(mu, 1.0))).sum()
    torch.testing.assert_close(terms["rate/c"], kl_c.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["rate/z"], kl_z.detach(), rtol=1e-12, atol=0)


def test_observed_values_are_data_not_rate(float64):
    """Examples with a known label: the guide's point mass makes the terms those of the
    observed model (−ln p(label) as distortion); the unknown ones carry the rate."""
    elbo = ScaledELBO(analytic_kl=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    mixed = elbo.terms(enum_model, enum_guide, DATA, False, None, None, LABELS)
    known = LABELS >= 0
    log_pi = torch.log_softmax(pyro.param("pi_logits"), -1)
    nu = pyro.param("nu")
    q = torch.softmax(DATA[:, None] * pyro.param("w"), -1)[~known]
    kl_unknown = (q * (q.log() - log_pi)).sum()
    torch.testing.assert_close(mixed["rate/c"], kl_unknown.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(mixed["distortion/c"], -log_pi[LABELS[known]].sum().detach(),
                               rtol=1e-9, atol=0)
    # the data term of a labelled example is at its label
    lik = dist.Normal(nu[LABELS[known]], 0.7).log_prob(DATA[known]).sum()
    lik_unknown = (q * dist.Normal(nu, 0.7).log_prob(DATA[~known][:, None])).sum()
    torch.testing.assert_close(mixed["distortion/y"], -(lik + lik_unknown).detach(),
                               rtol=1e-9, atol=0)


# ---- on models built from a spec ----------------------------------------------------------
def _built(prior="learned_normal", aux='[{kind="infonce"}, {kind="supervised", weight=2.0}]'):
    spec = load_spec(Spec(), [f'prior.kind="{prior}"', f"objective.aux={aux}",
                              "encoder.hidden=[16]", "decoder.hidden=[16]", "latent.dim=3"])
    torch.manual_seed(0)
    return build(spec, 12, register=False)


@pytest.mark.parametrize("prior", ["normal", "learned_normal", "mixture"])
def test_aux_gradients_reach_the_encoder_only(prior):
    built = _built(prior)
    y = torch.rand(10, 12).round()
    labels = torch.tensor([0, 1, 2, -1, -1, 3, 4, 5, -1, 1])
    t = ScaledELBO().differentiable_terms(built.model, built.guide, y, labels)
    assert {"aux/infonce", "aux/supervised"} <= set(t)
    for name, module in built.modules.items():
        for pname, p in module.named_parameters():
            (g,) = torch.autograd.grad(t["aux"], p, retain_graph=True, allow_unused=True)
            if name in ("decoder", "prior", "likelihood"):
                assert g is None or torch.count_nonzero(g) == 0, f"{name}.{pname}"
            elif pname.endswith("weight"):
                assert g is not None and torch.count_nonzero(g) > 0, f"{name}.{pname}"


def test_infonce_is_a_bound_below_log_batch():
    built = _built("normal", '[{kind="infonce"}]')
    y = torch.rand(32, 12).round()
    t = ScaledELBO().terms(built.model, built.guide, y)
    bound = -t["aux/infonce"] / 32
    assert 0 < bound <= torch.log(torch.tensor(32.0))  # noisy but distinct posteriors: I > 0


@pytest.mark.parametrize("prior", ["normal", "learned_normal"])
def test_analytic_rate_matches_monte_carlo(prior):
    built = _built(prior, "[]")
    with torch.no_grad():
        for p in built.modules["prior"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = torch.rand(8, 12).round()
    pyro.set_rng_seed(0)
    analytic = ScaledELBO(analytic_kl=True).terms(built.model, built.guide, y)["rate"]
    mc = ScaledELBO(analytic_kl=False, num_particles=4000, vectorize_particles=True,
                    max_plate_nesting=1)
    draws = torch.stack([mc.terms(built.model, built.guide, y)["rate"] for _ in range(5)])
    single = torch.stack([ScaledELBO(analytic_kl=False).terms(built.model, built.guide, y)["rate"]
                          for _ in range(400)])
    stderr = single.std() / (4000 * 5) ** 0.5
    assert abs(draws.mean() - analytic) < 4 * stderr + 1e-6
    assert stderr < 0.05 * analytic  # the check has teeth


#: A spec-built two-layer model: p̂(z2) p̂(z1|z2) p̂(y|z1), q(z1|y) full covariance, q(z2|z1).
TWO_LAYER = ['latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"], '
             'hidden=[5]}, posterior={kind="full"}}, {name="z2", dim=2, posterior={inputs='
             '["z1"], hidden=[4]}}]', 'decoder.reads=["z1"]', "encoder.hidden=[6]",
             "decoder.hidden=[6]", 'likelihood.kind="gaussian"', "likelihood.scale=0.5"]


@pytest.mark.parametrize("analytic_kl, stock_cls", [(False, Trace_ELBO),
                                                    (True, TraceMeanField_ELBO)])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_a_two_layer_spec_equals_the_stock_elbo(analytic_kl, stock_cls, num_particles):
    """At β = 1 the built two-layer model's ScaledELBO is Trace_ELBO (TraceMeanField_ELBO with
    analytic_kl: z2's KL is closed-form in both, z1's full-covariance rate Monte Carlo in
    both), values and gradients, float64."""
    from ppl_vae.pyro.hooks import Model

    spec = load_spec(Spec(), [*TWO_LAYER, 'train.dtype="float64"'])
    torch.manual_seed(0)
    model = Model(spec, 10, None, "cpu")
    y = torch.as_tensor(np.random.default_rng(0).normal(size=(7, 10)))
    params = list(model.modules.parameters())

    def run(elbo):
        pyro.set_rng_seed(5)
        with pyro.validation_enabled(False):  # the stock mean-field check warns: bottom-up
            loss = elbo.differentiable_loss(model.built.model, model.built.guide, y)
        return loss.detach(), dict(enumerate(torch.autograd.grad(loss, params)))

    kw = {"num_particles": num_particles, "vectorize_particles": num_particles > 1,
          "max_plate_nesting": 1}
    assert_same(run(ScaledELBO(analytic_kl=analytic_kl, **kw)), run(stock_cls(**kw)))



def bernoulli_model(data):
    p = pyro.param("p_prior", torch.tensor(0.3), constraint=constraints.unit_interval)
    mu = pyro.param("mu_b", torch.tensor([-1.0, 1.5]))
    with pyro.plate("N", len(data)):
        b = pyro.sample("b", dist.Bernoulli(p))
        z = pyro.sample("z", dist.Normal(mu[b.long()], 1.0))
        pyro.sample("y", dist.Normal(z, 0.7), obs=data)


def bernoulli_guide(data):
    w = pyro.param("w_b", torch.tensor(0.8))
    a = pyro.param("a_b", torch.tensor([-0.5, 0.5]))
    with pyro.plate("N", len(data)):
        b = pyro.sample("b", dist.Bernoulli(logits=w * data), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Normal(a[b.long()] + 0.1 * data, 0.9))


def test_an_enumerated_bernoulli_site_equals_traceenum_elbo(float64):
    ours = loss_and_grads(ScaledELBO(analytic_kl=False, max_plate_nesting=1), bernoulli_model,
                          bernoulli_guide, DATA)
    stock = loss_and_grads(TraceEnum_ELBO(max_plate_nesting=1), bernoulli_model,
                           bernoulli_guide, DATA)
    assert_same(ours, stock)


# ---- where stock users go: AutoGuides, masks, validation (issue 13) ----------------------------
def constrained_model(data, b=None):
    """loc ~ N(0, 2), scale ~ LogNormal(0, 0.5) (a constrained latent), y ~ N(loc, scale)."""
    loc = scaled(b, pyro.sample, "loc", dist.Normal(0.0, 2.0))
    scale = scaled(b, pyro.sample, "scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("N", len(data)):
        pyro.sample("y", dist.Normal(loc, scale), obs=data)


AUTOGUIDES = ["AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal",
              "AutoLowRankMultivariateNormal", "AutoIAFNormal"]


@pytest.mark.parametrize("autoguide", AUTOGUIDES)
@pytest.mark.parametrize("b", [None, 0.25])
def test_autoguides_equal_the_stock_elbo(float64, autoguide, b):
    """An AutoGuide adds guide-only latents marked is_auxiliary; their ln q is part of the rate.
    β = 1: Trace_ELBO; β = b: Trace_ELBO with the model's latents and the whole guide scaled."""
    from pyro.infer import autoguide as autoguides

    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    guide = getattr(autoguides, autoguide)(constrained_model)
    guide(DATA)  # creates the guide's parameters
    ours = loss_and_grads(ScaledELBO(beta=1.0 if b is None else b, analytic_kl=False),
                          constrained_model, guide, DATA)
    stock_guide = guide if b is None else poutine.scale(guide, scale=b)
    stock = loss_and_grads(Trace_ELBO(), constrained_model, stock_guide, DATA, b)
    assert_same(ours, stock)


def test_a_masked_latent_is_zero_not_a_crash(float64):
    def model(data):
        with pyro.plate("N", len(data)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).mask(False))
            pyro.sample("y", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        a = pyro.param("a_m", torch.zeros(len(data)))
        with pyro.plate("N", len(data)):
            pyro.sample("z", dist.Normal(a, 1.0).mask(False))

    ours = loss_and_grads(ScaledELBO(analytic_kl=True), model, guide, DATA)
    stock = loss_and_grads(TraceMeanField_ELBO(), model, guide, DATA)
    assert_same(ours, stock)
    assert float(ScaledELBO().terms(model, guide, DATA)["rate/z"]) == 0.0


def test_validation_warns_as_trace_mean_field_elbo_does():
    def model(data):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("y", dist.Normal(z2, 1.0), obs=data[0])

    def guide(data):  # z2 first: not the model's order, so not mean field
        z2 = pyro.sample("z2", dist.Normal(pyro.param("c", torch.tensor(0.0)), 1.0))
        pyro.sample("z1", dist.Normal(z2, 1.0))

    for elbo in (TraceMeanField_ELBO(), ScaledELBO(analytic_kl=True)):
        with pyro.validation_enabled(True), pytest.warns(UserWarning, match="mean field"):
            elbo.loss(model, guide, DATA)


# ---- the importance-weighted bound (issue 22): against RenyiELBO(alpha=0) -----------------------
def stock_loss_and_grads(elbo, model, guide, *args, seed=0):
    """loss_and_grads for an estimator without differentiable_loss (RenyiELBO): the gradients
    it accumulates in the param store's unconstrained tensors."""
    for name in pyro.get_param_store():
        pyro.param(name).unconstrained().grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, *args)
    names = sorted(pyro.get_param_store().keys())
    return (torch.tensor(loss, dtype=torch.float64),
            {n: pyro.param(n).unconstrained().grad.clone() for n in names})


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("num_particles", [1, 5])
@pytest.mark.parametrize("b", [None, 2.5])
def test_iwae_equals_renyi_elbo_alpha_zero(float64, num_particles, vectorize, b):
    """bound="iwae" is RenyiELBO(alpha=0) on the same draws (the same seed, the particles drawn
    as the stock estimator draws them): values and gradients. With β = b each latent site's
    ln p − ln q enters the log-weight times b: the stock estimator with the latent sites scaled
    by b in model and guide (then no longer a bound)."""
    kw = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    args = (DATA, b)
    stock = stock_loss_and_grads(RenyiELBO(alpha=0, **kw), two_latent_model, two_latent_guide,
                                 *args)
    beta = 1.0 if b is None else b
    ours = loss_and_grads(ScaledELBO(beta=beta, bound="iwae", **kw), two_latent_model,
                          two_latent_guide, DATA)
    assert_same(ours, stock)
    # DReG: the same value; the model's (decoder's, prior's) gradient is the ordinary one,
    # the guide's differs (the score terms replaced by the reweighted path derivative)
    dreg = loss_and_grads(ScaledELBO(beta=beta, bound="iwae", gradient="dreg", **kw),
                          two_latent_model, two_latent_guide, DATA)
    torch.testing.assert_close(dreg[0], stock[0], rtol=RTOL, atol=0)
    for name in ("m", "w"):
        torch.testing.assert_close(dreg[1][name], stock[1][name], rtol=RTOL, atol=1e-12)
    assert not torch.allclose(dreg[1]["a"], stock[1]["a"])


def test_dreg_without_max_plate_nesting_guesses_it(float64):
    """ScaledELBO(bound="iwae", gradient="dreg") one particle at a time, max_plate_nesting not
    given: it raised TypeError ('float' object cannot be interpreted as an integer) in its
    check of the drawn sites; it now guesses the nesting from the traces, as the ELBO does
    where a site is enumerated, and gives what it gives with the nesting given."""
    kw = dict(bound="iwae", gradient="dreg", num_particles=3)
    guessed = loss_and_grads(ScaledELBO(**kw), two_latent_model, two_latent_guide, DATA)
    given = loss_and_grads(ScaledELBO(max_plate_nesting=1, **kw), two_latent_model,
                           two_latent_guide, DATA)
    assert_same(guessed, given)


def test_iwae_terms_are_self_normalised_and_loss_is_the_bound(float64):
    """terms: loss = −L_K (no aux here); rate/<site> and distortion/<site> are the particles'
    terms under the normalised weights w̃ (detached), from the same draws."""
    elbo = ScaledELBO(bound="iwae", num_particles=4, vectorize_particles=True,
                      max_plate_nesting=1)
    pyro.set_rng_seed(2)
    t = elbo.terms(two_latent_model, two_latent_guide, DATA)
    pyro.set_rng_seed(2)
    renyi = RenyiELBO(alpha=0, num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert float(t["loss"]) == pytest.approx(renyi.loss(two_latent_model, two_latent_guide,
                                                        DATA), rel=1e-12)
    # by hand, from one vectorised trace of the same draws
    pyro.set_rng_seed(2)
    guide = elbo._vectorized_num_particles(two_latent_guide)
    model = elbo._vectorized_num_particles(two_latent_model)
    gtr = poutine.trace(guide).get_trace(DATA)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(DATA)
    gtr.compute_log_prob()
    mtr.compute_log_prob()
    rate = {s: gtr.nodes[s]["log_prob"] - mtr.nodes[s]["log_prob"] for s in ("z1", "z2")}
    distortion = -mtr.nodes["y"]["log_prob"]
    log_w = -(rate["z1"] + rate["z2"] + distortion)  # (K, N)
    w = torch.softmax(log_w, 0)
    expected = {"rate/z1": (w * rate["z1"]).sum(), "rate/z2": (w * rate["z2"]).sum(),
                "distortion/y": (w * distortion).sum(),
                "loss": -(torch.logsumexp(log_w, 0) - np.log(4)).sum()}
    for key, value in expected.items():
        torch.testing.assert_close(t[key], value.detach(), rtol=1e-10, atol=0, msg=key)
    torch.testing.assert_close(t["rate"], t["rate/z1"] + t["rate/z2"])


def _enum_log_evidence(labels=None):
    """Σ_n ln p(y_n) of enum_model without z: p(y) = Σ_c π_c N(y; ν_c, 0.7); ln p(y, c_n) where
    the label is known."""
    log_pi = torch.log_softmax(pyro.param("pi_logits"), -1).detach()
    joint = log_pi + dist.Normal(pyro.param("nu").detach(), 0.7).log_prob(DATA[:, None])
    out = torch.logsumexp(joint, -1)
    if labels is not None:
        known = labels >= 0
        out = torch.where(known, joint.gather(-1, labels.clamp(min=0)[:, None])[:, 0], out)
    return out.sum()


@pytest.mark.parametrize("num_particles", [1, 3])
def test_enumerated_iwae_sums_the_site_out_exactly(float64, num_particles):
    """An enumerated site is summed out inside each particle's weight, w_k = Σ_c q(c) w(c, z_k^c)
    (a log-sum-exp over the values of ln q(c) + ln w): without another latent, every weight is
    p(y) itself, so L_K = ln p(y) exactly for every K (ln p(y, label) where the label is known);
    at β = 1 ln q(c) cancels, so the bound does not depend on the classifier q(c|y); the
    self-normalised rate of c is its KL from the exact posterior's point of view."""
    kw = dict(num_particles=num_particles, vectorize_particles=num_particles > 1,
              max_plate_nesting=1)
    for labels in (None, LABELS):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo = ScaledELBO(bound="iwae", **kw)
        loss = elbo.differentiable_loss(enum_model, enum_guide, DATA, False, None, None, labels)
        torch.testing.assert_close(-loss.detach(), _enum_log_evidence(labels), rtol=1e-10,
                                   atol=0)
        (grad_w,) = torch.autograd.grad(loss, [pyro.param("w").unconstrained()])
        assert grad_w.abs().max() < 1e-10
    # the self-normalised terms, by hand: w̃(c) = the exact posterior p(c|y)
    pyro.set_rng_seed(0)
    t = ScaledELBO(bound="iwae", **kw).terms(enum_model, enum_guide, DATA, False)
    log_pi = torch.log_softmax(pyro.param("pi_logits"), -1).detach()
    log_lik = dist.Normal(pyro.param("nu").detach(), 0.7).log_prob(DATA[:, None])
    posterior = torch.softmax(log_pi + log_lik, -1)
    q = torch.softmax(DATA[:, None] * pyro.param("w").detach(), -1)
    torch.testing.assert_close(t["rate/c"], (posterior * (q.log() - log_pi)).sum(), rtol=1e-10,
                               atol=0)
    torch.testing.assert_close(t["distortion/y"], -(posterior * log_lik).sum(), rtol=1e-10,
                               atol=0)


def test_enumerated_iwae_converges_to_the_evidence(float64):
    """With the continuous z | c as well: L_K → ln p(y), p(y) = Σ_c π_c N(y; μ_c + ν_c,
    √(1 + 0.7²)), and L_1 is a tighter bound than the enumerated ELBO."""
    pyro.set_rng_seed(0)
    enum_guide(DATA)
    enum_model(DATA)
    with torch.no_grad():  # a proposal further from the posterior: shifted and wider
        pyro.param("a").unconstrained().add_(1.0)
        pyro.param("s").unconstrained().add_(0.7)
    log_pi = torch.log_softmax(pyro.param("pi_logits"), -1).detach()
    means = (pyro.param("mu") + pyro.param("nu")).detach()
    exact = torch.logsumexp(log_pi + dist.Normal(means, (1 + 0.49) ** 0.5).log_prob(
        DATA[:, None]), -1).sum()

    def bound(k, seed=0, **kw):
        pyro.set_rng_seed(seed)
        elbo = ScaledELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1, **kw)
        return -elbo.loss(enum_model, enum_guide, DATA)

    def gap(k, n, **kw):
        """ln p(y) − the mean of n estimates, and its standard error."""
        draws = float(exact) - np.array([bound(k, s, **kw) for s in range(n)])
        return draws.mean(), draws.std(ddof=1) / np.sqrt(n)

    elbo, elbo_se = gap(1, 200, analytic_kl=False)
    (g1, se1), (g10, se10), (g1000, se1000) = (gap(k, n, bound="iwae")
                                               for k, n in ((1, 200), (10, 50), (1000, 10)))
    assert elbo - g1 > 3 * np.hypot(elbo_se, se1) and g1 > 0  # L_1 ≥ the enumerated ELBO
    assert g1 - g10 > 3 * np.hypot(se1, se10) and g10 - g1000 > 3 * np.hypot(se10, se1000)
    assert abs(g1000) < 4 * se1000 + 1e-3, (g1000, se1000)
