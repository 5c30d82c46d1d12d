"""ppl_vae: VAE-family models as probabilistic programs, trained on

    loss = beta * rate + lam * distortion + aux(encoder only)

in Pyro (``backend="pyro"``) or NumPyro (``backend="numpyro"``). Importing this package imports
neither torch nor jax; a backend is imported when it is first used.

    >>> import ppl_vae
    >>> run = ppl_vae.fit("vae_digits", backend="pyro", out_dir="runs/vae")
    >>> run.final_test["elbo"]
"""

from ppl_vae.runs import Run, load_run
from ppl_vae.spec import Spec, SpecError, list_models, load_spec
from ppl_vae.training import TrainingDiverged, TrainingInterrupted, fit
from ppl_vae.version import __version__  # noqa: F401 - the package's version

__all__ = ["Run", "Spec", "SpecError", "TrainingDiverged", "TrainingInterrupted", "fit",
           "list_models", "load_run", "load_spec"]
