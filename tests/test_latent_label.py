"""The M2 model (label.latent): trained from a spec by each backend through the CLI, evaluated
with the label summed out. The ELBO identities and the backends' parity are in
tests/pyro/test_elbo.py, tests/numpyro/test_elbo.py and tests/test_parity.py."""

import json

import numpy as np
import pytest

from ppl_vae.cli import main
from ppl_vae.runs import load_run

M2 = ["label.condition=true", "label.latent=true", "label.hidden=[32]", "data.labelled=100",
      'objective.aux=[{kind="supervised", site="label", weight=20.0}]', "latent.dim=4",
      "encoder.hidden=[32]", "decoder.hidden=[32]", "train.steps=300", "train.batch_size=64",
      "train.log_every=50", "train.eval_every=300", "train.checkpoint_every=300"]


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_m2_trains_and_evaluates_with_the_label_summed_out(tmp_path, capsys, backend):
    if backend == "numpyro":
        pytest.importorskip("numpyro")
    out = tmp_path / "m2"
    args = ["train", "vae_digits", "--backend", backend, "--out", str(out), "--no-progress"]
    assert main([*args, *(a for o in M2 for a in ("--set", o))]) == 0
    run = load_run(out)
    train, test = run.records("train"), run.final_test
    assert "rate/label" in train[-1] and train[-1]["objective"] < train[0]["objective"]
    assert 0.0 < test["rate/label"] <= test["rate"]
    assert test["aux"] == 0.0  # the test ELBO is that of the unlabelled model
    assert test["accuracy"] > 0.25  # 10 classes: chance is 0.1
    assert main(["eval", str(out), "--iwae-k", "30", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "classifier accuracy" in text and "rate of the label" in text
    report = json.loads((out / "report.json").read_text())
    # the IWAE bound sums the label out exactly: above the ELBO, and within a few nats of it
    assert report["elbo"] < report["log_likelihood"] < report["elbo"] + 5
    assert report["accuracy"] == pytest.approx(test["accuracy"])


def test_the_label_parts_are_the_elbo_summed_over_the_label():
    """log_density_parts of an M2 model: each column is an expectation under q(label|y), so
    their sum averages to the ELBO that eval_terms reports (same model, other draws)."""
    from ppl_vae.data import load_data
    from ppl_vae.pyro.hooks import Model
    from ppl_vae.spec import load_spec
    from ppl_vae.training import evaluation_data

    spec = load_spec("vae_digits", M2)
    model = Model(spec, 64, (8, 8), "cpu")
    x, labels = evaluation_data(spec, load_data(spec))
    x, labels = x[:200], labels[:200]
    parts = model.log_density_parts(x, 20, labels=labels)
    assert parts.shape == (200, 20, 1 + 2 * 2)  # y, then (p, q) for z and for the label
    elbo_draws = parts[..., 0] + (parts[..., 1::2] - parts[..., 2::2]).sum(-1)
    terms = model.eval_terms(x, labels, 1.0, 1.0)
    elbo = -(terms["rate"] + terms["nll"]) / len(x)
    assert elbo_draws.mean() == pytest.approx(elbo, abs=0.05 * abs(elbo))
    # the label's own columns: its exact KL, the same in every draw
    label_rate = parts[..., 4] - parts[..., 3]
    np.testing.assert_allclose(label_rate, np.broadcast_to(label_rate[:, :1], label_rate.shape),
                               rtol=1e-5, atol=1e-6)
    assert label_rate.mean() == pytest.approx(terms["rate/label"] / len(x), rel=1e-4)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_the_label_summed_iwae_converges_to_ln_p_by_quadrature(backend):
    """An independent answer: with one latent dimension, ln p̂(y) = ln Σ_c π_c ∫ N(z; 0, 1)
    p̂(y|c, z) dz by quadrature on a fine grid (the decoder evaluated directly). The IWAE bound
    with the label summed out must approach it from below, and the ELBO stay under it."""
    import torch

    from ppl_vae.data import load_data
    from ppl_vae.diagnostics import iwae_bound
    from ppl_vae.pyro.hooks import Model as PyroModel
    from ppl_vae.pyro.latents import one_hot
    from ppl_vae.pyro.likelihood import likelihood_dist
    from ppl_vae.spec import load_spec
    from ppl_vae.training import evaluation_data

    if backend == "numpyro":
        pytest.importorskip("numpyro")
        from ppl_vae.numpyro.hooks import Model as NumPyroModel
    spec = load_spec("vae_digits", [*(o for o in M2 if not o.startswith("latent.")),
                                    "latent.dim=1", "label.classes=10"])
    torch.manual_seed(3)
    reference = PyroModel(spec, 64, (8, 8), "cpu")
    model = reference if backend == "pyro" else NumPyroModel(
        spec, 64, (8, 8), "cpu", params=reference.export_params())
    x, _ = evaluation_data(spec, load_data(spec))
    x = x[:6]
    grid = torch.linspace(-9, 9, 6001, dtype=torch.float64)
    dz = float(grid[1] - grid[0])
    with torch.no_grad():
        decoder, lik = reference.modules["decoder"].double(), spec.likelihood
        y = torch.as_tensor(x, dtype=torch.float64)
        per_class = []
        for c in range(10):
            onehot = one_hot(torch.full((len(grid),), c), 10, torch.float64)
            params = decoder(torch.cat([grid[:, None], onehot], -1))      # (G, D)
            log_lik = likelihood_dist(lik, params[:, None]).log_prob(y)    # (G, N)
            log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid)[:, None]
            per_class.append((log_lik + log_prior).logsumexp(0) + np.log(dz) + np.log(0.1))
        exact = torch.stack(per_class).logsumexp(0).numpy()             # (N,)
        reference.modules["decoder"].float()
    bound = iwae_bound(model.log_weights(x, 3000, seed=1)).per_example
    terms = model.eval_terms(x, None, 1.0, 1.0)
    elbo = -(terms["rate"] + terms["nll"])
    assert elbo < exact.sum()
    np.testing.assert_array_less(bound, exact + 0.02)  # a bound (up to Monte Carlo noise)
    np.testing.assert_allclose(bound, exact, atol=0.1)
