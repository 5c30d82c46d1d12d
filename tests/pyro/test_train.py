"""Training with the Pyro backend: exact resume, NaN stop, Ctrl-C, devices, run folders."""

import numpy as np
import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ppl_vae import runs
from ppl_vae.backends import BackendError
from ppl_vae.runs import RunError, load_run
from ppl_vae.training import TrainingDiverged, TrainingInterrupted, fit
from tests import aux_fns

TINY = ["data.limit=300", "encoder.hidden=[32]", "decoder.hidden=[32]", "latent.dim=4",
        "train.batch_size=32", "train.log_every=10", "train.eval_every=20",
        "train.checkpoint_every=20", "train.eval_batch_size=100"]


def tiny_fit(tmp_path, name, extra=(), **kwargs):
    return fit("vae_digits", out_dir=tmp_path / name, overrides=[*TINY, *extra],
               progress=False, **kwargs)


def test_training_lowers_the_loss_and_writes_the_run_folder(tmp_path):
    run = tiny_fit(tmp_path, "a", ["train.steps=200", "train.eval_every=100",
                                   "train.checkpoint_every=100"])
    train = run.records("train")
    assert [r["step"] for r in train] == list(range(10, 201, 10))
    assert train[-1]["objective"] < train[0]["objective"] - 5
    test = run.records("test")
    assert [r["step"] for r in test] == [100, 200]
    last = test[-1]
    assert last["elbo"] == pytest.approx(-(last["rate"] + last["nll"]))
    assert sum(last[f"rate/dim_{i}"] for i in range(4)) == pytest.approx(last["rate"], rel=1e-4)
    for f in ("spec.toml", "run.json", "metrics.jsonl", "params.npz", "checkpoint.pt"):
        assert (run.path / f).exists(), f
    assert run.info["step"] == 200 and run.info["backend"] == "pyro"
    assert {"encoder.loc.weight", "decoder.out.bias"} <= set(run.params)


