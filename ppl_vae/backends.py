"""The backends, listed once; a backend is chosen explicitly by name, never globally."""

from __future__ import annotations

import importlib


class BackendError(RuntimeError):
    """A backend cannot do what was asked (a CUDA device where there is none, …)."""


#: backend name -> the third-party packages it needs (for the install hint).
BACKENDS = {"pyro": ("torch", "pyro"), "numpyro": ("jax", "numpyro", "flax", "optax")}


def backend_module(backend: str, module: str):
    """Import ``ppl_vae.<backend>.<module>`` (model, train, elbo, networks)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"ppl_vae.{backend}.{module}")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in BACKENDS[backend]:
            raise ImportError(f"the {backend} backend needs {err.name!r}: "
                              f"pip install 'ppl_vae[{backend}]'") from err
        raise
