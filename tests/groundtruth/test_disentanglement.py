"""ppl_vae.groundtruth.disentanglement against independent references.

* the information quantities against `sklearn.metrics.mutual_info_score` and hand-worked
  examples; the discretiser against disentanglement_lib's formula, written out here;
* the metrics on synthetic representations whose scores are known: an affine, permuted copy of
  the factors (MIG computed exactly from the 20-bin histogram of each factor's values, beta-VAE
  and FactorVAE ~1), the copy plus nuisance noise dimensions, pure noise (MIG ~0, the
  classifiers at chance 1/K), and one code entangling two factors;
* the batched calls to `represent` against per-point re-implementations of disentanglement_lib's
  sampling loops (same draws, two or one `represent` call per point), which must agree exactly.

Sizes are small (5 factors of 3 to 10 values, <= 2000 classifier points) so the file runs in
seconds.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score
from threadpoolctl import threadpool_limits

from ppl_vae.groundtruth import disentanglement as dis

SIZES = (3, 6, 10, 8, 8)
K = len(SIZES)
NUM_BINS = 20

# The clean copy: code i = SCALE[i] * factor PERM[i] + SHIFT[i] (scales of both signs and of
# different orders of magnitude, every code's std well above FactorVAE's 0.05 threshold).
PERM = np.array([2, 0, 4, 1, 3])
SCALE = np.array([0.5, -3.0, 0.07, 2.0, -0.2])
SHIFT = np.array([1.0, -4.0, 0.3, 10.0, 0.0])


def affine_copy(factors, perm=PERM, scale=SCALE, shift=SHIFT):
    return factors[:, perm] * scale + shift


def with_noise_dims(represent, num_noise, seed):
    """`represent`'s codes followed by `num_noise` standard normal dimensions (fresh each call)."""
    noise_rng = np.random.default_rng(seed)

    def out(factors):
        noise = noise_rng.standard_normal((factors.shape[0], num_noise))
        return np.concatenate([represent(factors), noise], axis=1)

    return out


def pure_noise(num_codes, seed):
    """Codes independent of the factors."""
    noise_rng = np.random.default_rng(seed)
    return lambda factors: noise_rng.standard_normal((factors.shape[0], num_codes))


