"""`ppl-vae` end to end on the digits, in seconds, and its one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.cli import main

pytest.importorskip("torch")  # the CLI trains with the Pyro backend by default

FAST = ["--set", "train.steps=30", "--set", "train.log_every=10", "--set", "train.eval_every=30",
        "--set", "train.checkpoint_every=30", "--set", "data.limit=400", "--no-progress"]


def test_train_eval_sample_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "test (nats per example): elbo" in printed
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test ELBO" in printed and "active units" in printed and "collapse" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["elbo"] == pytest.approx(-(report["rate"] + report["nll_distortion"]))
    assert len(report["rate_per_dim"]) == 8
    assert main(["sample", str(out), "--n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert main(["sample", str(out), "--n", "5", "--out", str(tmp_path / "s.npy")]) == 0
    means = np.load(tmp_path / "s.npy")
    assert means.shape == (5, 64) and (means >= 0).all() and (means <= 1).all()
    assert main(["models"]) == 0
    assert "vae_mnist" in capsys.readouterr().out


def test_existing_run_is_refused_then_resumed(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "vae_digits", "--out", out, *FAST]) == 0
    assert main(["train", "vae_digits", "--out", out, *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    more = [a if a != "train.steps=30" else "train.steps=60" for a in FAST]
    assert main(["train", "vae_digits", "--out", out, "--resume", *more]) == 0


@pytest.mark.parametrize("args, message", [
    (["train", "vae_digits", "--set", "latent.dim=zero"], "latent.dim = 'zero'"),
    (["train", "vae_digits", "--set", "encoder.kind=conv"], "encoder.kind"),
    (["train", "no_such_spec"], "no spec file or bundled model"),
    (["train", "vae_mnist", "--set", 'data.path="/no/such/folder"'], "/no/such/folder"),
    (["eval", "/no/such/run"], "not a finished run folder"),
    (["eval", "/no/such/run", "--particles", "0"], "--particles must be at least 1"),
])
def test_errors_are_one_line_with_exit_code_2(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "r")] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, origin", [
    (["--set", "train.stpes=5"], "--set train.stpes=5 (applied to"),
    (["--set", "encoder.hidden=[64, -1]"], "--set encoder.hidden=[64, -1] (applied to"),
    (["--devices", "some"], "--devices some (applied to"),
])
def test_an_error_in_a_command_line_value_names_the_flag_not_the_file(args, origin, tmp_path,
                                                                       capsys):
    assert main(["train", "vae_digits", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ppl-vae train: error: {origin}") and "vae_digits.toml)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_npz_data_error_is_reported(tmp_path, capsys):
    x = np.random.default_rng(0).random((50, 10)) * 3  # outside [0, 1]: not Bernoulli data
    np.savez(tmp_path / "d.npz", x=x)
    code = main(["train", "vae_digits", "--set", "data.source=npz",
                 "--set", f'data.path="{tmp_path / "d.npz"}"', "--set", "data.binarize=none",
                 "--out", str(tmp_path / "r"), *FAST])
    assert code == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "ppl-vae"
    found = str(exe) if exe.exists() else shutil.which("ppl-vae")
    assert found, "the ppl-vae console script is not installed (pip install -e .)"
    done = subprocess.run([found, "models"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "vae_digits" in done.stdout


@pytest.mark.slow
def test_a_pyro_run_evaluates_and_samples_with_numpyro(tmp_path, capsys):
    pytest.importorskip("numpyro")
    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST]) == 0
    assert main(["eval", str(out)]) == 0
    by_pyro = json.loads((out / "report.json").read_text())
    assert main(["eval", str(out), "--backend", "numpyro"]) == 0
    by_numpyro = json.loads((out / "report.json").read_text())
    assert by_numpyro["backend"] == "numpyro" and by_numpyro["trained_with"] == "pyro"
    # same parameters, different random draws: the same test ELBO up to Monte Carlo noise
    assert by_numpyro["elbo"] == pytest.approx(by_pyro["elbo"], rel=0.02)
    assert by_numpyro["rate"] == pytest.approx(by_pyro["rate"], rel=1e-4)  # analytic KL
    assert main(["sample", str(out), "--backend", "numpyro", "--n", "4",
                 "--out", str(tmp_path / "n.npy")]) == 0


@pytest.mark.slow
def test_compare_prints_both_backends(tmp_path, capsys):
    pytest.importorskip("numpyro")
    more = [a for a in FAST if a != "--no-progress"]
    assert main(["compare", "vae_digits", "--out", str(tmp_path / "cmp"), *more]) == 0
    table = capsys.readouterr().out
    for row in ("test ELBO", "steps per second", "peak memory", "compile", "matmul precision"):
        assert row in table
    assert "pyro" in table and "numpyro" in table
    assert "steps (pyro): " in table and "steps (numpyro): lax.scan" in table


@pytest.mark.slow
def test_eval_reports_iwae_psis_and_information(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST,
                 "--set", "train.steps=200", "--set", "train.eval_every=200",
                 "--set", "train.checkpoint_every=200"]) == 0
    assert main(["eval", str(out), "--iwae-k", "200", "--n", "100", "--no-progress",
                 "--particles", "4"]) == 0
    printed = capsys.readouterr().out
    assert "IWAE ln p(y), K=200" in printed and "PSIS" in printed and "I_q" in printed
    assert "100 test examples, 4 draws of z each" in printed
    r = json.loads((out / "report.json").read_text())
    assert r["n_test"] == 100 and r["iwae_k"] == 200 and r["particles"] == 4
    # ln p − ELBO from one set of K draws: IWAE and the mean log-weight of the same draws
    assert r["elbo_gap"] == pytest.approx(r["log_likelihood"] - r["elbo_same_draws"])
    assert r["elbo_gap"] > 3 * r["elbo_gap_stderr"] > 0
    # L_K >= L_1 = ELBO in expectation; with K = 200 the gap is well above the noise
    assert r["log_likelihood"] > r["elbo"]
    # I_q <= rate (the marginal KL is a KL divergence), up to Monte Carlo error
    assert r["mutual_information"] <= r["rate"] + 3 * r["mutual_information_stderr"]
    assert r["marginal_kl"] == pytest.approx(r["rate"] - r["mutual_information"])
    assert 0 <= r["psis"]["share_above_0.7"] <= 1 and 1 <= r["ess_mean"] <= 200
    assert "I_q" in r["verdict"]


@pytest.mark.slow
def test_both_backends_give_the_same_iwae_estimate(tmp_path):
    pytest.importorskip("numpyro")
    from ppl_vae.report import evaluate_run

    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST]) == 0
    a = evaluate_run(out, backend="pyro", iwae_k=500, n=60, progress=False)
    b = evaluate_run(out, backend="numpyro", iwae_k=500, n=60, progress=False)
    # different draws of z: agree within the Monte Carlo error of the two estimates
    assert abs(a["log_likelihood"] - b["log_likelihood"]) < 0.1
    assert a["mutual_information"] == pytest.approx(b["mutual_information"], rel=1e-4)


@pytest.mark.slow
def test_plot_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST]) == 0
    assert main(["eval", str(out), "--iwae-k", "50", "--no-progress"]) == 0
    assert main(["plot", str(out)]) == 0
    names = {p.name for p in (out / "plots").iterdir()}
    assert names == {"curves.png", "samples.png", "reconstructions.png", "traversals.png",
                     "rate_per_dim.png", "rate_distortion.png", "khat.png"}
    assert all((out / "plots" / n).stat().st_size > 5000 for n in names)


@pytest.mark.slow
def test_eval_exports_posterior_draws_for_arviz(tmp_path, capsys):
    arviz = pytest.importorskip("arviz")
    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST]) == 0
    assert main(["eval", str(out), "--iwae-k", "0", "--export-draws", "3", "--plots",
                 "--no-progress"]) == 0
    from ppl_vae.arviz_compat import load_netcdf

    idata = load_netcdf(out / "posterior.nc")
    z = idata.posterior["z"]
    assert z.shape == (1, 1000, 3, 8) and list(z.dims)[2:] == ["example", "latent"]
    summary = arviz.summary(idata, var_names=["z"], kind="stats")
    assert len(summary) == 24
    assert (out / "plots" / "curves.png").exists()


@pytest.mark.slow
def test_eval_places_a_run_against_a_known_entropy(tmp_path, capsys):
    """On a synthetic population the report adds H(y) and the lecture's bounds, and the
    autoregressive decoder evaluates, samples and plots (ancestral draws) like any other."""
    out = tmp_path / "run"
    assert main(["train", "collapse_bars", "--out", str(out), "--no-progress",
                 "--set", "train.steps=300", "--set", "train.eval_every=300",
                 "--set", "train.checkpoint_every=300", "--set", "train.log_every=100",
                 "--set", "data.size=3000"]) == 0
    assert main(["eval", str(out), "--iwae-k", "100", "--no-progress", "--plots"]) == 0
    printed = capsys.readouterr().out
    assert "H(y), exact" in printed and "H(y) − distortion ≤ I_q ≤ rate" in printed
    r = json.loads((out / "report.json").read_text())
    from ppl_vae.groundtruth.populations import bars

    assert r["entropy"] == pytest.approx(bars().entropy()) and r["data"] == "synthetic:bars"
    # the lecture's bounds hold within Monte Carlo error even for a barely trained model
    assert r["elbo_excess"] == pytest.approx(-r["elbo"] - r["entropy"])
    assert r["elbo_excess"] > -2 * r["elbo_stderr"]
    assert r["log_likelihood_excess"] > -2 * r["log_likelihood_stderr"]
    assert r["mutual_information_lower"] == pytest.approx(r["entropy"] - r["nll_distortion"])
    assert 0 < r["elbo_stderr"] < 0.2 and 0 < r["rate_stderr"] < r["elbo_stderr"] * 3
    assert (out / "plots" / "traversals.png").exists()
    assert main(["sample", str(out), "--n", "16", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (16, 16) and ((samples >= 0) & (samples <= 1)).all()


# ---- latent graphs, label conditioning, posterior families ----------------------------------
FAMILIES = {
    # bottom-up two-layer with an IAF posterior on z1 and per-site β
    "two-layer-iaf": ['latents=[{name="z1", dim=4, prior={kind="conditional", parents=["z2"], '
                      'hidden=[8]}, posterior={kind="iaf", flow_hidden=[8]}}, {name="z2", '
                      'dim=2, beta=2.0, posterior={inputs=["z1"], hidden=[8]}}]',
                      'decoder.reads=["z1"]'],
    # a conditional VAE with p(z|label) and a full-covariance posterior
    "cvae-full": ["label.condition=true", "label.prior=true", 'prior.kind="conditional"',
                  "latent.dim=3", 'posterior.kind="full"'],
}


@pytest.mark.slow
@pytest.mark.parametrize("family, trained, evaluated", [
    ("two-layer-iaf", "pyro", "numpyro"), ("cvae-full", "numpyro", "pyro")])
def test_each_family_trains_with_one_backend_and_evaluates_with_the_other(
        family, trained, evaluated, tmp_path, capsys):
    pytest.importorskip("numpyro")
    out = tmp_path / "run"
    sets = [a for o in FAMILIES[family] for a in ("--set", o)]
    assert main(["train", "vae_digits", "--backend", trained, "--out", str(out), *FAST,
                 *sets]) == 0
    assert main(["eval", str(out), "--backend", evaluated, "--iwae-k", "50",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "report.json").read_text())
    sites = {"two-layer-iaf": {"z1": 4, "z2": 2}, "cvae-full": {"z": 3}}[family]
    assert {k: v["dim"] for k, v in r["sites"].items()} == sites
    assert r["rate"] == pytest.approx(sum(s["rate"] for s in r["sites"].values()), rel=1e-6)
    assert r["elbo"] == pytest.approx(-(r["rate"] + r["nll_distortion"]))
    assert np.isfinite(r["log_likelihood"]) and r["log_likelihood"] > r["elbo"] - 1
    for site in r["sites"].values():
        assert 0 <= site["active_units"] <= site["dim"] and "collapse" in site["verdict"]
        assert site["rate_stderr"] > 0
    if family == "two-layer-iaf":
        assert "site z1" in printed and "site z2" in printed
        # z2's posterior and prior factorise: a rate per dimension (Monte Carlo: z1 is drawn)
        assert sum(r["sites"]["z2"]["rate_per_dim"]) == pytest.approx(
            r["sites"]["z2"]["rate"], rel=0.5, abs=0.3)
        assert r["sites"]["z1"]["rate_per_dim"] == []  # an IAF posterior does not factorise
        assert r["sites"]["z1"]["mutual_information"] is None  # not Gaussian
        train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert {"rate/z1", "rate/z2"} <= set(train[0])
        assert main(["plot", str(out)]) == 0
        for f in ("traversals_z1.png", "traversals_z2.png", "rate_per_dim.png"):
            assert (out / "plots" / f).stat().st_size > 1000, f
        assert main(["sample", str(out), "--label", "3", "--out", str(tmp_path / "s.png")]) == 2
        assert "does not read a label" in capsys.readouterr().err
    else:
        assert r["sites"]["z"]["mutual_information"] is None  # a full covariance: not estimated
        assert main(["sample", str(out), "--label", "3", "--n", "4",
                     "--out", str(tmp_path / "three.npy")]) == 0
        assert np.load(tmp_path / "three.npy").shape == (4, 64)
        assert main(["plot", str(out), "--label", "3"]) == 0
        assert (out / "plots" / "samples_by_label.png").stat().st_size > 1000
        assert main(["sample", str(out), "--label", "12", "--out", str(tmp_path / "x.npy")]) == 2
        assert "labels are 0..9" in capsys.readouterr().err


def test_a_conditional_vae_needs_every_label(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 2, (60, 10)).astype(float)
    np.savez(tmp_path / "nolabels.npz", x=x)
    common = ["--set", "data.source=npz", "--set", "data.binarize=none",
              "--set", "label.condition=true", "--out", str(tmp_path / "r"), *FAST]
    assert main(["train", "vae_digits", "--set", f'data.path="{tmp_path / "nolabels.npz"}"',
                 *common]) == 2
    assert "have no label" in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", x=x, labels=np.arange(60) % 12)
    assert main(["train", "vae_digits", "--set", f'data.path="{tmp_path / "big.npz"}"',
                 *common]) == 2
    assert "label.classes = 12" in capsys.readouterr().err


def test_small_mistakes_get_clear_answers(tmp_path, capsys):
    """Issue 13's smaller items: an .npz given as the spec; `sample --out s` (matplotlib writes
    s.png: say so); `eval --n` above the split's size; files written with the umask's mode."""
    import os
    import stat

    import numpy as np

    np.savez(tmp_path / "data.npz", x=np.zeros((10, 4)))
    assert main(["train", str(tmp_path / "data.npz"), "--out", str(tmp_path / "r")]) == 2
    assert "a TOML spec (this file is binary" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST,
                 "--set", "train.steps=20", "--set", "train.log_every=10",
                 "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20"]) == 0
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s")]) == 0
    assert f"written: {tmp_path / 's.png'}" in capsys.readouterr().out
    assert (tmp_path / "s.png").is_file()
    assert main(["eval", str(out), "--n", "100000", "--iwae-k", "2", "--no-progress"]) == 0
    assert "all of them were used" in capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    for name in ("run.json", "params.npz", "spec.toml", "report.json"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


# ---- issue 20: every mistake one line, nothing misread -----------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "vae_digits", "--out", str(out), *FAST,
                 "--set", "train.steps=20", "--set", "train.log_every=10",
                 "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20"]) == 0
    return out


@pytest.mark.parametrize("args, message", [
    (["--iwae-k", "-5"], "--iwae-k must be at least 1"),  # was torch.cat() of an empty list
    (["--n", "-3"], "--n must be at least 1 test example; got -3"),  # was 356 of 359, exit 0
    (["--n", "0"], "--n must be at least 1 test example; got 0"),  # was: all of them, silently
])
def test_eval_refuses_counts_below_one_in_one_line(args, message, small_run, capsys):
    before = sorted(p.name for p in small_run.iterdir())
    assert main(["eval", str(small_run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ppl-vae eval: error: {err.split(': error: ', 1)[1]}" and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in small_run.iterdir()) == before  # no report.json


def test_psis_with_too_few_draws_says_not_estimable_instead_of_nan(small_run, capsys):
    """--iwae-k 10 printed "PSIS k̂: mean nan, max nan, nan%"."""
    assert main(["eval", str(small_run), "--iwae-k", "10", "--n", "30", "--no-progress"]) == 0
    text = capsys.readouterr().out
    (line,) = [line for line in text.splitlines() if "PSIS" in line]
    assert "nan" not in line.lower() and "not estimable: K = 10 draws per example" in line
    assert main(["eval", str(small_run), "--iwae-k", "100", "--n", "30", "--no-progress"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "PSIS" in line]
    assert "PSIS k̂: mean" in line and "nan" not in line.lower()


def test_bits_say_what_they_are_computed_from(small_run, capsys):
    assert main(["eval", str(small_run), "--iwae-k", "30", "--n", "30", "--bits",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    report = json.loads((small_run / "report.json").read_text())
    assert "(−ELBO / (D ln 2), D = 64: from the test ELBO)" in text
    assert report["bits_per_dim"] == pytest.approx(-report["elbo"] / (64 * np.log(2)))
    assert report["bits_per_dim_iwae"] == pytest.approx(
        -report["log_likelihood"] / (64 * np.log(2)))
    assert report["bits_per_dim_iwae"] < report["bits_per_dim"]  # IWAE is the tighter bound


def test_a_learning_rate_of_ten_says_no_metrics_were_logged_not_step_dash(tmp_path, capsys):
    """The message ended "last finite metrics (step -): none"."""
    assert main(["train", "vae_digits", "--out", str(tmp_path / "r"), "--set", "train.lr=10",
                 "--set", "train.steps=100", "--set", "train.log_every=100", "--set",
                 "train.eval_every=100", "--set", "train.checkpoint_every=100",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "blew up" in err and "before any metrics were logged" in err
    assert "(step -)" not in err and ": none" not in err


def test_m2_eval_says_its_aux_term_was_not_evaluated(tmp_path, capsys):
    """M2's eval printed "aux 0.000" for a model trained with a weight-20 α-term: eval sums the
    label out, so the term on known labels is not evaluated."""
    from tests.test_latent_label import M2

    out = tmp_path / "m2"
    small = [o for o in M2 if not o.startswith("train.")] + [
        "train.steps=20", "train.log_every=10", "train.eval_every=20",
        "train.checkpoint_every=20", "data.limit=400", "train.batch_size=32"]
    assert main(["train", "vae_digits", "--out", str(out), "--no-progress",
                 *(a for o in small for a in ("--set", o))]) == 0
    assert main(["eval", str(out), "--iwae-k", "0", "--n", "50", "--no-progress"]) == 0
    text = capsys.readouterr().out
    (line,) = [line for line in text.splitlines() if line.strip().startswith("aux")]
    assert "not evaluated" in line and "supervised (weight 20)" in line and "0.000" not in line
    assert "(without the aux terms not evaluated)" in text
    report = json.loads((out / "report.json").read_text())
    assert report["aux_not_evaluated"] == ["supervised (weight 20)"]


def test_a_one_site_full_covariance_posterior_says_i_q_is_not_estimated(tmp_path, capsys):
    """The README promised the line; a one-site model printed nothing about I_q."""
    out = tmp_path / "full"
    assert main(["train", "vae_digits", "--out", str(out), *FAST, "--set",
                 'posterior.kind="full"', "--set", "train.steps=20", "--set",
                 "train.eval_every=20", "--set", "train.checkpoint_every=20"]) == 0
    assert main(["eval", str(out), "--iwae-k", "0", "--n", "30", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "  I_q: not estimated (q(z|y) is not a diagonal Gaussian of the data)" in text


def test_data_mnist_is_a_command(tmp_path, capsys, monkeypatch):
    """The missing-MNIST messages point at `ppl-vae data mnist DIR` (ppl_vae.download, tested
    against a local server in tests/test_download.py): it is wired into the command line."""
    from ppl_vae import download

    asked = {}
    monkeypatch.setattr(download, "download_mnist",
                        lambda folder, **kw: asked.update(folder=folder, **kw))
    assert main(["data", "mnist", str(tmp_path / "m"), "--no-progress"]) == 0
    assert asked["folder"] == str(tmp_path / "m") and asked["progress"] is False
    assert f"MNIST is in {tmp_path / 'm'}" in capsys.readouterr().out

    def refuse(folder, **kw):
        raise download.DownloadError("no mirror answered")

    monkeypatch.setattr(download, "download_mnist", refuse)
    assert main(["data", "mnist", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == "ppl-vae data: error: no mirror answered"
