"""The objectives beyond the ELBO, in both backends (issue 22): free bits and capacity targets
against a hand computation, the combinations refused, the capacity schedule, and the gradient
benchmark's smoke run. (The IWAE bound against RenyiELBO: tests/pyro/test_elbo.py and
tests/numpyro/test_elbo.py; the estimators against closed forms: tests/test_linear_gaussian.py;
the two backends against each other: tests/test_parity.py.)

The tiny model: B = 4 examples, z ∈ R³, p(z) = N(0, I), p(y|z) = N(z, I), q(z|y) = N(μ_n, s_n²)
with per-example parameters, whose closed-form rate per dimension is
KL_ni = ½ (s_ni² + μ_ni² − 1 − ln s_ni²); the per-dimension batch rates rate_i = Σ_n KL_ni lie
on both sides of λ·B for λ = 0.3.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.objective import capacity_schedule, check_estimator
from ppl_vae.spec import CapacitySpec

ROOT = Path(__file__).parents[1]
B, D = 4, 3
_rng = np.random.default_rng(0)
LOC = np.array([1.5, 0.1, 0.6]) + 0.1 * _rng.normal(size=(B, D))
LOG_SCALE = np.array([-0.5, 0.0, -0.2]) + 0.05 * _rng.normal(size=(B, D))
Y = _rng.normal(size=(B, D))


def closed_form_rate(loc=LOC, log_scale=LOG_SCALE):
    """KL per example and dimension (B, D), and its gradients wrt loc and log_scale."""
    s2 = np.exp(2 * log_scale)
    return 0.5 * (s2 + loc ** 2 - 1 - 2 * log_scale), loc, s2 - 1


def run(backend: str, seed: int = 0, elbo=None, **elbo_kwargs):
    """(terms {key: float}, gradients {"loc", "log_scale"} of the loss, the guide's draw z)
    of `ScaledELBO(**elbo_kwargs)` (or `elbo`) on the tiny model, float64 (Pyro) / float32
    (NumPyro)."""
    if backend == "pyro":
        torch = pytest.importorskip("torch")
        import pyro
        import pyro.distributions as dist
        from pyro import poutine

        from ppl_vae.pyro.elbo import ScaledELBO

        elbo = elbo or ScaledELBO(max_plate_nesting=1, **elbo_kwargs)
        loc = torch.tensor(LOC, requires_grad=True)
        log_scale = torch.tensor(LOG_SCALE, requires_grad=True)
        y = torch.tensor(Y)

        def model(y):
            with pyro.plate("N", B):
                z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=y.dtype), 1.0).to_event(1))
                pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

        def guide(y):
            with pyro.plate("N", B):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

        pyro.set_rng_seed(seed)
        terms = elbo.differentiable_terms(model, guide, y)
        g_loc, g_scale = torch.autograd.grad(terms["loss"], [loc, log_scale])
        pyro.set_rng_seed(seed)  # the guide draws first: the ELBO's draw
        z = poutine.trace(guide).get_trace(y).nodes["z"]["value"].detach().numpy()
        return ({k: float(v.detach()) for k, v in terms.items()},
                {"loc": g_loc.numpy(), "log_scale": g_scale.numpy()}, z)
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro import handlers

    from ppl_vae.numpyro.elbo import ScaledELBO

    def model(y):
        with numpyro.plate("N", B):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
            numpyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    def guide(y):
        loc = numpyro.param("loc", jnp.zeros((B, D)))
        log_scale = numpyro.param("log_scale", jnp.zeros((B, D)))
        with numpyro.plate("N", B):
            numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    params = {"loc": jnp.asarray(LOC, jnp.float32), "log_scale": jnp.asarray(LOG_SCALE,
                                                                             jnp.float32)}
    key, y = jax.random.PRNGKey(seed), jnp.asarray(Y, jnp.float32)
    elbo = ScaledELBO(max_plate_nesting=1, **elbo_kwargs)
    capacity = elbo_kwargs.get("capacity")
    if capacity is not None:  # traced, as the trainer passes it
        elbo = elbo.with_weights(elbo.beta, elbo.lam, {k: jnp.asarray(v, jnp.float32)
                                                       for k, v in capacity.items()})
    terms = jax.jit(lambda p: elbo.terms(key, p, model, guide, y))(params)
    grads = jax.jit(jax.grad(lambda p: elbo.loss(key, p, model, guide, y)))(params)
    _, guide_key = jax.random.split(key)  # the guide's key, as the ELBO splits it
    z = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), guide_key)
                       ).get_trace(y)["z"]["value"]
    return ({k: float(v) for k, v in terms.items()},
            {k: np.asarray(v, np.float64) for k, v in grads.items()}, np.asarray(z))


def tolerance(backend):
    return dict(rtol=1e-10, atol=1e-10) if backend == "pyro" else dict(rtol=2e-5, atol=2e-5)


def test_the_tiny_model_has_dimensions_on_both_sides_of_the_floor():
    per_dim = closed_form_rate()[0].mean(0)
    assert per_dim.min() < 0.3 < per_dim.max()


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_free_bits_is_the_hand_computation(backend, analytic_kl):
    """loss = β · Σ_i max(λ, rate_i / B) · B + λ_y · distortion (Kingma et al. 2016), with rate_i
    the closed-form KL per dimension summed over the batch where the rate is closed-form, else
    ln q_i − ln p_i at the draw; the gradient of the rate only from dimensions above the floor;
    the reported rate stays the true one."""
    free_bits, beta = 0.3, 1.5
    kw = dict(beta=beta, analytic_kl=analytic_kl)
    terms, grads, z = run(backend, free_bits={"z": free_bits}, **kw)
    plain, plain_grads, _ = run(backend, **kw)  # the same draws, the ELBO's loss
    if analytic_kl:
        kl, d_loc, d_scale = closed_form_rate()
    else:  # ln q_i − ln p_i at the draw: −ln s − ε²/2 + z²/2 (z = μ + s ε), per coordinate
        s = np.exp(LOG_SCALE)
        eps = (z - LOC) / s
        kl = -LOG_SCALE - eps ** 2 / 2 + z ** 2 / 2
        d_loc, d_scale = z, z * s * eps - 1  # ∂/∂μ and ∂/∂ln s through z = μ + s ε
    rate_dims = kl.sum(0)
    above = rate_dims > free_bits * B
    assert above.any() and not above.all()
    tol = tolerance(backend)
    np.testing.assert_allclose(terms["rate"], kl.sum(), **tol)  # the true rate
    np.testing.assert_allclose(terms["rate"], plain["rate"], **tol)
    expected = plain["loss"] - beta * kl.sum() + beta * np.maximum(free_bits * B,
                                                                   rate_dims).sum()
    np.testing.assert_allclose(terms["loss"], expected, **tol)
    for name, d_rate in (("loc", d_loc), ("log_scale", d_scale)):
        hand = plain_grads[name] - beta * d_rate + beta * d_rate * above
        np.testing.assert_allclose(grads[name], hand, **tol, err_msg=name)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
@pytest.mark.parametrize("target", [0.5, 6.0])
def test_capacity_is_the_hand_computation(backend, target):
    """β · rate becomes γ · |rate / B − C| · B (Burgess et al. 2018), on both sides of C."""
    gamma = 20.0
    kw = dict(beta=3.0, analytic_kl=True)
    terms, grads, _ = run(backend, capacity_weight={"z": gamma}, capacity={"z": target}, **kw)
    plain, plain_grads, _ = run(backend, **kw)
    kl, d_loc, d_scale = closed_form_rate()
    rate, tol = kl.sum(), tolerance(backend)
    np.testing.assert_allclose(terms["rate"], rate, **tol)
    expected = plain["loss"] - 3.0 * rate + gamma * abs(rate / B - target) * B
    np.testing.assert_allclose(terms["loss"], expected, **tol)
    sign = np.sign(rate / B - target)
    for name, d_rate in (("loc", d_loc), ("log_scale", d_scale)):
        hand = plain_grads[name] - 3.0 * d_rate + gamma * sign * d_rate
        np.testing.assert_allclose(grads[name], hand, **tol, err_msg=name)


def test_the_pyro_capacity_target_is_read_at_every_call():
    """The Pyro trainer fills its capacity tensors in place (a CUDA graph replays the step):
    the ELBO reads them when it runs, as it reads β."""
    torch = pytest.importorskip("torch")
    from ppl_vae.pyro.elbo import ScaledELBO

    target = torch.zeros((), dtype=torch.float64)
    elbo = ScaledELBO(capacity_weight={"z": 2.0}, capacity={"z": target}, max_plate_nesting=1)
    first, _, _ = run("pyro", elbo=elbo)
    target.fill_(4.0)
    second, _, _ = run("pyro", elbo=elbo)
    rate = closed_form_rate()[0].sum()
    np.testing.assert_allclose(second["loss"] - first["loss"],
                               2.0 * (abs(rate / B - 4.0) - rate / B) * B, rtol=1e-10)


def test_a_traced_capacity_target_compiles_once():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from ppl_vae.numpyro.elbo import ScaledELBO

    def model():
        numpyro.sample("z", dist.Normal(jnp.zeros(2), 1.0).to_event(1))

    def guide():
        numpyro.sample("z", dist.Normal(numpyro.param("loc", jnp.ones(2)), 0.5).to_event(1))

    elbo = ScaledELBO(capacity_weight={"z": 5.0})
    traces = []

    @jax.jit
    def loss(target):
        traces.append(1)
        return elbo.with_weights(1.0, 1.0, {"z": target}).loss(
            jax.random.PRNGKey(0), {"loc": jnp.ones(2)}, model, guide)

    values = [float(loss(jnp.asarray(c))) for c in (0.0, 1.0, 2.0)]
    assert len(traces) == 1 and len(set(values)) == 3


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_a_number_of_free_bits_applies_to_every_site(backend):
    by_site, _, _ = run(backend, free_bits={"z": 0.3})
    number, _, _ = run(backend, free_bits=0.3)
    assert by_site == number


@pytest.mark.parametrize("kwargs, message", [
    (dict(gradient="dreg"), "'dreg' is the IWAE bound's estimator"),
    (dict(bound="iwae", gradient="stl"), "biased for the IWAE bound"),
    (dict(bound="iwae", free_bits=0.5), "which bound='iwae' does not have"),
    (dict(bound="iwae", capacity_weight={"z": 2.0}), "which bound='iwae' does not have"),
    (dict(free_bits={"z": 0.5}, capacity_weight={"z": 2.0}), "site 'z' has both"),
    (dict(free_bits=-1.0), "nats per dimension >= 0"),
    (dict(capacity_weight={"z": 0.0}), "γ > 0"),
    (dict(bound="ELBO"), "use one of elbo, iwae"),
    (dict(gradient="score"), "use one of reparam, stl, dreg"),
])
@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_impossible_combinations_are_refused_in_one_line(backend, kwargs, message):
    pytest.importorskip("torch" if backend == "pyro" else "jax")
    elbo_cls = importlib.import_module(f"ppl_vae.{backend}.elbo").ScaledELBO
    with pytest.raises(ValueError, match=message) as err:
        elbo_cls(**kwargs)
    assert "\n" not in str(err.value)


def test_sum_sites_false_has_no_iwae_parts():
    with pytest.raises(NotImplementedError, match="no per-site parts"):
        check_estimator("iwae", "reparam", None, None, sum_sites=False)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_free_bits_on_a_full_covariance_posterior_is_refused_naming_the_site(backend):
    """Free bits are per dimension: a site whose q does not factorise is refused (the spec
    refuses it first, `ppl_vae.validation`; a hand-written guide gets the ELBO's line)."""
    if backend == "pyro":
        pytest.importorskip("torch")
        import pyro
        import pyro.distributions as dist
        import torch

        from ppl_vae.pyro.elbo import ScaledELBO

        def model():
            pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))

        def guide():
            pyro.sample("w", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

        def call():
            ScaledELBO(free_bits={"w": 0.1}).loss(model, guide)
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        from ppl_vae.numpyro.elbo import ScaledELBO

        def model():
            numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))

        def guide():
            numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)))

        def call():
            ScaledELBO(free_bits={"w": 0.1}).loss(jax.random.PRNGKey(0), {}, model, guide)
    with pytest.raises(ValueError, match="free bits on site 'w' need a rate per dimension"):
        call()


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_dreg_refuses_a_draw_shared_by_every_enumerated_value(backend):
    """DReG's weights are per (particle, enumerated value): a continuous site drawn once for
    all values of an enumerated one (its q does not read it) is refused, naming it."""
    if backend == "pyro":
        pytest.importorskip("torch")
        import pyro
        import pyro.distributions as dist
        import torch

        import tests.pyro.test_elbo as t
        from ppl_vae.pyro.elbo import ScaledELBO

        def guide(data, *args):
            with pyro.plate("N", len(data)):
                pyro.sample("c", dist.Categorical(torch.ones(3) / 3),
                            infer={"enumerate": "parallel"})
                pyro.sample("z", dist.Normal(0.1 * data, 1.0))

        def call():
            ScaledELBO(bound="iwae", gradient="dreg", num_particles=2, max_plate_nesting=1
                       ).differentiable_loss(t.enum_model, guide, t.DATA.float())
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        import tests.numpyro.test_elbo as t
        from ppl_vae.numpyro.elbo import ScaledELBO

        def guide(data, *args):
            with numpyro.plate("N", len(data)):
                numpyro.sample("c", dist.Categorical(jnp.ones(3) / 3),
                               infer={"enumerate": "parallel"})
                numpyro.sample("z", dist.Normal(0.1 * data, 1.0))

        params = {k: jnp.asarray(v) for k, v in t.ENUM_PARAMS.items() if k != "w"}

        def call():  # (traced only: the refusal comes while tracing, nothing to compile)
            jax.eval_shape(jax.grad(lambda p: ScaledELBO(
                bound="iwae", gradient="dreg", num_particles=2, max_plate_nesting=1).loss(
                jax.random.PRNGKey(0), p, t.enum_model, guide, jnp.asarray(t.DATA))), params)
    with pytest.raises(NotImplementedError, match="'z' is drawn once for all of them"):
        call()


def test_capacity_schedule_rises_linearly_then_holds():
    got = capacity_schedule(CapacitySpec(max=25.0, steps=100, weight=1000.0),
                            np.array([0, 1, 50, 99, 100, 5000]))
    np.testing.assert_allclose(got, [0.0, 0.25, 12.5, 24.75, 25.0, 25.0])
    assert got.dtype == np.float64
    assert not capacity_schedule(CapacitySpec(), np.arange(5)).any()  # max = 0: no target


@pytest.mark.slow  # (a subprocess that trains and compiles; tests/test_examples.py runs it too)
def test_the_gradient_benchmark_smoke_run():
    """benchmarks/bench_gradients.py --smoke: it runs and prints an SNR row per backend, K and
    estimator (nothing is timed or asserted about the numbers but their form)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gradients.py"),
                           "--smoke"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(
        ("pyro ", "numpyro "))]
    assert {(r[0], r[1], r[2]) for r in rows} >= {
        (b, k, g) for b in ("pyro", "numpyro") for k in ("1", "5") for g in ("reparam",
                                                                           "dreg")}
    assert all(np.isfinite(float(r[3])) and float(r[3]) > 0 for r in rows)
