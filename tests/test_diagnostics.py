"""ppl_vae.diagnostics against independent references.

The main reference is a linear-Gaussian model, z ~ N(0, I_d), y = W z + b + ε,
ε ~ N(0, σ² I_D), whose posterior, evidence and mutual information are closed-form; it is
built here with plain NumPy linear algebra (full covariances, no diagonal shortcuts), not with
the library. W has orthogonal columns so the exact posterior is a diagonal Gaussian, which is
the family the library's functions take.
"""

from __future__ import annotations

import math
import tracemalloc
from importlib.util import find_spec

import numpy as np
import pytest
from scipy.special import logsumexp as scipy_logsumexp

from ppl_vae import diagnostics as dg

HAS_ARVIZ = find_spec("arviz") is not None


# ---------------------------------------------------------------------------------------------
# the linear-Gaussian reference (test-only helpers)


class LinearGaussian:
    """z ~ N(0, I_d), y | z ~ N(W z + b, σ² I_D), with closed-form posterior and evidence."""

    def __init__(self, rng, d=2, big_d=4, sigma=0.5, col_scales=(1.5, 0.7)):
        basis, _ = np.linalg.qr(rng.standard_normal((big_d, d)))
        self.w = basis * np.asarray(col_scales)[None, :]  # orthogonal columns
        self.b = rng.standard_normal(big_d)
        self.sigma = sigma
        self.d, self.big_d = d, big_d
        precision = np.eye(d) + self.w.T @ self.w / sigma**2
        self.post_cov = np.linalg.inv(precision)
        off_diag = self.post_cov - np.diag(np.diag(self.post_cov))
        assert np.max(np.abs(off_diag)) < 1e-12  # the posterior is mean-field exactly
        self.post_scale = np.sqrt(np.diag(self.post_cov))
        self.marginal_cov = self.w @ self.w.T + sigma**2 * np.eye(big_d)
        # I(y; z) of a Gaussian channel: ½ ln det(I + WᵀW/σ²).
        self.mutual_info = 0.5 * np.linalg.slogdet(precision)[1]

    def sample_y(self, rng, n):
        z = rng.standard_normal((n, self.d))
        return z @ self.w.T + self.b + self.sigma * rng.standard_normal((n, self.big_d))

    def posterior_loc(self, y):
        return (y - self.b) @ self.w @ self.post_cov.T / self.sigma**2

    def log_evidence(self, y):
        """ln N(y; b, W Wᵀ + σ² I), via a Cholesky factor."""
        chol = np.linalg.cholesky(self.marginal_cov)
        white = np.linalg.solve(chol, (y - self.b).T)
        return (-0.5 * np.sum(white**2, axis=0) - np.sum(np.log(np.diag(chol)))
                - 0.5 * self.big_d * math.log(2 * math.pi))

    def log_joint(self, y, z):
        """ln p(y, z) for y (N, D) and z (N, K, d) -> (N, K)."""
        mean = z @ self.w.T + self.b
        resid = y[:, None, :] - mean
        log_lik = (-0.5 * np.sum(resid**2, axis=-1) / self.sigma**2
                   - self.big_d * math.log(self.sigma) - 0.5 * self.big_d * math.log(2 * math.pi))
        log_prior = -0.5 * np.sum(z**2, axis=-1) - 0.5 * self.d * math.log(2 * math.pi)
        return log_lik + log_prior


def normal_logpdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)


def proposal_log_weights(model, rng, y, loc, scale, k):
    """(N, K) log weights ln p(y, z) − ln q(z|y) for z ~ N(loc, scale²) (diagonal)."""
    z = loc[:, None, :] + scale[:, None, :] * rng.standard_normal((len(y), k, model.d))
    log_q = normal_logpdf(z, loc[:, None, :], scale[:, None, :]).sum(-1)
    return model.log_joint(y, z) - log_q


# ---------------------------------------------------------------------------------------------
# rate per dimension


def test_gaussian_kl_hand_values_and_broadcasting():
    # KL(N(1, 2²) || N(0, 1)) = ½ (4 − 1 − ln 4 + 1) = 2 − ln 2
    assert dg.gaussian_kl_per_dim([[1.0]], [[2.0]])[0, 0] == pytest.approx(2 - math.log(2),
                                                                             rel=1e-14)
    loc = np.array([[0.3, -1.0], [2.0, 0.0]])
    scale = np.array([[1.0, 0.5], [0.1, 3.0]])
    kl = dg.gaussian_kl_per_dim(loc, scale, np.array([0.3, 1.0]), np.array([1.0, 2.0]))
    assert kl.shape == (2, 2)
    assert kl[0, 0] == 0.0  # q = p exactly
    expected = np.log(2.0 / 0.5) + (0.5**2 + 2.0**2) / (2 * 2.0**2) - 0.5
    assert kl[0, 1] == pytest.approx(expected, rel=1e-13)
    with pytest.raises(ValueError, match="scales must be > 0"):
        dg.gaussian_kl_per_dim(loc, -scale)


