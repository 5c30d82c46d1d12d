"""Training with the NumPyro backend: one compilation per run, exact resume, NaN stop."""

import functools

import numpy as np
import pytest

pytest.importorskip("numpyro")

import jax  # noqa: E402

from ppl_vae.numpyro import train as ntrain  # noqa: E402
from ppl_vae.training import TrainingDiverged, fit  # noqa: E402
from tests import aux_fns  # noqa: E402
from tests.pyro.test_train import NAN_GRADIENT, SCHEDULE, TINY, _close_records  # noqa: E402


def tiny_fit(tmp_path, name, extra=(), **kwargs):
    return fit("vae_digits", backend="numpyro", out_dir=tmp_path / name,
               overrides=[*TINY, *extra], progress=False, **kwargs)


#: A latent graph with per-site β and an IAF posterior: still one compilation.
GRAPH = ['latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"]}, '
         'posterior={kind="iaf", flow_steps=1, flow_hidden=[6]}}, {name="z2", dim=2, beta=3.0, '
         'posterior={inputs=["z1"]}}]', 'decoder.reads=["z1"]']


@pytest.mark.parametrize("graph", [False, True])
def test_a_run_with_a_changing_beta_compiles_once_per_window_length(tmp_path, monkeypatch,
                                                                    graph):
    made = []
    original = ntrain.Trainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(ntrain.Trainer, "__init__", spy)
    # 45 steps: four full windows of 10 and a short last one, β rising every step.
    overrides = ["train.steps=45", "train.eval_every=20", "train.checkpoint_every=20",
                 "objective.beta=2", 'objective.beta_schedule={kind="linear", warmup=40}']
    if graph:
        run = fit("vae_digits", backend="numpyro", out_dir=tmp_path / "c", progress=False,
                  overrides=[*(o for o in TINY if not o.startswith("latent.")), *GRAPH,
                             *overrides])
    else:
        run = tiny_fit(tmp_path, "c", overrides)
    (trainer,) = made
    assert trainer.compilations == 2  # windows of 10 steps and the last one of 5; β is traced
    # and XLA compiled each trace once: the first window's inputs are committed to the device
    # as every later window's are (an uncommitted key compiled the window again, 1.4 s)
    assert trainer._window._cache_size() == 2
    assert trainer.step_mode == "lax.scan, 10 steps per call"
    betas = [r["beta"] for r in run.records("train")]
    assert betas == pytest.approx([0.45, 0.95, 1.45, 1.95, 2.0])
    train = run.records("train")
    assert train[-1]["objective"] < train[0]["objective"]


