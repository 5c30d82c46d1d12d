"""The one generative program (`ppl_vae.program`) and the plan it reads (`ppl_vae.graph.plan`):
what the program builds for the VampPrior and the ladder posterior, checked against their
definitions (Tomczak & Welling 2018; Sønderby et al. 2016) in both backends. (That the two
backends agree term by term for every kind is tests/test_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from ppl_vae import graph
from ppl_vae.spec import Spec, load_spec

LADDER = ['latents=[{name="z2", dim=2, posterior={hidden=[4]}}, {name="z1", dim=3, '
          'prior={kind="conditional", parents=["z2"], hidden=[5]}, posterior={kind="ladder", '
          'hidden=[4]}}]', 'decoder.reads=["z1"]', "encoder.hidden=[6]", "decoder.hidden=[6]"]
VAMP = ['prior.kind="vamp"', "prior.components=4", "latent.dim=3", "encoder.hidden=[6]",
        "decoder.hidden=[6]"]


def test_a_ladder_guide_runs_top_down_with_a_valid_closed_form_rate():
    spec = load_spec(Spec(), LADDER)
    plan = graph.plan(spec, 64)
    assert plan.guide_order == ("z2", "z1") == plan.model_order
    # z1's prior reads z2, drawn by the guide before z1: the KL at that draw is the rate
    assert plan.site("z1").closed_form and plan.site("z2").closed_form
    # the same prior graph inferred bottom-up (Burda et al.): q(z2 | z1) is drawn after z1,
    # so z1's KL at the drawn z2 is biased and its rate stays Monte Carlo
    bottom_up = load_spec(Spec(), [
        LADDER[0].replace('posterior={hidden=[4]}', 'posterior={inputs=["z1"], hidden=[4]}')
        .replace('kind="ladder", ', ''), *LADDER[1:]])
    plan = graph.plan(bottom_up, 64)
    assert plan.guide_order == ("z1", "z2") and not plan.site("z1").closed_form


def _pyro(spec):
    import torch

    from ppl_vae.pyro.hooks import Model

    torch.manual_seed(0)
    return Model(spec, 64, None, "cpu")


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_the_ladder_posterior_is_the_precision_weighted_merge(backend):
    """q(z1 | y, z2) ∝ N(μ_bu, σ_bu²) · p̂(z1 | z2): mean and variance from the precisions."""
    spec = load_spec(Spec(), LADDER)
    y = np.random.default_rng(0).integers(0, 2, (5, 64)).astype(np.float32)
    z2 = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    model = _pyro(spec)
    if backend == "numpyro":
        from ppl_vae.numpyro.hooks import Model

        model = Model(spec, 64, None, "cpu", params=model.export_params())
    q, (loc_bu, scale_bu), (loc_p, scale_p) = _ladder_parts(model, backend, y, z2)
    precision = scale_bu ** -2 + scale_p ** -2
    np.testing.assert_allclose(q[1], precision ** -0.5, rtol=1e-5)
    np.testing.assert_allclose(q[0], (loc_bu * scale_bu ** -2 + loc_p * scale_p ** -2)
                               / precision, rtol=1e-5, atol=1e-6)
    assert np.all(q[1] < np.minimum(scale_bu, scale_p))  # a product is sharper than each


def _ladder_parts(model, backend, y, z2):
    """((loc, scale) of q(z1|·), the bottom-up (loc, scale), the prior's (loc, scale)) as
    NumPy arrays, from the program's pieces."""
    built = model.built
    if backend == "pyro":
        import torch

        yt, values = torch.as_tensor(y), {"z2": torch.as_tensor(z2)}
        with torch.no_grad():
            q, loc, scale = built.posterior_of("z1", yt, values, None)
            features = built.data_features(yt)
            bu = built.P.network("encoder_z1")(None, features)[:2]
            prior = built.prior_of("z1", values, None)
        to = lambda t: t.numpy()  # noqa: E731
        return ((to(loc), to(scale)), tuple(map(to, bu)),
                (to(prior.base_dist.loc), to(prior.base_dist.scale)))
    import jax.numpy as jnp
    from numpyro import handlers

    def parts():
        values = {"z2": jnp.asarray(z2)}
        q, loc, scale = built.posterior_of("z1", jnp.asarray(y), values, None)
        bu = built.P.network("encoder_z1")(None, built.data_features(jnp.asarray(y)))[:2]
        prior = built.prior_of("z1", values, None)
        return (loc, scale), bu, (prior.base_dist.loc, prior.base_dist.scale)

    with handlers.substitute(data=model.param_map):
        out = parts()
    return tuple(tuple(np.asarray(a) for a in pair) for pair in out)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_the_vamp_prior_is_the_posterior_mixture_at_the_pseudo_inputs(backend):
    """ln p̂(z) = ln (1/K) Σ_k q(z | u_k), computed here from the encoder's own outputs."""
    spec = load_spec(Spec(), VAMP)
    model = _pyro(spec)
    params = model.export_params()
    pseudo = params["prior.pseudo_inputs"]
    assert pseudo.shape == (4, 64)
    z = np.random.default_rng(2).normal(size=(7, 3))
    if backend == "numpyro":
        from ppl_vae.numpyro.hooks import Model

        model = Model(spec, 64, None, "cpu", params=params)
    locs, stds = model.encode(pseudo)  # (K, d): q(z | u_k) is N(loc_k, diag std_k²)
    log_q = (-0.5 * ((z[:, None] - locs) / stds) ** 2 - np.log(stds)
             - 0.5 * np.log(2 * np.pi)).sum(-1)  # (7, K)
    expected = np.logaddexp.reduce(log_q, axis=1) - np.log(4)
    np.testing.assert_allclose(_prior_log_prob(model, backend, z), expected, rtol=1e-5)


def _prior_log_prob(model, backend, z):
    if backend == "pyro":
        import torch

        with torch.no_grad():
            prior = model.built.prior_of("z", {}, None)
            return prior.log_prob(torch.as_tensor(z, dtype=torch.float32)).numpy()
    import jax.numpy as jnp
    from numpyro import handlers

    with handlers.substitute(data=model.param_map):
        prior = model.built.prior_of("z", {}, None)
        return np.asarray(prior.log_prob(jnp.asarray(z, jnp.float32)))