def test_rate_per_dim_matches_monte_carlo():
    rng = np.random.default_rng(1)
    n, d, m = 400, 3, 200
    loc = rng.normal(0.0, 1.0, (n, d)) * np.array([1.0, 0.3, 0.0])
    scale = np.exp(rng.normal(-0.5, 0.3, (n, d)))
    loc_p, scale_p = np.array([0.2, 0.0, -0.1]), np.array([1.0, 0.8, 1.5])
    analytic = dg.rate_per_dim(loc, scale, loc_p, scale_p)

    z = loc[:, None, :] + scale[:, None, :] * rng.standard_normal((n, m, d))
    log_ratio = normal_logpdf(z, loc[:, None, :], scale[:, None, :]) - normal_logpdf(
        z, loc_p, scale_p)
    per_example = log_ratio.mean(axis=1)  # (n, d)
    mc = per_example.mean(axis=0)
    se = per_example.std(axis=0, ddof=1) / math.sqrt(n)
    assert analytic.shape == (d,)
    assert np.all(np.abs(analytic - mc) < 4 * se), (analytic, mc, se)


def test_active_units_on_constructed_posteriors():
    rng = np.random.default_rng(2)
    n = 1000
    loc = np.column_stack([
        rng.normal(0, 1.0, n),      # informative
        rng.normal(5, 0.3, n),      # informative, off-centre (variance 0.09)
        np.full(n, 2.0),            # collapsed: constant mean
        rng.normal(0, 0.02, n),     # collapsed: wiggles far below the threshold (4e-4)
    ])
    n_active, cov = dg.active_units(loc)
    assert n_active == 2
    np.testing.assert_allclose(cov, loc.var(axis=0), rtol=1e-12)
    assert cov[2] == 0.0
    assert dg.active_units(loc, threshold=0.1)[0] == 1  # only the unit-variance dimension
    assert dg.active_units(loc, threshold=1e-6)[0] == 3


# ---------------------------------------------------------------------------------------------
# aggregate posterior and mutual information


def brute_force_aggregate(z, loc, scale):
    """ln (1/N) Σ_n N(z; loc_n, diag scale_n²) with the full (S, N, d) array."""
    comp = normal_logpdf(z[:, None, :], loc[None], scale[None]).sum(-1)
    return scipy_logsumexp(comp, axis=1) - math.log(len(loc))


def test_aggregate_log_density_chunking_and_brute_force():
    rng = np.random.default_rng(3)
    n, s, d = 301, 123, 3
    loc = rng.normal(3.0, 2.0, (n, d))  # off the origin on purpose
    scale = np.exp(rng.normal(-1.0, 0.7, (n, d)))
    z = rng.normal(3.0, 2.5, (s, d))
    whole = dg.aggregate_log_density(z, loc, scale, chunk=n)
    assert whole.shape == (s,)
    for chunk in (1, 7, 100, None):
        np.testing.assert_allclose(dg.aggregate_log_density(z, loc, scale, chunk=chunk), whole,
                                   rtol=0, atol=1e-10)
    np.testing.assert_allclose(whole, brute_force_aggregate(z, loc, scale), rtol=0, atol=1e-9)
    # one component: the mixture is that Gaussian
    np.testing.assert_allclose(dg.aggregate_log_density(z, loc[:1], scale[:1]),
                               normal_logpdf(z, loc[0], scale[0]).sum(-1), atol=1e-10)


