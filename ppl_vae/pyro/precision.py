"""`train.matmul_precision` for PyTorch: float32 matrix products and cuDNN convolutions in full
float32 ("highest") or in TensorFloat-32 ("high"); the twin of `ppl_vae/numpyro/precision.py`.

PyTorch keeps these switches in process-wide flags (its defaults differ: full float32 for matrix
products, TF32 for cuDNN convolutions), so the backend sets them only inside `matmul_precision`,
around each training window and each evaluation, and restores them afterwards. The legacy
``allow_tf32`` flags are used because they read back consistently on every PyTorch release this
project supports (mixing them with 2.9's ``fp32_precision`` API raises on reading).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def tf32_enabled(policy: str) -> bool:
    """True where `policy` ("highest" | "high") lets float32 products use TensorFloat-32."""
    if policy not in ("highest", "high"):
        raise ValueError(f"matmul precision {policy!r}: use 'highest' or 'high'")
    return policy == "high"


@contextmanager
def matmul_precision(policy: str):
    """Run the block with cuBLAS and cuDNN float32 work in `policy`'s precision."""
    tf32 = tf32_enabled(policy)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
