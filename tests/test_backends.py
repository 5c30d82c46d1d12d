"""The seams between the backend-free layer and the two backends: both backends' `Model` and
`Trainer` meet the `typing.Protocol`s of `ppl_vae.backends`, method by method and argument by
argument, and the two `ScaledELBO`s give their public methods the same meaning."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from ppl_vae import backends
from ppl_vae.data import Dataset
from ppl_vae.program import Program
from ppl_vae.schedules import step_scalars
from ppl_vae.spec import load_spec

BACKENDS = ("pyro", "numpyro")


def _protocol_members(protocol) -> dict[str, object]:
    """The protocol's own methods and annotated attributes."""
    members = {name: value for name, value in vars(protocol).items()
               if callable(value) and not name.startswith("_")}
    members |= {name: None for name in protocol.__annotations__}
    return members


def _tiny():
    spec = load_spec("vae_digits", ["train.steps=2", "train.log_every=1", "train.eval_every=1",
                                    "train.checkpoint_every=1", "latent.dim=2",
                                    "encoder.hidden=[8]", "decoder.hidden=[8]"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (40, 64)).astype(np.float32)
    labels = np.zeros(40, np.int64)
    return spec, Dataset(x[:30], x[30:], labels[:30], labels[30:], (8, 8), "tiny")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_meets_the_model_and_trainer_protocols(backend):
    spec, data = _tiny()
    trainer = backends.backend_module(backend, "train").Trainer(spec, data, "cpu")
    try:
        for protocol, obj in ((backends.Model, trainer.model), (backends.Trainer, trainer)):
            assert isinstance(obj, protocol), (backend, protocol.__name__)
            for name, method in _protocol_members(protocol).items():
                assert hasattr(obj, name), (backend, protocol.__name__, name)
                if method is None:
                    continue
                want = list(inspect.signature(method).parameters)[1:]  # without self
                have = list(inspect.signature(getattr(obj, name)).parameters)
                assert have == want, (backend, name, have, want)
        assert isinstance(trainer.model.built, Program)
        rows = trainer.run_steps(step_scalars(spec, np.arange(2), trainer.n_train), 1.0)
        assert rows.shape == (2, 4) and np.isfinite(rows).all()
    finally:
        trainer.close()


def test_the_two_elbos_have_the_same_public_methods():
    from ppl_vae.numpyro.elbo import ScaledELBO as NumPyroELBO
    from ppl_vae.pyro.elbo import ScaledELBO as PyroELBO

    public = {"terms", "differentiable_terms", "loss", "with_weights"}
    for cls in (PyroELBO, NumPyroELBO):
        assert public <= set(dir(cls)), cls
        other = cls(beta=2.0).with_weights({"z": 3.0}, 0.5)
        assert other.beta == {"z": 3.0} and other.lam == 0.5


def test_terms_are_for_reading_and_differentiable_terms_for_gradients():
    """In both backends `terms` carries no gradient and `differentiable_terms` does."""
    import jax
    import torch

    from ppl_vae.numpyro.elbo import ScaledELBO as NumPyroELBO
    from ppl_vae.numpyro.model import build as nbuild
    from ppl_vae.numpyro.params import init_params
    from ppl_vae.pyro.elbo import ScaledELBO as PyroELBO
    from ppl_vae.pyro.model import build as pbuild

    spec, data = _tiny()
    y = data.x_train[:8]
    built = pbuild(spec, 64, (8, 8), register=False)
    yt = torch.as_tensor(y)
    assert PyroELBO().terms(built.model, built.guide, yt)["loss"].grad_fn is None
    assert PyroELBO().differentiable_terms(built.model, built.guide, yt)["loss"].grad_fn

    nb = nbuild(spec, 64, (8, 8))
    params = init_params(nb, 64, jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)

    def norm(method):
        grads = jax.grad(lambda p: getattr(NumPyroELBO(), method)(
            key, p, nb.model, nb.guide, y)["loss"])(params)
        return sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree_util.tree_leaves(grads))

    assert norm("terms") == 0.0
    assert norm("differentiable_terms") > 0.0
