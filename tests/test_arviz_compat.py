"""ppl_vae.arviz_compat with the installed arviz (0.x here; the 1.x branch is untested)."""

from __future__ import annotations

import builtins
import math
from importlib.util import find_spec

import numpy as np
import pytest

from ppl_vae import arviz_compat

pytestmark = pytest.mark.skipif(find_spec("arviz") is None,
                                reason="arviz not installed (pip install ppl_vae[arviz])")


def test_psis_shapes_normalisation_and_sign():
    rng = np.random.default_rng(0)
    n, k = 40, 500
    z = 0.3 * rng.standard_normal((n, k))
    # log N(z; 0, 1) − log N(z; 0, 0.3²): large where |z| is large, heavy right tail
    lw = -0.5 * z**2 + 0.5 * (z / 0.3) ** 2 + math.log(0.3)
    smoothed, khat = arviz_compat.psis(lw)
    assert smoothed.shape == (n, k) and khat.shape == (n,)
    log_total = np.log(np.exp(smoothed).sum(axis=1))
    np.testing.assert_allclose(log_total, 0.0, atol=1e-10)
    assert np.mean(khat) > 0.7
    # smoothing keeps the order of the weights within a row (monotone in the raw weight)
    row = np.argsort(lw[0])
    assert np.all(np.diff(smoothed[0][row]) >= -1e-12)
    # the sign convention matters: the negated weights have a bounded right tail
    flipped = arviz_compat.psis(-lw)[1]
    assert np.mean(flipped) < 0.5


def test_psis_per_row_fits_match_one_row_at_a_time():
    rng = np.random.default_rng(1)
    lw = rng.standard_normal((5, 400)) * np.array([[0.1], [0.5], [1.0], [2.0], [3.0]])
    smoothed, khat = arviz_compat.psis(lw)
    for i in range(len(lw)):
        s_i, k_i = arviz_compat.psis(lw[i:i + 1])
        np.testing.assert_allclose(s_i[0], smoothed[i], atol=1e-12)
        assert k_i[0] == pytest.approx(khat[i], abs=1e-12)
    assert khat[0] < khat[-1]  # more spread in the log weights, heavier tail


def test_psis_degenerate_rows():
    lw = np.vstack([np.full(100, 12.5), np.linspace(0, 1, 100)])
    smoothed, khat = arviz_compat.psis(lw)
    assert khat[0] == -np.inf
    np.testing.assert_allclose(smoothed[0], -np.log(100))
    assert np.isfinite(khat[1])
    few = arviz_compat.psis(np.random.default_rng(2).standard_normal((2, 10)))[1]
    assert np.all(np.isnan(few))  # too few draws for a tail fit: not estimable, not +inf
    with pytest.raises(ValueError, match="shape"):
        arviz_compat.psis(np.zeros(10))
    with pytest.raises(ValueError, match="finite"):
        arviz_compat.psis(np.array([[0.0, np.inf]]))


def test_inference_data_netcdf_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    draws = {"z": rng.standard_normal((2, 50, 3)), "sigma": np.exp(rng.standard_normal((2, 50)))}
    idata = arviz_compat.posterior_draws_to_inference_data(
        draws, coords={"latent": ["a", "b", "c"]}, dims={"z": ["latent"]})
    assert dict(idata.posterior.sizes) == {"chain": 2, "draw": 50, "latent": 3}
    path = arviz_compat.save_netcdf(idata, tmp_path / "posterior.nc")
    assert path.exists() and not (tmp_path / "posterior.nc.tmp").exists()
    loaded = arviz_compat.load_netcdf(path)
    np.testing.assert_array_equal(loaded.posterior["z"].values, draws["z"])
    np.testing.assert_array_equal(loaded.posterior["sigma"].values, draws["sigma"])
    assert list(loaded.posterior["latent"].values) == ["a", "b", "c"]


def test_draws_must_share_chain_and_draw():
    with pytest.raises(ValueError, match=r"\(chain, draw, \.\.\.\)"):
        arviz_compat.posterior_draws_to_inference_data({"a": np.zeros((2, 5)), "b": np.zeros(5)})
    with pytest.raises(ValueError, match="same"):
        arviz_compat.posterior_draws_to_inference_data(
            {"a": np.zeros((2, 5)), "b": np.zeros((2, 6))})


def test_missing_arviz_gives_an_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_arviz(name, *args, **kwargs):
        if name == "arviz" or name.startswith("arviz."):
            raise ImportError("No module named 'arviz'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_arviz)
    with pytest.raises(ImportError, match=r"pip install ppl_vae\[arviz\]"):
        arviz_compat.psis(np.random.default_rng(5).standard_normal((2, 100)))
