"""A linear-Gaussian model has a closed-form posterior and evidence. With the encoder set to the
exact posterior, every importance weight equals p(y), so through either backend the ELBO, the IWAE
bound for every K, and ln p(y) coincide; with a perturbed encoder IWAE climbs to ln p(y) as K
grows. This checks the backends' hooks (log-weights, eval terms) against an independent answer.

z ~ N(0, I_d), y | z ~ N(W z + b, σ² I_D), W with orthogonal columns (so the posterior is
diagonal): Σ = (I + WᵀW/σ²)⁻¹, μ(y) = Σ Wᵀ (y − b)/σ², p(y) = N(b, W Wᵀ + σ² I).
"""

import numpy as np
import pytest

from ppl_vae.backends import backend_module
from ppl_vae.diagnostics import iwae_bound
from ppl_vae.spec import Spec, load_spec

D, d, SIGMA = 6, 2, 0.5
SPEC = load_spec(Spec(), ['likelihood.kind="gaussian"', f"likelihood.scale={SIGMA}",
                          "encoder.hidden=[]", "decoder.hidden=[]", f"latent.dim={d}",
                          'data.binarize="none"', 'train.dtype="float64"',
                          "objective.num_particles=50"])


def problem(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(D, d)))
    W = q * np.array([1.5, 0.7])  # orthogonal columns of different lengths
    b = rng.normal(size=D) * 0.3
    Sigma_diag = 1 / (1 + (W ** 2).sum(0) / SIGMA ** 2)
    A = (Sigma_diag[:, None] * W.T) / SIGMA ** 2  # μ(y) = A (y − b)
    z = rng.normal(size=(200, d))
    y = z @ W.T + b + SIGMA * rng.normal(size=(200, D))
    cov = W @ W.T + SIGMA ** 2 * np.eye(D)
    diff = y - b
    log_p = -0.5 * (np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
                    + np.linalg.slogdet(cov)[1] + D * np.log(2 * np.pi))
    scale_raw = np.log(np.expm1(np.sqrt(Sigma_diag) - 1e-4))  # softplus⁻¹(std − MIN_SCALE)
    params = {
        "decoder.out.weight": W, "decoder.out.bias": b,
        "encoder.loc.weight": A, "encoder.loc.bias": -A @ b,
        "encoder.scale.weight": np.zeros((d, D)), "encoder.scale.bias": scale_raw,
    }
    return y, log_p, params


