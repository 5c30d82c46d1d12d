"""The autoregressive (MADE) decoder: the masks give each pixel exactly y_<i and z, in both
backends; ancestral draws follow the density the decoder scores (checked by enumeration)."""

import itertools

import numpy as np
import pytest

from ppl_vae import autoregressive
from ppl_vae.spec import Spec, load_spec


def _reach(masks: list[np.ndarray]) -> np.ndarray:
    """(D_in, D_out) 0/1: which outputs any path through the masked layers can reach."""
    reach = masks[0] > 0
    for m in masks[1:]:
        reach = (reach.astype(int) @ (m > 0).astype(int)) > 0
    return reach


@pytest.mark.parametrize("data_dim, hidden, per_pixel",
                         [(10, (20, 15), 1), (10, (4,), 3), (64, (128, 256), 1), (1, (5,), 2),
                          (7, (), 2)])
def test_masks_are_autoregressive_and_complete(data_dim, hidden, per_pixel):
    masks = autoregressive.layer_masks(data_dim, hidden, per_pixel)
    assert [m.shape for m in masks] == list(zip([data_dim, *hidden],
                                                [*hidden, data_dim * per_pixel]))
    reach = _reach(masks)
    if hidden:
        reach = reach | (autoregressive.direct_mask(data_dim, per_pixel) > 0)
    pixel_of_output = np.repeat(np.arange(data_dim), per_pixel)
    # output (i, k) is reached from input j exactly when j < i: strictly earlier pixels, all of them
    expected = np.arange(data_dim)[:, None] < pixel_of_output[None, :]
    np.testing.assert_array_equal(reach, expected)


def test_hidden_degrees_span_every_earlier_pixel_even_when_narrow():
    degrees = autoregressive.hidden_degrees(100, 30)
    assert degrees.min() == 1 and degrees.max() <= 99 and len(np.unique(degrees)) == 30
    assert (np.diff(degrees) >= 0).all()


SPEC = ['decoder.kind="autoregressive"', "decoder.hidden=[12, 9]", "latent.dim=2"]


def _models(*overrides, data_dim=5):
    torch = pytest.importorskip("torch")
    pytest.importorskip("numpyro")
    from ppl_vae.numpyro import hooks as nmodel
    from ppl_vae.pyro import hooks as pmodel

    spec = load_spec(Spec(), [*SPEC, *overrides])
    torch.manual_seed(3)
    pm = pmodel.Model(spec, data_dim, None, "cpu")
    # larger weights than at initialisation, so that the conditionals really depend on y_<i
    params = {k: 3 * v for k, v in pm.export_params().items()}
    pm.import_params(params)
    return spec, pm, nmodel.Model(spec, data_dim, None, "cpu", params=params)


def test_each_pixel_depends_on_earlier_pixels_and_z_only_in_both_backends():
    import jax
    import jax.numpy as jnp
    import torch

    spec, pm, nm = _models('likelihood.kind="categorical"', "likelihood.categories=3",
                           data_dim=6)
    y = np.random.default_rng(0).integers(0, 3, 6) / 2.0
    z = np.array([0.3, -1.2])
    decoder = pm.modules["decoder"]
    jac_y = torch.autograd.functional.jacobian(
        lambda v: decoder(torch.as_tensor(z, dtype=torch.float32), v).sum(-1),
        torch.as_tensor(y, dtype=torch.float32)).numpy()  # (out pixel, in pixel)
    jac_z = torch.autograd.functional.jacobian(
        lambda v: decoder(v, torch.as_tensor(y, dtype=torch.float32)).sum(-1),
        torch.as_tensor(z, dtype=torch.float32)).numpy()

    def flax_out(zz, yy):
        return nm.built.decoder_module.apply({"params": nm.param_map["decoder$params"]}, zz,
                                             yy).sum(-1)

    jax_y = np.asarray(jax.jacobian(flax_out, 1)(jnp.asarray(z, jnp.float32),
                                                 jnp.asarray(y, jnp.float32)))
    for jac in (jac_y, jax_y):
        assert np.all(jac[np.triu_indices(6)] == 0)  # pixel i never sees y_i or later
        assert np.all(jac[np.tril_indices(6, -1)] != 0)  # and sees every earlier pixel
    np.testing.assert_allclose(jac_y, jax_y, atol=1e-5)
    assert np.all(jac_z != 0)  # every pixel sees z


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_ancestral_draws_follow_the_scored_density(backend):
    """Frequencies of 40 000 ancestral draws of y given one z against P̂(y|z) from the
    teacher-forced decoder, over all 2^5 images (a chi-square check)."""
    from ppl_vae.diagnostics import logsumexp

    spec, pm, nm = _models()
    model = pm if backend == "pyro" else nm
    z = np.tile([[0.5, -0.8]], (40000, 1))
    images = np.array(list(itertools.product([0, 1], repeat=5)), np.float32)
    log_p = _log_p_y_given_z(pm, images, z[0])
    assert abs(logsumexp(log_p)) < 1e-5  # a normalised distribution over the 32 images
    draws = _draws(model, backend, z)
    codes = draws @ (2 ** np.arange(4, -1, -1))
    counts = np.bincount(codes.astype(int), minlength=32)
    expected = len(z) * np.exp(log_p)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70, (chi2, counts, expected.round())  # 31 dof: p(chi2 > 70) ~ 1e-4


