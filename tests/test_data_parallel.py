"""Data-parallel training (train.devices): N devices compute the one-device run, to float
rounding, in both backends; checkpoints move between device counts; rank 0 alone writes.

Each backend trains 20 steps twice: two devices for the first 10 then one (resumed from the
two-device checkpoint), and one device then two. Both runs equal each other at every logged
step (the first window of one is a two-device window, of the other a one-device window) and
at the end. NumPyro runs in subprocesses with two simulated CPU devices (XLA_FLAGS); Pyro runs
two gloo processes under torchrun (`ppl-vae train --devices 2` starts it)."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ppl_vae.runs import load_run
from ppl_vae.spec import SpecError, load_spec
from tests.conftest import XLA_TEST_FLAGS

#: 20 steps in windows of 10; a 2-device run trains the first 10 (or the last 10) of them.
TINY = ["train.steps=20", "train.log_every=10", "train.eval_every=10",
        "train.checkpoint_every=10", "train.batch_size=32", "train.eval_batch_size=400",
        "encoder.hidden=[32]", "decoder.hidden=[32]", "latent.dim=4"]
HALF = ["train.steps=10"]
CLI = [sys.executable, "-m", "ppl_vae.cli"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _run(cmd, env=None, timeout=240):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _assert_same_run(run, reference):
    """The same parameters and the same logged metrics (train and test), to float rounding."""
    assert run.params.keys() == reference.params.keys()
    for name, value in reference.params.items():
        np.testing.assert_allclose(run.params[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    for split in ("train", "test"):
        got, want = run.records(split), reference.records(split)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for a, b in zip(got, want):
            for key in ("objective", "rate", "distortion", "elbo"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (split, key)


def _train_records(run):
    return [r["step"] for r in run.records("train")]


# -- the spec key ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, key, allowed", [
    ("0", "train.devices", '"all"'),
    ('"two"', "train.devices", 'a positive integer or "all"'),
    ("2.5", "train.devices", 'a positive integer or "all"'),
    ("3", "train.batch_size", "a multiple of train.devices (3)"),
])
def test_train_devices_mistakes_are_spec_errors(value, key, allowed):
    with pytest.raises(SpecError) as err:
        load_spec("vae_digits", [f"train.devices={value}"])
    assert err.value.key == key and allowed in str(err.value)


def test_train_devices_takes_a_number_or_all():
    assert load_spec("vae_digits").train.devices == 1
    assert load_spec("vae_digits", ["train.devices=2"]).train.devices == 2
    assert load_spec("vae_digits", ["train.devices=all"]).train.devices == "all"


# -- NumPyro: a mesh of two simulated CPU devices -------------------------------------------------
NUMPYRO_SCRIPT = """
import sys
from ppl_vae.training import fit
tiny, half, root = {tiny!r}, {half!r}, sys.argv[1]
import jax
assert len(jax.devices()) == 2, jax.devices()
# two devices' checkpoint, resumed on one
fit("vae_digits", "numpyro", out_dir=root + "/two_one", overrides=tiny, resume=True,
    progress=False)
# one device's checkpoint, resumed on two
fit("vae_digits", "numpyro", out_dir=root + "/one_two", overrides=tiny + half, progress=False)
fit("vae_digits", "numpyro", out_dir=root + "/one_two", overrides=tiny + ["train.devices=2"],
    resume=True, progress=False)
