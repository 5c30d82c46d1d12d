"""`build(spec)`: the NumPyro model (prior + decoder), guide (encoder + aux terms), and `Model`,
the backend hooks; the twin of `ppl_vae/pyro/model.py`, with the same sites:

* ``z`` latent in the plate ``data``; ``y`` distortion (observed, or a factor −Dist_Φ(y|z));
* one guide factor site per aux term (weight · aux loss, on the encoder alone).

Parameters live in a NumPyro param map: ``encoder$params``, ``decoder$params``,
``aux_<name>$params`` (Flax trees, via `numpyro.contrib.module.flax_module`) and ``prior.loc``,
``prior.log_scale``, ``prior.logits``, ``likelihood.log_scale`` (arrays). `export_params` /
`import_params` convert to and from the canonical names shared with the Pyro backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module

from ppl_vae.backends import BackendError
from ppl_vae.diagnostics import log_weights_from_parts
from ppl_vae.numpyro.networks import (
    AutoregressiveDecoder,
    Decoder,
    Encoder,
    SupervisedHead,
    canonical_to_flax,
    flax_to_canonical,
)
from ppl_vae.objective import aux_site_names
from ppl_vae.spec import LikelihoodSpec, Spec, resolve_user_function


def likelihood_dist(spec: LikelihoodSpec, params, log_scale=None):
    """P̂_Φ(y|z) with event shape (D,) from decoder outputs (..., D) or (..., D, K)."""
    if spec.kind == "bernoulli":
        # Grey values in [0, 1] are allowed as soft targets (cross-entropy), as in the Pyro backend.
        return dist.Bernoulli(logits=params, validate_args=False).to_event(1)
    if spec.kind == "gaussian":
        scale = jnp.exp(log_scale) if log_scale is not None else spec.scale
        return dist.Normal(params, jnp.broadcast_to(scale, params.shape)).to_event(1)
    if spec.kind == "binomial":
        return dist.Binomial(total_count=spec.total_count, logits=params).to_event(1)
    return dist.Categorical(logits=params).to_event(1)


def observation(spec: LikelihoodSpec, y):
    if spec.kind == "binomial":
        return jnp.round(y * spec.total_count)
    if spec.kind == "categorical":
        return jnp.round(y * (spec.categories - 1)).astype(jnp.int32)
    return y


def from_observation(spec: LikelihoodSpec, obs):
    """The inverse of `observation`: a value of site ``y`` back in the data's units."""
    if spec.kind == "binomial":
        return obs / spec.total_count
    if spec.kind == "categorical":
        return obs / (spec.categories - 1)
    return obs


def likelihood_mean(spec: LikelihoodSpec, params):
    """E[y|z] in the data's units: what mse/l1 compare with y."""
    if spec.kind in ("bernoulli", "binomial"):
        return jax.nn.sigmoid(params)
    if spec.kind == "gaussian":
        return params
    levels = jnp.arange(spec.categories, dtype=params.dtype)
    return (jax.nn.softmax(params, -1) * levels).sum(-1) / (spec.categories - 1)


def distortion_value(kind: str, y, mean):
    diff = y - mean
    return (diff * diff).sum(-1) if kind == "mse" else jnp.abs(diff).sum(-1)


def ancestral_sample(spec: LikelihoodSpec, decode, z, data_dim: int, key, log_scale=None):
    """y ~ P̂_Φ(y|z) = Π_i P̂_Φ(y_i | y_<i, z) for an autoregressive decoder, pixel by pixel
    (`lax.fori_loop` over the D pixels); `decode(z, y)` gives the likelihood parameters.

    z (..., d), key a JAX key. Returns (y, means), each (..., D) in the data's units: the draw,
    and E[y_i | y_<i, z] at the drawn y_<i (what `decode_mean` shows as the picture of z).
    """

    def pixel(i, carry):
        y, means = carry
        params = decode(z, y)
        lik = likelihood_dist(spec, params, log_scale)
        draw = from_observation(spec, lik.sample(jax.random.fold_in(key, i))).astype(y.dtype)
        mean = likelihood_mean(spec, params)
        return y.at[..., i].set(draw[..., i]), means.at[..., i].set(mean[..., i])

    y = jnp.zeros((*z.shape[:-1], data_dim), z.dtype)
    return jax.lax.fori_loop(0, data_dim, pixel, (y, jnp.zeros_like(y)))


