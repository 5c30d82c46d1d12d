"""A user-written Pyro VAE (no spec) trained with `pyro.infer.SVI` and ppl_vae's `ScaledELBO`.

The model is P̂_Φ(z) P̂_Φ(y|z) (prior + decoder), the guide is the encoder P_Ψ(z|y). The loss

    β · rate + distortion,   rate = E[ln q(z|y) − ln p(z)],   distortion = E[−ln p(y|z)]

is minimised by stock SVI; `ScaledELBO.terms` reports its parts in nats per example.

    python examples/custom_model_pyro.py --beta 4 --steps 3000
    python examples/custom_model_pyro.py --smoke          # a few seconds
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_digits
from torch import nn

from ppl_vae.pyro.elbo import ScaledELBO


class Encoder(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU())
        self.loc = nn.Linear(hidden, latent_dim)
        self.scale = nn.Linear(hidden, latent_dim)

    def forward(self, y):
        h = self.body(y)
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


class VAE(nn.Module):
    """model/guide as methods of one module, as in Pyro's VAE tutorial."""

    def __init__(self, data_dim: int = 64, latent_dim: int = 4, hidden: int = 128):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(data_dim, latent_dim, hidden)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, data_dim))

    def model(self, y):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", y.shape[0]):
            zero = y.new_zeros(self.latent_dim)
            z = pyro.sample("z", dist.Normal(zero, 1.0 + zero).to_event(1))
            pyro.sample("y", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=y)

    def guide(self, y):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", y.shape[0]):
            loc, scale = self.encoder(y)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def main(args) -> dict:
    # One intra-op thread, as ppl_vae's own runs use (train.threads, README "Speed"): PyTorch's
    # default, a thread per core, is slower for networks this small, and far slower on a CPU
    # that other processes share.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()  # the stock SVI finds parameters through Pyro's global store
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    perm = torch.randperm(len(x))
    train, test = x[perm[300:]], x[perm[:300]]
    test_binary = torch.bernoulli(test, generator=torch.Generator().manual_seed(1))

    vae = VAE()
    elbo = ScaledELBO(beta=args.beta)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
    for step in range(1, args.steps + 1):
        batch = torch.bernoulli(train[torch.randint(len(train), (args.batch_size,))])
        loss = svi.step(batch) / args.batch_size
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:5d}  loss {loss:8.3f} nats/example")

    with torch.no_grad():
        t = elbo.terms(vae.model, vae.guide, test_binary)
    n = len(test_binary)
    result = {"rate": float(t["rate"]) / n, "distortion": float(t["distortion"]) / n}
    result["elbo"] = -(result["rate"] + result["distortion"])
    print(f"test, nats per example: rate {result['rate']:.3f}  distortion "
          f"{result['distortion']:.3f}  ELBO {result['elbo']:.3f}  (β = {args.beta})")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (default 1)")
    p.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps = 50
    return args


if __name__ == "__main__":
    main(parse_args())