def smooth_represent(factors):
    """A deterministic, entangled, row-by-row representation with two inactive dimensions.

    Elementwise operations only, so a row's code is bit-identical whatever batch it comes in.
    """
    f = factors.astype(np.float64)
    return np.stack([np.tanh(0.5 * f[:, 0] - 0.2 * f[:, 2]),
                     np.full(f.shape[0], 3.0),                 # constant: inactive
                     0.4 * f[:, 1] + np.sin(f[:, 3]),
                     0.002 * f[:, 4],                          # std ~0.005 < 0.05: inactive
                     np.cos(0.7 * f[:, 2]) * (1.0 + f[:, 4]),
                     f[:, 3] - 0.5 * f[:, 0]], axis=1)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The logistic regressions here are tiny; with other work on a 2-core machine, BLAS
    threads spin against each other and slow this file ~3x. One thread avoids that."""
    with threadpool_limits(limits=1):
        yield


class Counting:
    """Wraps a representation; records its calls and checks what it is handed."""

    def __init__(self, represent):
        self.represent = represent
        self.rows: list[int] = []

    def __call__(self, factors):
        assert factors.ndim == 2 and factors.shape[1] == K and factors.dtype == np.int64
        self.rows.append(factors.shape[0])
        return self.represent(factors)


# ---------------------------------------------------------------------------------------------
# reference implementations (test-only), transcribed from disentanglement_lib


def reference_histogram_discretize(target, num_bins):
    """disentanglement_lib utils._histogram_discretize; target is (num_codes, N)."""
    discretized = np.zeros_like(target)
    for i in range(target.shape[0]):
        discretized[i, :] = np.digitize(target[i, :],
                                        np.histogram(target[i, :], num_bins)[1][:-1])
    return discretized


def reference_beta_vae_points(represent, sizes, rng, num_points, batch_size):
    """beta_vae._generate_training_batch: one point at a time, two represent calls each."""
    labels, features = [], []
    for _ in range(num_points):
        index = rng.integers(len(sizes))
        factors1 = rng.integers(0, sizes, size=(batch_size, len(sizes)))
        factors2 = rng.integers(0, sizes, size=(batch_size, len(sizes)))
        factors2[:, index] = factors1[:, index]
        features.append(np.mean(np.abs(represent(factors1) - represent(factors2)), axis=0))
        labels.append(index)
    return np.array(labels), np.array(features)


def reference_beta_vae_score(represent, sizes, rng, batch_size, num_train, num_eval):
    train_labels, train_points = reference_beta_vae_points(represent, sizes, rng, num_train,
                                                           batch_size)
    model = LogisticRegression(random_state=0, max_iter=10000).fit(train_points, train_labels)
    eval_labels, eval_points = reference_beta_vae_points(represent, sizes, rng, num_eval,
                                                         batch_size)
    return {"train_accuracy": model.score(train_points, train_labels),
            "eval_accuracy": model.score(eval_points, eval_labels)}


def reference_factor_vae_votes(represent, sizes, rng, num_points, batch_size,
                               global_variances, active_dims):
    """factor_vae._generate_training_batch, with disentanglement_lib's own vote columns: the
    argmin is an index among the active dimensions."""
    votes = np.zeros((len(sizes), global_variances.shape[0]), dtype=np.int64)
    for _ in range(num_points):
        factor_index = rng.integers(len(sizes))
        factors = rng.integers(0, sizes, size=(batch_size, len(sizes)))
        factors[:, factor_index] = factors[0, factor_index]
        local_variances = np.var(represent(factors), axis=0, ddof=1)
        argmin = np.argmin(local_variances[active_dims] / global_variances[active_dims])
        votes[factor_index, argmin] += 1
    return votes


def reference_factor_vae_score(represent, sizes, rng, batch_size, num_train, num_eval,
                               num_variance_estimate):
    codes = represent(rng.integers(0, sizes, size=(num_variance_estimate, len(sizes))))
    global_variances = np.var(codes, axis=0, ddof=1)
    active_dims = np.sqrt(global_variances) >= 0.05
    args = (batch_size, global_variances, active_dims)
    train_votes = reference_factor_vae_votes(represent, sizes, rng, num_train, *args)
    classifier = np.argmax(train_votes, axis=0)
    other_index = np.arange(train_votes.shape[1])
    eval_votes = reference_factor_vae_votes(represent, sizes, rng, num_eval, *args)
    return {"train_accuracy": np.sum(train_votes[classifier, other_index]) / np.sum(train_votes),
            "eval_accuracy": np.sum(eval_votes[classifier, other_index]) / np.sum(eval_votes),
            "active_dims": active_dims}


# ---------------------------------------------------------------------------------------------
# exact MIG of an affine copy under the histogram discretiser (population values)


def _entropy_of_counts(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def binned_index(values, num_bins=NUM_BINS):
    """Equal-width bin 0..num_bins-1 of integer `values` spanning [min, max], exactly (integer
    arithmetic, the maximum in the last bin)."""
    lo, span = values.min(), values.max() - values.min()
    return np.minimum(num_bins * (values - lo) // span, num_bins - 1)


def copy_gap(size, scale):
    """H(binned code) / H(factor) for code = scale * factor + shift, factor uniform on
    0..size-1: the binned code is a function of the factor, so I(code; factor) = H(code)."""
    values = np.arange(size) if scale > 0 else size - 1 - np.arange(size)
    return _entropy_of_counts(np.bincount(binned_index(values))) / math.log(size)


# ---------------------------------------------------------------------------------------------
# sampling and input checks


def test_sample_factors_uniform_independent_and_global_rng_untouched():
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    factors = dis.sample_factors(SIZES, 20000, np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], before)
    assert factors.shape == (20000, K) and factors.dtype == np.int64
    for j, size in enumerate(SIZES):
        freq = np.bincount(factors[:, j], minlength=size) / len(factors)
        assert freq.size == size  # no value out of range
        # Each frequency within 5 binomial standard errors of 1/size.
        assert np.max(np.abs(freq - 1 / size)) < 5 * math.sqrt((1 / size) / len(factors))
    # Pairwise independence: plug-in MI at its finite-sample bias level (~(a-1)(b-1)/2N).
    mi = np.array([[mutual_info_score(factors[:, i], factors[:, j]) for j in range(K)]
                   for i in range(K)])
    off_diag = mi[~np.eye(K, dtype=bool)]
    assert np.max(off_diag) < 0.01
    # Seeded: same generator state, same factors.
    assert np.array_equal(factors, dis.sample_factors(SIZES, 20000, np.random.default_rng(0)))
    # A size-1 factor is allowed; its column is 0.
    assert np.all(dis.sample_factors((4, 1), 10, np.random.default_rng(0))[:, 1] == 0)


@pytest.mark.parametrize("sizes", [(), (3, 0), (3, -2), ((3, 4),), (3.0, 4.0)])
def test_sample_factors_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="factor_sizes"):
        dis.sample_factors(sizes, 5, np.random.default_rng(0))


def test_sample_factors_rejects_bad_n_and_rng():
    with pytest.raises(ValueError, match="n must be"):
        dis.sample_factors(SIZES, -1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        dis.sample_factors(SIZES, 5, np.random.RandomState(0))
    with pytest.raises(TypeError, match="Generator"):
        dis.sample_factors(SIZES, 5, 0)


def test_module_imports_no_backend_and_no_sklearn():
    code = ("import sys\nimport ppl_vae.groundtruth.disentanglement\n"
            "print(' '.join(m for m in ('torch', 'jax', 'sklearn', 'pyro', 'numpyro', 'flax') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"


# ---------------------------------------------------------------------------------------------
# discrete information and the discretiser


def test_discrete_mutual_info_and_entropy_match_sklearn():
    rng = np.random.default_rng(1)
    n = 300
    base = rng.integers(0, 4, n)
    codes = np.stack([rng.integers(0, 5, n),
                      base + rng.integers(0, 2, n),             # dependent on factor 0
                      np.full(n, 9),                            # constant
                      rng.choice([-3, 7, 100], n)], axis=1)     # non-contiguous labels
    factors = np.stack([base, rng.integers(0, 3, n), rng.integers(0, 12, n)], axis=1)
    mi = dis.discrete_mutual_info(codes, factors)
    expected = np.array([[mutual_info_score(factors[:, j], codes[:, i]) for j in range(3)]
                         for i in range(4)])
    assert mi.shape == (4, 3)
    np.testing.assert_allclose(mi, expected, rtol=1e-10, atol=1e-12)
    assert mi[1, 0] > 0.5  # the dependent pair is seen
    entropy = dis.discrete_entropy(factors)
    expected_h = [mutual_info_score(factors[:, j], factors[:, j]) for j in range(3)]
    np.testing.assert_allclose(entropy, expected_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dis.discrete_entropy(codes)[2], 0.0)


def test_discrete_information_hand_computed():
    same = np.array([[0], [0], [1], [1]])
    flipped = np.array([[1], [1], [0], [0]])
    independent = np.array([[0], [1], [0], [1]])
    assert dis.discrete_mutual_info(same, flipped)[0, 0] == pytest.approx(math.log(2), abs=1e-15)
    assert dis.discrete_mutual_info(same, independent)[0, 0] == 0.0
    assert dis.discrete_entropy(same)[0] == pytest.approx(math.log(2), abs=1e-15)
    # y = [0, 0, 0, 1] given x = [0, 0, 1, 1]: I = H(Y) - H(Y | X) = H(3/4, 1/4) - ln 2 / 2.
    y = np.array([[0], [0], [0], [1]])
    h_y = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert dis.discrete_mutual_info(same, y)[0, 0] == pytest.approx(h_y - math.log(2) / 2,
                                                                    abs=1e-15)
    assert dis.discrete_entropy(y)[0] == pytest.approx(h_y, abs=1e-15)


def test_discrete_information_rejects_bad_input():
    good = np.zeros((4, 2), dtype=int)
    with pytest.raises(ValueError, match="same number"):
        dis.discrete_mutual_info(good, np.zeros((5, 2), dtype=int))
    with pytest.raises(ValueError, match="integer labels"):
        dis.discrete_mutual_info(good.astype(float), good)
    with pytest.raises(ValueError, match="shape"):
        dis.discrete_entropy(np.zeros(4, dtype=int))


def test_histogram_discretize_matches_disentanglement_lib_formula():
    rng = np.random.default_rng(2)
    codes = np.stack([rng.standard_normal(500),
                      rng.exponential(size=500) * 1e3,
                      rng.integers(0, 40, 500).astype(float) * 0.3 - 2.0,   # values on a grid
                      np.full(500, -1.5)], axis=1)                         # constant
    for num_bins in (20, 7, 1):
        binned = dis.histogram_discretize(codes, num_bins)
        assert binned.dtype == np.int64
        assert binned.min() >= 1 and binned.max() <= num_bins
        reference = reference_histogram_discretize(codes.T, num_bins).T
        np.testing.assert_array_equal(binned, reference)
    with pytest.raises(ValueError, match="non-finite"):
        dis.histogram_discretize(np.array([[0.0], [np.nan]]))
    with pytest.raises(ValueError, match="num_bins"):
        dis.histogram_discretize(codes, 0)


# ---------------------------------------------------------------------------------------------
# MIG


@pytest.mark.parametrize("sizes, scale, shift", [
    (SIZES, SCALE[np.argsort(PERM)], SHIFT),          # every factor fits 20 bins: MIG 1
    ((3, 6, 40, 10), np.array([2.0, -0.3, 0.7, -5.0]), np.array([0.0, 1.0, -2.0, 3.0])),
])
def test_mig_of_an_affine_copy_is_the_binning_loss(sizes, scale, shift):
    """A 40-value factor in 20 bins keeps ln 20 of its ln 40 nats: gap 0.812, not 1."""
    result = dis.mig_from_factors(lambda f: f * scale + shift, sizes, np.random.default_rng(3))
    expected_gaps = np.array([copy_gap(s, a) for s, a in zip(sizes, scale)])
    # The plug-in estimates at N = 10000 are within ~0.005 of the population values here.
    np.testing.assert_allclose(result.gaps, expected_gaps, atol=0.01)
    assert result.score == pytest.approx(np.mean(expected_gaps), abs=0.01)
    assert result.score > 0.8
    assert result.mutual_info.shape == (len(sizes), len(sizes))
    np.testing.assert_allclose(result.entropy, np.log(sizes), atol=0.01)
    if len(sizes) == 4:
        assert expected_gaps[2] == pytest.approx(math.log(20) / math.log(40))


def test_mig_clean_copy_permuted_and_with_noise_dims():
    clean = dis.mig_from_factors(affine_copy, SIZES, np.random.default_rng(4))
    assert clean.score == pytest.approx(1.0, abs=0.01)
    # Each factor's best code is its copy, wherever the permutation put it.
    np.testing.assert_array_equal(np.argmax(clean.mutual_info, axis=0), np.argsort(PERM))
    noisy = dis.mig_from_factors(with_noise_dims(affine_copy, 3, seed=5), SIZES,
                                 np.random.default_rng(4))
    assert noisy.mutual_info.shape == (K + 3, K)
    assert noisy.score > 0.98


def test_mig_pure_noise_is_near_zero():
    result = dis.mig_from_factors(pure_noise(5, seed=6), SIZES, np.random.default_rng(7))
    assert 0.0 <= result.score < 0.05
    assert np.max(result.mutual_info) < 0.05  # nats; only the plug-in bias


def test_mig_drops_for_an_entangled_code():
    """code 0 = f0 + 10 f1 and copies of f2..f4: f0 is split over code 0's bins.

    f1 keeps its full gap: code 0's bins still determine f1 and no other code knows it. This
    is MIG's known blind spot (one code capturing two factors is not penalised); the
    population gaps are computed here from code 0's exact binning.
    """
    def entangled(factors):
        f = factors.astype(np.float64)
        return np.stack([f[:, 0] + 10 * f[:, 1], f[:, 2], f[:, 3], f[:, 4]], axis=1)

    result = dis.mig_from_factors(entangled, SIZES, np.random.default_rng(8))
    clean = dis.mig_from_factors(affine_copy, SIZES, np.random.default_rng(8))
    f0, f1 = np.meshgrid(np.arange(SIZES[0]), np.arange(SIZES[1]), indexing="ij")
    bins = binned_index((f0 + 10 * f1).ravel())
    joint = np.zeros((NUM_BINS, SIZES[0]))
    np.add.at(joint, (bins, f0.ravel()), 1.0)
    mi_f0 = (_entropy_of_counts(joint.sum(axis=1)) + math.log(SIZES[0])
             - _entropy_of_counts(joint.ravel()))
    expected_gap_f0 = mi_f0 / math.log(SIZES[0])
    assert result.gaps[0] == pytest.approx(expected_gap_f0, abs=0.02)
    assert result.gaps[0] < 0.5
    assert result.gaps[1] > 0.98
    assert np.mean(result.gaps[:2]) < np.mean(clean.gaps[:2]) - 0.25
    assert result.score < clean.score - 0.1


def test_mig_gap_vanishes_for_a_duplicated_factor():
    """Two codes that each determine f0 (a copy and a flipped, scaled copy) tie: gap 0."""
    def duplicated(factors):
        f = factors.astype(np.float64)
        return np.concatenate([f[:, :1], -2.0 * f[:, :1] + 1.0, f[:, 1:]], axis=1)

    result = dis.mig_from_factors(duplicated, SIZES, np.random.default_rng(30), num_points=3000)
    assert result.gaps[0] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(result.mutual_info[:2, 0], result.entropy[0], rtol=1e-12)
    assert np.all(result.gaps[1:] > 0.97)
    assert result.score == pytest.approx(np.mean(result.gaps))


def test_mig_single_code_dimension_takes_second_best_as_zero():
    factors = dis.sample_factors((4, 5), 2000, np.random.default_rng(9))
    result = dis.mig(factors[:, :1] * 2.5, factors)
    assert result.mutual_info.shape == (1, 2)
    assert result.gaps[0] == pytest.approx(1.0, abs=1e-12)
    assert result.gaps[1] == pytest.approx(result.mutual_info[0, 1] / result.entropy[1])
    assert result.gaps[1] < 0.01


def test_mig_skips_a_constant_factor():
    result = dis.mig_from_factors(lambda f: f * 1.0, (4, 1, 5), np.random.default_rng(10),
                                  num_points=3000)
    assert result.entropy[1] == 0.0
    assert np.isnan(result.gaps[1])
    assert np.all(np.isfinite(result.gaps[[0, 2]]))
    assert result.score == pytest.approx(np.mean(result.gaps[[0, 2]]))
    with pytest.raises(ValueError, match="no factor varies"):
        dis.mig_from_factors(lambda f: f * 1.0, (1, 1), np.random.default_rng(10), 100)


def test_mig_rejects_bad_input():
    factors = np.zeros((10, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="same number of rows"):
        dis.mig(np.zeros((9, 3)), factors)
    with pytest.raises(ValueError, match="integer labels"):
        dis.mig(np.zeros((10, 3)), factors.astype(float))
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        dis.mig(np.zeros(10), factors)
    with pytest.raises(ValueError, match="rows for"):
        dis.mig_from_factors(lambda f: f[1:] * 1.0, SIZES, np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="non-finite"):
        dis.mig_from_factors(lambda f: np.where(f > 0, f, np.nan), SIZES,
                             np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="earlier"):
        widths = iter([2, 3])
        dis.mig_from_factors(lambda f: np.zeros((len(f), next(widths))), SIZES,
                             np.random.default_rng(0), 100, rows_per_call=50)


# ---------------------------------------------------------------------------------------------
# the beta-VAE and FactorVAE metrics


def test_classifier_metrics_clean_copy():
    beta = dis.beta_vae_score(affine_copy, SIZES, np.random.default_rng(11), num_train=1000,
                              num_eval=1000)
    assert beta["train_accuracy"] > 0.95 and beta["eval_accuracy"] > 0.95
    factor = dis.factor_vae_score(affine_copy, SIZES, np.random.default_rng(12),
                                  num_train=1000, num_eval=1000, num_variance_estimate=2000)
    assert factor["train_accuracy"] > 0.95 and factor["eval_accuracy"] > 0.95
    assert factor["num_active_dims"] == K


def test_classifier_metrics_ignore_noise_dims():
    represent = with_noise_dims(affine_copy, 3, seed=13)
    beta = dis.beta_vae_score(represent, SIZES, np.random.default_rng(14), num_train=1000,
                              num_eval=1000)
    assert beta["eval_accuracy"] > 0.95
    factor = dis.factor_vae_score(represent, SIZES, np.random.default_rng(15), num_train=1000,
                                  num_eval=1000, num_variance_estimate=2000)
    assert factor["eval_accuracy"] > 0.95
    assert factor["num_active_dims"] == K + 3  # the noise is active, but never least variable


def test_classifier_metrics_pure_noise_at_chance():
    chance = 1 / K
    beta = dis.beta_vae_score(pure_noise(5, seed=16), SIZES, np.random.default_rng(17),
                              num_train=1000, num_eval=2000)
    assert abs(beta["eval_accuracy"] - chance) < 0.1
    factor = dis.factor_vae_score(pure_noise(5, seed=18), SIZES, np.random.default_rng(19),
                                  num_train=1000, num_eval=2000, num_variance_estimate=2000)
    assert abs(factor["eval_accuracy"] - chance) < 0.1
    assert factor["num_active_dims"] == 5


def test_factor_vae_constant_codes_score_zero():
    result = dis.factor_vae_score(lambda f: np.full((len(f), 4), 2.5), SIZES,
                                  np.random.default_rng(21), num_train=10, num_eval=10,
                                  num_variance_estimate=100)
    assert result == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
    noise = pure_noise(3, seed=22)
    # std 0.01 < the 0.05 threshold: every dimension is pruned.
    quiet = dis.factor_vae_score(lambda f: 0.01 * noise(f), SIZES, np.random.default_rng(23),
                                 num_train=10, num_eval=10, num_variance_estimate=500)
    assert quiet["num_active_dims"] == 0 and quiet["eval_accuracy"] == 0.0


@pytest.mark.parametrize("call", [
    lambda: dis.beta_vae_score(affine_copy, (3, 1, 4), np.random.default_rng(0)),
    lambda: dis.factor_vae_score(affine_copy, (3, 1, 4), np.random.default_rng(0)),
])
def test_classifier_metrics_reject_a_one_value_factor(call):
    with pytest.raises(ValueError, match=">= 2"):
        call()


def test_classifier_metrics_reject_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="batch_size"):
        dis.factor_vae_score(affine_copy, SIZES, rng, batch_size=1, num_variance_estimate=10)
    with pytest.raises(ValueError, match="prune_threshold"):
        dis.factor_vae_score(affine_copy, SIZES, rng, prune_threshold=0.0)
    with pytest.raises(ValueError, match="num_eval"):
        dis.beta_vae_score(affine_copy, SIZES, rng, num_eval=0)
    with pytest.raises(ValueError, match="one factor fixed"):
        dis.beta_vae_score(affine_copy, SIZES, rng, num_train=1)
    with pytest.raises(TypeError, match="Generator"):
        dis.factor_vae_score(affine_copy, SIZES, np.random.RandomState(0))
    with pytest.raises(ValueError, match="active"):
        dis.factor_vae_votes(affine_copy, SIZES, rng, 5, np.ones(K), np.zeros(K, dtype=bool))


# ---------------------------------------------------------------------------------------------
# batching: identical to disentanglement_lib's per-point loops


@pytest.mark.parametrize("rows_per_call, expected_calls", [(1, 50), (64, 13), (10**6, 1)])
def test_beta_vae_points_do_not_depend_on_batching(rows_per_call, expected_calls):
    """16 rows per point (2 x batch 8): 1 point per call at 1 row, 4 at 64, all at 10**6."""
    counting = Counting(smooth_represent)
    labels, features = dis.beta_vae_training_points(
        counting, SIZES, np.random.default_rng(24), 50, batch_size=8,
        rows_per_call=rows_per_call)
    ref_labels, ref_features = reference_beta_vae_points(
        smooth_represent, SIZES, np.random.default_rng(24), 50, 8)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(features, ref_features)
    assert len(counting.rows) == expected_calls and sum(counting.rows) == 50 * 16


@pytest.mark.parametrize("rows_per_call, expected_calls", [(1, 40), (50, 7), (10**6, 1)])
def test_factor_vae_votes_do_not_depend_on_batching(rows_per_call, expected_calls):
    """Votes equal disentanglement_lib's after mapping its active-dimension columns back."""
    global_variances = np.var(smooth_represent(
        dis.sample_factors(SIZES, 1000, np.random.default_rng(25))), axis=0, ddof=1)
    active_dims = np.sqrt(global_variances) >= 0.05
    np.testing.assert_array_equal(active_dims, [True, False, True, False, True, True])
    counting = Counting(smooth_represent)
    votes = dis.factor_vae_votes(counting, SIZES, np.random.default_rng(26), 40, global_variances,
                                 active_dims, batch_size=8, rows_per_call=rows_per_call)
    ref_votes = reference_factor_vae_votes(smooth_represent, SIZES, np.random.default_rng(26), 40,
                                           8, global_variances, active_dims)
    num_active = int(active_dims.sum())
    np.testing.assert_array_equal(votes[:, active_dims], ref_votes[:, :num_active])
    assert not votes[:, ~active_dims].any() and not ref_votes[:, num_active:].any()
    assert votes.sum() == 40 and np.count_nonzero(votes.sum(axis=0)) > 1
    assert len(counting.rows) == expected_calls and sum(counting.rows) == 40 * 8