def infonce_loss(z, loc, scale):
    """−Σ_i InfoNCE_i (see the Pyro twin): z (..., B, d), loc/scale (B, d) -> (...,)."""
    diff = (z[..., :, None, :] - loc) / scale
    log_q = (-0.5 * (diff * diff).sum(-1) - jnp.log(scale).sum(-1)
             - 0.5 * z.shape[-1] * math.log(2 * math.pi))
    batch = z.shape[-2]
    bound = (jnp.diagonal(log_q, axis1=-2, axis2=-1) - jax.nn.logsumexp(log_q, -1)
             + math.log(batch))
    return -bound.sum(-1)


def supervised_loss(head, loc, labels):
    if labels is None:
        return jnp.zeros((), loc.dtype)
    logits = head(loc)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                               jnp.clip(labels, 0)[..., None], -1)[..., 0]
    return jnp.where(labels >= 0, nll, 0.0).sum()


@dataclass
class Built:
    spec: Spec
    model: object
    guide: object
    elbo_model: object
    encoder: Encoder
    decoder: Decoder | AutoregressiveDecoder


def _prior(spec: Spec):
    d, kind = spec.latent.dim, spec.prior.kind
    if kind == "normal":
        return dist.Normal(jnp.zeros(d), 1.0).to_event(1)
    if kind == "learned_normal":
        loc = numpyro.param("prior.loc", jnp.zeros(d))
        log_scale = numpyro.param("prior.log_scale", jnp.zeros(d))
        return dist.Normal(loc, jnp.exp(log_scale)).to_event(1)
    k = spec.prior.components
    logits = numpyro.param("prior.logits", jnp.zeros(k))
    loc = numpyro.param("prior.loc", lambda key: jax.random.normal(key, (k, d)))
    log_scale = numpyro.param("prior.log_scale", jnp.zeros((k, d)))
    return dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                  dist.Normal(loc, jnp.exp(log_scale)).to_event(1))


def build(spec: Spec, data_dim: int, image_shape=None) -> Built:
    """Model, guide and the Flax modules of `spec`; both take ``(y, labels=None)``."""
    d, lik_spec, objective = spec.latent.dim, spec.likelihood, spec.objective
    per_pixel = lik_spec.categories if lik_spec.kind == "categorical" else 1
    encoder = Encoder(spec.encoder, d, image_shape)
    decoder = (AutoregressiveDecoder(spec.decoder, data_dim, per_pixel)
               if spec.decoder.kind == "autoregressive" else
               Decoder(spec.decoder, data_dim, image_shape, per_pixel))
    aux_terms = list(zip(aux_site_names(spec), objective.aux))
    heads = {name: SupervisedHead(a) for name, a in aux_terms if a.kind == "supervised"}
    user_fns = {name: resolve_user_function(a.kind) for name, a in aux_terms
                if a.kind not in ("infonce", "supervised")}
    learned_scale = lik_spec.kind == "gaussian" and lik_spec.scale == "learned"

    def make_model(distortion: str):
        def model(y, labels=None):
            net = flax_module("decoder", decoder, jnp.ones((1, d)), jnp.ones((1, data_dim)))
            prior = _prior(spec)
            log_scale = (numpyro.param("likelihood.log_scale", jnp.zeros(data_dim))
                         if learned_scale else None)
            with numpyro.plate("data", y.shape[0]):
                z = numpyro.sample("z", prior)
                params = net(z, y)  # y: the autoregressive decoder's teacher forcing
                if distortion == "nll":
                    numpyro.sample("y", likelihood_dist(lik_spec, params, log_scale),
                                   obs=observation(lik_spec, y))
                else:
                    mean = likelihood_mean(lik_spec, params)
                    numpyro.factor("y", -distortion_value(distortion, y, mean))
            return z

        return model

    def guide(y, labels=None):
        net = flax_module("encoder", encoder, input_shape=(1, data_dim))
        with numpyro.plate("data", y.shape[0]):
            loc, scale = net(y)
            z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
        for name, aux in aux_terms:
            if aux.kind == "infonce":
                value = infonce_loss(z, loc, scale)
            elif aux.kind == "supervised":
                head = flax_module(f"aux_{name}", heads[name], input_shape=(1, d))
                value = supervised_loss(head, loc, labels)
            else:
                value = user_fns[name](y=y, z=z, loc=loc, scale=scale, labels=labels,
                                       backend="numpyro")
            numpyro.factor(name, aux.weight * value)
        return z

    model = make_model(objective.distortion)
    elbo_model = model if objective.distortion == "nll" else make_model("nll")
    return Built(spec, model, guide, elbo_model, encoder, decoder)


