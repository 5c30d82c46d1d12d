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
