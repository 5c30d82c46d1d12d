"""Trained from the same initial parameters on the digits, the two backends reach the same test
ELBO (within 1%): the backends differ only in their random draws."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("numpyro")

from ppl_vae.pyro.hooks import Model  # noqa: E402
from ppl_vae.runs import save_params  # noqa: E402
from ppl_vae.spec import load_spec  # noqa: E402
from ppl_vae.training import fit  # noqa: E402

STEPS = ["train.steps=600", "train.log_every=100", "train.eval_every=600",
         "train.checkpoint_every=600"]


@pytest.mark.parametrize("seed", [0, 1])
def test_same_init_same_test_elbo(tmp_path, seed):
    import torch

    spec = load_spec("vae_digits", [*STEPS, f"train.seed={seed}"])
    torch.manual_seed(100 + seed)
    init = tmp_path / "init.npz"
    save_params(init, Model(spec, 64, (8, 8), "cpu").export_params())
    elbos = {}
    for backend in ("pyro", "numpyro"):
        run = fit(spec, backend=backend, out_dir=tmp_path / backend, progress=False,
                  overrides=[f'train.init="{init}"'])
        elbos[backend] = run.final_test["elbo"]
    assert np.isfinite(list(elbos.values())).all()
    assert abs(elbos["pyro"] - elbos["numpyro"]) < 0.01 * abs(elbos["pyro"]), elbos
