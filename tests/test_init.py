"""`ppl_vae.init`: Pyro's ss_vae_M2 initialisation (hidden layers N(0, σ²), output layers
PyTorch's default rule) drawn by NumPy, the VampPrior's pseudo-inputs from training images, and
both backends starting from the same numbers."""

import numpy as np
import pytest

from ppl_vae import init
from ppl_vae.spec import load_spec

NORMAL = ['train.weight_init="normal"']


def fake_params():
    """A canonical parameter dict with every kind of name the networks make (float32)."""
    shapes = {
        "encoder.body.layers.0.weight": (300, 64), "encoder.body.layers.0.bias": (300,),
        "encoder.convs.0.weight": (8, 1, 4, 4), "encoder.convs.0.bias": (8,),
        "encoder.loc.weight": (4, 300), "encoder.loc.bias": (4,),
        "encoder.scale.weight": (4, 300), "encoder.scale.bias": (4,),
        "encoder.flow.0.layers.0.weight": (20, 4), "encoder.flow.0.layers.0.bias": (20,),
        "encoder.flow.0.layers.1.weight": (8, 20), "encoder.flow.0.layers.1.bias": (8,),
        "encoder.flow.0.context.0.weight": (20, 300), "encoder.flow.0.context.1.weight": (8, 300),
        "encoder.flow.0.direct.weight": (8, 4),
        "decoder.project.weight": (48, 5), "decoder.project.bias": (48,),
        "decoder.deconvs.0.weight": (3, 2, 4, 4), "decoder.deconvs.0.bias": (2,),
        "decoder.deconvs.1.weight": (2, 1, 4, 4), "decoder.deconvs.1.bias": (1,),
        "prior.pseudo_inputs": (6, 64), "prior_z2.loc": (4,), "prior_z2.log_scale": (4,),
        "likelihood.log_scale": (64,),
    }
    rng = np.random.default_rng(5)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def images(n=50, d=64):
    return np.random.default_rng(1).random((n, d)).astype(np.float32)


def test_hidden_and_output_layers():
    p = fake_params()
    hidden = {layer for layer in init.layers(p) if init.is_hidden(layer, p)}
    assert hidden == {"encoder.body.layers.0", "encoder.convs.0", "encoder.flow.0.layers.0",
                      "encoder.flow.0.context.0", "decoder.project", "decoder.deconvs.0"}
    with pytest.raises(ValueError, match="'encoder.mystery'.*ppl_vae/init.py"):
        init.is_hidden("encoder.mystery", p | {"encoder.mystery.weight": np.zeros((2, 2))})


def test_fan_in_is_pytorchs():
    torch = pytest.importorskip("torch")
    from torch.nn.init import _calculate_fan_in_and_fan_out

    for shape in [(7, 3), (8, 1, 4, 4), (3, 2, 4, 4), (5, 9)]:
        assert init.fan_in(shape) == _calculate_fan_in_and_fan_out(torch.empty(shape))[0]


def test_normal_init_draws_hidden_layers_from_n0_sigma_and_outputs_by_pytorchs_rule():
    p = fake_params()
    spec = load_spec("vae_digits", [*NORMAL, "train.weight_init_std=0.01"])
    out = init.initial_params(spec, p, images())
    w, b = out["encoder.body.layers.0.weight"], out["encoder.body.layers.0.bias"]
    assert w.dtype == np.float32 and w.shape == (300, 64)
    assert abs(w.std() - 0.01) < 0.0005 and abs(w.mean()) < 0.0005  # 19200 draws
    assert abs(b.std() - 0.01) < 0.003 and b.std() > 0  # the example draws biases too
    for layer, fan in [("encoder.loc", 300), ("decoder.deconvs.1", 16),
                       ("encoder.flow.0.layers.1", 20)]:
        bound = 1 / np.sqrt(fan)
        w, bias = out[f"{layer}.weight"], out[f"{layer}.bias"]
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound, layer
        assert np.abs(bias).max() <= bound, layer
    assert np.abs(out["encoder.flow.0.direct.weight"]).max() <= 1 / 2  # fan-in 4
    for name in ("prior_z2.loc", "prior_z2.log_scale", "likelihood.log_scale"):
        assert out[name] is p[name]  # not layers: the backend's values
    assert out is not p and p["encoder.loc.weight"] is not out["encoder.loc.weight"]