# ---- parameters ---------------------------------------------------------------------------
def init_params(built: Built, data_dim: int, rng_key) -> dict:
    """The param map that model and guide create at their first run (NumPyro's own inits)."""
    y = jnp.zeros((2, data_dim))
    labels = jnp.zeros((2,), jnp.int32)
    params = {}
    for fn, key in zip((built.model, built.guide), jax.random.split(rng_key)):
        trace = handlers.trace(handlers.seed(fn, key)).get_trace(y, labels)
        params |= {k: s["value"] for k, s in trace.items() if s["type"] == "param"}
    return params


def export_params(param_map: dict) -> dict[str, np.ndarray]:
    """Param map -> canonical {"<module>.<name>": PyTorch-layout array}."""
    out = {}
    for name, value in param_map.items():
        if name.endswith("$params"):
            out |= flax_to_canonical(name[: -len("$params")], value)
        else:
            out[name] = np.asarray(value)
    return out


def import_params(param_map: dict, params: dict[str, np.ndarray]) -> dict:
    """Canonical arrays -> a param map shaped like `param_map`; names and shapes must match."""
    own = export_params(param_map)
    missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
    if missing or extra:
        raise ValueError(f"parameters do not match the spec: missing {missing}, unexpected {extra}")
    out = {}
    for name, value in param_map.items():
        if name.endswith("$params"):
            out[name] = canonical_to_flax(name[: -len("$params")], params, value)
        else:
            if tuple(params[name].shape) != tuple(value.shape):
                raise ValueError(f"parameter {name!r}: shape {params[name].shape} in the file, "
                                 f"{tuple(value.shape)} in the model")
            out[name] = jnp.asarray(params[name], dtype=value.dtype)
    return out


