"""Time per training step of one VAE trained several ways, each way in its own fresh process, on
the same data, with the same network and Adam.

MLP VAE 784-400-20, Bernoulli (batch 128 on a CPU; 128, 1024 and 4096 on a GPU):

  torch_hand      a hand-written PyTorch loop (the reference for the Pyro backend)
  torch_graph     the same step captured once in a CUDA graph and replayed (GPU only: the
                  strongest PyTorch reference)
  pyro_stock      Pyro's SVI + Trace_ELBO (one .item() per step, as SVI.step does)
  ppl_vae_pyro    ppl_vae's Pyro backend (`ppl_vae.pyro.train.Trainer`; CUDA-graph steps on a GPU)
  jax_hand        a hand-written JAX + optax loop, one jitted step per call (the JAX reference)
  numpyro_stock   NumPyro's SVI + Trace_ELBO with `jax.jit(svi.update)`, one step per call
  ppl_vae_numpyro ppl_vae's NumPyro backend (`lax.scan` over `train.log_every` steps per call)
  ppl_vae_numpyro_beside_torch
                  the same, in a process where PyTorch trained first on the same GPU (GPU only:
                  the setting of issue 11's 20x slower harness figure, kept to tell whether a
                  second framework in the process, rather than the trainer, was the cause)

and the dSprites convolutional VAE (`beta_vae_dsprites`, batch 64) with each backend
(`ppl_vae_pyro_conv`, `ppl_vae_numpyro_conv`: on a GPU by default, on a CPU with --conv).

Each way runs in a process of its own, so one framework's threads, CUDA context or allocator
never slow another's (issue 11: a NumPyro figure measured beside PyTorch in one process was 20x
off). It prints ms/step, steps/s, examples/s and the ratios the project aims at. Nothing is
asserted: speed is measured here, by hand, never in the test suite.

    python benchmarks/bench_step.py                  # CPU: ~3 minutes on 2 cores
    python benchmarks/bench_step.py --device cuda    # GPU: batches 128, 1024, 4096 and conv
    python benchmarks/bench_step.py --smoke          # seconds: each MLP way, in one process
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D, H, Z = 784, 400, 20
CONV_BATCH = 64
MLP_WAYS = ("torch_hand", "torch_graph", "pyro_stock", "ppl_vae_pyro", "jax_hand",
            "numpyro_stock", "ppl_vae_numpyro", "ppl_vae_numpyro_beside_torch")
CONV_WAYS = ("ppl_vae_pyro_conv", "ppl_vae_numpyro_conv")
GPU_ONLY = ("torch_graph", "ppl_vae_numpyro_beside_torch")
#: the order the ways run in: the headline comparisons first, so that a run cut short by a time
#: limit (a lent GPU's minutes) still has them
ORDER = ("ppl_vae_pyro", "torch_graph", "torch_hand", "ppl_vae_numpyro", "jax_hand",
         "ppl_vae_pyro_conv", "ppl_vae_numpyro_conv", "numpyro_stock", "pyro_stock",
         "ppl_vae_numpyro_beside_torch")
#: (way, reference, target on a CPU, target on a GPU): time-per-step ratios, < 1 is faster
RATIOS = [("ppl_vae_pyro", "torch_hand", 1.15, None), ("ppl_vae_pyro", "torch_graph", None, 1.2),
          ("pyro_stock", "torch_hand", None, None),
          ("ppl_vae_numpyro", "jax_hand", 1.05, 1.0),
          ("ppl_vae_numpyro", "numpyro_stock", 1.0, 1.0), ("numpyro_stock", "jax_hand", None, None),
          ("ppl_vae_numpyro_beside_torch", "ppl_vae_numpyro", None, None)]
#: absolute GPU targets, ms per step: (way, batch) -> ms
GPU_MS = {("ppl_vae_pyro", 128): 0.5, ("ppl_vae_numpyro_conv", CONV_BATCH): 1.0}


def make_data(n: int, mnist: str | None, seed: int = 0) -> np.ndarray:
    """MNIST-sized grey images in [0, 1]: MNIST's test images when `mnist` names their folder
    (--mnist, else the default of `ppl_vae.experiments.optional_mnist`), else random values."""
    if mnist:
        from ppl_vae.data import MNIST_FILES, _find_file, read_idx

        path = _find_file(Path(mnist), MNIST_FILES["test"][0])
        return (read_idx(path).reshape(-1, D)[:n] / 255.0).astype(np.float32)
    return np.random.default_rng(seed).random((n, D), dtype=np.float32)


def make_conv_data(n: int, seed: int = 0) -> np.ndarray:
    """dSprites-sized binary images (64 x 64); the step's cost does not depend on the pictures."""
    return (np.random.default_rng(seed).random((n, 64 * 64)) < 0.1).astype(np.float32)


