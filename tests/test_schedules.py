"""The per-step scalars of `ppl_vae.schedules`: each learning-rate schedule against a hand
computation (and optax's schedules where it has the same one), Burda et al.'s stages, the keys
the trainers take, resuming, and the two backends' optimisers under a decaying schedule."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ppl_vae import schedules
from ppl_vae.spec import CapacitySpec, LRScheduleSpec, SpecError, load_spec


def lr_spec(n_steps=100, **schedule):
    table = ", ".join(f"{k}={v!r}" if not isinstance(v, str) else f'{k}="{v}"'
                      for k, v in schedule.items())
    return load_spec("vae_digits", [f"train.steps={n_steps}", "train.lr=0.01",
                                    f"train.lr_schedule={{{table}}}"])


def lrs(spec, steps, n_train=1000):
    return schedules.lr_schedule(spec.train, np.asarray(steps), n_train)


def test_constant():
    np.testing.assert_array_equal(lrs(lr_spec(kind="constant"), [0, 1, 50, 99]), 0.01)


def test_exponential_decays_continuously():
    spec = lr_spec(kind="exponential", decay=0.5, every=10)
    got = lrs(spec, [0, 5, 10, 25, 99])
    want = 0.01 * np.array([1.0, 0.5 ** 0.5, 0.5, 0.5 ** 2.5, 0.5 ** 9.9])
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_step_decays_in_stairs():
    spec = lr_spec(kind="step", decay=0.5, every=10)
    got = lrs(spec, [0, 9, 10, 19, 20, 99])
    np.testing.assert_allclose(got, 0.01 * np.array([1, 1, 0.5, 0.5, 0.25, 0.5 ** 9]),
                               rtol=1e-15)


def test_cosine_reaches_final_at_train_steps():
    spec = lr_spec(kind="cosine", final=0.1)
    got = lrs(spec, [0, 25, 50, 100])
    want = 0.01 * np.array([1.0, 0.1 + 0.9 * (1 + np.sqrt(0.5)) / 2, 0.55, 0.1])
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_the_decays_match_optax():
    """optax's own schedules, counted as optax counts (the value at update count t)."""
    optax = pytest.importorskip("optax")
    t = np.arange(100)
    cases = [({"kind": "exponential", "decay": 0.3, "every": 7},
              optax.exponential_decay(0.01, 7, 0.3)),
             ({"kind": "step", "decay": 0.3, "every": 7},
              optax.exponential_decay(0.01, 7, 0.3, staircase=True)),
             ({"kind": "cosine", "final": 0.2}, optax.cosine_decay_schedule(0.01, 100, 0.2))]
    for schedule, reference in cases:
        want = np.array([float(reference(i)) for i in t])
        np.testing.assert_allclose(lrs(lr_spec(**schedule), t), want, rtol=2e-6,
                                   err_msg=str(schedule))  # optax computes in float32


def test_burda_stages_by_hand():
    """Stage i lasts 3^i epochs at 10^(−i/7): with 2-step epochs, steps 0-1 (epoch 0) stage 0,
    2-7 (epochs 1-3) stage 1, 8-25 (epochs 4-12) stage 2, 26 on (epoch 13) stage 3."""
    spec = lr_spec(kind="burda", epoch_steps=2)
    steps = [0, 1, 2, 7, 8, 25, 26, 79]
    stages = [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_allclose(lrs(spec, steps), [0.01 * 10 ** (-i / 7) for i in stages],
                               rtol=1e-15)


def test_burda_eight_stages_are_3280_epochs():
    epochs = np.array([0, 1, 3, 4, 12, 13, 39, 40, 3279, 3280])
    assert schedules.burda_stage(epochs).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 7, 8]
    starts = np.cumsum([3 ** i for i in range(8)])  # the first epoch of stages 1..8
    assert starts[-1] == 3280
    assert schedules.burda_stage(starts).tolist() == list(range(1, 9))
    assert schedules.burda_stage(starts - 1).tolist() == list(range(0, 8))


def test_an_epoch_is_the_training_set_unless_given():
    spec = lr_spec(kind="burda")  # batch 128 (vae_digits)
    assert spec.train.batch_size == 128
    assert schedules.steps_per_epoch(spec.train, 1000) == 8  # ceil(1000 / 128)
    assert schedules.steps_per_epoch(spec.train, 1024) == 8
    assert schedules.steps_per_epoch(spec.train, 1025) == 9
    # epoch 0 is steps 0..7 at lr, epoch 1 starts stage 1
    got = lrs(spec, [7, 8], n_train=1000)
    np.testing.assert_allclose(got, [0.01, 0.01 * 10 ** (-1 / 7)], rtol=1e-15)
    assert schedules.steps_per_epoch(lr_spec(kind="burda", epoch_steps=3).train, 1000) == 3


