"""Canonical parameters (NumPyro): the param map that model and guide create, and its
conversion to and from the canonical names and PyTorch layouts `params.npz` holds for both
backends (`ppl_vae.numpyro.networks.flax_to_canonical`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from ppl_vae.numpyro.networks import canonical_to_flax, flax_to_canonical


def init_params(built, data_dim: int, rng_key) -> dict:
    """The param map that the model and guide of `built` (`ppl_vae.numpyro.model.Built`) create
    at their first run (NumPyro's own inits)."""
    y = jnp.zeros((2, data_dim))
    labels = jnp.zeros((2,), jnp.int32)
    params = {}
    for fn, key in zip((built.model, built.guide), jax.random.split(rng_key)):
        trace = handlers.trace(handlers.seed(fn, key)).get_trace(y, labels)
        params |= {k: s["value"] for k, s in trace.items() if s["type"] == "param"}
    return params


def export_params(param_map: dict) -> dict[str, np.ndarray]:
    """Param map -> canonical {"<module>.<name>": PyTorch-layout array}."""
    out = {}
    for name, value in param_map.items():
        if name.endswith("$params"):
            out |= flax_to_canonical(name[: -len("$params")], value)
        else:
            out[name] = np.asarray(value)
    return out


def import_params(param_map: dict, params: dict[str, np.ndarray]) -> dict:
    """Canonical arrays -> a param map shaped like `param_map`; names and shapes must match."""
    own = export_params(param_map)
    missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
    if missing or extra:
        raise ValueError(f"parameters do not match the spec: missing {missing}, unexpected {extra}")
    out = {}
    for name, value in param_map.items():
        if name.endswith("$params"):
            out[name] = canonical_to_flax(name[: -len("$params")], params, value)
        else:
            if tuple(params[name].shape) != tuple(value.shape):
                raise ValueError(f"parameter {name!r}: shape {params[name].shape} in the file, "
                                 f"{tuple(value.shape)} in the model")
            out[name] = jnp.asarray(params[name], dtype=value.dtype)
    return out