def timed(step, n_steps: int, warmup: int, sync, repeats: int) -> float:
    """Best seconds per step over `repeats` blocks of n_steps, after `warmup` steps."""
    for _ in range(warmup):
        step()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / n_steps)
    return best


# ---- PyTorch ----------------------------------------------------------------------------------
def _torch_device(device: str):
    import torch

    return torch.device("cuda" if device == "cuda" else "cpu")


def _torch_sync(dev):
    import torch

    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def _torch_vae(dev, capturable: bool):
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(D, H), nn.ReLU())
    loc_head, scale_head = nn.Linear(H, Z), nn.Linear(H, Z)
    dec = nn.Sequential(nn.Linear(Z, H), nn.ReLU(), nn.Linear(H, D))
    mods = nn.ModuleList([enc, loc_head, scale_head, dec]).to(dev)
    opt = torch.optim.Adam(mods.parameters(), lr=1e-3, capturable=capturable)

    def step(xt, batch):  # from zeroed gradients; no host synchronisation
        y = torch.bernoulli(xt[torch.randint(len(xt), (batch,), device=dev)])
        h = enc(y)
        loc, scale = loc_head(h), F.softplus(scale_head(h)) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        logits = dec(z)
        distortion = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        rate = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum()
        ((rate + distortion) / batch).backward()
        opt.step()

    return step, opt


def torch_hand(x, batch, device, a):
    import torch

    dev = _torch_device(device)
    xt = torch.as_tensor(x, device=dev)
    step, opt = _torch_vae(dev, capturable=False)

    def one():
        opt.zero_grad(set_to_none=True)
        step(xt, batch)

    return timed(one, a.steps, a.warmup, _torch_sync(dev), a.repeats)


def torch_graph(x, batch, device, a):
    """PyTorch's documented whole-network capture: warm up on a side stream, capture, replay."""
    import torch

    dev = _torch_device(device)
    xt = torch.as_tensor(x, device=dev)
    step, opt = _torch_vae(dev, capturable=True)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(xt, batch)
    torch.cuda.current_stream(dev).wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(xt, batch)
    return timed(graph.replay, a.steps, a.warmup, _torch_sync(dev), a.repeats)


def pyro_stock(x, batch, device, a):
    import pyro
    import pyro.distributions as dist
    import torch

    from ppl_vae.pyro.networks import MLP, Encoder
    from ppl_vae.spec import PosteriorSpec

    dev = _torch_device(device)
    torch.manual_seed(0)
    pyro.clear_param_store()
    encoder = Encoder(D, None, 0, (H,), "relu", Z, PosteriorSpec()).to(dev)
    decoder = torch.nn.Sequential(MLP([Z, H], "relu"), torch.nn.Linear(H, D)).to(dev)
    xt = torch.as_tensor(x, device=dev)
    prior_loc = torch.zeros(Z, device=dev)

    def model(y):
        pyro.module("decoder", decoder)
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            pyro.sample("y", dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1),
                        obs=y)

    def guide(y):
        pyro.module("encoder", encoder)
        with pyro.plate("data", y.shape[0]):
            loc, scale = encoder(y)[:2]
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())

    def one():
        svi.step(torch.bernoulli(xt[torch.randint(len(xt), (batch,), device=dev)]))

    with pyro.validation_enabled(False):
        return timed(one, a.steps, a.warmup, _torch_sync(dev), a.repeats)


# ---- the two backends ---------------------------------------------------------------------------
def spec_for_benchmark(name: str, log_every: int, batch: int, threads: int = 0):
    """`threads`: the Pyro backend's train.threads, the thread count the hand-written PyTorch
    loop gets (0: the backend's default)."""
    from ppl_vae.spec import load_spec

    data = ['data.source="digits"', 'data.path=""'] if name == "vae_mnist" else []
    return load_spec(name, [f"train.log_every={log_every}", f"train.eval_every={log_every}",
                            f"train.checkpoint_every={log_every}", f"train.batch_size={batch}",
                            "objective.analytic_kl=true", f"train.threads={threads}", *data])


