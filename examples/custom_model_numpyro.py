"""A user-written NumPyro VAE (no spec) trained with `numpyro.infer.SVI` and ppl_vae's
`ScaledELBO`: the NumPyro twin of `custom_model_pyro.py`.

The model is P̂_Φ(z) P̂_Φ(y|z) (prior + decoder, Flax modules through `flax_module`), the guide is
the encoder P_Ψ(z|y). The loss β · rate + distortion is minimised by the stock SVI, several steps
per compiled call (`lax.scan`); `ScaledELBO.terms` reports its parts in nats per example.

    python examples/custom_model_numpyro.py --beta 4 --steps 3000
    python examples/custom_model_numpyro.py --smoke        # a few seconds
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import flax_module
from numpyro.infer import SVI
from sklearn.datasets import load_digits

from ppl_vae.numpyro.elbo import ScaledELBO

LATENT, HIDDEN = 4, 128


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, y):
        h = nn.relu(nn.Dense(HIDDEN)(y))
        return nn.Dense(LATENT)(h), jax.nn.softplus(nn.Dense(LATENT)(h)) + 1e-4


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        return nn.Dense(64)(nn.relu(nn.Dense(HIDDEN)(z)))


def model(y):
    decoder = flax_module("decoder", Decoder(), input_shape=(1, LATENT))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Normal(jnp.zeros(LATENT), 1.0).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=y)


def guide(y):
    encoder = flax_module("encoder", Encoder(), input_shape=(1, 64))
    with numpyro.plate("data", y.shape[0]):
        loc, scale = encoder(y)
        numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


def main(args) -> dict:
    x = jnp.asarray(load_digits().data / 16.0, jnp.float32)
    key, k_perm, k_test, k_init = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    perm = jax.random.permutation(k_perm, len(x))
    train, test = x[perm[300:]], x[perm[:300]]
    test_binary = jax.random.bernoulli(k_test, test).astype(jnp.float32)

    elbo = ScaledELBO(beta=args.beta)
    svi = SVI(model, guide, optax.adam(1e-3), loss=elbo)
    state = svi.init(k_init, train[: args.batch_size])

    @jax.jit
    def run_steps(state, key):
        """`args.log_every` SVI steps in one compiled call; returns the mean loss."""
        def step(state, key):
            k_idx, k_bin = jax.random.split(key)
            batch = train[jax.random.randint(k_idx, (args.batch_size,), 0, len(train))]
            state, loss = svi.update(state, jax.random.bernoulli(k_bin, batch).astype(
                jnp.float32))
            return state, loss

        state, losses = jax.lax.scan(step, state, jax.random.split(key, args.log_every))
        return state, losses.mean() / args.batch_size

    for i in range(args.steps // args.log_every):
        key, sub = jax.random.split(key)
        state, loss = run_steps(state, sub)
        print(f"step {(i + 1) * args.log_every:5d}  loss {float(loss):8.3f} nats/example")

    params = svi.get_params(state)
    t = elbo.terms(jax.random.PRNGKey(1), params, model, guide, test_binary)
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
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps, to check it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.log_every = 50, 25
    return args


if __name__ == "__main__":
    main(parse_args())
