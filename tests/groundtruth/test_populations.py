"""Synthetic populations: the exact entropy by enumeration against closed forms and Monte Carlo."""

import numpy as np
import pytest

from ppl_vae import spec as spec_module
from ppl_vae.groundtruth.populations import POPULATIONS, BernoulliMixture, bars, population


def binary_entropy(p):
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def test_registry_matches_the_spec():
    assert tuple(POPULATIONS) == spec_module.SYNTHETIC_POPULATIONS


def test_one_component_has_the_closed_form_entropy():
    probs = np.array([[0.1, 0.5, 0.93, 0.3]])
    pop = BernoulliMixture("one", np.array([1.0]), probs)
    assert pop.entropy() == pytest.approx(binary_entropy(probs).sum(), rel=1e-12)
    assert pop.conditional_entropy() == pytest.approx(pop.entropy(), rel=1e-12)


def test_well_separated_components_add_ln_k():
    """Two components that put almost all mass on disjoint images: H = ln 2 + H(y|k)."""
    probs = np.array([[1e-9] * 6, [1 - 1e-9] * 6])
    pop = BernoulliMixture("two", np.array([0.5, 0.5]), probs)
    assert pop.entropy() == pytest.approx(np.log(2) + pop.conditional_entropy(), abs=1e-6)


def test_bars_entropy_against_monte_carlo_and_bounds():
    pop = bars()
    h = pop.entropy()
    assert np.exp(pop.log_prob(pop.all_images())).sum() == pytest.approx(1.0, abs=1e-12)
    y, k = pop.sample(200_000, np.random.default_rng(0))
    log_p = pop.log_prob(y)
    stderr = log_p.std() / np.sqrt(len(log_p))
    assert abs(-log_p.mean() - h) < 4 * stderr
    # H(y|k) <= H(y) <= H(y|k) + H(k), and H(y) below the factorised (independent pixels) entropy
    assert pop.conditional_entropy() < h < pop.conditional_entropy() + np.log(8)
    pixel = y.mean(0)
    assert h < binary_entropy(pixel).sum()
    assert y.dtype == np.float32 and set(np.unique(y)) == {0.0, 1.0}
    assert np.bincount(k, minlength=8).min() > 0.12 * len(k)
    # the bar of an example is lit: its pixels are on far more often than the others
    rows = y.reshape(-1, 4, 4)[k == 2]
    assert rows[:, 2, :].mean() > 0.85 and rows[:, 0, :].mean() < 0.1


def test_population_errors():
    with pytest.raises(ValueError, match="no synthetic population 'nope'"):
        population("nope")
    with pytest.raises(ValueError, match="strictly inside"):
        BernoulliMixture("bad", np.array([1.0]), np.array([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="sum to 1"):
        BernoulliMixture("bad", np.array([0.3, 0.3]), np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="D <= 20"):
        BernoulliMixture("big", np.array([1.0]), np.full((1, 21), 0.5))
