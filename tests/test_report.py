"""`eval`'s per-site arithmetic on posteriors with known answers (NumPy only)."""

import math

import numpy as np
import pytest

from ppl_vae.report import site_information


def test_information_given_the_label_removes_what_the_label_already_says():
    """q(z|y, label) = N(μ_label, 0.1²): z tells the label (I(y, label; z) ≈ ln 4) but nothing
    more about y once the label is known (I(y; z | label) ≈ 0), which is what a
    label-conditional prior p̂(z|label) is compared with."""
    rng = np.random.default_rng(7)  # not the estimator's seed (0): its draws would be the codes
    labels = np.repeat(np.arange(4), 250)
    loc = np.stack([labels * 3.0, -labels * 2.0], 1)
    scale = np.full_like(loc, 0.1)
    joint, ceiling = site_information(loc, scale)
    assert joint.value == pytest.approx(math.log(4), abs=0.01) and ceiling == math.log(1000)
    given, ceiling = site_information(loc, scale, labels)
    assert abs(given.value) < 0.01 and ceiling == pytest.approx(math.log(250))
    # within each class the codes vary with y: I(y; z | label) = ln(1 + 1/0.5²) in 2-D
    # (N(0, 1) codes observed through N(·, 0.5²) noise), and the estimate is the class average
    loc = loc + rng.normal(size=loc.shape)
    given, _ = site_information(loc, np.full_like(loc, 0.5), labels)
    assert given.value == pytest.approx(math.log(5), abs=0.15)
    per_class = [site_information(loc[labels == k], np.full((250, 2), 0.5))[0].value
                 for k in range(4)]
    assert given.value == pytest.approx(np.mean(per_class), abs=0.1)


# ---- eval on a linear-Gaussian run with closed-form answers --------------------------------
def linear_gaussian_run(tmp_path, sigma, n_train=2000, n_test=500, seed=0, **npz):
    """A run folder whose encoder is the exact posterior of a linear-Gaussian model, with data
    drawn from that model: z ~ N(0, I_2), y | z ~ N(W z + b, σ² I_6). Its aggregate posterior
    is the prior N(0, I), so I_q = rate = −½ Σ_j ln Σ_jj and KL(q(z) ‖ p̂(z)) = 0 exactly; every
    importance weight is p(y), so the ELBO and IWAE coincide; and the expected distortion
    has a closed form. Returns the folder and (W, b, Σ_diag, A) with μ(y) = A (y − b)."""
    from ppl_vae import runs
    from ppl_vae.spec import Spec, load_spec, spec_to_toml

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    W = q * np.array([1.5, 0.7])
    b = rng.normal(size=6) * 0.3
    sigma_diag = 1 / (1 + (W ** 2).sum(0) / sigma ** 2)
    A = (sigma_diag[:, None] * W.T) / sigma ** 2
    n = n_train + n_test
    y = rng.normal(size=(n, 2)) @ W.T + b + sigma * rng.normal(size=(n, 6))
    np.savez(tmp_path / "linear.npz", x=y[:n_train], x_test=y[n_train:], **npz)
    spec = load_spec(Spec(), ['likelihood.kind="gaussian"', f"likelihood.scale={sigma}",
                              "encoder.hidden=[]", "decoder.hidden=[]", "latent.dim=2",
                              'data.binarize="none"', 'train.dtype="float64"',
                              'data.source="npz"', f'data.path="{tmp_path / "linear.npz"}"'])
    out = tmp_path / f"run-{sigma}"
    out.mkdir()
    runs.write_text_atomic(out / runs.SPEC_FILE, spec_to_toml(spec))
    runs.write_json_atomic(out / runs.INFO_FILE, {"backend": "pyro", "data_dim": 6,
                                                  "image_shape": None, "step": 0})
    scale_raw = np.log(np.expm1(np.sqrt(sigma_diag) - 1e-4))  # softplus⁻¹(std − MIN_SCALE)
    runs.save_params(out / runs.PARAMS_FILE, {
        "decoder.out.weight": W, "decoder.out.bias": b,
        "encoder.loc.weight": A, "encoder.loc.bias": -A @ b,
        "encoder.scale.weight": np.zeros((2, 6)), "encoder.scale.bias": scale_raw})
    return out, (W, b, sigma_diag, A)


def test_information_near_its_ceiling_is_flagged_from_the_rate(tmp_path, capsys):
    """σ = 0.02: I_q = rate ≈ 7.9 nats, above what 2500 examples resolve (ln 2500 = 7.8). The
    estimate is biased low (a mixture of M components holds at most ln M); eval must flag it
    from the rate, build q(z) from train and test, and print no marginal KL, which here would
    be the estimator's bias alone (the true one is 0)."""
    from ppl_vae.data import load_data
    from ppl_vae.report import evaluate_run, format_report
    from ppl_vae.runs import load_run

    out, (_, b, sigma_diag, A) = linear_gaussian_run(tmp_path, sigma=0.02)
    report = evaluate_run(out, iwae_k=0, progress=False)
    true_information = -0.5 * np.log(sigma_diag).sum()  # I_q over the population
    mu = (load_data(load_run(out).spec).x_test - b) @ A.T
    rate = 0.5 * (sigma_diag + mu ** 2 - 1 - np.log(sigma_diag)).sum(1).mean()
    assert report["rate"] == pytest.approx(rate, rel=1e-6)  # the closed form, these examples
    assert rate == pytest.approx(true_information, abs=0.1)
    assert report["mutual_information_ceiling"] == pytest.approx(math.log(2500))  # train + test
    assert report["mutual_information_limited"] and "marginal_kl" not in report
    assert report["mutual_information"] < true_information - 0.3  # the bias the flag is about
    text = format_report(report)
    assert "may be limited by its ceiling ln M = 7.82, M = 2500" in text
    assert "KL(q(z) ‖ p̂(z))  " not in text and "= rate − I_q)" not in text
    # the pool of train and test lifts the estimate above the test split's alone
    from ppl_vae.report import site_information

    model = load_run(out).model()
    alone, ceiling = site_information(*model.encode(load_data(model.spec).x_test))
    assert ceiling == pytest.approx(math.log(500))
    assert report["mutual_information"] > alone.value + 0.3


