"""The encoder's gradient signal-to-noise ratio of the IWAE bound: reparam against DReG, K = 1, 5,
50, in both backends (Rainforth et al. 2018: reparam's SNR falls with K; Tucker et al. 2019:
DReG's does not).

A small VAE on scikit-learn's 8x8 digits (`vae_digits` with 64-64-8 networks), trained for a
few hundred steps with the plain ELBO (Pyro), then frozen: its parameters go to both backends
through the canonical format, so the two backends estimate the same gradients. For each K and
estimator, `--draws` independent estimates of the gradient of the bound on one fixed minibatch
(`--batch` examples) with respect to every encoder weight; per weight SNR = |mean| / std over
the draws; the table prints the median and the mean over the encoder's weights, and the
wall-clock ms per gradient draw (one thread per framework; for orientation only: the machine's
load is printed).

    python benchmarks/bench_gradients.py            # about a minute on two cores
    python benchmarks/bench_gradients.py --smoke    # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SPEC = ["encoder.hidden=[64]", "decoder.hidden=[64]", "latent.dim=8", "train.batch_size=64"]


def _pyro_model(spec, data, steps: int, seed: int):
    """The Pyro model of `spec`, trained `steps` Adam steps with the plain ELBO."""
    import pyro
    import torch

    from ppl_vae.pyro.elbo import ScaledELBO
    from ppl_vae.pyro.hooks import Model

    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    model = Model(spec, data.dim, None, "cpu")
    x = model.tensor(data.x_train)
    optimizer = torch.optim.Adam(model.modules.parameters(), lr=1e-3)
    elbo = ScaledELBO()
    for _ in range(steps):
        y = torch.bernoulli(x[torch.randint(len(x), (spec.train.batch_size,))])
        optimizer.zero_grad()
        (elbo.differentiable_loss(model.built.model, model.built.guide, y) / len(y)).backward()
        optimizer.step()
    return model


def _snr(grads: np.ndarray) -> tuple[float, float]:
    """(median, mean) over the weights of |mean| / std over the draws; grads (draws, weights)."""
    snr = np.abs(grads.mean(0)) / np.maximum(grads.std(0, ddof=1), 1e-30)
    return float(np.median(snr)), float(np.mean(snr))


def pyro_draws(model, y: np.ndarray, k: int, gradient: str, draws: int) -> np.ndarray:
    """((draws, encoder weights) gradients of −L_K (per example) from independent seeds, the
    seconds they took)."""
    import pyro
    import torch

    from ppl_vae.pyro.elbo import ScaledELBO

    elbo = ScaledELBO(num_particles=k, bound="iwae", gradient=gradient,
                      vectorize_particles=k > 1, max_plate_nesting=1)
    params = [p for name, p in model.modules.named_parameters() if name.startswith("encoder")]
    yt = model.tensor(y)
    out = []
    start = time.perf_counter()
    for seed in range(draws):
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(model.built.model, model.built.guide, yt) / len(y)
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out).numpy(), time.perf_counter() - start


def numpyro_draws(model, y: np.ndarray, k: int, gradient: str, draws: int) -> np.ndarray:
    """The NumPyro twin of `pyro_draws`: one compiled function mapped over the keys."""
    import jax

    from ppl_vae.numpyro.elbo import ScaledELBO
    from ppl_vae.numpyro.params import export_params

    elbo = ScaledELBO(num_particles=k, bound="iwae", gradient=gradient, max_plate_nesting=1)
    yt = model.tensor(y)

    def grad(key):
        g = jax.grad(lambda p: elbo.loss(key, p, model.built.model, model.built.guide, yt)
                     / len(y))(model.param_map)
        return g

    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    compiled = jax.jit(lambda ks: jax.lax.map(grad, ks)).lower(keys).compile()
    start = time.perf_counter()  # the draws, not the compilation
    grads = jax.block_until_ready(compiled(keys))
    seconds = time.perf_counter() - start
    rows = []
    for i in range(draws):  # canonical names and layouts, one draw at a time
        flat = export_params(jax.tree.map(lambda g, i=i: g[i], grads))
        rows.append(np.concatenate([np.asarray(flat[n]).reshape(-1) for n in sorted(flat)
                                    if n.startswith("encoder")]))
    return np.stack(rows), seconds


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--backends", nargs="+", default=["pyro", "numpyro"])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.particles, args.draws, args.batch, args.train_steps = [1, 5], 8, 8, 5
    # one thread each: the networks are small, and the cores are shared
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                          "intra_op_parallelism_threads=1")
    import torch

    torch.set_num_threads(1)

    from ppl_vae.data import load_data
    from ppl_vae.spec import load_spec

    spec = load_spec("vae_digits", SPEC)
    data = load_data(spec)
    trained = _pyro_model(spec, data, args.train_steps, seed=0)
    y = (np.random.default_rng(1).random((args.batch, data.dim))
         < data.x_train[:args.batch]).astype(np.float32)  # one fixed binarised minibatch
    models = {"pyro": trained}
    if "numpyro" in args.backends:
        from ppl_vae.numpyro.hooks import Model

        models["numpyro"] = Model(spec, data.dim, None, "cpu", params=trained.export_params())
    draw = {"pyro": pyro_draws, "numpyro": numpyro_draws}
    print(f"encoder gradient SNR of the IWAE bound: {spec.name} (64-64-8), trained "
          f"{args.train_steps} steps; {args.draws} draws on {args.batch} examples; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'backend':8s} {'K':>3s} {'gradient':8s} {'snr_median':>10s} {'snr_mean':>9s} "
          f"{'ms/draw':>8s}")
    rows = []
    for backend in args.backends:
        for k in args.particles:
            for gradient in ("reparam", "dreg"):
                grads, seconds = draw[backend](models[backend], y, k, gradient, args.draws)
                ms = 1e3 * seconds / args.draws
                median, mean = _snr(grads)
                rows.append({"backend": backend, "K": k, "gradient": gradient,
                             "snr_median": median, "snr_mean": mean, "ms_per_draw": ms})
                print(f"{backend:8s} {k:3d} {gradient:8s} {median:10.3f} {mean:9.3f} "
                      f"{ms:8.1f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
