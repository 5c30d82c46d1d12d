"""Disentanglement metrics (MIG, beta-VAE, FactorVAE), in NumPy only (no torch, no jax).

They follow disentanglement_lib (Locatello et al. 2019, "Challenging common assumptions in the
unsupervised learning of disentangled representations"), `evaluation/metrics/{mig, beta_vae,
factor_vae, utils}.py`, with its published defaults; departures are named where they occur.

Ground truth is K independent discrete factors with sizes `factor_sizes` (dSprites:
(3, 6, 40, 32, 32)); a factor's values are the integer indices 0 .. size-1, drawn uniformly and
independently (`sample_factors`). A representation is a callable

    represent(factors) -> codes,    (n, K) int64 factor indices -> (n, d) float codes

(for a VAE: render the images of those factors and return the encoder's posterior means), so
this module knows nothing of datasets or backends. `represent` must act row by row (a row's
code may not depend on the other rows of its call, e.g. no batch norm in training mode): calls
are batched, several samples of a metric at a time, at most `rows_per_call` rows each, and the
results are then identical to calling it one sample at a time.

All randomness comes from the `numpy.random.Generator` passed in (`rng.integers`), never from
the global NumPy RNG. Information quantities are in nats. scikit-learn is imported only inside
`beta_vae_score`, for its logistic regression (as disentanglement_lib does).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_ROWS_PER_CALL",
    "MIGResult",
    "Represent",
    "beta_vae_score",
    "beta_vae_training_points",
    "discrete_entropy",
    "discrete_mutual_info",
    "factor_vae_score",
    "factor_vae_votes",
    "histogram_discretize",
    "mig",
    "mig_from_factors",
    "sample_factors",
]

#: (n, K) int64 factor indices -> (n, d) float codes, row by row.
Represent = Callable[[np.ndarray], np.ndarray]

#: Most rows (factor vectors) handed to `represent` in one call, unless a single sample of a
#: metric needs more; for 64x64 images that is 64 MiB of float32 pixels per call.
DEFAULT_ROWS_PER_CALL = 4096


class MIGResult(NamedTuple):
    """MIG and its parts; unpacks as (score, gaps, mutual_info, entropy).

    score:       mean of `gaps` over the factors with positive entropy (in [0, 1] up to
                 estimator bias).
    gaps:        (K,) (I_best - I_second_best) / H(factor) per factor; NaN for a factor that
                 is constant in the sample (entropy 0), which the score skips.
    mutual_info: (d, K) I(binned code i; factor j), nats.
    entropy:     (K,) H(factor j), nats.
    """

    score: float
    gaps: np.ndarray
    mutual_info: np.ndarray
    entropy: np.ndarray


# ---------------------------------------------------------------------------------------------
# input checks


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. np.random.default_rng(0)), "
                        f"got {type(rng).__name__}")
    return rng


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_factor_sizes(factor_sizes: Sequence[int] | np.ndarray, minimum: int) -> np.ndarray:
    sizes = np.asarray(factor_sizes)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"factor_sizes must be a non-empty 1-d sequence, got shape {sizes.shape}")
    if not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"factor_sizes must be integers, got {sizes.tolist()}")
    if np.any(sizes < minimum):
        why = ("a factor with one value cannot be told apart when it is held fixed; drop it"
               if minimum == 2 else "a factor needs at least one value")
        raise ValueError(f"factor_sizes must all be >= {minimum} ({why}), got {sizes.tolist()}")
    return sizes.astype(np.int64)


def _check_codes(codes: object, name: str = "codes") -> np.ndarray:
    out = np.asarray(codes, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n, d) with d >= 1, got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contain non-finite values")
    return out


def _check_labels(labels: object, name: str) -> np.ndarray:
    out = np.asarray(labels)
    if out.ndim != 2 or out.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n, columns) with columns >= 1, got {out.shape}")
    if not (np.issubdtype(out.dtype, np.integer) or out.dtype == np.bool_):
        raise ValueError(f"{name} must be integer labels, got dtype {out.dtype}")
    return out


# ---------------------------------------------------------------------------------------------
# ground truth and representations


def _draw_factors(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    # One call draws every column: column j is uniform on 0 .. sizes[j]-1, independently.
    return rng.integers(0, sizes, size=(n, sizes.size), dtype=np.int64)


def sample_factors(factor_sizes: Sequence[int] | np.ndarray, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(n, K) int64 factor indices, column j uniform on 0 .. factor_sizes[j]-1, independent.

    A size-1 factor is allowed (its column is all 0); MIG then skips it, and the beta-VAE and
    FactorVAE metrics refuse it.
    """
    sizes = _check_factor_sizes(factor_sizes, minimum=1)
    return _draw_factors(sizes, _check_int("n", n, 0), _check_rng(rng))


