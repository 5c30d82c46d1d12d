"""The variance of the score-function (REINFORCE) gradient of a discrete-latent VAE, without a
baseline, with the decaying average and with NVIL's input-dependent network (Mnih & Gregor
2014), through `ScaledELBO`'s ``infer={"baseline": {...}}`` in Pyro and NumPyro.

The model: a sigmoid-belief VAE on scikit-learn's 8x8 digits (binarised per draw), 16 binary
latents (2^16 values: too many to sum out), p(z) Bernoulli(σ(a)) per coordinate, p(y|z) a
linear-Bernoulli decoder, q(z|y) a linear-Bernoulli encoder; the baseline network is
64-32-1 (tanh). It is trained `--train-steps` Adam steps in Pyro with the network baseline (the
decaying average then warmed `--warm` calls on random minibatches), and frozen: both backends
take the same weights. For each estimator, `--draws` independent gradients of the loss (per
example, Monte Carlo rates as Trace_ELBO) on one fixed minibatch with respect to the encoder's
weights; the table prints the variance summed over those weights, its reduction (the
variance without a baseline over this one), z² (the squared distance of the mean gradient from
the baseline-free one's in standard errors, averaged over the weights: about 1, since a baseline
changes no expectation) and the milliseconds per draw (one thread each; for orientation only:
the machine's load is printed). The decaying average is frozen during the draws (each draw
starts from the warmed state), so each is an estimate at one moment of training. A last row per
backend is the framework's own TraceGraph_ELBO without a baseline: the same estimator as
"none", for its time per draw (NumPyro's has no baselines).

    python benchmarks/bench_baselines.py            # about a minute on two cores
    python benchmarks/bench_baselines.py --smoke    # seconds (Pyro only): checks that it runs
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np

LATENTS, HIDDEN, SEED = 16, 32, 0
ESTIMATORS = ("none", "decaying average", "nn baseline")
#: the framework's own TraceGraph_ELBO, no baseline: the same estimator as "none" (so about
#: the same variance), for its time per draw
STOCK = "stock TraceGraph_ELBO"


def init_weights(pixels: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The model's, the encoder's and the baseline network's weights (float32)."""
    def normal(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {"prior": np.zeros(LATENTS, np.float32), "dec_w": normal(LATENTS, pixels),
            "dec_b": np.zeros(pixels, np.float32), "enc_w": normal(pixels, LATENTS),
            "enc_b": np.zeros(LATENTS, np.float32), "nn_w1": normal(pixels, HIDDEN),
            "nn_b1": np.zeros(HIDDEN, np.float32), "nn_w2": normal(HIDDEN),
            "nn_b2": np.zeros((), np.float32)}


ENCODER = ("enc_w", "enc_b")


def baseline_infer(estimator: str, network, y) -> dict:
    if estimator == "decaying average":
        return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}}
    if estimator == "nn baseline":
        return {"baseline": {"nn_baseline": network, "nn_baseline_input": y}}
    return {}


# ---- Pyro ---------------------------------------------------------------------------------------
def pyro_program(weights: dict):
    """(model, guide(y, estimator), the weights as leaf tensors)."""
    import pyro
    import pyro.distributions as dist
    import torch

    w = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}

    def network(y):
        return torch.tanh(y @ w["nn_w1"] + w["nn_b1"]) @ w["nn_w2"] + w["nn_b2"]

    def model(y, estimator="none"):
        with pyro.plate("N", y.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=w["prior"].expand(y.shape[0], LATENTS))
                            .to_event(1))
            pyro.sample("y", dist.Bernoulli(logits=z @ w["dec_w"] + w["dec_b"]).to_event(1),
                        obs=y)

    def guide(y, estimator="none"):
        with pyro.plate("N", y.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=y @ w["enc_w"] + w["enc_b"]).to_event(1),
                        infer=baseline_infer(estimator, network, y))

    return model, guide, w


def binarised(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(x.shape) < x).astype(np.float32)


