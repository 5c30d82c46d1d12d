"""Run folders written before the one generative program (`ppl_vae.program`, issue 21) still
load and evaluate to the numbers they gave then.

`tests/data/old_runs/` holds three small run folders trained and evaluated by the code at
commit 3c80960 (before the program was written once), without their checkpoints:

* ``one_site``: a mixture prior and a full-covariance posterior (Pyro);
* ``two_layer``: z2 → z1 → y with an IAF posterior on z1, bottom-up inference (NumPyro);
* ``m2``: a latent label summed out, a learned class prior and the α-term (Pyro).

``report_<backend>.json`` is what ``ppl-vae eval RUN --backend <backend> --iwae-k 20`` wrote
then; each is recomputed here and must agree to float precision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.cli import main
from ppl_vae.runs import load_run

OLD_RUNS = Path(__file__).parent / "data" / "old_runs"
KEYS = ("elbo", "rate", "nll_distortion", "objective", "log_likelihood")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
@pytest.mark.parametrize("run", ["one_site", "two_layer", "m2"])
def test_an_old_run_evaluates_to_the_numbers_it_gave(run, backend, tmp_path):
    folder = tmp_path / run
    shutil.copytree(OLD_RUNS / run, folder)
    before = json.loads((folder / f"report_{backend}.json").read_text())
    assert main(["eval", str(folder), "--backend", backend, "--iwae-k", "20",
                 "--no-progress"]) == 0
    after = json.loads((folder / "report.json").read_text())
    for key in KEYS:
        assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-9), key
    for site, report in before["sites"].items():
        assert after["sites"][site]["rate"] == pytest.approx(report["rate"], rel=1e-6,
                                                             abs=1e-9), site


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_old_parameters_load_unchanged_in_either_backend(backend):
    for run in ("one_site", "two_layer", "m2"):
        loaded = load_run(OLD_RUNS / run)
        exported = loaded.model(backend).export_params()
        with np.load(OLD_RUNS / run / "params.npz") as saved:
            assert set(exported) == set(saved.files), run
            for name in saved.files:
                np.testing.assert_array_equal(exported[name], saved[name], err_msg=name)
