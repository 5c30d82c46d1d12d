"""The one place that talks to ArviZ, for both of its lines.

* arviz 0.x (Python >= 3.11; 0.23 is what the test suite runs against): `arviz.psislw(lw)`
  takes *log importance weights* ln p − ln q with the draws on the last axis and returns
  (smoothed, normalised log weights, k̂); `arviz.from_dict(posterior=...)` returns an
  `InferenceData`.
* arviz >= 1.0 (Python >= 3.12): PSIS lives in `arviz_stats`; its NumPy-level
  `array_stats.psislw(ary, r_eff, axis)` *negates its input* (it expects log-likelihoods, as in
  PSIS-LOO where the log ratio is −ln p(y_i|θ)), so log weights go in with their sign flipped.
  `arviz.from_dict` takes a nested {"group": {var: array}} dict and returns an
  `xarray.DataTree`. THE 1.x BRANCHES ARE NOT EXERCISED BY THE TEST SUITE HERE (arviz 0.23
  is installed); they follow arviz-stats' and arviz-base's sources.

ArviZ is an optional dependency (`pip install ppl_vae[arviz]`) and is imported only when one
of these functions is called.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["load_netcdf", "posterior_draws_to_inference_data", "psis", "save_netcdf"]

_INSTALL_HINT = ("ArviZ is needed for PSIS diagnostics and InferenceData export; install it "
                 "with `pip install ppl_vae[arviz]`")


def _arviz():
    """(the arviz module, its major version), importing it on first use."""
    try:
        with warnings.catch_warnings():
            # arviz 0.2x announces its 1.0 refactor with a FutureWarning once a day on import;
            # it is addressed to arviz users, not to ours, and would fail warnings-as-errors runs.
            warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing",
                                    category=FutureWarning)
            import arviz
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return arviz, int(arviz.__version__.split(".")[0])


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    peak = a.max(axis=1, keepdims=True)
    return np.log(np.exp(a - peak).sum(axis=1, keepdims=True)) + peak


def psis(log_weights, reff: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed importance sampling, one fit per row.

    log_weights (N, K): ln p(y_n, z_k) − ln q(z_k|y_n), K independent draws per example
    (so the relative efficiency `reff` is 1). Returns (smoothed log weights (N, K), normalised
    so each row's weights sum to 1; k̂ (N,)).

    Conventions shared by both arviz lines: a row whose log weights are all equal (up to
    rounding, e.g. q(z|y) = p(z|y) exactly) has no tail to fit and gets k̂ = −inf with uniform
    weights (ArviZ would report +inf); a row ArviZ cannot fit (too few tail draws, K ≲ 25)
    gets k̂ = NaN ("not estimable") rather than +inf ("terrible").
    Reference: Vehtari et al. (2024), "Pareto smoothed importance sampling", JMLR 25(72).
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 2 or lw.shape[1] < 2:
        raise ValueError(f"log_weights must have shape (N, K) with K >= 2; got {lw.shape}")
    if not np.all(np.isfinite(lw)):
        raise ValueError("log_weights must be finite for PSIS")
    n, k = lw.shape
    smoothed = np.full_like(lw, -np.log(k))
    khat = np.full(n, -np.inf)

    # Equal weights: the GPD fit is meaningless on rounding noise, and the ideal case must not
    # read as a failure. Tolerance is relative to the size of the log weights.
    spread = np.ptp(lw, axis=1)
    varying = spread > 1e-9 * np.maximum(1.0, np.abs(lw).max(axis=1))
    if np.any(varying):
        rows = lw[varying]
        arviz, major = _arviz()
        if major >= 1:  # arviz >= 1.0: untested here (see the module docstring)
            from arviz_stats.base import array_stats

            out, k_rows = array_stats.psislw(-rows, r_eff=reff, axis=-1)
        else:
            # last axis = draws; returns normalised log weights
            out, k_rows = arviz.psislw(rows, reff=reff)
        out = np.asarray(out, dtype=np.float64)
        smoothed[varying] = out - _logsumexp_rows(out)  # normalise the same way in both lines
        k_rows = np.asarray(k_rows, dtype=np.float64)
        khat[varying] = np.where(np.isfinite(k_rows), k_rows, np.nan)
    return smoothed, khat


def posterior_draws_to_inference_data(draws: dict[str, np.ndarray], coords=None, dims=None):
    """An ArviZ posterior object from draws {name: array (chain, draw, ...)}.

    `coords` {dim name: values} and `dims` {var name: [dim names of the trailing axes]} are
    passed through to `arviz.from_dict`. Returns an `InferenceData` (arviz 0.x) or an
    `xarray.DataTree` (arviz >= 1.0), each with a `posterior` group.
    """
    arrays = {name: np.asarray(value) for name, value in draws.items()}
    if not arrays:
        raise ValueError("draws is empty: give at least one variable of shape (chain, draw, ...)")
    lead = {name: a.shape[:2] for name, a in arrays.items()}
    bad = [name for name, a in arrays.items() if a.ndim < 2]
    if bad or len(set(lead.values())) != 1:
        raise ValueError("every draw array must have shape (chain, draw, ...) with the same "
                         f"chain and draw counts; got { {n: a.shape for n, a in arrays.items()} }")
    arviz, major = _arviz()
    if major >= 1:  # arviz >= 1.0: untested here
        return arviz.from_dict({"posterior": arrays}, coords=coords, dims=dims)
    return arviz.from_dict(posterior=arrays, coords=coords, dims=dims)


def save_netcdf(idata, path) -> Path:
    """Write `idata` (from `posterior_draws_to_inference_data`) to a netCDF file at `path`.

    Written to a temporary file beside it and renamed, so `path` is never left half-written.
    Returns the path.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        idata.to_netcdf(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_netcdf(path):
    """Read a file written by `save_netcdf` fully into memory (no file handle stays open)."""
    arviz, major = _arviz()
    if major >= 1:  # arviz >= 1.0: untested here
        import xarray

        tree = xarray.open_datatree(str(path))
        try:
            return tree.load()
        finally:
            tree.close()
    with arviz.rc_context({"data.load": "eager"}):
        return arviz.from_netcdf(str(path))