def test_resume_equals_straight_run(tmp_path):
    straight = tiny_fit(tmp_path, "straight", ["train.steps=40"])
    first = tiny_fit(tmp_path, "resumed", ["train.steps=20"])
    assert first.info["step"] == 20
    resumed = tiny_fit(tmp_path, "resumed", ["train.steps=40"], resume=True)
    _close_records(resumed.metrics, straight.metrics)
    for k, v in straight.params.items():
        np.testing.assert_allclose(resumed.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def _close_records(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k == "split":
                assert ra[k] == rb[k]
            elif k != "seconds":
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-6), (ra["step"], k)
    return True


def test_two_builds_in_one_process_train_identically(tmp_path):
    a = tiny_fit(tmp_path, "a", ["train.steps=20"])
    b = tiny_fit(tmp_path, "b", ["train.steps=20"])
    _close_records(a.metrics, b.metrics)
    assert a.records("train")[-1]["objective"] < a.records("train")[0]["objective"]


def test_existing_run_folder_is_refused(tmp_path):
    tiny_fit(tmp_path, "a", ["train.steps=10", "train.eval_every=10",
                             "train.checkpoint_every=10"])
    with pytest.raises(RunError, match="already exists.*--resume.*--overwrite"):
        tiny_fit(tmp_path, "a", ["train.steps=10"])
    run = tiny_fit(tmp_path, "a", ["train.steps=10", "train.eval_every=10",
                                   "train.checkpoint_every=10"], overwrite=True)
    assert run.info["step"] == 10


def test_resume_refuses_another_spec(tmp_path):
    tiny_fit(tmp_path, "a", ["train.steps=20"])
    with pytest.raises(RunError, match="differs"):
        tiny_fit(tmp_path, "a", ["train.steps=40", "objective.beta=2"], resume=True)


# The aux functions of these two tests act on the host at each call (a counter, a signal); a
# CUDA graph replays the step without calling Python, so on a GPU they run eagerly.
EAGER = 'train.cuda_graphs="off"'


def test_nan_stops_with_the_step_and_last_finite_metrics(tmp_path):
    aux_fns.CALLS["n"] = 0
    with pytest.raises(TrainingDiverged) as err:
        tiny_fit(tmp_path, "nan", [EAGER, "train.steps=40", "train.eval_every=40",
                                   "train.checkpoint_every=20",
                                   'objective.aux=[{kind="tests.aux_fns:nan_after_25"}]'])
    msg = str(err.value)
    assert "at step 26" in msg and "(step 20)" in msg and "rate=" in msg
    assert "checkpoint (step 20)" in msg
    run_dir = tmp_path / "nan"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 20
    assert all(np.isfinite(v).all() for v in np.load(run_dir / "params.npz").values())


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    aux_fns.CALLS["n"] = 0
    extra = [EAGER, "train.steps=40", 'objective.aux=[{kind="tests.aux_fns:ctrl_c_at_15"}]']
    with pytest.raises(TrainingInterrupted) as err:
        tiny_fit(tmp_path, "int", extra)
    assert err.value.step == 20  # stops at the end of the window that saw Ctrl-C
    assert "--resume" in str(err.value)
    assert torch.load(tmp_path / "int" / "checkpoint.pt", weights_only=False)["step"] == 20
    run = tiny_fit(tmp_path, "int", extra, resume=True)
    assert run.info["step"] == 40 and [r["step"] for r in run.records("train")][-1] == 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present; the error needs none")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="sees no CUDA GPU.*--device cpu"):
        tiny_fit(tmp_path, "cuda", ["train.steps=10"], device="cuda")


@pytest.mark.parametrize("extra", [
    ['prior.kind="mixture"', "prior.components=3"],
    ['prior.kind="learned_normal"', 'objective.beta_schedule={kind="cyclical", warmup=5, '
                                    'period=10}'],
    ['data.binarize="none"', 'likelihood.kind="binomial"', "likelihood.total_count=16"],
    ['data.binarize="none"', 'likelihood.kind="categorical"', "likelihood.categories=17"],
    ['data.binarize="none"', 'likelihood.kind="gaussian"', 'likelihood.scale="learned"'],
    ['data.binarize="none"', 'likelihood.kind="gaussian"', 'objective.distortion="l1"',
     "objective.lam=10"],
    ['objective.aux=[{kind="supervised"}, {kind="infonce", weight=0.5}]',
     "objective.num_particles=2", "train.clip_norm=5"],
    ['train.dtype="float64"'],
])
def test_component_kinds_train(tmp_path, extra):
    run = tiny_fit(tmp_path, "k", ["train.steps=20", *extra])
    test = run.final_test
    assert np.isfinite([test["elbo"], test["rate"], test["distortion"]]).all()
    assert run.records("train")[-1]["objective"] < run.records("train")[0]["objective"]


def test_beta_schedule_is_logged(tmp_path):
    run = tiny_fit(tmp_path, "s", ["train.steps=40", "objective.beta=2",
                                   'objective.beta_schedule={kind="linear", warmup=20}'])
    betas = [r["beta"] for r in run.records("train")]
    assert betas == pytest.approx([0.9, 1.9, 2.0, 2.0])


def test_load_run_roundtrip(tmp_path):
    run = tiny_fit(tmp_path, "a", ["train.steps=20"])
    again = load_run(run.path)
    assert again.spec == run.spec and again.metrics == run.metrics
    model = again.model()
    x = np.random.default_rng(0).random((5, 64)).round()
    loc, scale = model.encode(x)
    assert loc.shape == (5, 4) and (scale > 0).all()


# ---- the step is capturable: it never reads a device value on the host -------------------------
class HostReads(TorchDispatchMode):
    """Records the operators that make the host wait for the device on a GPU: reading a value
    (``.item()``, ``bool(t)``, ``if t:``), a result whose shape depends on values, or a tensor
    made from Python data (``torch.tensor(3.0)``: ``lift_fresh``, on a GPU a copy from the host).
    A CUDA graph cannot capture them; on a CPU they are cheap, so this mode is how a CPU test
    finds them."""

    SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal",
               "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "allclose",
               "repeat_interleave", "lift_fresh", "lift_fresh_copy"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # Pyro's plates probe the default device with an empty torch.tensor(()): nothing to copy
        empty = name.startswith("lift_fresh") and args[0].numel() == 0
        if name in self.SYNCING and not empty:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def host_reads_of_a_step(tmp_path, extra):
    from ppl_vae.data import load_data
    from ppl_vae.objective import step_fields
    from ppl_vae.pyro.train import Trainer
    from ppl_vae.spec import load_spec

    graph = any(o.startswith("latents") for o in extra)
    spec = load_spec("vae_digits", [*(o for o in TINY if not (graph and o.startswith("latent."))),
                                    *extra])
    trainer = Trainer(spec, load_data(spec), "cpu")
    trainer._eager_step(validate=True)  # Adam's state exists, as after the warm-up steps
    trainer.optimizer.step = lambda: None  # capturable=True keeps Adam sync-free (CUDA only)
    trainer.optimizer.zero_grad(set_to_none=True)
    with pyro.validation_enabled(False), HostReads() as reads:
        row = trainer._step()
    assert row.shape == (len(step_fields(spec)),)  # the terms, and `skipped` where it skips
    return reads.seen


TWO_SITES = ['latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"]}, '
             'posterior={kind="iaf", flow_steps=2, flow_hidden=[8]}}, {name="z2", dim=2, '
             'beta=2.0, posterior={kind="full", inputs=["z1"]}}]', 'decoder.reads=["z1"]']


@pytest.mark.parametrize("extra", [
    [],
    ['prior.kind="mixture"', "prior.components=3", "objective.analytic_kl=false"],
    ['objective.aux=[{kind="supervised"}, {kind="infonce", weight=0.5}]',
     "objective.num_particles=2", "train.clip_norm=5"],
    ['data.binarize="none"', 'likelihood.kind="gaussian"', 'likelihood.scale="learned"'],
    ['data.binarize="none"', 'likelihood.kind="binomial"', "likelihood.total_count=16"],
    ['data.binarize="none"', 'likelihood.kind="categorical"', "likelihood.categories=17"],
    TWO_SITES,
    ['decoder.kind="autoregressive"'],
    ["label.condition=true", "label.latent=true", "data.labelled=100", "label.hidden=[8]",
     'objective.aux=[{kind="supervised", site="label", weight=5.0}]'],
    ["train.skip_grad_norm=100", "latent.capacity={max=5.0, steps=10}"],
    ["train.skip_grad_norm=100", "train.clip_norm=5"],
], ids=["vae", "mixture-mc", "aux-particles-clip", "gaussian", "binomial", "categorical",
        "graph-iaf-full", "made", "m2-enumerated-label", "skip-capacity", "skip-clip"])
def test_the_training_step_never_waits_for_the_device(tmp_path, extra):
    assert host_reads_of_a_step(tmp_path, extra) == []


def test_the_host_read_detector_sees_an_item_call(tmp_path):
    # the control: an aux function that reads a value on the host is seen (and on a GPU it
    # makes capture fail, and training falls back to eager steps)
    assert host_reads_of_a_step(tmp_path, ['objective.aux=[{kind="tests.aux_fns:reads_host"}]'])


def test_step_mode_and_precision_are_recorded(tmp_path):
    run = tiny_fit(tmp_path, "m", ["train.steps=10", 'train.matmul_precision="high"'],
                   device="cpu")
    assert run.info["step_mode"] == "eager" and run.info["matmul_precision"] == "high"


@pytest.mark.parametrize("policy,tf32", [("highest", False), ("high", True)])
def test_matmul_precision_sets_and_restores_the_tf32_switches(policy, tf32):
    from ppl_vae.pyro.precision import matmul_precision

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    with matmul_precision(policy):
        assert [f.allow_tf32 for f in flags] == [tf32, tf32]
    assert [f.allow_tf32 for f in flags] == before
    with pytest.raises(ValueError, match="highest"):
        with matmul_precision("medium"):
            pass


@pytest.mark.parametrize("setting,inside", [(0, 1), (2, 2)])
def test_training_and_evaluation_run_on_train_threads_and_restore(tmp_path, monkeypatch,
                                                                   setting, inside):
    """train.threads = 0 runs the steps and the evaluation on one PyTorch thread (PyTorch's own
    default, one per core, collapses under contention: benchmarks/bench_threads.py); a number
    asks for that many; the process's own setting is restored after each."""
    from ppl_vae.pyro import hooks
    from ppl_vae.pyro.train import Trainer

    seen = {"step": set(), "eval": set()}
    step, eval_terms = Trainer._step, hooks.Model.eval_terms

    def counting_step(self):
        seen["step"].add(torch.get_num_threads())
        return step(self)

    def counting_eval(self, *args, **kwargs):
        seen["eval"].add(torch.get_num_threads())
        return eval_terms.__wrapped__(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", counting_step)
    monkeypatch.setattr(hooks.Model, "eval_terms", hooks._inference(counting_eval))
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # whatever the process had: restored after each window
    try:
        tiny_fit(tmp_path, "t", ["train.steps=20", f"train.threads={setting}"], device="cpu")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == {"step": {inside}, "eval": {inside}}


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tmp_path):
    # A GPU run's Adam is capturable (its step counts live on the device); the flag travels in
    # the checkpoint, and a CPU resume must not inherit it (Adam refuses capturable on a CPU).
    straight = tiny_fit(tmp_path, "straight", ["train.steps=40"])
    tiny_fit(tmp_path, "resumed", ["train.steps=20"])
    path = tmp_path / "resumed" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True
    # written as the GPU run would have written it: the digest in run.json follows the file
    runs.write_recorded(path.parent, {path.name: lambda tmp: torch.save(state, tmp)},
                        runs.read_info(path.parent))
    resumed = tiny_fit(tmp_path, "resumed", ["train.steps=40"], resume=True)
    _close_records(resumed.metrics, straight.metrics)


def test_a_blow_up_short_of_nan_stops_and_keeps_the_good_checkpoint(tmp_path):
    """Issue 13: a loss that leaves the problem's scale without becoming NaN (here an aux term
    jumping to 1e9 after 25 steps) stops the run like NaN; the step-20 checkpoint stays."""
    aux_fns.CALLS["n"] = 0
    with pytest.raises(TrainingDiverged, match="blew up.*step 30.*checkpoint \\(step 20\\)"):
        tiny_fit(tmp_path, "b", [EAGER, "train.steps=60",
                                 'objective.aux=[{kind="tests.aux_fns:huge_after_25"}]'])
    assert load_run(tmp_path / "b").info["step"] == 20
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 20


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_a_learning_rate_of_ten_is_a_divergence_not_a_result(tmp_path, backend):
    """lr = 10 took the digits VAE from 45 nats to 1e8 within ten steps, and used to finish
    with exit 0 and a test ELBO of −1e7 (NumPyro) or −212 (Pyro, against −23)."""
    if backend == "numpyro":
        pytest.importorskip("numpyro")
    with pytest.raises(TrainingDiverged, match="blew up.*step 10"):
        fit("vae_digits", backend=backend, out_dir=tmp_path / "lr", progress=False,
            overrides=[*TINY, "train.steps=100", "train.lr=10"])


def test_the_resume_command_printed_after_ctrl_c_works_with_overrides(tmp_path, capsys):
    """Issue 13: the command printed after Ctrl-C resumes a run that was started with --set."""
    import shlex

    from ppl_vae.cli import main

    aux_fns.CALLS["n"] = 0
    out = tmp_path / "int"
    sets = [*TINY, EAGER, "train.steps=40",
            'objective.aux=[{kind="tests.aux_fns:ctrl_c_at_15"}]']
    args = ["train", "vae_digits", "--out", str(out), "--no-progress"]
    assert main([*args, *(a for o in sets for a in ("--set", o))]) == 130
    message = capsys.readouterr().err
    command = message.split("`")[1]
    assert command.startswith("ppl-vae train ") and "--resume" in command
    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert load_run(out).info["step"] == 40


def test_resume_to_fewer_steps_is_refused_and_changes_nothing(tmp_path):
    """Issue 13: `--resume --set train.steps=20` on a 40-step run used to rewrite spec.toml."""
    tiny_fit(tmp_path, "r", ["train.steps=40"])
    before = (tmp_path / "r" / "spec.toml").read_text()
    with pytest.raises(RunError, match="trained 40 steps.*train.steps >= 40"):
        tiny_fit(tmp_path, "r", ["train.steps=20"], resume=True)
    assert (tmp_path / "r" / "spec.toml").read_text() == before


# ---- learning-rate schedules, update skipping, initialisation --------------------------------
#: `nan_gradient`'s calls (one per step in an eager Pyro run; one per trace in NumPyro) at which
#: its gradient is NaN; None: at every call.
NAN_GRADIENT = {"calls": 0, "at": None}


def nan_gradient(*, y, z, loc, scale, labels, backend):
    """An aux term that is 0 in value (the loss stays finite) and whose gradient is NaN at the
    calls `NAN_GRADIENT["at"]`: 0 · d√u/du at u = 0 (0 · ∞); a zero term otherwise."""
    NAN_GRADIENT["calls"] += 1
    at = NAN_GRADIENT["at"]
    u = 0.0 * loc.sum()
    return u ** 0.5 if at is None or NAN_GRADIENT["calls"] in at else u


def nan_gradient_at_3(*, y, z, loc, scale, labels, backend):
    """`nan_gradient` at the third call of its process only (a process of its own: torchrun)."""
    NAN_AT_3["calls"] += 1
    u = 0.0 * loc.sum()
    return u ** 0.5 if NAN_AT_3["calls"] == 3 else u


NAN_AT_3 = {"calls": 0}


def huge_gradient(*, y, z, loc, scale, labels, backend):
    """0 in value, a gradient of 1e30 on every coordinate of the posterior's mean: finite, far
    above any threshold."""
    if backend == "numpyro":
        from jax.lax import stop_gradient
    else:
        stop_gradient = torch.Tensor.detach
    total = loc.sum()
    return 1e30 * (total - stop_gradient(total))


def _state(trainer):
    """Copies of the parameters and of every tensor of Adam's state."""
    state = {(i, k): v.clone() for i, p in enumerate(trainer.params)
             for k, v in trainer.optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
    return [p.detach().clone() for p in trainer.params], state


def _assert_same_state(trainer, before):
    params, state = _state(trainer)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state), "Adam's state changed"


def _trainer(extra):
    from ppl_vae.data import load_data
    from ppl_vae.pyro.train import Trainer
    from ppl_vae.spec import load_spec

    spec = load_spec("vae_digits", [*TINY, *extra])
    return spec, Trainer(spec, load_data(spec), "cpu")


def _scalars(spec, trainer, n):
    from ppl_vae.schedules import step_scalars

    return step_scalars(spec, np.arange(trainer.step, trainer.step + n), trainer.n_train)


@pytest.mark.parametrize("gradient", ["inf", "huge", "nan"])
def test_a_skipped_update_leaves_parameters_and_adam_state_bit_equal(gradient):
    spec, trainer = _trainer(["train.skip_grad_norm=1000", "train.steps=40"])
    assert trainer.run_steps(_scalars(spec, trainer, 3), 1.0)[:, -1].tolist() == [0, 0, 0]
    before = _state(trainer)
    bad = {"inf": lambda g: torch.full_like(g, float("inf")), "huge": lambda g: g * 1e30 + 1e30,
           "nan": lambda g: g * float("nan")}[gradient]
    hook = trainer.params[0].register_hook(bad)
    rows = trainer.run_steps(_scalars(spec, trainer, 2), 1.0)
    hook.remove()
    assert rows[:, -1].tolist() == [1, 1] and np.isfinite(rows[:, 0]).all()
    _assert_same_state(trainer, before)
    assert trainer.step == 5
    assert trainer.run_steps(_scalars(spec, trainer, 1), 1.0)[:, -1].tolist() == [0]
    assert not torch.equal(trainer.params[0], before[0][0])  # the next update is taken


def test_a_skipped_first_update_leaves_adams_initial_state():
    spec, trainer = _trainer(["train.skip_grad_norm=1000", "train.steps=40"])
    start = [p.detach().clone() for p in trainer.params]
    hook = trainer.params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    assert trainer.run_steps(_scalars(spec, trainer, 1), 1.0)[:, -1].tolist() == [1]
    hook.remove()
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, start))
    for p in trainer.params:  # as Adam creates it: zero moments, no step counted
        for v in trainer.optimizer.state[p].values():
            assert not v.any()