def _represent(represent: Represent, factors: np.ndarray) -> np.ndarray:
    """(n, d) float64 codes of (n, K) factors, checked."""
    codes = _check_codes(represent(factors), name="represent's codes")
    if codes.shape[0] != factors.shape[0]:
        raise ValueError(f"represent returned {codes.shape[0]} rows for {factors.shape[0]} "
                         "factor vectors")
    return codes


def _check_width(codes: np.ndarray, width: int | None) -> None:
    if width is not None and codes.shape[-1] != width:
        raise ValueError(f"represent returned {codes.shape[-1]} code dimensions, earlier {width}")


def _represent_rows(represent: Represent, factors: np.ndarray, rows_per_call: int) -> np.ndarray:
    """(n, d) codes of (n, K) factors, `rows_per_call` rows per call."""
    chunks: list[np.ndarray] = []
    for start in range(0, factors.shape[0], rows_per_call):
        codes = _represent(represent, factors[start:start + rows_per_call])
        _check_width(codes, chunks[0].shape[1] if chunks else None)
        chunks.append(codes)
    return np.concatenate(chunks, axis=0)


def _represent_blocks(represent: Represent, blocks: np.ndarray) -> np.ndarray:
    """(p, ..., K) factor blocks -> (p, ..., d) codes, in one call on the stacked rows."""
    num_factors = blocks.shape[-1]
    codes = _represent(represent, blocks.reshape(-1, num_factors))
    return codes.reshape(*blocks.shape[:-1], codes.shape[1])


# ---------------------------------------------------------------------------------------------
# discrete information (contingency tables)


