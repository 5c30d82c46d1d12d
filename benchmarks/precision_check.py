"""How exact is a float32 matrix product under each `train.matmul_precision` policy, in each
framework, on this machine's accelerator? Issue 11 found the two backends 1.3-1.6% apart on an
H200 (against < 0.7% on a CPU) and suspected JAX's TF32 default; this prints the evidence.

For a (n, n) @ (n, n) product of standard normal float32 matrices it prints the largest relative
error against the float64 product, for JAX's default precision and each policy, and for PyTorch's
default and each policy (`ppl_vae.numpyro.precision`, `ppl_vae.pyro.precision`). Full float32 is
near 1e-6; TensorFloat-32 (10-bit mantissa) near 1e-3. On a CPU every row is float32.

    python benchmarks/precision_check.py              # seconds
    python benchmarks/precision_check.py --smoke
"""

from __future__ import annotations

import argparse

import numpy as np


def relative_error(product: np.ndarray, exact: np.ndarray) -> float:
    return float(np.max(np.abs(product - exact)) / np.max(np.abs(exact)))


def jax_rows(a, b, exact) -> list[tuple[str, str, float]]:
    import jax
    import jax.numpy as jnp

    from ppl_vae.numpyro.precision import with_precision

    device = jax.devices()[0]
    x, y = jax.device_put(jnp.asarray(a), device), jax.device_put(jnp.asarray(b), device)
    rows = [("jax", f"default ({device.platform})",
             relative_error(np.asarray(jax.jit(jnp.matmul)(x, y)), exact))]
    for policy in ("highest", "high"):
        fn = jax.jit(with_precision(jnp.matmul, policy))
        rows.append(("jax", f"policy {policy}", relative_error(np.asarray(fn(x, y)), exact)))
    return rows


def torch_rows(a, b, exact) -> list[tuple[str, str, float]]:
    import torch

    from ppl_vae.pyro.precision import matmul_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = torch.as_tensor(a, device=device), torch.as_tensor(b, device=device)
    rows = [("torch", f"default ({device.type})", relative_error((x @ y).cpu().numpy(), exact))]
    for policy in ("highest", "high"):
        with matmul_precision(policy):
            product = (x @ y).cpu().numpy()
        rows.append(("torch", f"policy {policy}", relative_error(product, exact)))
    return rows


def main(args) -> list[tuple[str, str, float]]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((args.n, args.n)).astype(np.float32)
    b = rng.standard_normal((args.n, args.n)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    rows = jax_rows(a, b, exact) + torch_rows(a, b, exact)
    print(f"float32 ({args.n}, {args.n}) @ ({args.n}, {args.n}): largest error relative to the "
          "largest entry of the float64 product")
    for framework, setting, err in rows:
        print(f"  {framework:<6}{setting:<22}{err:.2e}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.n = 64
    return args


if __name__ == "__main__":
    main(parse_args())
