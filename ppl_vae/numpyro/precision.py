"""`train.matmul_precision` for JAX: float32 dot products and convolutions in full float32
("highest") or in TensorFloat-32 ("high"); the twin of `ppl_vae/pyro/precision.py`.

JAX's own default on NVIDIA GPUs is TF32 for float32 products while PyTorch's is full float32,
which is why the two backends drifted apart on a GPU (1.3-1.6% in the same-init test) and not on
a CPU. The precision is fixed when a function is traced, so `with_precision` wraps a function's
body before `jax.jit` sees it: nothing process-wide is set, and the compiled code carries it.
"""

from __future__ import annotations

import functools

import jax

_JAX_NAMES = {"highest": "float32", "high": "tensorfloat32"}


def jax_precision(policy: str) -> str:
    """JAX's name (``jax.default_matmul_precision``) for `policy` ("highest" | "high")."""
    if policy not in _JAX_NAMES:
        raise ValueError(f"matmul precision {policy!r}: use 'highest' or 'high'")
    return _JAX_NAMES[policy]


def with_precision(fn, policy: str):
    """`fn` traced with float32 products in `policy`'s precision (wrap before `jax.jit`)."""
    name = jax_precision(policy)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.default_matmul_precision(name):
            return fn(*args, **kwargs)

    return traced