def pyro_train(weights, x_train, steps: int, warm: int, batch: int):
    """The weights after `steps` Adam steps with the network baseline (the baseline network
    trained by its own loss), and the decaying-average estimator warmed `warm` calls."""
    import pyro
    import torch

    from ppl_vae.pyro.elbo import ScaledELBO

    model, guide, w = pyro_program(weights)
    optimizer = torch.optim.Adam(list(w.values()), lr=3e-3)
    elbo = ScaledELBO(analytic_kl=False)
    rng = np.random.default_rng(SEED)
    pyro.set_rng_seed(SEED)
    for _ in range(steps):
        y = torch.tensor(binarised(x_train[rng.integers(len(x_train), size=batch)], rng))
        optimizer.zero_grad()
        (elbo.differentiable_loss(model, guide, y, "nn baseline") / batch).backward()
        optimizer.step()
    trained = {k: v.detach().numpy().copy() for k, v in w.items()}
    averaging = ScaledELBO(analytic_kl=False)
    model, guide, _ = pyro_program(trained)
    for _ in range(warm):  # the decaying average on random minibatches (no update)
        y = torch.tensor(binarised(x_train[rng.integers(len(x_train), size=batch)], rng))
        averaging.differentiable_loss(model, guide, y, "decaying average")
    return trained, averaging


def pyro_draws(weights, averaging, y: np.ndarray, estimator: str, draws: int):
    """((draws, encoder weights) gradients of the loss per example, seconds)."""
    import pyro
    import torch
    from pyro.infer import TraceGraph_ELBO

    from ppl_vae.pyro.elbo import ScaledELBO

    model, guide, w = pyro_program(weights)
    yt = torch.tensor(y)
    params = [w[k] for k in ENCODER]
    out = []
    start = time.perf_counter()
    for seed in range(draws):
        pyro.set_rng_seed(1000 + seed)
        if estimator == STOCK:  # (its gradient goes to .grad: the loss summed, so / len(y))
            for p in params:
                p.grad = None
            TraceGraph_ELBO().loss_and_grads(model, guide, yt)
            out.append(torch.cat([p.grad.reshape(-1) / len(y) for p in params]))
            continue
        # each draw from the warmed average (a copy: the call updates it)
        elbo = copy.deepcopy(averaging) if estimator == "decaying average" else \
            ScaledELBO(analytic_kl=False)
        loss = elbo.differentiable_loss(model, guide, yt, estimator) / len(y)
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out).numpy(), time.perf_counter() - start


