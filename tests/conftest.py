"""Shared fixtures. `mnist_dir`: the MNIST IDX folder the examples read (`PPL_VAE_MNIST`, else
../shared/data/mnist beside the repository); a test that needs it is skipped, with the reason,
in a clone without it."""

from pathlib import Path

import pytest

from ppl_vae.data import MNIST_FILES, _find_file
from ppl_vae.experiments import MNIST_ENV, default_mnist


def mnist_missing() -> str | None:
    """Why the MNIST test files are not available (the skip reason), or None when they are."""
    folder = default_mnist()
    if folder.is_dir() and all(_find_file(folder, n) for n in MNIST_FILES["test"]):
        return None
    return (f"needs the MNIST IDX files (t10k-*) at {folder}: set {MNIST_ENV} to a folder "
            "holding them")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    reason = mnist_missing()
    if reason:
        pytest.skip(reason)
    return default_mnist().resolve()