def test_scores_equal_the_per_point_references():
    beta = dis.beta_vae_score(smooth_represent, SIZES, np.random.default_rng(27), batch_size=16,
                              num_train=300, num_eval=200, rows_per_call=200)
    ref_beta = reference_beta_vae_score(smooth_represent, SIZES, np.random.default_rng(27), 16,
                                        300, 200)
    assert beta == ref_beta
    factor = dis.factor_vae_score(smooth_represent, SIZES, np.random.default_rng(28),
                                  batch_size=16, num_train=300, num_eval=200,
                                  num_variance_estimate=1000, rows_per_call=200)
    ref_factor = reference_factor_vae_score(smooth_represent, SIZES, np.random.default_rng(28),
                                            16, 300, 200, 1000)
    assert factor["train_accuracy"] == ref_factor["train_accuracy"]
    assert factor["eval_accuracy"] == ref_factor["eval_accuracy"]
    # disentanglement_lib reports len(active_dims) here, i.e. all 6; this is the active count.
    assert factor["num_active_dims"] == int(ref_factor["active_dims"].sum()) == 4
    assert 0.2 < factor["eval_accuracy"] < 1.0  # an entangled code: neither chance nor perfect


def test_metrics_leave_the_global_rng_alone():
    np.random.seed(29)
    before = np.random.get_state()[1].copy()
    dis.mig_from_factors(smooth_represent, SIZES, np.random.default_rng(0), 500)
    dis.beta_vae_score(smooth_represent, SIZES, np.random.default_rng(0), num_train=100,
                       num_eval=50, batch_size=8)
    dis.factor_vae_score(smooth_represent, SIZES, np.random.default_rng(0), num_train=50,
                         num_eval=50, num_variance_estimate=200, batch_size=8)
    assert np.array_equal(np.random.get_state()[1], before)
