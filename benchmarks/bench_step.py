"""Steps per second of one MLP VAE (784-400-20, Bernoulli, batch 128) trained six ways, in one
process, on the same data, with the same network and Adam:

  torch_hand     a hand-written PyTorch loop (the reference for the Pyro backend)
  pyro_stock     Pyro's SVI + Trace_ELBO (one .item() per step, as SVI.step does)
  ppl_vae_pyro   ppl_vae's Pyro backend (`ppl_vae.pyro.train.Trainer`)
  jax_hand       a hand-written JAX + optax loop, one jitted step per call (the JAX reference)
  numpyro_stock  NumPyro's SVI + Trace_ELBO with `jax.jit(svi.update)`, one step per call
  ppl_vae_numpyro ppl_vae's NumPyro backend (`lax.scan` over `train.log_every` steps per call)

It prints a table and the ratios the project aims at: ppl_vae_pyro within 1.15x of torch_hand,
ppl_vae_numpyro within 1.05x of jax_hand and faster than numpyro_stock. Nothing is asserted:
speed is measured here, by hand, never in the test suite.

    python benchmarks/bench_step.py              # ~2 minutes on 2 CPU cores
    python benchmarks/bench_step.py --smoke      # seconds: checks that every way runs
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

D, H, Z, BATCH = 784, 400, 20, 128


def make_data(n: int, seed: int = 0) -> np.ndarray:
    """MNIST-sized grey images in [0, 1] (real MNIST when ../shared/data/mnist is there)."""
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
    path = os.path.join(folder, "t10k-images-idx3-ubyte.gz")
    if os.path.exists(path):
        from ppl_vae.data import read_idx

        return (read_idx(path).reshape(-1, D)[:n] / 255.0).astype(np.float32)
    return np.random.default_rng(seed).random((n, D), dtype=np.float32)


def timed(step, n_steps: int, warmup: int, sync) -> float:
    """Seconds per step over n_steps after `warmup` steps (sync() waits for the device)."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync()
    return (time.perf_counter() - t0) / n_steps


# ---- PyTorch ----------------------------------------------------------------------------------
def torch_hand(x, n_steps, warmup):
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(D, H), nn.ReLU())
    loc_head, scale_head = nn.Linear(H, Z), nn.Linear(H, Z)
    dec = nn.Sequential(nn.Linear(Z, H), nn.ReLU(), nn.Linear(H, D))
    params = [*enc.parameters(), *loc_head.parameters(), *scale_head.parameters(),
              *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    xt = torch.as_tensor(x)

    def step():
        y = torch.bernoulli(xt[torch.randint(len(xt), (BATCH,))])
        h = enc(y)
        loc, scale = loc_head(h), F.softplus(scale_head(h)) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        logits = dec(z)
        distortion = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        rate = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
        opt.zero_grad(set_to_none=True)
        ((rate + distortion) / BATCH).backward()
        opt.step()

    return timed(step, n_steps, warmup, lambda: None)


def pyro_stock(x, n_steps, warmup):
    import pyro
    import pyro.distributions as dist
    import torch

    from ppl_vae.pyro.networks import MLP, Encoder
    from ppl_vae.spec import PosteriorSpec

    torch.manual_seed(0)
    pyro.clear_param_store()
    encoder = Encoder(D, None, 0, (H,), "relu", Z, PosteriorSpec())
    decoder = torch.nn.Sequential(MLP([Z, H], "relu"), torch.nn.Linear(H, D))
    xt = torch.as_tensor(x)

    def model(y):
        pyro.module("decoder", decoder)
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("y", dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1),
                        obs=y)

    def guide(y):
        pyro.module("encoder", encoder)
        with pyro.plate("data", y.shape[0]):
            loc, scale = encoder(y)[:2]
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())

    def step():
        svi.step(torch.bernoulli(xt[torch.randint(len(xt), (BATCH,))]))

    with pyro.validation_enabled(False):
        return timed(step, n_steps, warmup, lambda: None)


def spec_for_benchmark(log_every: int):
    from ppl_vae.spec import load_spec

    return load_spec("vae_mnist", [f"train.log_every={log_every}",
                                   f"train.eval_every={log_every}",
                                   f"train.checkpoint_every={log_every}",
                                   "objective.analytic_kl=true", 'data.path="unused"'])