def test_skipped_updates_are_counted_and_training_goes_on(tmp_path):
    """NaN gradients at steps 5 and 12 (a finite loss): both updates skipped, counted in the
    windows that hold them, and the run finishes; without skipping the same run diverges."""
    aux = ['objective.aux=[{kind="tests.pyro.test_train:nan_gradient"}]', EAGER,
           "train.steps=30"]
    NAN_GRADIENT.update(calls=0, at=(5, 12))
    run = tiny_fit(tmp_path, "skip", [*aux, "train.skip_grad_norm=1e4"])
    train = run.records("train")
    assert [r["skipped"] for r in train] == [1, 1, 0]
    assert np.isfinite(run.final_test["elbo"])
    assert all(np.isfinite(v).all() for v in run.params.values())
    assert "skipped" not in tiny_fit(tmp_path, "plain", ["train.steps=10"]).records("train")[0]
    NAN_GRADIENT.update(calls=0, at=(5, 12))
    with pytest.raises(TrainingDiverged, match="at step 6;"):  # NaN parameters, NaN loss
        tiny_fit(tmp_path, "diverges", aux)


def test_a_nan_loss_still_stops_a_run_that_skips(tmp_path):
    aux_fns.CALLS["n"] = 0
    with pytest.raises(TrainingDiverged, match="at step 26"):
        tiny_fit(tmp_path, "nan", [EAGER, "train.steps=40", "train.eval_every=40",
                                   "train.skip_grad_norm=1e4",
                                   'objective.aux=[{kind="tests.aux_fns:nan_after_25"}]'])