def test_aggregate_log_density_memory_is_bounded_by_the_chunk():
    rng = np.random.default_rng(4)
    n, s, d = 10_000, 2_000, 8
    loc, scale = rng.normal(size=(n, d)), np.exp(rng.normal(-1, 0.2, (n, d)))
    z = rng.normal(size=(s, d))
    tracemalloc.start()
    try:
        dg.aggregate_log_density(z, loc, scale, chunk=500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # an unchunked (S, N) block alone would be 160 MB; (S, N, d) 1.3 GB
    assert peak < 64e6, peak


def test_mutual_information_and_marginal_kl_linear_gaussian():
    """Exact posterior, y ~ p(y): q(z) = p(z) = N(0, I), so I_q = I(y; z) and KL(q(z)||p(z)) = 0;
    against a wrong prior N(0, s² I) the rate grows by exactly KL(N(0, I) || N(0, s² I))."""
    rng = np.random.default_rng(5)
    model = LinearGaussian(rng)
    y = model.sample_y(rng, 3000)
    loc = model.posterior_loc(y)
    scale = np.broadcast_to(model.post_scale, loc.shape)

    mi = dg.mutual_information(loc, scale, rng, num_samples_per_example=2)
    assert isinstance(mi, dg.Estimate)
    assert 0 < mi.stderr < 0.05
    assert abs(mi.value - model.mutual_info) < 4 * mi.stderr, (mi, model.mutual_info)

    kl_per_example = dg.gaussian_kl_per_dim(loc, scale).sum(axis=1)
    rate = dg.rate_per_dim(loc, scale).sum()
    assert rate == pytest.approx(kl_per_example.mean(), rel=1e-12)
    rate_se = kl_per_example.std(ddof=1) / math.sqrt(len(y))
    assert abs(rate - model.mutual_info) < 4 * rate_se  # E_y KL(q(z|y)||p(z)) = I(y; z) here
    both_se = math.hypot(mi.stderr, rate_se)
    assert abs(dg.marginal_kl(rate, mi.value)) < 4 * both_se

    s = 2.0
    rate_wrong_prior = dg.rate_per_dim(loc, scale, 0.0, s).sum()
    gap_exact = model.d * (math.log(s) + 1 / (2 * s**2) - 0.5)
    gap = dg.marginal_kl(rate_wrong_prior, mi.value)
    wrong_se = math.hypot(mi.stderr, dg.gaussian_kl_per_dim(loc, scale, 0.0, s).sum(1).std(
        ddof=1) / math.sqrt(len(y)))
    assert abs(gap - gap_exact) < 4 * wrong_se, (gap, gap_exact, wrong_se)


def test_mutual_information_limits_collapsed_and_separated():
    rng = np.random.default_rng(6)
    n, d = 500, 3
    # collapsed encoder: every q(z|y) is the same, so q(z|y) = q(z) and I_q = 0 exactly
    collapsed = dg.mutual_information(np.full((n, d), 0.4), np.full((n, d), 0.9), rng)
    assert abs(collapsed.value) < 1e-10
    # perfectly separated codes: q(z) at a draw from q(z|y_n) is q(z|y_n)/N, so I_q = ln N
    loc = np.arange(n, dtype=float)[:, None] * np.ones((1, d)) * 100.0
    separated = dg.mutual_information(loc, np.full((n, d), 0.1), rng, num_samples_per_example=3)
    # codes ~2.5e4 from their centre at scale 0.1: the documented rounding (eps · 6e10) applies
    assert separated.value == pytest.approx(math.log(n), abs=1e-5)


def test_posterior_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        dg.aggregate_log_density(np.zeros((2, 3)), np.zeros((4, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="scale_q must be > 0"):
        dg.mutual_information(np.zeros((4, 2)), np.zeros((4, 2)), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# IWAE


def test_iwae_with_exact_posterior_is_the_evidence_for_every_k():
    rng = np.random.default_rng(7)
    model = LinearGaussian(rng)
    y = model.sample_y(rng, 50)
    loc = model.posterior_loc(y)
    scale = np.broadcast_to(model.post_scale, loc.shape)
    log_p = model.log_evidence(y)
    for k in (1, 10, 100):
        bound = dg.iwae_bound(proposal_log_weights(model, rng, y, loc, scale, k))
        np.testing.assert_allclose(bound.per_example, log_p, rtol=0, atol=1e-9)
        assert bound.mean == pytest.approx(log_p.mean(), abs=1e-9)


def test_iwae_with_wrong_proposal_climbs_to_the_evidence():
    """Shifted, over-dispersed q: E[L_1] = ln p − KL(q || p(z|y)) and E[L_K] ↑ ln p(y)."""
    rng = np.random.default_rng(8)
    model = LinearGaussian(rng)
    y = model.sample_y(rng, 2000)
    exact_loc = model.posterior_loc(y)
    post_scale = np.broadcast_to(model.post_scale, exact_loc.shape)
    loc = exact_loc + 2.0 * post_scale
    scale = 1.5 * post_scale
    log_p = model.log_evidence(y)

    ks = (1, 10, 100, 5000)
    gaps, ses = [], []
    blocks = []
    for start in range(0, len(y), 250):  # 250 examples × 5000 draws at a time
        sl = slice(start, start + 250)
        lw = proposal_log_weights(model, rng, y[sl], loc[sl], scale[sl], ks[-1])
        blocks.append(lw)
    lw_all = np.concatenate(blocks)
    for k in ks:  # nested prefixes of the same draws: common random numbers across K
        bound = dg.iwae_bound(lw_all[:, :k])
        gaps.append(np.mean(log_p - bound.per_example))
        ses.append(bound.stderr)
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] >= -0.005, gaps
    assert gaps[2] - gaps[3] > 0.01
    assert abs(gaps[3]) < 0.005

    elbo_gap = dg.gaussian_kl_per_dim(loc, scale, exact_loc, post_scale).sum(1).mean()
    assert abs(gaps[0] - elbo_gap) < 4 * ses[0], (gaps[0], elbo_gap, ses[0])

    chunked = dg.iwae_bound_chunked(iter(blocks))
    whole = dg.iwae_bound(lw_all)
    np.testing.assert_array_equal(chunked.per_example, whole.per_example)
    assert chunked.mean == whole.mean and chunked.stderr == whole.stderr


def test_iwae_bound_small_cases():
    lw = np.log(np.array([[1.0, 3.0], [2.0, 2.0]]))
    bound = dg.iwae_bound(lw)
    np.testing.assert_allclose(bound.per_example, np.log([2.0, 2.0]), atol=1e-15)
    assert bound.stderr == 0.0
    assert math.isnan(dg.iwae_bound(lw[:1]).stderr)
    big = np.array([[1000.0, 1000.0, -np.inf]])  # no overflow; a zero weight still counts in K
    assert dg.iwae_bound(big).mean == pytest.approx(1000.0 + math.log(2 / 3), abs=1e-12)
    with pytest.raises(ValueError, match="NaN"):
        dg.iwae_bound(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="at least one block"):
        dg.iwae_bound_chunked([])


# ---------------------------------------------------------------------------------------------
# ESS and PSIS


def test_ess_from_log_weights():
    rng = np.random.default_rng(9)
    lw = rng.normal(0, 1.5, (20, 300)) + 50.0
    w = np.exp(lw - lw.max(axis=1, keepdims=True))
    expected = w.sum(1) ** 2 / (w**2).sum(1)
    np.testing.assert_allclose(dg.ess_from_log_weights(lw), expected, rtol=1e-12)
    np.testing.assert_allclose(dg.ess_from_log_weights(np.full((2, 64), -7.0)), 64.0)
    one_dominant = np.array([[0.0, -800.0, -800.0, -800.0]])
    assert dg.ess_from_log_weights(one_dominant)[0] == pytest.approx(1.0)


def gaussian_is_log_weights(rng, n, k, proposal_scale, target_scale=1.0):
    """log N(z; 0, target²) − log N(z; 0, proposal²), z ~ N(0, proposal²): (n, k)."""
    z = proposal_scale * rng.standard_normal((n, k))
    return normal_logpdf(z, 0.0, target_scale) - normal_logpdf(z, 0.0, proposal_scale)


@pytest.mark.skipif(not HAS_ARVIZ, reason="arviz not installed (pip install ppl_vae[arviz])")
def test_psis_khat_separates_good_and_heavy_tailed_proposals():
    rng = np.random.default_rng(10)
    n, k = 100, 1000
    # q = p exactly: every weight equal, nothing to fit
    equal = dg.psis_khat(np.full((3, k), -3.2) + 1e-15 * rng.standard_normal((3, k)))
    assert np.all(equal == -np.inf)
    # q slightly wider than p: bounded weights, k̂ < 0.5
    good = dg.psis_khat(gaussian_is_log_weights(rng, n, k, proposal_scale=1.2))
    # q much narrower than p: weights have tail index 1 − 0.3² ≈ 0.91
    bad = dg.psis_khat(gaussian_is_log_weights(rng, n, k, proposal_scale=0.3))
    assert good.shape == bad.shape == (n,)
    good_summary, bad_summary = dg.psis_summary(good), dg.psis_summary(bad)
    assert good_summary["khat_max"] < 0.5 and good_summary["share_above_0.5"] == 0.0
    # per-row k̂ from K = 1000 draws scatter by ~0.15 (and are shrunk towards 0.5), so the
    # thresholds are on the mean and on shares, with room for that scatter
    assert bad_summary["khat_mean"] > 0.7
    assert bad_summary["share_above_0.7"] > 0.5
    assert bad_summary["share_above_0.5"] > 0.8


def test_psis_summary_counts():
    khat = np.array([0.1, 0.6, 0.8, 1.2, -np.inf, np.nan])
    summary = dg.psis_summary(khat)
    assert summary["khat_mean"] == pytest.approx((0.1 + 0.6 + 0.8 + 1.2) / 4)
    assert summary["khat_max"] == 1.2
    assert summary["share_above_0.7"] == pytest.approx(2 / 5)
    assert summary["share_above_0.5"] == pytest.approx(3 / 5)
    assert summary["n"] == 6 and summary["n_not_estimable"] == 1


def test_to_bits_per_dim():
    assert dg.to_bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0, rel=1e-15)
    np.testing.assert_allclose(dg.to_bits_per_dim(np.array([0.0, 2 * math.log(2)]), 2),
                               [0.0, 1.0])
    with pytest.raises(ValueError):
        dg.to_bits_per_dim(1.0, 0)


# ---------------------------------------------------------------------------------------------
# the prior refitted to a fixed encoder


def test_gaussian_mixture_density_against_scipy():
    from scipy.stats import multivariate_normal

    mix = dg.GaussianMixture(np.array([0.2, 0.8]), np.array([[0.0, 1.0], [-2.0, 0.5]]),
                             np.array([[1.0, 0.3], [0.5, 2.0]]))
    z = np.random.default_rng(0).normal(size=(7, 2))
    ref = np.log(sum(w * multivariate_normal(m, np.diag(s**2)).pdf(z)
                     for w, m, s in zip(mix.weights, mix.loc, mix.scale)))
    np.testing.assert_allclose(mix.log_density(z), ref, rtol=1e-12)


def test_fit_gaussian_mixture_recovers_a_known_mixture_and_moment_matches():
    rng = np.random.default_rng(0)
    true = dg.GaussianMixture(np.array([0.3, 0.7]), np.array([[-3.0, 0.0], [2.0, 1.0]]),
                              np.array([[0.5, 1.0], [1.0, 0.3]]))
    k = rng.choice(2, size=20000, p=true.weights)
    z = true.loc[k] + true.scale[k] * rng.standard_normal((20000, 2))
    fit = dg.fit_gaussian_mixture(z, 2, rng)
    order = np.argsort(fit.loc[:, 0])
    np.testing.assert_allclose(fit.weights[order], true.weights, atol=0.01)
    np.testing.assert_allclose(fit.loc[order], true.loc, atol=0.03)
    np.testing.assert_allclose(fit.scale[order], true.scale, atol=0.03)
    one = dg.fit_gaussian_mixture(z, 1, rng)  # K = 1: the mean and standard deviation of z
    np.testing.assert_allclose(one.loc[0], z.mean(0), atol=1e-9)
    np.testing.assert_allclose(one.scale[0], z.std(0), atol=1e-9)
    with pytest.raises(ValueError, match="components"):
        dg.fit_gaussian_mixture(z[:3], 5, rng)


def test_rate_under_prior_matches_the_closed_form_kl():
    rng = np.random.default_rng(1)
    loc, scale = rng.normal(size=(400, 3)), np.exp(0.3 * rng.normal(size=(400, 3)))
    prior = dg.GaussianMixture(np.ones(1), np.full((1, 3), 0.5), np.full((1, 3), 2.0))
    estimate = dg.rate_under_prior(loc, scale, prior.log_density, rng, num_samples=64)
    exact = dg.gaussian_kl_per_dim(loc, scale, 0.5, 2.0).sum(1).mean()
    assert abs(estimate.value - exact) < 3 * estimate.stderr + 1e-3


def test_refitting_the_prior_closes_the_marginal_kl():
    """The universality theorem's first step on posteriors whose aggregate is a 3-cluster
    mixture: under N(0, I) the rate exceeds I_q; a 3-component prior fitted to q(z) brings the
    rate down to I_q (within Monte Carlo error)."""
    rng = np.random.default_rng(2)
    centres = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    loc = centres[rng.integers(0, 3, 3000)] + 0.3 * rng.normal(size=(3000, 2))
    scale = np.full_like(loc, 0.5)
    mi = dg.mutual_information(loc, scale, rng)
    rate_normal = dg.gaussian_kl_per_dim(loc, scale).sum(1).mean()
    draws = loc + scale * rng.standard_normal(loc.shape)
    prior = dg.fit_gaussian_mixture(draws, 3, rng)
    refit = dg.rate_under_prior(loc, scale, prior.log_density, rng, num_samples=16)
    assert rate_normal - mi.value > 5.0  # N(0, I) is far from q(z)
    assert abs(refit.value - mi.value) < 0.05  # the refitted prior leaves almost no marginal KL