def ppl_vae_backend(backend, x, n_steps, warmup, log_every):
    from ppl_vae.backends import backend_module
    from ppl_vae.data import Dataset

    spec = spec_for_benchmark(log_every)
    data = Dataset(x, x[:10], np.full(len(x), -1), np.full(10, -1), (28, 28), "bench")
    trainer = backend_module(backend, "train").Trainer(spec, data, "cpu")
    windows = max(1, n_steps // log_every)
    betas = np.ones(log_every)
    seconds = timed(lambda: trainer.run_steps(betas, 1.0), windows, max(1, warmup // log_every),
                    lambda: None)  # run_steps returns host arrays: already synchronised
    return seconds / log_every


# ---- JAX -------------------------------------------------------------------------------------
def jax_hand(x, n_steps, warmup):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from ppl_vae.numpyro.networks import MLP

    class VAE(nn.Module):
        @nn.compact
        def __call__(self, y, eps):
            h = MLP((H,), "relu")(y)
            loc = nn.Dense(Z)(h)
            scale = jax.nn.softplus(nn.Dense(Z)(h)) + 1e-4
            z = loc + scale * eps
            logits = nn.Dense(D)(MLP((H,), "relu")(z))
            distortion = optax.sigmoid_binary_cross_entropy(logits, y).sum()
            rate = (0.5 * (loc ** 2 + scale ** 2 - 1) - jnp.log(scale)).sum()
            return (rate + distortion) / y.shape[0]

    vae = VAE()
    key = jax.random.PRNGKey(0)
    params = vae.init(key, jnp.zeros((1, D)), jnp.zeros((1, Z)))
    opt = optax.adam(1e-3)
    xs = jnp.asarray(x)

    @jax.jit
    def step(params, opt_state, key):
        key, k1, k2, k3 = jax.random.split(key, 4)
        y = jax.random.bernoulli(k2, xs[jax.random.randint(k1, (BATCH,), 0, len(xs))])
        y = y.astype(jnp.float32)
        loss, grads = jax.value_and_grad(vae.apply)(params, y,
                                                    jax.random.normal(k3, (BATCH, Z)))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    state = [params, opt.init(params), key]

    def one():
        state[0], state[1], state[2], _ = step(*state)

    return timed(one, n_steps, warmup, lambda: jax.block_until_ready(state[0]))


def numpyro_stock(x, n_steps, warmup):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.contrib.module import flax_module
    from numpyro.infer import SVI, Trace_ELBO

    from ppl_vae.numpyro.networks import Decoder, Encoder
    from ppl_vae.spec import DecoderSpec, PosteriorSpec

    encoder = Encoder((H,), "relu", None, None, Z, PosteriorSpec())
    decoder = Decoder(DecoderSpec(hidden=(H,)), D, None, 1)

    def model(y):
        net = flax_module("decoder", decoder, input_shape=(1, Z))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(Z), 1.0).to_event(1))
            numpyro.sample("y", dist.Bernoulli(logits=net(z)).to_event(1), obs=y)

    def guide(y):
        net = flax_module("encoder", encoder, input_shape=(1, D))
        with numpyro.plate("data", y.shape[0]):
            loc, scale = net(y)[:2]
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    xs = jnp.asarray(x)
    key = jax.random.PRNGKey(0)
    state = [svi.init(key, xs[:BATCH]), key]
    update = jax.jit(svi.update)

    def one():
        k, k1, k2 = jax.random.split(state[1], 3)
        y = jax.random.bernoulli(k2, xs[jax.random.randint(k1, (BATCH,), 0, len(xs))])
        state[0], _ = update(state[0], y.astype(jnp.float32))
        state[1] = k

    return timed(one, n_steps, warmup, lambda: jax.block_until_ready(state[0]))


def main(args) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    x = make_data(args.n)
    log_every = 50 if not args.smoke else 5
    ways = {
        "torch_hand": lambda: torch_hand(x, args.steps, args.warmup),
        "pyro_stock": lambda: pyro_stock(x, args.steps, args.warmup),
        "ppl_vae_pyro": lambda: ppl_vae_backend("pyro", x, args.steps, args.warmup, log_every),
        "jax_hand": lambda: jax_hand(x, args.steps, args.warmup),
        "numpyro_stock": lambda: numpyro_stock(x, args.steps, args.warmup),
        "ppl_vae_numpyro": lambda: ppl_vae_backend("numpyro", x, args.steps, args.warmup,
                                                   log_every),
    }
    chosen = {k: v for k, v in ways.items() if not args.only or k in args.only}
    seconds = {name: math.inf for name in chosen}
    # Round-robin repeats, keeping each way's best: drifts in machine speed hit every way alike.
    for _ in range(args.repeats):
        for name, run in chosen.items():
            seconds[name] = min(seconds[name], run())
    print(f"\nMLP VAE {D}-{H}-{Z}, batch {BATCH}, CPU, {args.threads} threads, "
          f"{args.steps} timed steps (best of {args.repeats})\n")
    print(f"{'way':<17}{'steps/s':>10}{'ms/step':>10}")
    for name, s in seconds.items():
        print(f"{name:<17}{1 / s:>10.1f}{1000 * s:>10.3f}")
    ratios = [("ppl_vae_pyro", "torch_hand", 1.15), ("pyro_stock", "torch_hand", None),
              ("ppl_vae_numpyro", "jax_hand", 1.05), ("ppl_vae_numpyro", "numpyro_stock", 1.0),
              ("numpyro_stock", "jax_hand", None)]
    print("\nratio (time per step; < 1 is faster)")
    for a, b, target in ratios:
        if a in seconds and b in seconds:
            r = seconds[a] / seconds[b]
            goal = f"   target <= {target:.2f}: {'met' if r <= target else 'NOT met'}" \
                if target else ""
            print(f"  {a} / {b}: {r:.3f}{goal}")
    return seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n", type=int, default=10000, help="examples in the data set")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", nargs="*", help="run only these ways")
    p.add_argument("--smoke", action="store_true", help="a few steps of each way")
    args = p.parse_args(argv)
    if args.smoke:
        args = replace_args(args, steps=10, warmup=5, repeats=1, n=500)
    return args


def replace_args(args, **changes):
    for k, v in changes.items():
        setattr(args, k, v)
    return args


if __name__ == "__main__":
    main(parse_args())