SCHEDULE = ['train.lr_schedule={kind="step", decay=0.5, every=15, warmup=5}',
            "train.skip_grad_norm=1e4", 'train.weight_init="normal"', "train.weight_init_std=0.05"]


def test_lr_is_logged_and_resume_equals_straight_run_with_a_schedule(tmp_path):
    """The lr of each window's last step beside β; a run resumed at step 20 takes the lr a
    straight run takes (and is not initialised again)."""
    straight = tiny_fit(tmp_path, "straight", ["train.steps=40", *SCHEDULE])
    assert [r["lr"] for r in straight.records("train")] == pytest.approx(
        [1e-3, 0.5e-3, 0.5e-3, 0.25e-3])  # steps 9, 19, 29, 39 (0-based)
    assert [r["skipped"] for r in straight.records("train")] == [0, 0, 0, 0]
    tiny_fit(tmp_path, "resumed", ["train.steps=20", *SCHEDULE])
    resumed = tiny_fit(tmp_path, "resumed", ["train.steps=40", *SCHEDULE], resume=True)
    _close_records(resumed.metrics, straight.metrics)
    for k, v in straight.params.items():
        np.testing.assert_allclose(resumed.params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_a_constant_schedule_is_todays_adam_to_the_bit():
    """The lr set in the param group every step changes nothing at a constant rate."""
    spec, scheduled = _trainer(["train.steps=40"])  # torch's random state is the process's:
    scheduled.run_steps(_scalars(spec, scheduled, 15), 1.0)  # one trainer after the other
    _, fixed = _trainer(["train.steps=40"])
    set_scalars = fixed._set_scalars

    def without_lr(scalars, lam):
        groups = [dict(g) for g in fixed.optimizer.param_groups]
        set_scalars(scalars, lam)
        for group, saved in zip(fixed.optimizer.param_groups, groups):
            group["lr"] = saved["lr"]  # Adam(lr=train.lr) as built, never touched

    fixed._set_scalars = without_lr
    fixed.run_steps(_scalars(spec, fixed, 15), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(scheduled.params, fixed.params))


def test_the_lr_decays_the_steps():
    """A schedule's lr reaches Adam: one update at lr = 0 (the warm-up's first) leaves the
    parameters as they were, and Adam's first update moves each by about lr."""
    spec, trainer = _trainer(['train.lr_schedule={kind="constant", warmup=4}', "train.steps=40"])
    start = [p.detach().clone() for p in trainer.params]
    trainer.run_steps(_scalars(spec, trainer, 1), 1.0)  # lr 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, start))
    trainer.run_steps(_scalars(spec, trainer, 1), 1.0)  # lr = 1e-3 / 4; Adam's 2nd update
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(trainer.params, start))
    assert 0.5 * 0.25e-3 < moved < 1.5 * 0.25e-3 * 1.6