def test_resume_equals_straight_run(tmp_path):
    """With a learning-rate schedule, update skipping and weight_init = "normal" (the plain
    path is the same code: the lr is a scan input either way): the lr of each window's last
    step is logged, and a run resumed at step 20 takes the straight run's lr (and is not
    initialised again)."""
    straight = tiny_fit(tmp_path, "straight", ["train.steps=40", *SCHEDULE])
    assert [r["lr"] for r in straight.records("train")] == pytest.approx(
        [1e-3, 0.5e-3, 0.5e-3, 0.25e-3])  # steps 9, 19, 29, 39 (0-based)
    assert [r["skipped"] for r in straight.records("train")] == [0, 0, 0, 0]
    tiny_fit(tmp_path, "resumed", ["train.steps=20", *SCHEDULE])
    resumed = tiny_fit(tmp_path, "resumed", ["train.steps=40", *SCHEDULE], resume=True)
    _close_records(resumed.metrics, straight.metrics)
    for k, v in straight.params.items():
        np.testing.assert_allclose(resumed.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_nan_stops_with_the_step(tmp_path):
    # The aux function runs once per trace: in a compiled scan that is once, so make it NaN
    # from the start: the first step is already non-finite.
    aux_fns.CALLS["n"] = 100
    with pytest.raises(TrainingDiverged, match="at step 1;"):
        tiny_fit(tmp_path, "nan", ["train.steps=20",
                                   'objective.aux=[{kind="tests.aux_fns:nan_after_25"}]'])


def test_a_numpyro_run_evaluates_with_pyro(tmp_path):
    pytest.importorskip("torch")
    run = tiny_fit(tmp_path, "x", ["train.steps=20"])
    x = np.random.default_rng(0).random((7, 64)).round()
    loc_n, scale_n = run.model("numpyro").encode(x)
    loc_p, scale_p = run.model("pyro").encode(x)
    np.testing.assert_allclose(loc_p, loc_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale_p, scale_n, rtol=1e-5, atol=1e-6)


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import jax

    from ppl_vae.backends import BackendError

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present; the error needs none")
    with pytest.raises(BackendError, match="sees no GPU.*--device"):
        tiny_fit(tmp_path, "cuda", ["train.steps=10"], device="cuda")


def test_float64_needs_jax_x64(tmp_path):
    import jax

    from ppl_vae.backends import BackendError

    if jax.config.jax_enable_x64:
        pytest.skip("64-bit mode is on in this process")
    with pytest.raises(BackendError, match="JAX_ENABLE_X64=1"):
        tiny_fit(tmp_path, "f64", ["train.steps=10", 'train.dtype="float64"'])


def test_conv_networks_on_a_cpu_take_one_step_per_call_with_the_same_result(tmp_path):
    """XLA runs convolutions inside loop and conditional bodies far slower on a CPU
    (jax-ml/jax#12868), so a conv spec steps once per compiled call; the steps are the same
    computation as in a scanned window."""
    from ppl_vae.data import load_data
    from ppl_vae.spec import load_spec

    spec = load_spec("vae_digits", ["data.source=dsprites", "data.size=40", "latent.dim=2",
                                    'encoder.kind="conv"', "encoder.channels=[2, 2, 2, 2]",
                                    "encoder.hidden=[4]", "decoder.hidden=[4]",
                                    'data.binarize="none"', "train.batch_size=4",
                                    "train.log_every=5", "train.eval_every=5",
                                    "train.checkpoint_every=5"])
    dataset = load_data(spec)
    single, scanned = (ntrain.Trainer(spec, dataset, "cpu") for _ in range(2))
    assert single.steps_per_call == 1
    scanned.steps_per_call = 5
    scalars = {"beta": np.linspace(0.5, 1.0, 5), "lr": np.full(5, 1e-3)}
    rows_single, rows_scanned = single.run_steps(scalars, 1.0), scanned.run_steps(scalars, 1.0)
    assert single.compilations == 1 and scanned.compilations == 1
    np.testing.assert_allclose(rows_single, rows_scanned, rtol=1e-4)
    for a, b in zip(*(jax.tree_util.tree_leaves(t.model.param_map) for t in (single, scanned))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    mlp = ntrain.Trainer(load_spec("vae_digits", ["train.log_every=10", "train.eval_every=10",
                                                  "train.checkpoint_every=10"]),
                         load_data(load_spec("vae_digits")), "cpu")
    assert mlp.steps_per_call == 10


@pytest.mark.parametrize("policy,hlo", [("highest", "HIGHEST"), ("high", "HIGH")])
def test_window_and_eval_are_compiled_in_the_spec_precision(policy, hlo):
    # JAX's default on NVIDIA GPUs is TF32 (DEFAULT) for float32 products; the spec decides.
    import re

    import jax.numpy as jnp

    from ppl_vae.data import load_data
    from ppl_vae.spec import load_spec

    spec = load_spec("vae_digits", [*TINY, f'train.matmul_precision="{policy}"'])
    trainer = ntrain.Trainer(spec, load_data(spec), "cpu")
    model = trainer.model
    window = trainer._window.lower(model.param_map, trainer.opt_state, trainer.key, trainer.x,
                                   trainer.labels, {"beta": jnp.ones(10), "lr": jnp.ones(10)},
                                   jnp.asarray(1.0)).as_text()
    evaluate = model._jit("eval/1", functools.partial(model._eval_batch, 1)).lower(
        model.param_map, trainer.key, trainer.x[:5], trainer.labels[:5], 1.0, 1.0).as_text()
    for text in (window, evaluate):
        found = set(re.findall(r"dot_general .*precision = \[(\w+), (\w+)\]", text))
        assert found == {(hlo, hlo)}


# ---- learning-rate schedules, update skipping -----------------------------------------------
def _trainer(extra):
    from ppl_vae.data import load_data
    from ppl_vae.spec import load_spec

    spec = load_spec("vae_digits", [*TINY, "train.steps=40", *extra])
    return spec, ntrain.Trainer(spec, load_data(spec), "cpu")


def _scalars(spec, trainer, n):
    from ppl_vae.schedules import step_scalars

    return step_scalars(spec, np.arange(trainer.step, trainer.step + n), trainer.n_train)


def _leaves(tree):
    return [np.array(a) for a in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_a_skipped_update_leaves_parameters_and_adam_state_bit_equal():
    """Every step of this trainer has a gradient of 1e30 per coordinate of the posterior's mean
    and a finite loss: each update is skipped and counted, and the parameters and Adam's state
    (moments and count, set to arbitrary values first) stay as they were, bit for bit."""
    import jax.numpy as jnp

    spec, trainer = _trainer(["train.skip_grad_norm=1000",
                              'objective.aux=[{kind="tests.pyro.test_train:huge_gradient"}]'])
    rng = np.random.default_rng(0)
    trainer.opt_state = jax.tree_util.tree_map(  # a state that real steps could have left
        lambda a: jnp.asarray(rng.random(a.shape) if a.dtype.kind == "f" else np.full(
            a.shape, 7), a.dtype), trainer.opt_state)
    before = _leaves((trainer.model.param_map, trainer.opt_state))
    rows = trainer.run_steps(_scalars(spec, trainer, 10), 1.0)
    assert rows[:, -1].tolist() == [1] * 10 and np.isfinite(rows[:, 0]).all()
    after = _leaves((trainer.model.param_map, trainer.opt_state))
    assert len(after) == len(before) and any(a.dtype.kind == "i" for a in after)  # the count
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


@pytest.mark.slow
def test_skipped_updates_are_counted_and_training_goes_on(tmp_path):
    """NaN gradients in every step (a finite loss): every update skipped and counted, and the
    run ends with its initial parameters (the Pyro twin shows the same run diverging without
    skipping)."""
    from ppl_vae.data import load_data

    NAN_GRADIENT.update(calls=0, at=None)
    run = tiny_fit(tmp_path, "skip", ["train.steps=20", "train.skip_grad_norm=1e4",
                                      'objective.aux=[{kind="tests.pyro.test_train:nan_gradient"}]'])
    assert [r["skipped"] for r in run.records("train")] == [10, 10]
    first = ntrain.Trainer(run.spec, load_data(run.spec), "cpu")  # a fresh run's start
    for k, v in first.model.export_params().items():
        np.testing.assert_array_equal(run.params[k], v, err_msg=k)


@pytest.mark.slow
def test_a_constant_schedule_is_todays_adam_to_the_bit_and_the_lr_is_traced():
    """optax.adam(1.0) times lr_t keeps optax.adam(train.lr)'s state (a checkpoint written
    before reads the same) and, at a constant lr, its updates to the bit; a window of other
    learning rates compiles nothing new."""
    import optax

    spec, scheduled = _trainer([])
    _, today = _trainer([])
    start = _leaves(today.model.param_map)
    today.optimizer = optax.chain(optax.adam(spec.train.lr))  # as it was built before
    assert (jax.tree_util.tree_structure(today.optimizer.init(today.model.param_map))
            == jax.tree_util.tree_structure(scheduled.opt_state))
    today.opt_state = jax.device_put(today.optimizer.init(today.model.param_map), today.device)
    scalars = _scalars(spec, scheduled, 10)
    scheduled.run_steps(scalars, 1.0)
    today.run_steps(scalars | {"lr": np.ones(10)}, 1.0)  # its own lr, times 1
    a, b = _leaves(scheduled.model.param_map), _leaves(today.model.param_map)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], start[0])
    scheduled.run_steps(scalars | {"lr": np.geomspace(1e-3, 1e-5, 10)}, 1.0)
    assert scheduled.compilations == 1
