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