def _log_p_y_given_z(pm, images, z):
    import torch

    from ppl_vae.pyro.likelihood import likelihood_dist, observation

    y = torch.as_tensor(images)
    params = pm.modules["decoder"](torch.as_tensor(z, dtype=torch.float32).expand(len(y), -1), y)
    lik = likelihood_dist(pm.spec.likelihood, params)
    with torch.no_grad():
        return lik.log_prob(observation(pm.spec.likelihood, y)).double().numpy()


def _draws(model, backend, z):
    if backend == "pyro":
        import torch

        from ppl_vae.pyro.likelihood import ancestral_sample

        with torch.no_grad():
            torch.manual_seed(0)
            return ancestral_sample(model.spec.likelihood, model.modules["decoder"],
                                    model.tensor(z), 5)[0].numpy()
    import jax

    from ppl_vae.numpyro.likelihood import ancestral_sample

    def decode(zz, yy):
        return model.built.decoder_module.apply({"params": model.param_map["decoder$params"]},
                                                zz, yy)

    return np.asarray(ancestral_sample(model.spec.likelihood, decode, model.tensor(z), 5,
                                       jax.random.PRNGKey(0))[0])


def test_the_decoder_refuses_to_run_without_the_image():
    spec, pm, nm = _models()
    import torch

    with pytest.raises(ValueError, match="teacher forcing"):
        pm.modules["decoder"](torch.zeros(1, 2))


# ---- the inverse autoregressive flow posterior ----------------------------------------------
IAF = ['posterior.kind="iaf"', "posterior.flow_steps=3", "posterior.flow_hidden=[7]",
       "latent.dim=4", "encoder.hidden=[5]"]


def test_iaf_density_is_the_change_of_variables_and_the_inverse_inverts():
    """ln q(z) of a draw (kept from the forward pass) equals ln N(z0; loc, scale) − ln |det ∂z/∂z0|
    with the Jacobian from autograd, and equals ln q(z) of the same value scored through the
    inverse (d MADE passes per step), float64."""
    torch = pytest.importorskip("torch")
    from ppl_vae.pyro.hooks import Model

    spec = load_spec(Spec(), [*IAF, 'train.dtype="float64"'])
    torch.manual_seed(0)
    model = Model(spec, 6, None, "cpu")
    params = {k: 2 * v for k, v in model.export_params().items()}  # a flow far from identity
    model.import_params(params)
    y = model.tensor(np.random.default_rng(0).integers(0, 2, (3, 6)))
    with torch.no_grad():
        q, loc, scale = model.built.posterior_of("z", y, {}, None)
        z0 = loc + scale * torch.randn_like(loc)
        z = z0
        for step in q.transforms:
            z = step(z)
        cached = q.log_prob(z)
        fresh = q.log_prob(z.clone())  # not the tensor the flow made: scored by inversion
    torch.testing.assert_close(fresh, cached, rtol=1e-10, atol=1e-10)

    def flow(x0):
        for step in q.transforms:
            x0 = step(x0)
        return x0

    for n in range(3):
        jac = torch.autograd.functional.jacobian(lambda v, n=n: flow(
            torch.cat([z0[:n], v[None], z0[n + 1:]]))[n], z0[n])
        base = torch.distributions.Normal(loc[n], scale[n]).log_prob(z0[n]).sum()
        torch.testing.assert_close(cached[n], base - torch.linalg.slogdet(jac)[1],
                                   rtol=1e-10, atol=1e-10)
    assert not torch.allclose(z, z0, atol=1e-2)  # the flow does move the draws


def test_iaf_intermediates_and_inverse_agree_in_numpyro():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from numpyro import handlers

    from ppl_vae.numpyro.hooks import Model

    spec = load_spec(Spec(), IAF)
    model = Model(spec, 6, None, "cpu")
    y = jnp.asarray(np.random.default_rng(0).integers(0, 2, (3, 6)), jnp.float32)
    with handlers.substitute(data=model.param_map):
        q, _, _ = model.built.posterior_of("z", y, {}, None)
    z, intermediates = q.sample_with_intermediates(jax.random.PRNGKey(0))
    np.testing.assert_allclose(q.log_prob(z, intermediates), q.log_prob(z), rtol=1e-4,
                               atol=1e-4)