def test_a_known_entropy_bounds_the_information_too(tmp_path):
    """I_q ≤ H(y) as well as I_q ≤ rate: where the data declare H(y) (an npz `entropy`) below
    ln M − 3.2, the estimate is not limited by its ceiling even when the rate is above it (a
    β < 1 model spends rate the data do not have: examples/README.md §2)."""
    from ppl_vae.report import evaluate_run

    out, _ = linear_gaussian_run(tmp_path, sigma=0.02, entropy=np.array(4.0))
    report = evaluate_run(out, iwae_k=0, progress=False)
    assert report["rate"] > report["mutual_information_ceiling"] - 3 > 4.0
    assert not report["mutual_information_limited"] and "marginal_kl" in report


def test_a_resolved_information_gives_the_marginal_kl_and_same_draw_bounds(tmp_path):
    """σ = 0.5: I_q ≈ 1.7 nats, far below ln 2500, so the estimate is trusted and
    KL(q(z) ‖ p̂(z)) = rate − I_q is printed: 0 up to its standard error. The encoder is the
    exact posterior, so each of the K draws' log-weights is ln p(y): the ELBO of the same draws
    equals IWAE and ln p(y) − ELBO is 0 to float precision (a second set of draws for the ELBO
    would leave Monte Carlo noise there). The distortion, averaged over `particles` draws per
    example, lands on its closed form within its Monte Carlo error."""
    from ppl_vae.data import load_data
    from ppl_vae.report import evaluate_run, format_report
    from ppl_vae.runs import load_run

    out, (W, b, sigma_diag, A) = linear_gaussian_run(tmp_path, sigma=0.5)
    report = evaluate_run(out, iwae_k=20, progress=False, particles=64)
    assert not report["mutual_information_limited"]
    assert report["marginal_kl"] == pytest.approx(0.0, abs=4 * report[
        "mutual_information_stderr"] + 0.02)
    assert report["elbo_gap"] == pytest.approx(0.0, abs=1e-9)
    assert report["elbo_same_draws"] == pytest.approx(report["log_likelihood"], abs=1e-9)
    assert "PSIS k̂: none (every example's weights are equal" in format_report(report)
    # E_q[−ln N(y; W z + b, σ²)] = D/2 ln 2πσ² + (‖y − Wμ − b‖² + Σ_j ‖W_j‖² Σ_jj) / 2σ²
    y = load_data(load_run(out).spec).x_test.astype(np.float64)
    resid = y - (y - b) @ A.T @ W.T - b
    per_example = 3 * math.log(2 * math.pi * 0.25) + (
        (resid ** 2).sum(1) + (W ** 2).sum(0) @ sigma_diag) / (2 * 0.25)
    # the Monte Carlo part of one draw: (‖r − W s‖² − E) / 2σ², s ~ N(0, Σ); its sd by sampling
    s = np.random.default_rng(1).normal(size=(4000, 2)) * np.sqrt(sigma_diag)
    one_draw_sd = (((resid[:1] - s @ W.T) ** 2).sum(1) / 0.5).std()
    tolerance = 4 * one_draw_sd / math.sqrt(len(y) * 64)
    assert report["particles"] == 64
    assert report["nll_distortion"] == pytest.approx(per_example.mean(), abs=tolerance)


def test_the_ceiling_given_the_label_is_written_with_the_pool_it_comes_from():
    """M2's note read "ln M = 5.35, M = 2100 examples", but ln 2100 = 7.65: given the label
    the ceiling is Σ_k p(k) ln M_k over the classes' pools, ≈ ln(M / classes). The text now
    says so, and its per-label count is the one the number is the log of."""
    from ppl_vae.report import ceiling_text

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 210)  # 2100 examples, 210 of each label
    loc, scale = rng.normal(size=(2100, 2)), np.ones((2100, 2))
    _, ceiling = site_information(loc, scale, labels)
    assert ceiling == pytest.approx(math.log(210))
    site = {"mutual_information_ceiling": ceiling, "mutual_information_pool": 2100,
            "mutual_information_given_label": True}
    text = ceiling_text(site)
    assert f"Σ_k p(k) ln M_k = {math.log(210):.2f}" in text and "≈ 210 per label" in text
    assert "among the 2100" in text and "ln M = " not in text
    site["mutual_information_given_label"] = False
    site["mutual_information_ceiling"] = math.log(2100)
    assert ceiling_text(site) == "ln M = 7.65, M = 2100 examples"