def _encode(column: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels -> (indices 0 .. levels-1, levels), whatever the label values."""
    levels, index = np.unique(column, return_inverse=True)
    return index.reshape(-1), levels.size


def _mutual_info_from_table(table: np.ndarray) -> float:
    """I(X; Y) in nats of a contingency table of counts (rows: X, columns: Y)."""
    n = table.sum()
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    i, j = np.nonzero(table)
    n_ij = table[i, j].astype(np.float64)
    # Σ p_ij ln(p_ij / (p_i p_j)) with p = count / n, in logs so that no product of counts
    # can overflow.
    mi = np.sum(n_ij / n * (np.log(n_ij) + math.log(n) - np.log(rows[i]) - np.log(cols[j])))
    # Independent labels give 0 up to rounding, which can be a tiny negative number; MI >= 0
    # (sklearn's mutual_info_score clips the same way).
    return max(float(mi), 0.0)


def discrete_mutual_info(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(d, K) I(code i; factor j) in nats, from (N, d) and (N, K) integer labels.

    The plug-in (empirical-distribution) estimate, equal to
    `sklearn.metrics.mutual_info_score(factors[:, j], discrete_codes[:, i])`, which is what
    disentanglement_lib's `utils.discrete_mutual_info` computes (its arrays are transposed:
    (d, N) and (K, N)). It is biased upward by about (levels_i - 1)(levels_j - 1) / (2N) for
    independent labels.
    """
    codes = _check_labels(discrete_codes, "discrete_codes")
    ys = _check_labels(factors, "factors")
    if codes.shape[0] != ys.shape[0] or codes.shape[0] == 0:
        raise ValueError(f"discrete_codes {codes.shape} and factors {ys.shape} need the same "
                         "number N >= 1 of rows")
    encoded_ys = [_encode(ys[:, j]) for j in range(ys.shape[1])]
    mi = np.zeros((codes.shape[1], ys.shape[1]))
    for i in range(codes.shape[1]):
        a, levels_a = _encode(codes[:, i])
        for j, (b, levels_b) in enumerate(encoded_ys):
            table = np.bincount(a * levels_b + b, minlength=levels_a * levels_b)
            mi[i, j] = _mutual_info_from_table(table.reshape(levels_a, levels_b))
    return mi


def discrete_entropy(factors: np.ndarray) -> np.ndarray:
    """(K,) plug-in entropy H(factor j) = -Σ p ln p in nats, from (N, K) integer labels.

    Equals `sklearn.metrics.mutual_info_score(factors[:, j], factors[:, j])`, which is how
    disentanglement_lib's `utils.discrete_entropy` computes it.
    """
    ys = _check_labels(factors, "factors")
    if ys.shape[0] == 0:
        raise ValueError("factors need at least one row")
    out = np.empty(ys.shape[1])
    for j in range(ys.shape[1]):
        p = np.unique(ys[:, j], return_counts=True)[1] / ys.shape[0]
        out[j] = max(float(-np.sum(p * np.log(p))), 0.0)  # max: a constant gives 0, not -0
    return out


def histogram_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """(N, d) codes -> (N, d) int64 bin numbers 1 .. num_bins, each dimension on its own.

    disentanglement_lib's `utils._histogram_discretize` (its default discretiser, 20 bins):
    `np.digitize(x, np.histogram(x, num_bins)[1][:-1])`, i.e. `num_bins` equal-width bins from
    the sample's minimum to its maximum, the maximum falling in the last one. It returns floats
    (`np.zeros_like` of the codes); the bin numbers are the same.
    """
    values = _check_codes(codes)
    num_bins = _check_int("num_bins", num_bins, 1)
    out = np.empty(values.shape, dtype=np.int64)
    for i in range(values.shape[1]):
        # histogram_bin_edges is the edge computation np.histogram uses, without the counting.
        edges = np.histogram_bin_edges(values[:, i], num_bins)
        out[:, i] = np.digitize(values[:, i], edges[:-1])
    return out


# ---------------------------------------------------------------------------------------------
# MIG


def mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> MIGResult:
    """Mutual information gap of (N, d) codes for (N, K) integer factors.

    Chen et al. 2018, "Isolating sources of disentanglement in VAEs", as disentanglement_lib's
    `mig._compute_mig`: bin each code dimension into `num_bins` equal-width bins
    (`histogram_discretize`), take the plug-in mutual information I(code i; factor j) in nats,
    and average over factors (I_best - I_second_best) / H(factor j). 1: each factor is captured
    by one code dimension and by no other; independent codes score about 0 (plus the plug-in
    estimator's small positive bias). MIG does not penalise one code capturing several factors.

    Departures from disentanglement_lib: with a single code dimension the second-best mutual
    information is taken as 0 (disentanglement_lib fails with an IndexError); a factor that is
    constant in the sample (entropy 0, e.g. a size-1 factor) has an undefined gap, reported as
    NaN and left out of the mean (disentanglement_lib would divide by zero); if no factor
    varies, ValueError.
    """
    values = _check_codes(codes)
    ys = _check_labels(factors, "factors")
    if values.shape[0] != ys.shape[0]:
        raise ValueError(f"codes {values.shape} and factors {ys.shape} need the same number of "
                         "rows")
    mutual_info = discrete_mutual_info(histogram_discretize(values, num_bins), ys)
    entropy = discrete_entropy(ys)
    varies = entropy > 0.0
    if not varies.any():
        raise ValueError("no factor varies in the sample (all entropies are 0); MIG is undefined")
    ranked = np.sort(mutual_info, axis=0)[::-1]
    second = ranked[1] if ranked.shape[0] > 1 else np.zeros(ranked.shape[1])
    gaps = np.full(entropy.shape, np.nan)
    gaps[varies] = (ranked[0, varies] - second[varies]) / entropy[varies]
    return MIGResult(float(np.mean(gaps[varies])), gaps, mutual_info, entropy)


def mig_from_factors(represent: Represent, factor_sizes: Sequence[int] | np.ndarray,
                     rng: np.random.Generator, num_points: int = 10000, *, num_bins: int = 20,
                     rows_per_call: int = DEFAULT_ROWS_PER_CALL) -> MIGResult:
    """MIG of `represent` on `num_points` uniformly sampled factor vectors (see `mig`).

    disentanglement_lib's default is num_train = 10000 points and 20 bins.
    """
    sizes = _check_factor_sizes(factor_sizes, minimum=1)
    num_points = _check_int("num_points", num_points, 2)
    rows_per_call = _check_int("rows_per_call", rows_per_call, 1)
    factors = _draw_factors(sizes, num_points, _check_rng(rng))
    return mig(_represent_rows(represent, factors, rows_per_call), factors, num_bins)


# ---------------------------------------------------------------------------------------------
# the beta-VAE metric


def beta_vae_training_points(represent: Represent, factor_sizes: Sequence[int] | np.ndarray,
                             rng: np.random.Generator, num_points: int, *, batch_size: int = 64,
                             rows_per_call: int = DEFAULT_ROWS_PER_CALL,
                             ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (num_points,) int64, features (num_points, d)) for the beta-VAE classifier.

    disentanglement_lib's `beta_vae._generate_training_sample`, per point: draw the factor k
    to hold fixed, two batches of `batch_size` factor vectors that share factor k's values, and
    the feature mean_b |code(batch 1)_b - code(batch 2)_b| (d,); the label is k. The draws are
    made point by point in that order, then the batches of as many points as fit in
    `rows_per_call` rows (2 * batch_size per point, at least one point) go to `represent` in one
    call, so the output does not depend on `rows_per_call`.
    """
    sizes = _check_factor_sizes(factor_sizes, minimum=2)
    num_points = _check_int("num_points", num_points, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    rows_per_call = _check_int("rows_per_call", rows_per_call, 1)
    rng = _check_rng(rng)
    num_factors = sizes.size
    labels = np.empty(num_points, dtype=np.int64)
    features: np.ndarray | None = None
    points_per_call = max(1, rows_per_call // (2 * batch_size))
    for start in range(0, num_points, points_per_call):
        count = min(points_per_call, num_points - start)
        pairs = np.empty((count, 2, batch_size, num_factors), dtype=np.int64)
        for p in range(count):
            index = int(rng.integers(num_factors))
            pairs[p, 0] = _draw_factors(sizes, batch_size, rng)
            pairs[p, 1] = _draw_factors(sizes, batch_size, rng)
            pairs[p, 1, :, index] = pairs[p, 0, :, index]
            labels[start + p] = index
        codes = _represent_blocks(represent, pairs)  # (count, 2, batch_size, d)
        if features is None:
            features = np.empty((num_points, codes.shape[-1]))
        _check_width(codes, features.shape[1])
        for p in range(count):
            # Point by point on the (batch_size, d) slices: exactly disentanglement_lib's
            # reduction, so batching cannot change a rounding.
            features[start + p] = np.mean(np.abs(codes[p, 0] - codes[p, 1]), axis=0)
    assert features is not None
    return labels, features


def beta_vae_score(represent: Represent, factor_sizes: Sequence[int] | np.ndarray,
                   rng: np.random.Generator, *, batch_size: int = 64, num_train: int = 10000,
                   num_eval: int = 5000, max_iter: int = 10000,
                   rows_per_call: int = DEFAULT_ROWS_PER_CALL) -> dict[str, float]:
    """The beta-VAE metric: {"train_accuracy", "eval_accuracy"} of a linear factor classifier.

    Higgins et al. 2017, "beta-VAE: learning basic visual concepts with a constrained
    variational framework", as disentanglement_lib's `beta_vae.compute_beta_vae_sklearn` with
    its defaults (batch_size 64, num_train 10000, num_eval 5000): a logistic regression is fit
    to predict which factor was held fixed from `beta_vae_training_points` features, then scored
    on `num_eval` fresh points. Chance level is 1/K; a disentangled code scores near 1 (the
    fixed factor's code dimension has feature 0).

    Departures: scikit-learn's current LogisticRegression defaults (lbfgs, multinomial, L2 with
    C=1) rather than the liblinear one-vs-rest of the scikit-learn disentanglement_lib ran on;
    max_iter is raised from 100 (features are not standardised, as in disentanglement_lib, and
    lbfgs needs more iterations on them). A ConvergenceWarning, if any, is passed on: it means
    the accuracies may be underestimates.
    """
    from sklearn.linear_model import LogisticRegression  # lazily: sklearn takes ~1 s to import

    max_iter = _check_int("max_iter", max_iter, 1)
    num_eval = _check_int("num_eval", num_eval, 1)
    train_labels, train_points = beta_vae_training_points(
        represent, factor_sizes, rng, num_train, batch_size=batch_size,
        rows_per_call=rows_per_call)
    if np.unique(train_labels).size < 2:
        raise ValueError(f"the {num_train} training points hold only one factor fixed; a "
                         "classifier needs two classes (increase num_train)")
    # random_state is unused by lbfgs; fixed so that no solver could reach for the global RNG.
    model = LogisticRegression(random_state=0, max_iter=max_iter)
    model.fit(train_points, train_labels)
    train_accuracy = float(model.score(train_points, train_labels))
    eval_labels, eval_points = beta_vae_training_points(
        represent, factor_sizes, rng, num_eval, batch_size=batch_size,
        rows_per_call=rows_per_call)
    _check_width(eval_points, train_points.shape[1])
    return {"train_accuracy": train_accuracy,
            "eval_accuracy": float(model.score(eval_points, eval_labels))}


# ---------------------------------------------------------------------------------------------
# the FactorVAE metric


def factor_vae_votes(represent: Represent, factor_sizes: Sequence[int] | np.ndarray,
                     rng: np.random.Generator, num_points: int, global_variances: np.ndarray,
                     active_dims: np.ndarray, *, batch_size: int = 64,
                     rows_per_call: int = DEFAULT_ROWS_PER_CALL) -> np.ndarray:
    """(K, d) int64 votes[factor, code dimension] of `num_points` FactorVAE samples.

    disentanglement_lib's `factor_vae._generate_training_sample`, per point: draw the factor k
    to hold fixed and a batch of `batch_size` factor vectors in which factor k takes the first
    vector's value; the vote goes to (k, the active code dimension of least variance over the
    batch relative to its global variance). `global_variances` (d,) and `active_dims` (d,) bool
    come from `factor_vae_score`. Draws are made point by point, then as many points as fit in
    `rows_per_call` rows (at least one) go to `represent` in one call, so the output does not
    depend on `rows_per_call`.
    """
    sizes = _check_factor_sizes(factor_sizes, minimum=2)
    num_points = _check_int("num_points", num_points, 1)
    # The sample variance (ddof=1) of a batch needs two rows.
    batch_size = _check_int("batch_size", batch_size, 2)
    rows_per_call = _check_int("rows_per_call", rows_per_call, 1)
    rng = _check_rng(rng)
    global_variances = np.asarray(global_variances, dtype=np.float64)
    active_dims = np.asarray(active_dims)
    if (global_variances.ndim != 1 or active_dims.shape != global_variances.shape
            or active_dims.dtype != np.bool_):
        raise ValueError("global_variances and active_dims must be (d,) float and (d,) bool, got "
                         f"{global_variances.shape} and {active_dims.shape} {active_dims.dtype}")
    if not active_dims.any() or not np.all(global_variances[active_dims] > 0.0):
        raise ValueError("need at least one active dimension, each with positive global variance")
    active_index = np.flatnonzero(active_dims)
    num_factors, num_codes = sizes.size, global_variances.size
    votes = np.zeros((num_factors, num_codes), dtype=np.int64)
    points_per_call = max(1, rows_per_call // batch_size)
    for start in range(0, num_points, points_per_call):
        count = min(points_per_call, num_points - start)
        blocks = np.empty((count, batch_size, num_factors), dtype=np.int64)
        fixed = np.empty(count, dtype=np.int64)
        for p in range(count):
            fixed[p] = rng.integers(num_factors)
            blocks[p] = _draw_factors(sizes, batch_size, rng)
            blocks[p, :, fixed[p]] = blocks[p, 0, fixed[p]]
        codes = _represent_blocks(represent, blocks)  # (count, batch_size, d)
        _check_width(codes, num_codes)
        for p in range(count):
            local_variances = np.var(codes[p], axis=0, ddof=1)
            argmin = np.argmin(local_variances[active_dims] / global_variances[active_dims])
            # disentanglement_lib votes in column `argmin`, an index among the active dimensions
            # (its remaining columns stay 0); mapping it back to the code dimension only
            # relabels columns, so the accuracies are those of disentanglement_lib.
            votes[fixed[p], active_index[argmin]] += 1
    return votes


def _majority_vote_accuracy(votes: np.ndarray, classifier: np.ndarray) -> float:
    """Share of the votes that the classifier (code dimension -> factor) gets right."""
    return float(np.sum(votes[classifier, np.arange(votes.shape[1])]) / np.sum(votes))


def factor_vae_score(represent: Represent, factor_sizes: Sequence[int] | np.ndarray,
                     rng: np.random.Generator, *, batch_size: int = 64, num_train: int = 10000,
                     num_eval: int = 5000, num_variance_estimate: int = 10000,
                     prune_threshold: float = 0.05,
                     rows_per_call: int = DEFAULT_ROWS_PER_CALL) -> dict[str, float | int]:
    """The FactorVAE metric: {"train_accuracy", "eval_accuracy", "num_active_dims"}.

    Kim & Mnih 2018, "Disentangling by factorising", as disentanglement_lib's
    `factor_vae.compute_factor_vae` with its published config (batch_size 64, num_train 10000,
    num_eval 5000, num_variance_estimate 10000, prune_dims.threshold 0.05): code dimensions
    whose global standard deviation (over `num_variance_estimate` sampled factor vectors, ddof 1)
    is below `prune_threshold` are inactive; each sample votes for (fixed factor, active
    dimension of least normalised variance) (`factor_vae_votes`); each code dimension is
    assigned the factor with most training votes (ties: the lowest index), and the accuracy is
    the share of votes that assignment gets right, on the training votes and on `num_eval`
    fresh ones. Chance level of eval_accuracy is 1/K (train_accuracy is above it by the
    majority vote's fit); a disentangled code scores near 1. With no active dimension the
    accuracies are 0 and num_active_dims is 0, as in disentanglement_lib.

    Departure: num_active_dims is the number of active dimensions (disentanglement_lib reports
    len() of its boolean mask, i.e. every dimension).
    """
    sizes = _check_factor_sizes(factor_sizes, minimum=2)
    rng = _check_rng(rng)
    num_variance_estimate = _check_int("num_variance_estimate", num_variance_estimate, 2)
    rows_per_call = _check_int("rows_per_call", rows_per_call, 1)
    num_train = _check_int("num_train", num_train, 1)
    num_eval = _check_int("num_eval", num_eval, 1)
    if not (isinstance(prune_threshold, numbers.Real) and prune_threshold > 0.0):
        # > 0 also keeps every active dimension's variance positive, the ratio's denominator.
        raise ValueError(f"prune_threshold must be a number > 0, got {prune_threshold!r}")
    codes = _represent_rows(represent, _draw_factors(sizes, num_variance_estimate, rng),
                            rows_per_call)
    global_variances = np.var(codes, axis=0, ddof=1)
    active_dims = np.sqrt(global_variances) >= prune_threshold
    if not active_dims.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}

    def votes(num_points: int) -> np.ndarray:
        return factor_vae_votes(represent, sizes, rng, num_points, global_variances, active_dims,
                                batch_size=batch_size, rows_per_call=rows_per_call)

    train_votes = votes(num_train)
    classifier = np.argmax(train_votes, axis=0)  # code dimension -> factor, by majority
    eval_votes = votes(num_eval)
    return {"train_accuracy": _majority_vote_accuracy(train_votes, classifier),
            "eval_accuracy": _majority_vote_accuracy(eval_votes, classifier),
            "num_active_dims": int(np.sum(active_dims))}