def ppl_vae_backend(backend, name, x, image_shape, batch, device, a):
    from ppl_vae.backends import backend_module
    from ppl_vae.data import Dataset
    from ppl_vae.schedules import step_scalars

    spec = spec_for_benchmark(name, a.log_every, batch, a.threads)
    data = Dataset(x, x[:10], np.full(len(x), -1), np.full(10, -1), image_shape, "bench")
    trainer = backend_module(backend, "train").Trainer(spec, data, device)
    windows = max(1, a.steps // a.log_every)
    betas = step_scalars(spec, np.arange(a.log_every), trainer.n_train)
    # the first windows compile (NumPyro) or capture the CUDA graph (Pyro): warm-up, untimed
    seconds = timed(lambda: trainer.run_steps(betas, 1.0), windows,
                    max(2, a.warmup // a.log_every), lambda: None, a.repeats)
    print(f"  {backend} steps: {trainer.step_mode}", file=sys.stderr)
    return seconds / a.log_every  # run_steps returns host arrays: already synchronised


# ---- JAX -------------------------------------------------------------------------------------
def _jax_device(device: str):
    import jax

    return jax.devices("gpu" if device == "cuda" else "cpu")[0]


def jax_hand(x, batch, device, a):
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

    dev = _jax_device(device)
    vae = VAE()
    key = jax.device_put(jax.random.PRNGKey(0), dev)
    params = jax.device_put(vae.init(key, jnp.zeros((1, D)), jnp.zeros((1, Z))), dev)
    opt = optax.adam(1e-3)
    xs = jax.device_put(jnp.asarray(x), dev)

    @jax.jit
    def step(params, opt_state, key):
        key, k1, k2, k3 = jax.random.split(key, 4)
        y = jax.random.bernoulli(k2, xs[jax.random.randint(k1, (batch,), 0, len(xs))])
        y = y.astype(jnp.float32)
        loss, grads = jax.value_and_grad(vae.apply)(params, y,
                                                    jax.random.normal(k3, (batch, Z)))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    state = [params, opt.init(params), key]

    def one():
        state[0], state[1], state[2], _ = step(*state)

    return timed(one, a.steps, a.warmup, lambda: jax.block_until_ready(state[0]), a.repeats)


def numpyro_stock(x, batch, device, a):
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

    dev = _jax_device(device)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    xs = jax.device_put(jnp.asarray(x), dev)
    key = jax.device_put(jax.random.PRNGKey(0), dev)
    state = [svi.init(key, xs[:batch]), key]
    update = jax.jit(svi.update)

    def one():
        k, k1, k2 = jax.random.split(state[1], 3)
        y = jax.random.bernoulli(k2, xs[jax.random.randint(k1, (batch,), 0, len(xs))])
        state[0], _ = update(state[0], y.astype(jnp.float32))
        state[1] = k

    return timed(one, a.steps, a.warmup, lambda: jax.block_until_ready(state[0]), a.repeats)


# ---- one way in this process ------------------------------------------------------------------
def run_way(way: str, batch: int, device: str, a) -> float:
    """Seconds per step of `way` at `batch` on `device` (the worker's job)."""
    import torch

    torch.set_num_threads(a.threads)
    if way in CONV_WAYS:
        backend = way.split("_")[2]
        return ppl_vae_backend(backend, "beta_vae_dsprites", make_conv_data(a.n), (64, 64),
                               batch, device, a)
    x = make_data(a.n, a.mnist)
    if way == "ppl_vae_numpyro_beside_torch":
        torch_hand(x, batch, device, argparse.Namespace(**{**vars(a), "repeats": 1}))
        return ppl_vae_backend("numpyro", "vae_mnist", x, (28, 28), batch, device, a)
    if way.startswith("ppl_vae_"):
        return ppl_vae_backend(way[len("ppl_vae_"):], "vae_mnist", x, (28, 28), batch, device, a)
    return globals()[way](x, batch, device, a)


def in_this_process(way: str, batch: int, device: str, a) -> float:
    """`run_way` here (--smoke); inf (and its error on stderr) when it fails."""
    try:
        return run_way(way, batch, device, a)
    except Exception as error:  # noqa: BLE001 (reported like a failed worker)
        sys.stderr.write(f"{way} (batch {batch}) failed: {type(error).__name__}: {error}\n")
        return math.inf


def in_own_process(way: str, batch: int, device: str, a) -> float:
    """`run_way` in a fresh interpreter; inf (and its error on stderr) when it fails."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", way, "--batch", str(batch),
           "--device", device, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--repeats", str(a.repeats), "--n", str(a.n), "--threads", str(a.threads),
           "--log-every", str(a.log_every), *(["--mnist", str(a.mnist)] if a.mnist else [])]
    env = os.environ | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sys.stderr.write("".join(f"  {line}\n" for line in done.stderr.splitlines()
                             if "steps:" in line))
    if done.returncode != 0:
        sys.stderr.write(f"{way} (batch {batch}) failed:\n{done.stderr[-3000:]}\n")
        return math.inf
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main(a) -> dict[tuple[str, int], float]:
    gpu = a.device == "cuda"
    ways = [w for w in ORDER if (gpu or w not in GPU_ONLY) and (gpu or a.conv or
                                                               w not in CONV_WAYS)]
    if a.only:
        ways = [w for w in ways if w in a.only]
    seconds = {}
    for way in ways:
        for batch in ([CONV_BATCH] if way in CONV_WAYS else a.batch):
            # --smoke checks that each way runs, so one process runs them all: its timings
            # mean nothing, and eight interpreters (torch or JAX imported in each) cost more
            # than the steps
            seconds[way, batch] = (in_this_process(way, batch, a.device, a) if a.smoke else
                                   in_own_process(way, batch, a.device, a))
            print(f"{way:<22}batch {batch:>5}: {1000 * seconds[way, batch]:8.3f} ms/step",
                  file=sys.stderr, flush=True)
    where = "GPU" if gpu else f"CPU, {a.threads} threads"
    print(f"\nVAE steps, {where}, {a.steps} timed steps (best of {a.repeats}), each way in its "
          "own process\n")
    print(f"{'way':<22}{'batch':>6}{'ms/step':>10}{'steps/s':>10}{'examples/s':>12}")
    for (way, batch), s in seconds.items():
        print(f"{way:<22}{batch:>6}{1000 * s:>10.3f}{1 / s:>10.1f}{batch / s:>12.0f}")
    print("\nratio (time per step; < 1 is faster)")
    for w, ref, cpu_target, gpu_target in RATIOS:
        target = gpu_target if gpu else cpu_target
        for batch in a.batch:
            if (w, batch) in seconds and (ref, batch) in seconds:
                r = seconds[w, batch] / seconds[ref, batch]
                goal = (f"   target <= {target:.2f}: {'met' if r <= target else 'NOT met'}"
                        if target else "")
                print(f"  batch {batch:>5}  {w} / {ref}: {r:.3f}{goal}")
    if gpu:
        for (way, batch), ms in GPU_MS.items():
            if (way, batch) in seconds:
                got = 1000 * seconds[way, batch]
                print(f"  {way} at batch {batch}: {got:.3f} ms/step, target <= {ms} ms: "
                      f"{'met' if got <= ms else 'NOT met'}")
    return seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, nargs="+", help="MLP batch sizes (default: 128 on a "
                   "CPU; 128 1024 4096 on a GPU)")
    p.add_argument("--conv", action="store_true", help="also the dSprites conv step (on a CPU)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log-every", type=int, default=50, help="steps per ppl_vae window")
    p.add_argument("--n", type=int, default=10000, help="examples in the data set")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", nargs="*", help="run only these ways")
    p.add_argument("--smoke", action="store_true", help="a few steps of each way")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # run one way, print its JSON
    from ppl_vae import experiments

    experiments.add_mnist_argument(p)
    a = p.parse_args(argv)
    a.mnist = experiments.optional_mnist(a.mnist, p.prog)  # random images without MNIST
    if a.batch is None:
        a.batch = [128, 1024, 4096] if a.device == "cuda" else [128]
    if a.smoke:
        # (the conv ways are left to --conv: their compilation is most of a smoke run, and
        # tests/numpyro/test_train.py trains the conv networks on a CPU)
        a.steps, a.warmup, a.repeats, a.n, a.log_every = 10, 5, 1, 500, 5
    return a


if __name__ == "__main__":
    args = parse_args()
    if args.worker:
        print(json.dumps({"seconds": run_way(args.worker, args.batch[0], args.device, args)}))
    else:
        failed = [f"{w} (batch {b})" for (w, b), s in main(args).items() if math.isinf(s)]
        if failed:
            sys.exit(f"failed: {', '.join(failed)}")