"""


def test_numpyro_two_devices_equal_one_and_checkpoints_move_between_them(tmp_path):
    pytest.importorskip("numpyro")
    # (XLA compiles the same programs in each fit: the suite's compilation cache, which these
    # processes inherit from tests/conftest.py, takes ~15 s off the test and changes no number)
    # the command line simulates the two CPU devices itself (XLA_FLAGS without a device count)
    _run([*CLI, "train", "vae_digits", "--backend", "numpyro", *_sets(TINY + HALF), "--devices",
          "2", "--out", str(tmp_path / "two_one"), "--no-progress"], {"XLA_FLAGS": XLA_TEST_FLAGS})
    assert "data-parallel over 2 devices" in load_run(tmp_path / "two_one").info["step_mode"]
    code = NUMPYRO_SCRIPT.format(tiny=TINY, half=HALF)
    _run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
         {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {XLA_TEST_FLAGS}"})
    two_one, one_two = load_run(tmp_path / "two_one"), load_run(tmp_path / "one_two")
    _assert_same_run(two_one, one_two)
    assert _train_records(two_one) == [10, 20]
    assert "data-parallel over 2 devices" in one_two.info["step_mode"]


def test_numpyro_two_processes_of_one_device_equal_one(tmp_path):
    """Two hosts, simulated: two processes of one CPU device each joined by
    jax.distributed (JAX_COORDINATOR_ADDRESS, ...); process 0 alone writes the run folder."""
    pytest.importorskip("numpyro")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys\nfrom ppl_vae.training import fit\n"
            "fit('vae_digits', 'numpyro', out_dir=sys.argv[1], overrides=sys.argv[2:], "
            "progress=False)")
    cmd = [sys.executable, "-c", code, str(tmp_path / "hosts"), *TINY, 'train.devices="all"']
    env = {**os.environ, "XLA_FLAGS": XLA_TEST_FLAGS,
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen(cmd, env=env | {"JAX_PROCESS_ID": str(i)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    from ppl_vae.training import fit

    one = fit("vae_digits", "numpyro", out_dir=tmp_path / "one", overrides=TINY,
              progress=False)
    hosts = load_run(tmp_path / "hosts")
    assert "data-parallel over 2 devices" in hosts.info["step_mode"]
    _assert_same_run(hosts, one)
    assert _train_records(hosts) == [10, 20]  # process 1 wrote no records


def test_numpyro_asks_for_simulated_devices_when_there_are_too_few(tmp_path):
    pytest.importorskip("numpyro")
    code = ("from ppl_vae.training import fit\n"
            "fit('vae_digits', 'numpyro', out_dir='{}', overrides=['train.devices=2'])")
    done = subprocess.run([sys.executable, "-c", code.format(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XLA_FLAGS": XLA_TEST_FLAGS})
    assert done.returncode != 0
    assert "xla_force_host_platform_device_count=2" in done.stderr
    assert "JAX sees 1 cpu device" in done.stderr


# -- Pyro: two gloo processes under torchrun --------------------------------------------------
def test_pyro_two_processes_equal_one_and_checkpoints_move_between_them(tmp_path):
    pytest.importorskip("pyro")
    from ppl_vae.training import fit

    # two processes started by torchrun directly, then resumed on one device
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          "-m", "ppl_vae.cli", "train", "vae_digits", "--backend", "pyro",
          *_sets(TINY + HALF + ["train.devices=2"]), "--out", str(tmp_path / "two_one"),
          "--no-progress"], {"OMP_NUM_THREADS": "1"})
    two = load_run(tmp_path / "two_one")
    assert "data-parallel over 2 processes (DDP, gloo)" in two.info["step_mode"]
    assert _train_records(two) == [10]  # rank 0 alone wrote: one record per window
    fit("vae_digits", "pyro", out_dir=tmp_path / "two_one", overrides=TINY, resume=True,
        progress=False)
    # one device, then resumed on two by `ppl-vae train --devices 2` (which starts torchrun)
    one = fit("vae_digits", "pyro", out_dir=tmp_path / "one_two", overrides=TINY + HALF,
              progress=False)
    assert sorted(p.name for p in two.path.iterdir()) == sorted(
        p.name for p in one.path.iterdir())  # nothing more, nothing less
    _run([*CLI, "train", "vae_digits", "--backend", "pyro", *_sets(TINY), "--devices", "2",
          "--out", str(tmp_path / "one_two"), "--resume", "--no-progress"])
    two_one, one_two = load_run(tmp_path / "two_one"), load_run(tmp_path / "one_two")
    _assert_same_run(two_one, one_two)
    assert _train_records(two_one) == _train_records(one_two) == [10, 20]


def _one_and_two_processes(elbo, built, y, labels):
    """One device's terms of (y, labels), and the sum of two processes' terms on their halves
    of the rows (each drawing the global batch's noise and keeping its rows)."""
    import torch

    from ppl_vae.pyro.devices import GlobalNoise

    torch.manual_seed(5)
    one = elbo.differentiable_terms(built.model, built.guide, y, labels)
    parts = []
    for rank in (0, 1):
        torch.manual_seed(5)
        rows = slice(3 * rank, 3 * rank + 3)
        with GlobalNoise(rank, 2):
            parts.append(elbo.differentiable_terms(built.model, built.guide, y[rows],
                                                   None if labels is None else labels[rows]))
    return one, {k: parts[0][k] + parts[1][k] for k in one}


def test_pyro_global_noise_draws_each_posterior_as_one_device(tmp_path):
    """Each process's share of the reparameterised draws is its rows of one device's draws, for
    every posterior family and with vectorised particles, and for M2 (the label enumerated,
    known on some rows, with the classifier's cross-entropy α-term: a factor outside the data
    plate, counted once per process on its rows): the processes' terms sum to one device's."""
    torch = pytest.importorskip("torch")
    from ppl_vae.pyro.elbo import ScaledELBO
    from ppl_vae.pyro.hooks import Model

    y = (torch.rand(6, 64, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    small = ["encoder.hidden=[16]", "decoder.hidden=[16]", "latent.dim=3"]
    cases = [("vae_digits", [f"posterior.kind={posterior}"], particles, None)
             for posterior, particles in (("diagonal", 1), ("full", 1), ("iaf", 1),
                                          ("diagonal", 3))]
    cases.append(("m2_mnist", ["label.hidden=[16]"], 1, torch.tensor([3, -1, 0, -1, -1, 7])))
    for name, overrides, particles, labels in cases:
        built = Model(load_spec(name, small + overrides), 64, (8, 8), "cpu").built
        elbo = ScaledELBO(num_particles=particles, vectorize_particles=particles > 1,
                          max_plate_nesting=1)
        one, two = _one_and_two_processes(elbo, built, y, labels)
        assert labels is None or one["aux"] > 0
        for key in ("loss", "rate", "distortion", "aux"):
            assert float(two[key].detach()) == pytest.approx(float(one[key].detach()),
                                                             rel=1e-5), (name, overrides, key)


def test_pyro_under_torchrun_refuses_a_batch_its_processes_cannot_split():
    """Under torchrun, train.devices = 1 or "all" takes the launcher's process count, which
    the spec's validation never saw: 128 rows over 3 processes would train 126 of them."""
    pytest.importorskip("pyro")
    from ppl_vae.pyro.devices import join

    environ = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"}
    for devices in ("1", '"all"'):
        spec = load_spec("vae_digits", [f"train.devices={devices}", "train.batch_size=128"])
        with pytest.raises(SpecError, match="a multiple of the 3 processes"):
            join(spec, environ)


def test_pyro_several_devices_outside_a_launcher_say_how_to_start(tmp_path):
    pytest.importorskip("pyro")
    from ppl_vae.backends import BackendError
    from ppl_vae.training import fit

    with pytest.raises(BackendError, match="--devices 2.*torchrun --nproc-per-node 2"):
        fit("vae_digits", "pyro", out_dir=tmp_path / "run", overrides=["train.devices=2"],
            progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (['objective.aux=[{kind="infonce"}]'], "'infonce' compares each example"),
])
def test_pyro_refuses_what_processes_would_not_compute_as_one(overrides, message, capsys):
    """Terms that couple a minibatch's rows are refused before torchrun starts (and in each
    process it starts); NumPyro's one program over the mesh computes them whole."""
    pytest.importorskip("pyro")
    from ppl_vae.cli import main

    assert main(["train", "vae_digits", "--backend", "pyro", "--devices", "2", *_sets(overrides),
                 "--out", "unused", "--no-progress"]) == 2
    assert message in capsys.readouterr().err
