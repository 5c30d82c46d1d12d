"""What only a CUDA GPU can show: the Pyro backend's CUDA-graph steps (equal to eager steps,
exact resume, NaN stop, fallback when a step cannot be captured), and the NumPyro backend's
convolutions inside the scan. Skipped, with the reason, where PyTorch or JAX sees no GPU;
`benchmarks/gpu_check.sh` runs them on one."""

import numpy as np
import pytest
import torch

from ppl_vae.training import TrainingDiverged, fit
from tests.pyro.test_train import TINY, _close_records

CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (PyTorch sees none); run on one by "
                                 "benchmarks/gpu_check.sh")


def cuda_fit(tmp_path, name, extra=(), backend="pyro", **kwargs):
    return fit("vae_digits", backend=backend, device="cuda", out_dir=tmp_path / name,
               overrides=[*TINY, *extra], progress=False, **kwargs)


@CUDA
def test_graphed_steps_train_like_eager_steps(tmp_path):
    graphed = cuda_fit(tmp_path, "graphed", ["train.steps=200"])
    eager = cuda_fit(tmp_path, "eager", ["train.steps=200", 'train.cuda_graphs="off"'])
    assert graphed.info["step_mode"] == "cuda graph"
    assert eager.info["step_mode"] == "eager (train.cuda_graphs = off)"
    # same random stream, same kernels: the two runs agree to float32 rounding
    a, b = graphed.final_test, eager.final_test
    assert a["elbo"] == pytest.approx(b["elbo"], rel=1e-3)
    assert a["elbo"] < graphed.records("test")[0]["elbo"] + 50


@CUDA
def test_graphed_resume_equals_straight_run(tmp_path):
    schedule = 'objective.beta_schedule={kind="linear", warmup=30}'
    straight = cuda_fit(tmp_path, "straight", ["train.steps=40", schedule])
    cuda_fit(tmp_path, "resumed", ["train.steps=20", schedule])
    resumed = cuda_fit(tmp_path, "resumed", ["train.steps=40", schedule], resume=True)
    assert resumed.info["step_mode"] == "cuda graph"
    _close_records(resumed.metrics, straight.metrics)
    for k, v in straight.params.items():
        np.testing.assert_allclose(resumed.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


@CUDA
@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's validation, on the first step
def test_graphed_steps_stop_on_nan(tmp_path):
    with pytest.raises(TrainingDiverged, match="at step 1;"):
        cuda_fit(tmp_path, "nan", ["train.steps=20",
                                   'objective.aux=[{kind="tests.aux_fns:nan_on_device"}]'])


@CUDA
def test_a_step_that_reads_the_host_falls_back_to_eager(tmp_path, capfd):
    # found by the last warm-up step (run in torch's sync-debug "error" mode) before any capture
    run = cuda_fit(tmp_path, "fallback", ["train.steps=20",
                                          'objective.aux=[{kind="tests.aux_fns:reads_host"}]'])
    assert run.info["step_mode"].startswith("eager (CUDA graph capture failed")
    assert "could not capture the training step in a CUDA graph" in capfd.readouterr().err
    assert np.isfinite(run.final_test["elbo"])
    # and the process can still capture: the next run is graphed
    assert cuda_fit(tmp_path, "after", ["train.steps=20"]).info["step_mode"] == "cuda graph"


@CUDA
def test_numpyro_convolutions_run_inside_the_scan_on_a_gpu():
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU (install jax[cuda12])")
    from ppl_vae.data import Dataset
    from ppl_vae.numpyro.train import Trainer
    from ppl_vae.schedules import step_scalars
    from ppl_vae.spec import load_spec

    spec = load_spec("beta_vae_dsprites", ["train.log_every=10", "train.batch_size=16"])
    x = np.random.default_rng(0).random((64, 64 * 64)).round().astype(np.float32)
    data = Dataset(x, x[:8], np.full(64, -1), np.full(8, -1), (64, 64), "random")
    trainer = Trainer(spec, data, "cuda")
    assert trainer.steps_per_call == 10
    values = trainer.run_steps(step_scalars(spec, np.arange(10), trainer.n_train), 1.0)
    assert values.shape[0] == 10 and np.isfinite(values).all()