def test_the_draws_are_a_function_of_the_seed_and_the_names():
    p = fake_params()
    spec = load_spec("vae_digits", NORMAL)
    a, b = (init.initial_params(spec, p, images()) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    shuffled = dict(reversed(list(p.items())))  # another backend's order of the same names
    c = init.initial_params(spec, shuffled, images())
    assert all(np.array_equal(a[k], c[k]) for k in a)
    other = init.initial_params(spec.replace(train=spec.train.__class__(
        **{**spec.train.__dict__, "seed": 1})), p, images())
    assert not np.array_equal(a["encoder.loc.weight"], other["encoder.loc.weight"])


def test_pseudo_inputs_are_distinct_training_images_whatever_the_weight_init():
    p = fake_params() | {"prior_z1.pseudo_inputs": np.zeros((4, 64), np.float64)}
    x = images()
    spec = load_spec("vae_digits")  # default weights: only the pseudo-inputs change
    out = init.initial_params(spec, p, x)
    for name, k in (("prior.pseudo_inputs", 6), ("prior_z1.pseudo_inputs", 4)):
        u = out[name]
        assert u.shape == (k, 64) and u.dtype == p[name].dtype
        rows = [int(np.flatnonzero((x == r).all(1))[0]) for r in u.astype(np.float32)]
        assert len(set(rows)) == k, name  # distinct images, each a row of x
    assert out["encoder.loc.weight"] is p["encoder.loc.weight"]
    normal = init.initial_params(load_spec("vae_digits", NORMAL), p, x)
    np.testing.assert_array_equal(normal["prior.pseudo_inputs"], out["prior.pseudo_inputs"])


def test_more_components_than_images_is_one_line():
    p = {"prior.pseudo_inputs": np.zeros((60, 64), np.float32)}
    with pytest.raises(ValueError, match="60 components but the training set has only 50"):
        init.initial_params(load_spec("vae_digits"), p, images())


def test_default_is_untouched():
    spec = load_spec("vae_digits")
    assert not init.needed(spec)
    assert init.needed(load_spec("vae_digits", NORMAL))


# ---- in the trainers --------------------------------------------------------------------------
TINY = ["data.limit=200", "encoder.hidden=[16]", "decoder.hidden=[12]", "latent.dim=3",
        "train.batch_size=16", "train.log_every=5", "train.eval_every=5",
        "train.checkpoint_every=5"]
VAMP = ['prior.kind="vamp"', "prior.components=7"]


def _trainers(extra):
    pytest.importorskip("torch")
    pytest.importorskip("numpyro")
    from ppl_vae.data import load_data
    from ppl_vae.numpyro.train import Trainer as NumPyroTrainer
    from ppl_vae.pyro.train import Trainer as PyroTrainer

    graph = any(o.startswith("latents") for o in extra)
    spec = load_spec("vae_digits", [*(o for o in TINY if not (graph and o.startswith("latent."))),
                                    *extra])
    data = load_data(spec)
    return spec, data, PyroTrainer(spec, data, "cpu"), NumPyroTrainer(spec, data, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[*NORMAL, *VAMP], VAMP, [
    *NORMAL, 'latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"], '
    'hidden=[4]}, posterior={kind="iaf", flow_steps=1, flow_hidden=[6]}}, '
    '{name="z2", dim=2, posterior={inputs=["z1"], hidden=[5]}}]', 'decoder.reads=["z1"]']],
    ids=["normal-vamp", "vamp", "normal-graph-iaf"])
def test_both_backends_start_from_the_same_parameters(extra):
    spec, data, pyro_t, numpyro_t = _trainers(extra)
    a, b = pyro_t.model.export_params(), numpyro_t.model.export_params()
    assert a.keys() == b.keys()
    # default weights are each framework's own draws; the pseudo-inputs are NumPy's anyway
    same = a if spec.train.weight_init == "normal" else ["prior.pseudo_inputs"]
    for k in same:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if "vamp" in " ".join(extra):
        u = a["prior.pseudo_inputs"]
        assert u.shape == (7, 64) and len({r.tobytes() for r in u}) == 7
        assert all((data.x_train == r).all(1).any() for r in u)  # training images


@pytest.mark.parametrize("backend", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])
def test_the_default_init_is_the_backends_own(backend):
    """weight_init = "default": the parameters a bare Model builds from the seed, untouched
    (and a default run's random stream after them)."""
    from ppl_vae.backends import backend_module
    from ppl_vae.data import load_data

    pytest.importorskip("torch" if backend == "pyro" else "numpyro")
    spec = load_spec("vae_digits", TINY)
    data = load_data(spec)
    trainer = backend_module(backend, "train").Trainer(spec, data, "cpu")
    if backend == "pyro":
        import torch

        from ppl_vae.pyro.hooks import Model

        torch.manual_seed(spec.train.seed)
        bare = Model(spec, data.dim, data.image_shape, "cpu")
    else:
        import jax

        from ppl_vae.numpyro.hooks import Model

        init_key, _ = jax.random.split(jax.random.PRNGKey(spec.train.seed))
        bare = Model(spec, data.dim, data.image_shape, "cpu", rng_key=init_key)
    want, got = bare.export_params(), trainer.model.export_params()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    hidden = got["encoder.body.layers.0.weight"]
    assert hidden.std() > 0.05  # not N(0, 0.001²): the framework's default scale


def test_normal_init_changes_only_the_weights_not_the_random_stream():
    """A pyro run with weight_init = "normal" draws the same minibatches as a default one:
    NumPy's draws leave torch's generator where the default build left it."""
    pytest.importorskip("torch")
    import torch

    from ppl_vae.data import load_data
    from ppl_vae.pyro.train import Trainer

    spec = load_spec("vae_digits", TINY)
    states = []
    for extra in ([], NORMAL):
        s = load_spec("vae_digits", [*TINY, *extra])
        Trainer(s, load_data(spec), "cpu")
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
