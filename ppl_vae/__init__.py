"""ppl_vae: VAE-family models as probabilistic programs, trained on

    loss = beta * rate + lam * distortion + aux(encoder only)

in Pyro (``backend="pyro"``) or NumPyro (``backend="numpyro"``). Importing this package imports
neither torch nor jax; a backend is imported when it is first used.
"""

from ppl_vae.spec import SpecError, Spec, list_models, load_spec

__all__ = ["Spec", "SpecError", "list_models", "load_spec"]
__version__ = "0.1.0"
