"""Discrete latent sites in the spec (issue 24): ``kind = "bernoulli" | "categorical"`` with
``estimator = "score" | "enumerate" | "relaxed"`` — what the spec refuses, the temperature
schedule, what the one program draws for each estimator, the distributions against the
frameworks' own, the score-function gradient against the exact one from enumeration, the
relaxed rate, the trainers' temperatures, and eval's code usage. (That both backends give the
same terms and gradients for every kind and estimator is tests/test_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from ppl_vae import graph, schedules
from ppl_vae.spec import Spec, SpecError, load_spec

torch = pytest.importorskip("torch")

SMALL = ["encoder.hidden=[7]", "decoder.hidden=[6]", "latent.dim=3"]
BITS = [*SMALL, 'latent.kind="bernoulli"']
CATEGORICAL = [*SMALL, 'latent.kind="categorical"', "latent.categories=3"]


def _y(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 2, (n, 64)).astype(np.float32)


def _pyro(spec, seed=0, params=None):
    from ppl_vae.pyro.hooks import Model

    torch.manual_seed(seed)
    return Model(spec, 64, None, "cpu", params=params)


# ---- the spec -----------------------------------------------------------------------------
REFUSED = {
    "enumerate 2^200": (['latent.kind="bernoulli"', "latent.dim=200",
                         'latent.estimator="enumerate"'], "latent.estimator", "2^200"),
    "two enumerated sites": (['latents=[{name="a", dim=6, kind="bernoulli", estimator='
                              '"enumerate"}, {name="b", dim=5, kind="bernoulli", estimator='
                              '"enumerate"}]', 'decoder.reads=["a", "b"]'],
                             "latents[1].estimator", "2048 joint values"),
    "free bits": ([*BITS, "latent.free_bits=0.1"], "latent.free_bits", "free bits"),
    "a VampPrior": ([*BITS, 'prior.kind="vamp"'], "prior.kind", "VampPriors"),
    "a mixture's keys": ([*BITS, 'prior.kind="uniform"', "prior.components=3"], "prior",
                         "components"),
    "a ladder": (['latents=[{name="t", dim=2}, {name="b", dim=3, kind="bernoulli", '
                  'prior={kind="conditional", parents=["t"]}, posterior={kind="ladder"}}]',
                  'decoder.reads=["b"]'], "latents[1].prior.kind", "bernoulli"),
    "a full posterior": ([*BITS, 'posterior.kind="full"'], "posterior.kind", "diagonal"),
    "IWAE with a score site": ([*BITS, 'objective.bound="iwae"'], "objective.bound", "VIMCO"),
    "STL with a relaxed site": ([*BITS, 'latent.estimator="relaxed"',
                                 'objective.gradient="stl"'], "objective.gradient", "STL"),
    "DReG with a score site": ([*BITS, 'objective.bound="iwae"', 'objective.gradient="dreg"'],
                               "objective.bound", "score"),
    "capacity with a score site": ([*BITS, "latent.capacity={max=2.0, steps=10}"],
                                   "latent.capacity.max", "score-function"),
    "aux terms on a discrete site": ([*BITS, 'objective.aux=[{kind="infonce"}]'],
                                     "objective.aux[0].site", "Gaussian site"),
    "an estimator on a Gaussian site": ([*SMALL, 'latent.estimator="relaxed"'],
                                        "latent.estimator", "discrete site"),
    "a discrete prior on a Gaussian site": ([*SMALL, 'prior.kind="uniform"'], "prior.kind",
                                            "Gaussian site"),
    "categories of a Bernoulli site": ([*BITS, "latent.categories=4"], "latent.categories",
                                       "categorical"),
    "a temperature past the run": ([*BITS, 'latent.estimator="relaxed"', "train.steps=100",
                                    "latent.temperature.steps=200"],
                                   "latent.temperature.steps", "train.steps (100)"),
    "a temperature of 0": ([*BITS, 'latent.estimator="relaxed"', "latent.temperature.end=0"],
                           "latent.temperature.end", "> 0"),
    "score beside a latent label": ([*BITS, "label.condition=true", "label.latent=true"],
                                    "latent.estimator", "summed out"),
    "score reading an enumerated site": (
        ['latents=[{name="c", dim=2, kind="bernoulli", estimator="enumerate"}, {name="s", '
         'dim=3, kind="bernoulli", posterior={inputs=["y", "c"]}}]', 'decoder.reads=["c", "s"]'],
        "latents[1].posterior.inputs", "enumerated site 'c'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_apply_to_a_discrete_site_is_refused_in_one_line_naming_the_key(case):
    overrides, key, words = REFUSED[case]
    with pytest.raises(SpecError) as err:
        load_spec(Spec(), overrides)
    message = str(err.value)
    assert err.value.key == key and words in message and "\n" not in message, message


def test_what_applies_is_accepted_and_the_defaults_are_uniform_score_with_nvil():
    spec = load_spec(Spec(), BITS)
    (s,) = spec.sites
    assert (s.kind, s.estimator, s.baseline, s.width) == ("bernoulli", "score", "network", 3)
    plan = graph.plan(spec, 64).site("z")
    assert plan.baseline_module == "baseline" and plan.temperature is None
    # a categorical site reads as dim × K one-hot values; an enumerated site of 3^3 values, a
    # relaxed one with its schedule, and a learned prior; a capacity target where the rate is
    # a sum over the draws (relaxed, enumerated); a baseline or temperature may stay in the spec
    # when the estimator does not read it (one --set switches the estimator)
    for extra in (['latent.estimator="enumerate"', 'prior.kind="learned_probs"'],
                  ['latent.estimator="relaxed"', "latent.capacity={max=1.0, steps=10}",
                   "latent.temperature={start=2.0, end=0.3, steps=100}"],
                  ['latent.estimator="enumerate"', "latent.temperature.end=0.2",
                   "latent.baseline_hidden=[4]"]):
        spec = load_spec(Spec(), [*CATEGORICAL, *extra])
        assert spec.sites[0].width == 9 and graph.decoder_input_width(spec) == 9


def test_the_bundled_spec_has_200_binary_units_and_switches_estimator_with_one_override():
    spec = load_spec("binary_vae_mnist")
    (s,) = spec.sites
    assert (s.kind, s.dim, s.estimator) == ("bernoulli", 200, "score")
    assert load_spec(spec, ['latent.estimator="relaxed"']).sites[0].estimator == "relaxed"
    with pytest.raises(SpecError, match="2\\^200"):
        load_spec(spec, ['latent.estimator="enumerate"'])


def test_the_temperature_schedule_is_geometric_over_its_steps_then_held():
    spec = load_spec(Spec(), [*BITS, 'latent.estimator="relaxed"', "train.steps=100",
                              "latent.temperature={start=1.0, end=0.25, steps=40}"])
    t = schedules.step_scalars(spec, np.array([0, 20, 40, 99]), 1000)["temperature/z"]
    np.testing.assert_allclose(t, [1.0, 0.5, 0.25, 0.25])
    # steps = 0: the whole run; a resumed window sees what a straight run sees
    whole = load_spec(spec, ["latent.temperature.steps=0"])
    every = schedules.step_scalars(whole, np.arange(100), 1000)["temperature/z"]
    assert every[0] == 1.0 and every[-1] == pytest.approx(0.25 ** (99 / 100))
    np.testing.assert_array_equal(
        schedules.step_scalars(whole, np.arange(50, 60), 1000)["temperature/z"], every[50:60])
    assert schedules.scalar_keys(whole) == ("beta", "lr", "temperature/z")
    assert schedules.step_temperatures({"beta": 1.0, "temperature/z": 0.5}) == {"z": 0.5}
    assert "temperature/z" not in schedules.scalar_keys(load_spec(Spec(), BITS))


def test_graph_widths_count_a_categorical_site_as_its_one_hot_values():
    spec = load_spec(Spec(), [
        'latents=[{name="c", dim=2, kind="categorical", categories=4, estimator="enumerate"}, '
        '{name="z", dim=3, prior={kind="conditional", parents=["c"]}, posterior={inputs=["y", '
        '"c"]}}]', 'decoder.reads=["c", "z"]', "encoder.hidden=[5]"])
    plan = graph.plan(spec, 64)
    assert plan.site("c").width == 8 and plan.site("c").categories == 4
    assert plan.site("z").prior_width == 8 and plan.site("z").posterior_width == 5 + 8
    assert plan.code_width == 8 + 3 and graph.total_dim(spec) == 5
    assert graph.relaxed_sites(spec) == ()


# ---- the program ----------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["score", "enumerate", "relaxed"])
def test_the_training_pair_carries_the_estimator_and_the_evaluation_pair_the_discrete_site(
        estimator):
    from pyro import poutine

    from ppl_vae.pyro.latents import Concrete, Discrete

    spec = load_spec(Spec(), [*BITS, f'latent.estimator="{estimator}"'])
    built = _pyro(spec).built
    y = torch.as_tensor(_y())
    train = poutine.trace(built.guide).get_trace(y).nodes["z"]
    model = poutine.trace(built.model).get_trace(y).nodes["z"]
    expected = Concrete if estimator == "relaxed" else Discrete
    assert type(train["fn"]) is expected and type(model["fn"]) is expected
    if estimator == "score":  # NVIL's network of y, one value per example
        assert train["infer"]["baseline"]["baseline_value"].shape == (4,)
    assert (train["infer"].get("enumerate") == "parallel") == (estimator == "enumerate")
    for fn in (built.eval_guide, built.posterior_guide, built.eval_model, built.elbo_model):
        site = poutine.trace(fn).get_trace(y).nodes["z"]
        assert type(site["fn"]) is Discrete and not site["infer"], site["infer"]
        assert set(site["value"].unique().tolist()) <= {0.0, 1.0}
    if estimator != "relaxed":
        assert built.eval_model is built.model is built.elbo_model
    else:
        assert 0 < train["value"].min() and train["value"].max() < 1
        assert float(train["fn"].temperature) == spec.sites[0].temperature.end


def test_the_discrete_distributions_are_the_frameworks_own_and_agree_across_backends():
    import jax.numpy as jnp
    import pyro.distributions as dist
    from torch.distributions import kl_divergence

    from ppl_vae.numpyro import latents as nl
    from ppl_vae.pyro import latents as pl

    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(size=(5, 6)))
    bits = pl.Discrete(logits)
    cat = pl.Discrete(logits, 3)
    x = bits.sample()
    np.testing.assert_allclose(bits.log_prob(x), dist.Bernoulli(logits=logits).log_prob(x).sum(-1))
    onehot = cat.sample()
    stock = dist.OneHotCategorical(logits=logits.reshape(5, 2, 3))
    np.testing.assert_allclose(cat.log_prob(onehot), stock.log_prob(onehot.reshape(5, 2, 3))
                               .sum(-1))
    for q in (bits, cat):  # the joint support: every value once, probabilities summing to 1
        support = q.enumerate_support(expand=False)
        assert len(support) == (64 if q is bits else 9) and support.unique(dim=0).shape[0] == len(
            support)
        probs = q.log_prob(support).exp()
        np.testing.assert_allclose(probs.sum(0), np.ones(5), rtol=1e-12)
        p = pl.Discrete(torch.zeros(6), q.categories).expand((5,))
        exact = (probs * (q.log_prob(support) - p.log_prob(support))).sum(0)
        np.testing.assert_allclose(kl_divergence(q, p), exact, rtol=1e-10)
    tau = torch.tensor(0.6, dtype=torch.float64)
    relaxed, relaxed_cat = pl.Concrete(tau, logits), pl.Concrete(tau, logits, 3)
    r, rc = relaxed.rsample(), relaxed_cat.rsample()
    np.testing.assert_allclose(relaxed.log_prob(r), dist.RelaxedBernoulli(tau, logits=logits)
                               .log_prob(r).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(
        relaxed_cat.log_prob(rc),
        dist.RelaxedOneHotCategorical(tau, logits=logits.reshape(5, 2, 3)).log_prob(
            rc.reshape(5, 2, 3)).sum(-1), rtol=1e-10)
    # the relaxations' KL is the discrete one, by design
    np.testing.assert_allclose(kl_divergence(relaxed_cat, pl.Concrete(tau, torch.zeros(6), 3)),
                               kl_divergence(cat, pl.Discrete(torch.zeros(6), 3)))
    # the NumPyro twins at the same values
    jl = jnp.asarray(logits.numpy())
    for k, value, rvalue in ((None, x, r), (3, onehot, rc)):
        np.testing.assert_allclose(nl.Discrete(jl, k).log_prob(jnp.asarray(value.numpy())),
                                   pl.Discrete(logits, k).log_prob(value), rtol=1e-6)
        np.testing.assert_allclose(nl.Concrete(0.6, jl, k).log_prob(jnp.asarray(rvalue.numpy())),
                                   pl.Concrete(tau, logits, k).log_prob(rvalue), rtol=1e-5)
        np.testing.assert_array_equal(nl.Discrete(jl, k).enumerate_support(False),
                                      pl.Discrete(logits, k).enumerate_support(False))


# ---- gradients and rates ----------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    ("bernoulli, NVIL's baseline", [*BITS, "latent.baseline_hidden=[5]"]),
    ("categorical, no baseline, β = 2.5", [*CATEGORICAL, 'latent.baseline="none"',
                                          "objective.beta=2.5", 'prior.kind="learned_probs"']),
], ids=lambda c: c[0])
def test_the_score_function_gradient_is_the_enumerated_gradient_in_expectation(case):
    """The encoder's gradient of the training objective, averaged over draws of z (score
    terms, with or without a baseline), equals the exact one of the same spec with z summed
    out, within 4.5 standard errors in every coordinate."""
    _, overrides = case
    # 40 draws, each the mean of 50 vectorised particles: 2000 single-draw estimates
    score = load_spec(Spec(), [*overrides, "objective.num_particles=50"])
    exact_spec = load_spec(score, ['latent.estimator="enumerate"'])
    model = _pyro(score)
    params = {k: v for k, v in model.export_params().items() if not k.startswith("baseline")}
    exact = _pyro(exact_spec, params=params)
    y = _y(4)
    draws = model.gradient_draws(y, 40, seed=1)
    target = exact.gradient_draws(y, 1)[0]
    assert np.abs(exact.gradient_draws(y, 2, seed=5)[1] - target).max() < 1e-6  # no noise
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    z = np.abs(mean - target) / np.maximum(se, 1e-6)
    assert z.max() < 4.5, (z.max(), np.argmax(z))
    assert np.abs(target).max() > 10 * se.max() or np.abs(target).max() > 1e-2  # informative


def test_a_relaxed_site_rate_is_the_discrete_kl_or_the_relaxed_densities_without_analytic_kl():
    from pyro import poutine

    from ppl_vae.pyro.elbo import ScaledELBO
    from ppl_vae.pyro.latents import discrete_kl_per_dim

    spec = load_spec(Spec(), [*CATEGORICAL, 'latent.estimator="relaxed"',
                              'prior.kind="learned_probs"'])
    model = _pyro(spec)
    built, y = model.built, torch.as_tensor(_y())
    with torch.no_grad():
        model.modules["prior"].logits.normal_()
        logits = built.discrete_logits("z", y, {}, None)
        kl = discrete_kl_per_dim(logits, model.modules["prior"].logits, 3).sum()
        t = ScaledELBO(max_plate_nesting=1).terms(built.model, built.guide, y)
    assert float(t["rate/z"]) == pytest.approx(float(kl), rel=1e-6)
    # objective.analytic_kl = false: ln q − ln p̂ of the relaxed densities at the drawn z
    trace = poutine.trace(built.guide).get_trace(y)
    guide = poutine.replay(built.guide, trace=trace)
    with torch.no_grad():
        mc = ScaledELBO(analytic_kl=False, max_plate_nesting=1).terms(built.model, guide, y)
        m = poutine.trace(poutine.replay(built.model, trace=trace)).get_trace(y)
        value = trace.nodes["z"]["value"]
        expected = (trace.nodes["z"]["fn"].log_prob(value) - m.nodes["z"]["fn"].log_prob(value))
    assert float(mc["rate/z"]) == pytest.approx(float(expected.sum()), rel=1e-6)
    assert float(mc["rate/z"]) != pytest.approx(float(kl), rel=1e-2)


@pytest.mark.slow
def test_both_trainers_hand_each_step_its_temperature():
    """Pyro fills the device buffer in place; NumPyro traces the value: one compilation for
    windows at different temperatures, and the loss moves with τ."""
    import jax
    from numpyro import handlers

    from ppl_vae.data import load_data
    from ppl_vae.numpyro.train import Trainer as NumPyroTrainer
    from ppl_vae.pyro.train import Trainer as PyroTrainer

    spec = load_spec(Spec(), [*BITS, 'latent.estimator="relaxed"', "train.steps=8",
                              "train.log_every=2", "train.eval_every=8",
                              "train.checkpoint_every=8", "train.batch_size=8", "data.limit=50",
                              "latent.temperature={start=2.0, end=0.5}"])
    data = load_data(spec)
    pyro_trainer = PyroTrainer(spec, data, "cpu")
    pyro_trainer.run_steps(schedules.step_scalars(spec, np.arange(0, 3), 40), 1.0)
    tau = schedules.step_scalars(spec, np.arange(3), 40)["temperature/z"][-1]
    assert float(pyro_trainer.model.built.P.temperature("z")) == pytest.approx(tau)
    trainer = NumPyroTrainer(spec, data, "cpu")
    for first in (0, 2, 4):
        trainer.run_steps(schedules.step_scalars(spec, np.arange(first, first + 2), 40), 1.0)
    assert trainer.compilations == 1
    built = trainer.model.built
    y = jax.numpy.asarray(_y())

    def tau_of(value):
        with built.temperatures_at({"z": value}):
            site = handlers.trace(handlers.seed(handlers.substitute(
                built.guide, data=trainer.model.param_map), 0)).get_trace(y)["z"]
        return float(site["fn"].temperature)

    assert tau_of(0.7) == pytest.approx(0.7) and built.P.temperatures["z"] == 0.5


# ---- evaluation -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bernoulli", "categorical"])
def test_eval_reports_the_discrete_rate_and_code_usage(kind, tmp_path):
    """A discrete site's report: its closed-form rate per variable, the activation
    frequencies (or the perplexities), active units and the estimator; its modes for
    reconstructions, the traversals and the code-usage figure."""
    from ppl_vae import plots
    from ppl_vae.evaluation import per_example_stderrs, site_reports
    from ppl_vae.report import _site_lines, posterior_codes
    from ppl_vae.training import evaluate

    spec = load_spec(Spec(), [*(BITS if kind == "bernoulli" else CATEGORICAL),
                              'latent.estimator="relaxed"'])
    model, x = _pyro(spec), _y(30, seed=3)
    probs = model.posterior_probs(x)
    assert probs.shape == (30, spec.sites[0].width)
    metrics = evaluate(model, spec, x, np.zeros(30, int), 1.0, 1.0, num_particles=4)
    stderr = per_example_stderrs(model, spec, x, num_particles=4)
    site = site_reports(model, spec, x, None, metrics, stderr)["z"]
    # the rate: the closed-form KL of the discrete posterior, the sum of the variables'
    assert sum(site["rate_per_dim"]) == pytest.approx(site["rate"], rel=1e-5)
    assert site["rate"] == pytest.approx(metrics["rate"], rel=1e-6) and site["rate"] > 0
    assert len(site["perplexity"]) == 3 and 0 <= site["active_units"] <= 3
    assert site["mutual_information"] is None and site["estimator"] == "relaxed"
    if kind == "bernoulli":
        np.testing.assert_allclose(site["activation"], probs.mean(0), rtol=1e-6)
    else:
        assert np.shape(site["usage"]) == (3, 3) and site["categories"] == 3
        np.testing.assert_allclose(np.sum(site["usage"], -1), 1.0, rtol=1e-6)
    assert "trained by a Concrete relaxation" in "\n".join(_site_lines("z", site))
    codes = posterior_codes(spec, {"z": probs})["z"]
    assert set(np.unique(codes)) <= {0.0, 1.0}
    if kind == "categorical":
        assert (codes.reshape(30, 3, 3).sum(-1) == 1).all()
    assert plots.code_usage_bars(site, tmp_path / "usage.png").stat().st_size > 1000
    path = plots.discrete_traversals(model.decode_mean, np.array([2, 0]), codes[:3],
                                     None if kind == "bernoulli" else 3, (8, 8),
                                     tmp_path / "t.png")
    assert path.stat().st_size > 1000
    draws = model.posterior_draws(x[:5], num_samples=3)["z"]
    assert draws.shape == (5, 3, spec.sites[0].width) and set(np.unique(draws)) <= {0.0, 1.0}
    assert model.prior_normal() is None


@pytest.mark.slow
def test_the_numpyro_hooks_of_a_discrete_site_agree_with_the_pyro_ones():
    """The same parameters: the same posterior probabilities and closed-form rate per
    variable, finite log-density parts (the IWAE estimate's draws of the discrete model), and
    gradient draws of the same layout."""
    from ppl_vae.numpyro.hooks import Model as NumPyroModel

    spec = load_spec(Spec(), [*CATEGORICAL, 'latent.estimator="enumerate"'])
    pm = _pyro(spec)
    nm = NumPyroModel(spec, 64, None, "cpu", params=pm.export_params())
    x = _y(20, seed=3)
    np.testing.assert_allclose(nm.posterior_probs(x), pm.posterior_probs(x), rtol=1e-5,
                               atol=1e-6)
    a, b = (m.eval_terms(x, None, {"z": 1.0}, 1.0, num_particles=2) for m in (pm, nm))
    for key in ("rate", "rate/z", *(f"rate/z/dim_{i}" for i in range(3))):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    parts = nm.log_density_parts(x[:5], 7)
    assert parts.shape == (5, 7, 3) and np.isfinite(parts).all()
    assert pm.gradient_draws(x[:5], 2).shape == nm.gradient_draws(x[:5], 2).shape
    assert nm.prior_normal() is None
