"""The backends, listed once, and the contracts each meets (`Model`, `Trainer`, as
`typing.Protocol`s); a backend is chosen explicitly by name, never globally."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ppl_vae.program import Program
    from ppl_vae.spec import Spec


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


# ---- the contracts each backend meets (checked for both in tests/test_backends.py) ----------
@runtime_checkable
class Model(Protocol):
    """`ppl_vae.<backend>.hooks.Model`: a spec built with parameters on a device, and the hooks
    that backend-free code (the CLI, `eval`, plots, experiments) calls, NumPy in and out.

    Arrays are per example (N leading); log-densities are in nats; a latent code is
    {site: (N, d_site)} (a one-site model also takes its one array); label-conditional models
    take the labels (N,) wherever they read them.
    """

    spec: Spec
    data_dim: int
    image_shape: tuple[int, int] | None
    built: Program

    def tensor(self, x: np.ndarray): ...

    def export_params(self) -> dict[str, np.ndarray]:
        """The canonical parameters (`params.npz` names and PyTorch layouts)."""

    def import_params(self, params: dict[str, np.ndarray]) -> None: ...

    def encode(self, x: np.ndarray, batch_size: int = 1000, labels=None,
               site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and coordinate standard deviations (N, d) of a Gaussian q(z_site|y)."""

    def posterior_draws(self, x: np.ndarray, labels=None, num_samples: int = 1, seed: int = 0,
                        batch_size: int = 1000) -> dict[str, np.ndarray]:
        """{site: (N, num_samples, d)} from the joint posterior q(z_1, …, z_S | y)."""

    def decode_mean(self, code, seed: int = 0, labels=None) -> np.ndarray:
        """E[y|z], (N, D)."""

    def sample_prior(self, n: int, seed: int = 0, labels=None) -> dict[str, np.ndarray]:
        """n ancestral draws {site: (n, d)} from P̂_Φ(z_1, …, z_S)."""

    def prior_normal(self, site: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(loc, scale) of a factorised normal prior, else None."""

    def log_density_parts(self, x: np.ndarray, num_samples: int, seed: int = 0,
                          chunk: int = 500, labels=None) -> np.ndarray:
        """(N, K, 1 + 2S) float64: ln p̂(y|z_k), then ln p̂(z_s,k|·), ln q(z_s,k|·) per site."""

    def log_weights(self, x: np.ndarray, num_samples: int, seed: int = 0, chunk: int = 500,
                    labels=None) -> np.ndarray:
        """(N, K) float64 importance log-weights ln p̂(y, z_k) − ln q(z_k|y)."""

    def eval_terms(self, x: np.ndarray, labels, beta, lam: float, seed: int = 0,
                   batch_size: int = 1000, num_particles: int | None = None) -> dict[str, float]:
        """Sums over the examples (nats): objective, rate, distortion, aux, nll, per site."""


@runtime_checkable
class Trainer(Protocol):
    """`ppl_vae.<backend>.train.Trainer`: the SVI steps of one spec; the driver
    (`ppl_vae.training.fit`) owns windows, schedules, metrics, checkpoints and Ctrl-C.
    (The module also has ``process_rank(spec) -> int``: 0 in the process that writes.)"""

    checkpoint_name: str  #: the backend's checkpoint file in a run folder
    spec: Spec
    model: Model
    step: int  #: SVI steps done
    step_mode: str  #: how the steps run, in words (recorded in run.json)
    n_train: int  #: training examples (`schedules.steps_per_epoch` counts an epoch by them)

    def run_steps(self, scalars: dict[str, np.ndarray], lam: float) -> np.ndarray:
        """One step per entry of the per-step `scalars`, {key: (steps,)} with exactly the keys
        `schedules.scalar_keys(spec)` (beta: the global β, lr: Adam's learning rate,
        capacity/<site>: C_site in nats per example), as `schedules.step_scalars` computes them;
        none of them recompiles or recaptures the step. Returns (steps, F) per-example values
        of `objective.step_fields` (the terms in nats; `skipped` 1 where the step's update was
        skipped, train.skip_grad_norm)."""

    def save_checkpoint(self, path) -> None: ...

    def load_checkpoint(self, path) -> int:
        """Restore parameters, optimiser state, step and random state; return the step."""

    def close(self) -> None:
        """Release what the trainer started (a prefetching thread); idempotent."""
