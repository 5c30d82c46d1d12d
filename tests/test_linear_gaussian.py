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