@pytest.mark.slow
def test_two_processes_skip_the_update_one_process_skips(tmp_path):
    """DDP (two gloo processes): the all-reduced gradient is NaN in both at step 3, both skip
    it, and the window counts it once; the run equals the one-process run."""
    import os
    import subprocess
    import sys

    sets = [*TINY, EAGER, "train.steps=20", "train.eval_every=20", "train.skip_grad_norm=1e4",
            'objective.aux=[{kind="tests.pyro.test_train:nan_gradient_at_3"}]']
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "ppl_vae.cli", "train", "vae_digits", "--backend", "pyro",
         *(a for o in [*sets, "train.devices=2"] for a in ("--set", o)),
         "--out", str(tmp_path / "two"), "--no-progress"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_run(tmp_path / "two")
    assert "data-parallel over 2 processes" in two.info["step_mode"]
    NAN_AT_3["calls"] = 0
    one = tiny_fit(tmp_path, "one", sets[len(TINY):])
    assert [r["skipped"] for r in two.records("train")] == [1, 0]
    assert [r["skipped"] for r in one.records("train")] == [1, 0]
    for k, v in one.params.items():
        np.testing.assert_allclose(two.params[k], v, rtol=1e-4, atol=1e-5, err_msg=k)


# ---- on a GPU only: the Tensor lr of capturable Adam, schedules and skipping in a CUDA graph ----
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (PyTorch sees none); run on one by "
                                 "benchmarks/gpu_check.sh")