def test_warm_up_multiplies_any_schedule_from_zero():
    spec = lr_spec(kind="step", decay=0.5, every=4, warmup=8)
    got = lrs(spec, [0, 2, 4, 6, 8, 9])
    want = 0.01 * np.array([0.0, 0.25 * 1, 0.5 * 0.5, 0.75 * 0.5, 1.0 * 0.25, 0.25])
    np.testing.assert_allclose(got, want, rtol=1e-15)
    flat = lrs(lr_spec(kind="constant", warmup=10), [0, 5, 10, 50])
    np.testing.assert_allclose(flat, [0.0, 0.005, 0.01, 0.01], rtol=1e-15)


def test_an_unknown_kind_in_a_hand_built_spec_is_one_line():
    with pytest.raises(ValueError, match="constant, exponential, step, cosine, burda"):
        schedules.lr_factor(LRScheduleSpec(kind="linear"), np.arange(3), 10, 1)


def test_a_warm_up_past_the_run_is_refused_by_the_spec():
    with pytest.raises(SpecError, match="train.lr_schedule.warmup"):
        lr_spec(n_steps=100, kind="cosine", warmup=100)


# ---- the scalars of a step ----------------------------------------------------------------------
def test_step_scalars_keys_and_values():
    spec = load_spec("vae_digits", [
        "train.steps=100", "objective.beta=2", 'objective.beta_schedule={kind="linear", warmup=10}',
        'train.lr_schedule={kind="step", decay=0.5, every=50}',
        "latent.capacity={max=5.0, steps=20, weight=100.0}"])
    assert schedules.scalar_keys(spec) == ("beta", "lr", "capacity/z")
    out = schedules.step_scalars(spec, np.array([0, 5, 10, 60]), 1000)
    assert list(out) == ["beta", "lr", "capacity/z"]
    np.testing.assert_allclose(out["beta"], [0.0, 1.0, 2.0, 2.0])  # ramp from start = 0
    np.testing.assert_allclose(out["lr"], 1e-3 * np.array([1, 1, 1, 0.5]))
    np.testing.assert_allclose(out["capacity/z"], [0.0, 1.25, 2.5, 5.0])  # 5 · min(1, t / 20)
    assert all(v.dtype == np.float64 and v.shape == (4,) for v in out.values())


def test_capacity_sites_of_a_graph():
    spec = load_spec("vae_digits", [
        'latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"]}, '
        'capacity={max=2.0, steps=10}}, {name="z2", dim=2, posterior={inputs=["z1"]}}]',
        'decoder.reads=["z1"]'])
    assert schedules.capacity_sites(spec) == ("z1",)
    assert schedules.scalar_keys(spec) == ("beta", "lr", "capacity/z1")
    assert schedules.elbo_options(spec) == {"capacity_weight": {"z1": 1000.0}}


def test_elbo_options_name_only_what_a_spec_uses():
    assert schedules.elbo_options(load_spec("vae_digits")) == {}
    spec = load_spec("vae_digits", ["latent.free_bits=0.25"])
    assert schedules.elbo_options(spec) == {"free_bits": {"z": 0.25}}
    spec = load_spec("vae_digits", ['objective.bound="iwae"', 'objective.gradient="dreg"',
                                    "objective.num_particles=5"])
    assert schedules.elbo_options(spec) == {"bound": "iwae", "gradient": "dreg"}


def test_run_steps_scalars_are_checked():
    spec = load_spec("vae_digits", ["latent.capacity={max=5.0, steps=20}", "train.steps=40"])
    good = schedules.step_scalars(spec, np.arange(3), 100)
    assert schedules.check_scalars(spec, good) == 3
    with pytest.raises(ValueError, match=r"take \['beta', 'lr', 'capacity/z'\].*step_scalars"):
        schedules.check_scalars(spec, {"beta": np.ones(3), "lr": np.ones(3)})
    with pytest.raises(ValueError, match="different lengths"):
        schedules.check_scalars(spec, good | {"lr": np.ones(2)})


@pytest.mark.parametrize("schedule", [
    'train.lr_schedule={kind="burda", warmup=7}',
    'train.lr_schedule={kind="cosine", final=0.05, warmup=3}',
    'train.lr_schedule={kind="exponential", decay=0.2, every=9}',
])
def test_resuming_at_step_k_gives_the_straight_runs_scalars(schedule):
    spec = load_spec("vae_digits", ["train.steps=200", schedule,
                                    'objective.beta_schedule={kind="cyclical", warmup=10, '
                                    'period=40}', "latent.capacity={max=3.0, steps=150}"])
    straight = schedules.step_scalars(spec, np.arange(200), 640)
    for k in (1, 37, 150):
        resumed = schedules.step_scalars(spec, np.arange(k, 200), 640)
        for key, values in straight.items():
            np.testing.assert_array_equal(resumed[key], values[k:], err_msg=f"{key} at {k}")