def model_for(backend, params):
    if backend == "numpyro":
        jax = pytest.importorskip("jax")
        if not jax.config.jax_enable_x64:
            spec = load_spec(SPEC, ['train.dtype="float32"'])
            return backend_module(backend, "hooks").Model(spec, D, None, "cpu", params=params)
    else:
        pytest.importorskip("torch")
    return backend_module(backend, "hooks").Model(SPEC, D, None, "cpu", params=params)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_exact_posterior_makes_every_bound_exact(backend):
    y, log_p, params = problem()
    model = model_for(backend, params)
    tol = 1e-9 if model.spec.train.dtype == "float64" else 2e-4
    for k in (1, 10, 100):
        lw = model.log_weights(y, k, seed=k)
        np.testing.assert_allclose(lw, np.repeat(log_p[:, None], k, 1), rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(iwae_bound(lw).per_example, log_p, rtol=tol, atol=tol * 10)
    sums = model.eval_terms(y, None, beta=1.0, lam=1.0, batch_size=100)
    elbo = -(sums["rate"] + sums["nll"]) / len(y)
    # with the exact posterior the ELBO is ln p(y); the estimate (analytic rate, 50 draws of the
    # distortion per example, 200 examples) has a Monte Carlo error of about 0.01 nats
    assert elbo == pytest.approx(log_p.mean(), abs=0.05)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_iwae_climbs_to_the_evidence_with_a_wrong_encoder(backend):
    y, log_p, params = problem(1)
    params["encoder.loc.bias"] = params["encoder.loc.bias"] + 1.0  # a shifted proposal
    params["encoder.scale.bias"] = params["encoder.scale.bias"] + 1.0  # and wider
    model = model_for(backend, params)
    gaps = [log_p.mean() - iwae_bound(model.log_weights(y, k, seed=1)).mean
            for k in (1, 10, 100, 2000)]
    # the gap ln p(y) − L_K shrinks with K (up to the estimate's noise, ~0.03 nats) to ~0
    assert gaps[0] > 5 and gaps[0] > gaps[1] > max(gaps[2], gaps[3]) - 0.03
    assert abs(gaps[3]) < 0.05


# ---- two stochastic layers: z2 → z1 → y, all linear-Gaussian ---------------------------------
#
# z2 ~ N(0, I_2), z1 | z2 ~ N(A z2 + a, s1² I_3), y | z1 ~ N(W z1 + b, σ² I_6). The exact
# posterior factorises bottom-up, p(z1, z2 | y) = p(z1|y) p(z2|z1) (y ⊥ z2 | z1):
#   p(z1|y) = N(C (Σ1⁻¹ a + Wᵀ (y − b) / σ²), C),  Σ1 = A Aᵀ + s1² I,  C = (Σ1⁻¹ + WᵀW/σ²)⁻¹
#     (a full covariance: the `full` posterior family);
#   p(z2|z1) = N(C2 Aᵀ (z1 − a) / s1², C2),  C2 = (I + AᵀA / s1²)⁻¹ (diagonal: A has
#     orthogonal columns);
#   p(y) = N(W a + b, W Σ1 Wᵀ + σ² I).
D1, D2, S1 = 3, 2, 0.6


def two_layer_spec(z1_posterior: str = "full"):
    return load_spec(Spec(), [
        f'latents=[{{name="z1", dim={D1}, prior={{kind="conditional", parents=["z2"]}}, '
        f'posterior={{kind="{z1_posterior}"}}}}, {{name="z2", dim={D2}, '
        'posterior={inputs=["z1"]}}]', 'decoder.reads=["z1"]', "encoder.hidden=[]",
        "decoder.hidden=[]", 'likelihood.kind="gaussian"', f"likelihood.scale={SIGMA}",
        'data.binarize="none"', 'train.dtype="float64"'])


def softplus_inverse(std):
    return np.log(np.expm1(np.asarray(std) - 1e-4))  # softplus⁻¹(std − MIN_SCALE)


def two_layer_problem(seed=0, n=200, z1_posterior="full"):
    """Data, exact ln p(y) and the parameters that make the encoder the exact posterior (with
    z1_posterior = "diagonal": its exact mean and marginal standard deviations)."""
    rng = np.random.default_rng(seed)
    qa, _ = np.linalg.qr(rng.normal(size=(D1, D2)))
    A = qa * np.array([1.3, 0.8])  # orthogonal columns: p(z2|z1) has a diagonal covariance
    a = rng.normal(size=D1) * 0.3
    W = rng.normal(size=(D, D1)) * 0.7
    b = rng.normal(size=D) * 0.3
    Sigma1 = A @ A.T + S1 ** 2 * np.eye(D1)
    C = np.linalg.inv(np.linalg.inv(Sigma1) + W.T @ W / SIGMA ** 2)
    L = np.linalg.cholesky(C)
    C2 = np.linalg.inv(np.eye(D2) + A.T @ A / S1 ** 2)
    assert np.allclose(C2, np.diag(np.diag(C2)))
    z2 = rng.normal(size=(n, D2))
    z1 = z2 @ A.T + a + S1 * rng.normal(size=(n, D1))
    y = z1 @ W.T + b + SIGMA * rng.normal(size=(n, D))
    cov = W @ Sigma1 @ W.T + SIGMA ** 2 * np.eye(D)
    diff = y - (W @ a + b)
    log_p = -0.5 * (np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
                    + np.linalg.slogdet(cov)[1] + D * np.log(2 * np.pi))
    M = C @ W.T / SIGMA ** 2  # loc of q(z1|y) = M y + m
    m = C @ (np.linalg.solve(Sigma1, a) - W.T @ b / SIGMA ** 2)
    K = C2 @ A.T / S1 ** 2  # loc of q(z2|z1) = K (z1 − a)
    rows, cols = np.tril_indices(D1, -1)
    full = z1_posterior == "full"
    params = {
        "encoder_z1.loc.weight": M, "encoder_z1.loc.bias": m,
        "encoder_z1.scale.weight": np.zeros((D1, D)),
        "encoder_z1.scale.bias": softplus_inverse(np.diag(L) if full else np.sqrt(np.diag(C))),
        "encoder_z2.loc.weight": K, "encoder_z2.loc.bias": -K @ a,
        "encoder_z2.scale.weight": np.zeros((D2, D1)),
        "encoder_z2.scale.bias": softplus_inverse(np.sqrt(np.diag(C2))),
        "prior_z1.loc.weight": A, "prior_z1.loc.bias": a,
        "prior_z1.scale.weight": np.zeros((D1, D2)),
        "prior_z1.scale.bias": softplus_inverse(np.full(D1, S1)),
        "decoder.out.weight": W, "decoder.out.bias": b,
    }
    if full:
        params |= {"encoder_z1.tril.weight": np.zeros((len(rows), D)),
                   "encoder_z1.tril.bias": L[rows, cols]}
    return y, log_p, params


def two_layer_model(backend, params, z1_posterior="full"):
    spec = two_layer_spec(z1_posterior)
    if backend == "numpyro":
        jax = pytest.importorskip("jax")
        if not jax.config.jax_enable_x64:
            spec = load_spec(spec, ['train.dtype="float32"'])
    else:
        pytest.importorskip("torch")
    return backend_module(backend, "hooks").Model(spec, D, None, "cpu", params=params)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_two_layer_exact_posterior_makes_every_importance_weight_the_evidence(backend):
    """With q(z1|y) q(z2|z1) set to the exact posterior, every joint log-weight
    ln p̂(y|z1) + ln p̂(z1|z2) + ln p̂(z2) − ln q(z1|y) − ln q(z2|z1) is ln p(y)."""
    y, log_p, params = two_layer_problem()
    model = two_layer_model(backend, params)
    tol = 1e-9 if model.spec.train.dtype == "float64" else 2e-4
    parts = model.log_density_parts(y, 20, seed=3)
    assert parts.shape == (len(y), 20, 1 + 2 * 2)
    np.testing.assert_allclose(model.log_weights(y, 20, seed=3),
                               np.repeat(log_p[:, None], 20, 1), rtol=tol, atol=tol * 10)
    # and the per-site parts are not individually constant: only their sum is
    assert parts[..., 3].std() > 0.1 and parts[..., 4].std() > 0.1


def test_the_closed_form_rate_is_used_only_where_it_is_unbiased():
    """Bottom-up inference on the two-layer model: z2 ~ q(z2|z1) is inferred from z1, so
    E_q KL(q(z1|y) ‖ p̂(z1|z2)) is not z1's rate E_q[ln q(z1|y) − ln p̂(z1|z2)]. With
    analytic_kl the builder keeps z1's rate Monte Carlo, and its mean is the Monte Carlo
    ELBO's; forcing the closed form moves it by many standard errors."""
    pytest.importorskip("torch")
    import pyro
    import torch

    from ppl_vae import graph
    from ppl_vae.pyro.elbo import ScaledELBO

    # a diagonal q(z1|y), whose closed-form KL to p̂(z1|z2) is registered, at the exact
    # posterior's mean and marginal standard deviations
    y, _, params = two_layer_problem(n=4, z1_posterior="diagonal")
    kw = {"num_particles": 5000, "vectorize_particles": True, "max_plate_nesting": 1}

    def rate_z1(model, analytic_kl, seed):
        pyro.set_rng_seed(seed)
        elbo = ScaledELBO(analytic_kl=analytic_kl, **kw)
        with torch.no_grad():
            draws = [float(elbo.terms(model.built.model, model.built.guide,
                                      model.tensor(y))["rate/z1"]) for _ in range(8)]
        return np.mean(draws), np.std(draws, ddof=1) / np.sqrt(len(draws))

    marked = two_layer_model("pyro", params, "diagonal")
    mc, mc_se = rate_z1(marked, False, 0)
    ours, ours_se = rate_z1(marked, True, 1)
    assert abs(ours - mc) < 4 * np.hypot(mc_se, ours_se), (ours, mc, mc_se)
    original = graph.closed_form_rate_valid
    try:
        graph.closed_form_rate_valid = lambda s: {x.name: True for x in s.sites}
        forced = two_layer_model("pyro", params, "diagonal")
    finally:
        graph.closed_form_rate_valid = original
    # with Pyro's validation on, the forced closed form is flagged, as TraceMeanField_ELBO flags it
    with pyro.validation_enabled(True), pytest.warns(UserWarning, match="mean field"):
        biased, biased_se = rate_z1(forced, True, 2)
    assert abs(biased - mc) > 10 * np.hypot(mc_se, biased_se), (biased, mc, mc_se)


# ---- gradient estimators against closed forms (issue 22) -----------------------------------------
#
# One scalar latent per example: p(z) = N(0, 1), p(y|z) = N(z, σ²), q(z|y) = N(μ, s²); the exact
# posterior is N(y/(1 + σ²), σ²/(1 + σ²)) and p(y) = N(0, 1 + σ²). Each of the M examples has its
# own (μ_n, ln s_n), so the M gradients are M independent draws of an estimator of one example's
# gradient. The ELBO is closed-form: −ELBO(μ, s) = ½(μ² + s²) + ((y − μ)² + s²)/(2σ²) − ln s +
# const, so ∂(−ELBO)/∂μ = μ − (y − μ)/σ² and ∂(−ELBO)/∂ln s = s² + s²/σ² − 1.
Y0, NOISE, M = 0.8, 0.6, 2000


def scalar_gradients(backend: str, mu: float, log_s: float, seed: int = 0, **elbo_kwargs):
    """(−L per example (M,), ∂loss/∂μ_n (M,), ∂loss/∂ln s_n (M,)) of `ScaledELBO(**elbo_kwargs)`
    on the scalar linear-Gaussian model, all M examples at y = Y0 and q = N(mu, e^log_s)."""
    if backend == "pyro":
        torch = pytest.importorskip("torch")
        import pyro
        import pyro.distributions as dist

        from ppl_vae.pyro.elbo import ScaledELBO

        y = torch.full((M,), Y0, dtype=torch.float64)
        loc = torch.full((M,), mu, dtype=torch.float64, requires_grad=True)
        log_scale = torch.full((M,), log_s, dtype=torch.float64, requires_grad=True)

        def model(y):
            with pyro.plate("N", M):
                z = pyro.sample("z", dist.Normal(torch.zeros_like(y), 1.0))
                pyro.sample("y", dist.Normal(z, NOISE), obs=y)

        def guide(y):
            with pyro.plate("N", M):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()))

        k = elbo_kwargs.get("num_particles", 1)
        elbo = ScaledELBO(vectorize_particles=k > 1, max_plate_nesting=1, **elbo_kwargs)
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(model, guide, y)
        g_loc, g_scale = torch.autograd.grad(loss, [loc, log_scale])
        return float(loss.detach()) / M, g_loc.numpy(), g_scale.numpy()
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from ppl_vae.numpyro.elbo import ScaledELBO

    y = jnp.full((M,), Y0)

    def model(y):
        with numpyro.plate("N", M):
            z = numpyro.sample("z", dist.Normal(jnp.zeros_like(y), 1.0))
            numpyro.sample("y", dist.Normal(z, NOISE), obs=y)

    def guide(y):
        loc = numpyro.param("loc", jnp.zeros(M))
        log_scale = numpyro.param("log_scale", jnp.zeros(M))
        with numpyro.plate("N", M):
            numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)))

    elbo = ScaledELBO(max_plate_nesting=1, **elbo_kwargs)
    params = {"loc": jnp.full((M,), mu), "log_scale": jnp.full((M,), log_s)}
    loss, grads = jax.jit(jax.value_and_grad(lambda p: elbo.loss(
        jax.random.PRNGKey(seed), p, model, guide, y)))(params)
    return float(loss) / M, np.asarray(grads["loc"]), np.asarray(grads["log_scale"])