def resolve_device(device: str):
    """"auto" → the first GPU when JAX sees one, else the CPU; "cuda" without one is an error."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if device == "cuda" and not gpus:
        raise BackendError(
            f"device 'cuda' was asked for, but JAX ({jax.__version__}) sees no GPU; use --device "
            "cpu (or auto), or install jax with CUDA support (pip install 'jax[cuda12]')."
        )
    if device in ("cuda", "auto") and gpus:
        return gpus[0]
    return jax.devices("cpu")[0]


def check_dtype(spec: Spec):
    if spec.train.dtype == "float64" and not jax.config.jax_enable_x64:
        raise BackendError("train.dtype = 'float64' with the numpyro backend needs JAX's 64-bit "
                           "mode: set the environment variable JAX_ENABLE_X64=1 before starting")
    return jnp.float64 if spec.train.dtype == "float64" else jnp.float32


class Model:
    """The spec built with parameters on a device, with the hooks backend-free code calls
    (NumPy in and out); the same methods as the Pyro backend's `Model`."""

    def __init__(self, spec: Spec, data_dim: int, image_shape=None, device: str = "auto",
                 params: dict[str, np.ndarray] | None = None, rng_key=None):
        self.spec, self.data_dim, self.image_shape = spec, data_dim, image_shape
        self.device = resolve_device(device)
        self.dtype = check_dtype(spec)
        self.built = build(spec, data_dim, image_shape)
        key = jax.random.PRNGKey(spec.train.seed) if rng_key is None else rng_key
        with jax.default_device(self.device):
            param_map = init_params(self.built, data_dim, key)
            param_map = jax.tree_util.tree_map(lambda a: jnp.asarray(a, self.dtype), param_map)
            if params is not None:
                param_map = import_params(param_map, params)
        self.param_map = jax.device_put(param_map, self.device)
        self._encode = jax.jit(lambda p, y: self.built.encoder.apply(
            {"params": p["encoder$params"]}, y))
        self._decode = jax.jit(self._decode_mean)
        self._eval = None

    def tensor(self, x):
        return jax.device_put(jnp.asarray(np.asarray(x), self.dtype), self.device)

    def export_params(self) -> dict[str, np.ndarray]:
        return export_params(self.param_map)

    def import_params(self, params: dict[str, np.ndarray]) -> None:
        self.param_map = jax.device_put(import_params(self.param_map, params), self.device)

    def encode(self, x: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._encode(self.param_map, self.tensor(x[i:i + batch_size]))
                 for i in range(0, len(x), batch_size)]
        return (np.concatenate([np.asarray(p[0]) for p in parts]),
                np.concatenate([np.asarray(p[1]) for p in parts]))

    def _decode_mean(self, param_map, z, key):
        def decode(z, y):
            return self.built.decoder.apply({"params": param_map["decoder$params"]}, z, y)

        lik = self.spec.likelihood
        if self.spec.decoder.kind == "autoregressive":
            return ancestral_sample(lik, decode, z, self.data_dim, key,
                                    param_map.get("likelihood.log_scale"))[1]
        return likelihood_mean(lik, decode(z, None))

    def decode_mean(self, z: np.ndarray, seed: int = 0) -> np.ndarray:
        """E[y|z], (N, D); autoregressive decoders: E[y_i | y_<i, z] along a draw seeded by
        `seed`."""
        return np.asarray(self._decode(self.param_map, self.tensor(z), jax.random.PRNGKey(seed)))

    def sample_prior(self, n: int, seed: int = 0) -> np.ndarray:
        key = jax.random.PRNGKey(seed)
        prior = handlers.substitute(lambda: _prior(self.spec), data=self.param_map)
        return np.asarray(prior().sample(key, (n,)))

    def log_density_parts(self, x: np.ndarray, num_samples: int, seed: int = 0,
                          chunk: int = 500) -> np.ndarray:
        """ln p̂(y|z_k), ln p̂(z_k), ln q(z_k|y) for K draws z_k ~ q(z|y): (N, K, 3) float64, nats
        (the twin of the Pyro backend's hook; draws in chunks of `chunk`)."""
        if getattr(self, "_parts", None) is None:
            self._parts = jax.jit(self._parts_chunk, static_argnums=3)
        y = self.tensor(x)
        key = jax.random.PRNGKey(seed)
        out = [np.asarray(self._parts(self.param_map, jax.random.fold_in(key, i), y,
                                      min(chunk, num_samples - k)), np.float64)
               for i, k in enumerate(range(0, num_samples, chunk))]
        return np.concatenate(out).transpose(1, 0, 2).copy()

    def log_weights(self, x: np.ndarray, num_samples: int, seed: int = 0,
                    chunk: int = 500) -> np.ndarray:
        """Importance log-weights ln p̂(y, z_k) − ln q(z_k|y), z_k ~ q(z|y), (N, K) float64."""
        return log_weights_from_parts(self.log_density_parts(x, num_samples, seed, chunk))

    def _parts_chunk(self, param_map, key, y, k):
        spec = self.spec
        loc, scale = self.built.encoder.apply({"params": param_map["encoder$params"]}, y)
        q = dist.Normal(loc, scale).to_event(1)
        z = q.rsample(key, (k,))
        with handlers.substitute(data=param_map):
            prior = _prior(spec)
        params = self.built.decoder.apply({"params": param_map["decoder$params"]}, z, y)
        lik = likelihood_dist(spec.likelihood, params, param_map.get("likelihood.log_scale"))
        return jnp.stack([lik.log_prob(observation(spec.likelihood, y)), prior.log_prob(z),
                          q.log_prob(z)], -1)

    def prior_normal(self):
        kind = self.spec.prior.kind
        d = self.spec.latent.dim
        if kind == "normal":
            return np.zeros(d), np.ones(d)
        if kind == "learned_normal":
            return (np.asarray(self.param_map["prior.loc"], np.float64),
                    np.exp(np.asarray(self.param_map["prior.log_scale"], np.float64)))
        return None

    def eval_terms(self, x: np.ndarray, labels, beta: float, lam: float, seed: int = 0,
                   batch_size: int = 1000) -> dict[str, float]:
        """Sums over the examples of x (nats): objective, rate, distortion, aux, nll."""
        if self._eval is None:
            self._eval = jax.jit(self._eval_batch)
        key = jax.random.PRNGKey(seed)
        sums = np.zeros(5)
        for b, i in enumerate(range(0, len(x), batch_size)):
            lab = None if labels is None else jnp.asarray(labels[i:i + batch_size], jnp.int32)
            sums += np.asarray(self._eval(self.param_map, jax.random.fold_in(key, b),
                                          self.tensor(x[i:i + batch_size]), lab,
                                          jnp.asarray(beta, self.dtype),
                                          jnp.asarray(lam, self.dtype)), np.float64)
        return dict(zip(("objective", "rate", "distortion", "aux", "nll"), sums.tolist()))

    def _eval_batch(self, param_map, key, y, labels, beta, lam):
        from ppl_vae.numpyro.elbo import ScaledELBO

        obj = self.spec.objective
        elbo = ScaledELBO(num_particles=obj.num_particles, analytic_kl=obj.analytic_kl)
        k1, k2 = jax.random.split(key)
        t = elbo.with_weights(beta, lam).terms(k1, param_map, self.built.model, self.built.guide,
                                               y, labels)
        if self.built.elbo_model is self.built.model:
            nll = t["distortion"]
        else:
            nll = elbo.terms(k2, param_map, self.built.elbo_model, self.built.guide, y,
                             labels)["distortion"]
        return jnp.stack([t["loss"], t["rate"], t["distortion"], t["aux"], nll])