# ---- NumPyro ------------------------------------------------------------------------------------
def numpyro_draws(weights, average: np.ndarray, y: np.ndarray, estimator: str, draws: int):
    """The NumPyro twin of `pyro_draws`: the same weights, the decaying average's state from the
    Pyro warm-up, one compiled function mapped over the keys."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.primitives import mutable

    from ppl_vae.numpyro.elbo import ScaledELBO
    from ppl_vae.objective import BASELINE_AVERAGE

    def model(y):
        prior = numpyro.param("prior", None)
        dec_w, dec_b = numpyro.param("dec_w", None), numpyro.param("dec_b", None)
        with numpyro.plate("N", y.shape[0]):
            z = numpyro.sample("z", dist.Bernoulli(logits=jnp.broadcast_to(
                prior, (y.shape[0], LATENTS))).to_event(1))
            numpyro.sample("y", dist.Bernoulli(logits=z @ dec_w + dec_b).to_event(1), obs=y)

    def guide(y):
        p = {k: numpyro.param(k, None) for k in ("enc_w", "enc_b", "nn_w1", "nn_b1", "nn_w2",
                                                 "nn_b2")}

        def network(x):
            return jnp.tanh(x @ p["nn_w1"] + p["nn_b1"]) @ p["nn_w2"] + p["nn_b2"]

        if estimator == "decaying average":
            mutable(BASELINE_AVERAGE + "z", jnp.zeros(y.shape[0]))
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("z", dist.Bernoulli(logits=y @ p["enc_w"] + p["enc_b"]).to_event(1),
                           infer=baseline_infer(estimator, network, y))

    params = {k: jnp.asarray(v) for k, v in weights.items()}
    if estimator == "decaying average":  # the warmed state, as SVI would pass it
        params[BASELINE_AVERAGE + "z"] = jnp.asarray(average, jnp.float32)
    from numpyro.infer import TraceGraph_ELBO

    elbo = TraceGraph_ELBO() if estimator == STOCK else ScaledELBO(analytic_kl=False)
    yj = jnp.asarray(y)

    def grad(key):
        g = jax.grad(lambda p: elbo.loss(key, p, model, guide, yj) / len(y))(params)
        return jnp.concatenate([g[k].reshape(-1) for k in ENCODER])

    keys = jax.random.split(jax.random.PRNGKey(SEED), draws)
    compiled = jax.jit(lambda ks: jax.lax.map(grad, ks)).lower(keys).compile()
    start = time.perf_counter()  # the draws, not the compilation
    grads = jax.block_until_ready(compiled(keys))
    return np.asarray(grads), time.perf_counter() - start


def summarise(grads: dict[str, np.ndarray]) -> dict[str, dict]:
    """{estimator: the variance summed over the weights, its ratio to "none"'s (the reduction),
    and z² = the mean over the weights of (mean − mean of "none")² / (se² + se of "none"²), about
    1 when the two estimate the same gradient (a baseline changes no expectation)}."""
    def mean_se(g):
        return g.mean(0), g.var(0, ddof=1) / len(g)

    base_var = grads["none"].var(0, ddof=1).sum()
    base_mean, base_se2 = mean_se(grads["none"])
    out = {}
    for name, g in grads.items():
        mean, se2 = mean_se(g)
        z2 = float(np.mean((mean - base_mean) ** 2 / np.maximum(se2 + base_se2, 1e-30)))
        var = float(g.var(0, ddof=1).sum())
        out[name] = {"variance": var, "reduction": float(base_var / var),
                     "z2": z2 if name != "none" else float("nan")}
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--backends", nargs="+", default=["pyro", "numpyro"])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.draws, args.batch, args.train_steps, args.warm = 6, 16, 5, 3
        args.backends = ["pyro"]
    # one thread each: the networks are small, and the cores are shared
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                          "intra_op_parallelism_threads=1")
    import torch

    torch.set_num_threads(1)

    from ppl_vae.data import load_data
    from ppl_vae.spec import load_spec

    data = load_data(load_spec("vae_digits", []))
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    weights, averaging = pyro_train(init_weights(data.dim, rng), data.x_train,
                                    args.train_steps, args.warm, args.batch)
    trained_s = time.perf_counter() - start
    y = binarised(data.x_test[:args.batch], np.random.default_rng(SEED + 1))  # fixed batch
    average = averaging.baseline_averages["z"].numpy()
    print(f"score-function gradient variance of a sigmoid-belief VAE ({LATENTS} binary "
          f"latents, {data.dim} pixels): trained {args.train_steps} steps ({trained_s:.0f} s), "
          f"average warmed {args.warm} calls; {args.draws} draws on {args.batch} examples; "
          f"encoder weights {data.dim * LATENTS + LATENTS}; load {os.getloadavg()[0]:.2f}")
    print(f"{'backend':8s} {'estimator':22s} {'variance':>10s} {'reduction':>9s} "
          f"{'z2':>6s} {'ms/draw':>8s}")
    draw = {"pyro": lambda e: pyro_draws(weights, averaging, y, e, args.draws),
            "numpyro": lambda e: numpyro_draws(weights, average, y, e, args.draws)}
    rows = []
    for backend in args.backends:
        grads, seconds = {}, {}
        for estimator in (*ESTIMATORS, STOCK):
            grads[estimator], seconds[estimator] = draw[backend](estimator)
        for estimator, row in summarise(grads).items():
            ms = 1e3 * seconds[estimator] / args.draws
            rows.append({"backend": backend, "estimator": estimator, **row,
                         "ms_per_draw": ms})
            print(f"{backend:8s} {estimator:22s} {row['variance']:10.4g} "
                  f"{row['reduction']:8.1f}x {row['z2']:6.2f} {ms:8.1f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