def exact_elbo_gradient(mu: float, log_s: float) -> tuple[float, float]:
    s2 = np.exp(2 * log_s)
    return mu - (Y0 - mu) / NOISE ** 2, s2 + s2 / NOISE ** 2 - 1


POSTERIOR = (Y0 / (1 + NOISE ** 2), 0.5 * np.log(NOISE ** 2 / (1 + NOISE ** 2)))
ELSEWHERE = (-0.3, 0.2)  # a proposal shifted and too wide


def assert_mean(draws, expected, what):
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(draws.mean() - expected) < 4 * se + 1e-6, (what, draws.mean(), expected, se)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_stl_and_reparam_have_the_elbo_gradient_in_expectation(backend):
    """Both estimators of the ELBO's encoder gradient are unbiased: their means over M draws
    are the closed form, within 4 standard errors."""
    exact = exact_elbo_gradient(*ELSEWHERE)
    for gradient in ("reparam", "stl"):
        _, g_mu, g_s = scalar_gradients(backend, *ELSEWHERE, gradient=gradient,
                                        analytic_kl=False)
        assert_mean(g_mu, exact[0], (gradient, "mu"))
        assert_mean(g_s, exact[1], (gradient, "log_s"))


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_stl_and_dreg_have_zero_variance_at_the_exact_posterior(backend):
    """At q = p(z|y), ln p(y, z) − ln q(z) = ln p(y) for every z: the path derivatives vanish,
    so STL's (ELBO) and DReG's (IWAE) encoder gradients are 0 for every draw; reparam's are
    not (its score term has mean 0, not variance 0)."""
    tol = 1e-9 if backend == "pyro" else 2e-5
    for kwargs in ({"gradient": "stl"}, {"bound": "iwae", "gradient": "dreg",
                                         "num_particles": 5}):
        _, g_mu, g_s = scalar_gradients(backend, *POSTERIOR, **kwargs)
        assert np.abs(g_mu).max() < tol and np.abs(g_s).max() < tol, kwargs
    for kwargs in ({"analytic_kl": False}, {"bound": "iwae", "num_particles": 5}):
        _, g_mu, g_s = scalar_gradients(backend, *POSTERIOR, **kwargs)
        assert g_mu.std() > 0.1 and g_s.std() > 0.1, kwargs
        assert_mean(g_mu, 0.0, kwargs)  # the exact posterior is the optimum: mean 0


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_dreg_and_reparam_have_the_same_iwae_gradient_in_expectation(backend):
    """The IWAE bound (K = 5) away from the posterior: DReG and reparam estimate the same
    encoder gradient (means within 4 combined standard errors over M draws), DReG with the
    smaller variance (Tucker et al. 2019)."""
    kw = {"bound": "iwae", "num_particles": 5}
    _, r_mu, r_s = scalar_gradients(backend, *ELSEWHERE, **kw)
    _, d_mu, d_s = scalar_gradients(backend, *ELSEWHERE, gradient="dreg", seed=1, **kw)
    for r, d, what in ((r_mu, d_mu, "mu"), (r_s, d_s, "log_s")):
        se = np.hypot(r.std(ddof=1), d.std(ddof=1)) / np.sqrt(M)
        assert abs(r.mean() - d.mean()) < 4 * se, (what, r.mean(), d.mean(), se)
        assert d.std() < r.std(), what
    assert abs(r_mu.mean()) > 5 * r_mu.std() / np.sqrt(M)  # a gradient worth comparing


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_the_iwae_value_converges_to_the_evidence(backend):
    """L_K → ln p(y) = ln N(y; 0, 1 + σ²) as K grows (each example an independent estimate),
    from below, the gap shrinking."""
    log_p = -0.5 * (np.log(2 * np.pi * (1 + NOISE ** 2)) + Y0 ** 2 / (1 + NOISE ** 2))
    gaps = [log_p + scalar_gradients(backend, *ELSEWHERE, bound="iwae", num_particles=k)[0]
            for k in (1, 10, 300)]
    assert gaps[0] > gaps[1] > gaps[2] > -0.002 and gaps[2] < 0.01, gaps