def test_capacity_of_a_hand_built_site():
    from ppl_vae.objective import capacity_schedule

    np.testing.assert_allclose(capacity_schedule(CapacitySpec(max=4.0, steps=8), np.arange(10)),
                               [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4])


# ---- the two backends' optimisers under a decaying schedule -------------------------------------
def optimise_both(n_steps: int, dtype: str) -> dict:
    """Both backends' trainers from the same initial parameters (weight_init = "normal") run
    `n_steps` steps on one deterministic objective of their parameters (the ELBO's draws and
    minibatches differ between the frameworks; this isolates the update: Adam, the lr schedule,
    clipping and skipping): loss = B · Σ_w (w²/2 + sin(7w)/10) over every parameter element,
    which does not depend on the layout. Returns the largest relative difference of the
    parameters, their largest change and the rows' skipped column."""
    import jax
    import jax.numpy as jnp
    import torch

    from ppl_vae.data import load_data
    from ppl_vae.numpyro.train import Trainer as NumPyroTrainer
    from ppl_vae.pyro.train import Trainer as PyroTrainer

    spec = load_spec("vae_digits", [
        "data.limit=64", "encoder.hidden=[6]", "decoder.hidden=[5]", "latent.dim=2",
        "train.batch_size=8", f"train.steps={n_steps}", f"train.log_every={n_steps}",
        f"train.eval_every={n_steps}", f"train.checkpoint_every={n_steps}", "train.lr=0.05",
        'train.lr_schedule={kind="exponential", decay=0.1, every=10, warmup=3}',
        'train.weight_init="normal"', "train.weight_init_std=0.5", "train.clip_norm=30",
        "train.skip_grad_norm=1e6", f'train.dtype="{dtype}"'])
    data = load_data(spec)
    batch = spec.train.batch_size

    def torch_loss(params):
        total = sum((0.5 * p ** 2 + 0.1 * torch.sin(7 * p)).sum() for p in params)
        zero = total * 0
        return {"loss": batch * total, "rate": zero, "distortion": zero, "aux": zero}

    class Deterministic:  # stands in for the NumPyro ScaledELBO
        def with_weights(self, *args, **kwargs):
            return self

        def differentiable_terms(self, key, params, *args):
            leaves = jax.tree_util.tree_leaves(params)
            total = sum(jnp.sum(0.5 * p ** 2 + 0.1 * jnp.sin(7 * p)) for p in leaves)
            return {"loss": batch * total, "rate": total * 0, "distortion": total * 0,
                    "aux": total * 0}

    pyro_t = PyroTrainer(spec, data, "cpu")
    pyro_t._terms = lambda y, labels: torch_loss(pyro_t.params)
    numpyro_t = NumPyroTrainer(spec, data, "cpu")
    numpyro_t.elbo = Deterministic()
    start = pyro_t.model.export_params()
    first = numpyro_t.model.export_params()
    same_start = all(np.array_equal(first[k], v) for k, v in start.items())
    scalars = schedules.step_scalars(spec, np.arange(n_steps), len(data.x_train))
    rows = [t.run_steps(scalars, 1.0) for t in (pyro_t, numpyro_t)]
    a, b = pyro_t.model.export_params(), numpyro_t.model.export_params()
    diff = max(float(np.max(np.abs(a[k] - b[k]) / (np.abs(a[k]) + 1e-3))) for k in a)
    moved = max(float(np.max(np.abs(a[k] - start[k]))) for k in a)
    return {"same_start": same_start, "diff": diff, "moved": moved,
            "skipped": [r[:, -1].tolist() for r in rows], "lr_last": float(scalars["lr"][-1])}


@pytest.mark.slow
def test_both_backends_optimise_alike_under_a_decaying_schedule_float64():
    """In float64 (JAX's 64-bit mode is process-wide: a child process)."""
    pytest.importorskip("torch")
    pytest.importorskip("numpyro")
    code = ("import json, tests.test_schedules as t; "
            "print(json.dumps(t.optimise_both(25, 'float64')))")
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["same_start"]
    assert out["moved"] > 0.05  # the steps did something
    assert out["lr_last"] < 0.05 * 0.1 ** 2  # and the schedule decayed it 100-fold
    assert out["diff"] < 1e-10, out
    assert out["skipped"] == [[0.0] * 25, [0.0] * 25]