@CUDA
def test_capturable_adam_takes_a_tensor_lr_and_gives_the_float_lrs_numbers():
    """What the graphed trainer relies on (torch 2.13): Adam(capturable=True) with a 0-d
    float32 device tensor as lr, filled in place, updates as with the same lr as a float."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = [torch.randn(s, device="cuda", generator=gen) for s in [(33, 7), (7,), (5, 33)]]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]
    lrs = [1e-3, 1e-3, 5e-4, 2.5e-4, 1e-4, 1e-4]
    out = []
    for tensor_lr in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        lr = torch.full((), lrs[0], device="cuda") if tensor_lr else lrs[0]
        opt = torch.optim.Adam(params, lr=lr, capturable=True)
        for step, g in enumerate(grads):
            if tensor_lr:
                lr.fill_(lrs[step])
            else:
                opt.param_groups[0]["lr"] = lrs[step]
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        out.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*out))


@CUDA
def test_graphed_steps_follow_the_lr_schedule_and_skip_like_eager_steps(tmp_path):
    extra = ["train.steps=60", 'train.lr_schedule={kind="step", decay=0.5, every=20, warmup=5}',
             "train.skip_grad_norm=1e4", "latent.capacity={max=3.0, steps=40, weight=10.0}"]
    graphed = fit("vae_digits", device="cuda", out_dir=tmp_path / "graphed",
                  overrides=[*TINY, *extra], progress=False)
    eager = fit("vae_digits", device="cuda", out_dir=tmp_path / "eager",
                overrides=[*TINY, *extra, EAGER], progress=False)
    assert graphed.info["step_mode"] == "cuda graph"
    assert [r["lr"] for r in graphed.records("train")] == [r["lr"] for r in eager.records(
        "train")] == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.5e-3, 0.25e-3, 0.25e-3])
    assert all(r["skipped"] == 0 for r in graphed.records("train"))
    for k, v in eager.params.items():  # same random stream, same kernels: float32 rounding
        np.testing.assert_allclose(graphed.params[k], v, rtol=1e-3, atol=1e-4, err_msg=k)
