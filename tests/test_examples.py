"""Every example and benchmark runs in its --smoke mode (NumPyro's test_examples.py, with tiny
arguments). Benchmarks are only run here, never timed: speed is measured by hand. The
experiments (the lecture's five and latent_graphs) also run with the NumPyro backend where that
is quick (not the conv one), and leave the table, results and figure that examples/README.md
shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_vae.experiments import MNIST_ENV
from tests.conftest import mnist_missing

ROOT = Path(__file__).parents[1]
#: A smoke run that takes this long has hung (the slowest, bench_step, takes about 2 minutes on
#: 2 idle cores; several times that under load).
SMOKE_TIMEOUT_S = 1800
#: Scripts that need the MNIST files (--mnist, $PPL_VAE_MNIST or ../shared/data/mnist).
NEEDS_MNIST = ("latent_graphs", "semi_supervised", "mnist_table", "bench_latent_graphs",
               "discrete_latents")
#: ... and those that need its 60 000 training images too.
NEEDS_MNIST_TRAIN = ("bench_peers",)
SCRIPTS = sorted([*(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
#: experiment -> its figure
EXPERIMENTS = {"posterior_collapse": "collapse.png", "rate_distortion": "rate_distortion.png",
           "universality": "universality.png", "encoder_autonomy": "encoder_autonomy.png",
           "disentangle": "disentangle.png", "latent_graphs": "latent_graphs.png",
           "semi_supervised": "semi_supervised.png"}
NUMPYRO_TOO = ("posterior_collapse",)
CASES = [pytest.param(p, "pyro", id=p.stem) for p in SCRIPTS] + [
    pytest.param(ROOT / "examples" / f"{name}.py", "numpyro", id=f"{name}-numpyro")
    for name in NUMPYRO_TOO]


@pytest.mark.slow
@pytest.mark.parametrize("path, backend", CASES)
def test_example_smoke(path, backend, tmp_path):
    if path.stem in (*NEEDS_MNIST, *NEEDS_MNIST_TRAIN):
        reason = mnist_missing(train=path.stem in NEEDS_MNIST_TRAIN)
        if reason:
            pytest.skip(reason)
    extra = ["--backend", backend, "--no-progress"] if path.stem in EXPERIMENTS else []
    done = subprocess.run([sys.executable, str(path), "--smoke", *extra], capture_output=True,
                          text=True, timeout=SMOKE_TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if path.stem in EXPERIMENTS:
        out = tmp_path / "runs" / f"{path.stem}-smoke"
        written = {p.name for p in out.iterdir()}
        assert {"results.json", "table.md", EXPERIMENTS[path.stem]} <= written
        results = json.loads((out / "results.json").read_text())
        assert results["backend"] == backend and results["smoke"] and results["rows"]


@pytest.mark.parametrize("name", NEEDS_MNIST)
def test_a_script_without_mnist_says_where_it_looked_in_one_line(name, tmp_path):
    """A fresh clone has no ../shared: the scripts that read MNIST used to end in a traceback
    (they hard-wired ../shared/data/mnist)."""
    path = next(p for p in SCRIPTS if p.stem == name)
    missing = tmp_path / "no_mnist"
    env = os.environ | {MNIST_ENV: str(missing)}
    done = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True,
                          text=True, timeout=SMOKE_TIMEOUT_S, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"the MNIST folder {missing} does not exist" in err and "--mnist DIR" in err
    (missing / "sub").mkdir(parents=True)  # there, but without the files: said so, too
    done = subprocess.run([sys.executable, str(path), "--smoke", "--mnist", str(missing)],
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 2 and "holds no MNIST test files" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_examples_readme_shows_each_experiment(name):
    """examples/README.md has a section, the command and the committed figure of each
    experiment, and no placeholder is left in either README."""
    readme = (ROOT / "examples" / "README.md").read_text()
    figure = f"figures/{EXPERIMENTS[name]}"
    assert f"`{name}.py`" in readme and f"python examples/{name}.py" in readme
    assert f"]({figure})" in readme and (ROOT / "examples" / figure).is_file()
    for text in (readme, (ROOT / "README.md").read_text()):
        assert "SUMMARY_" not in text and "DIS_" not in text


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_disentangle_summarises_seeds_and_calls_the_claim_against_their_spread():
    dis = _load_example("disentangle")
    scores = {key: 1.0 for key in dis.SCORES}
    rows = [{**scores, "beta": beta, "seed": seed, "mig": mig}
            for beta, seed, mig in [(1.0, 0, 0.10), (1.0, 1, 0.20), (4.0, 0, 0.30),
                                    (4.0, 1, 0.50), (16.0, 0, 0.12), (16.0, 1, 0.14)]]
    per_beta = dis.over_seeds(rows)
    assert [r["beta"] for r in per_beta] == [1.0, 4.0, 16.0]
    four = per_beta[1]
    assert four["seeds"] == 2 and four["mig"] == pytest.approx(0.40)
    assert four["mig_sd"] == pytest.approx(0.1414214, rel=1e-6)  # sample standard deviation
    assert four["mig_text"] == "0.400 ± 0.141"
    # 0.40 - 0.15 = 0.25 > 0.141 + 0.071: held; with a wider spread at β = 1 it is not
    assert dis.claim(per_beta)["held"]
    rows[1]["mig"] = 0.60
    assert not dis.claim(dis.over_seeds(rows))["held"]
    one_seed = dis.over_seeds([r for r in rows if r["seed"] == 0])
    assert one_seed[0]["mig_sd"] == 0.0 and dis.claim(one_seed)["held"]  # 0.30 > 0.10


def test_custom_model_pyro_trains_on_one_thread_by_default():
    """It ran on PyTorch's default thread count, against the README's advice (24 s against
    11 s with one thread on a busy machine)."""
    torch = pytest.importorskip("torch")
    example = _load_example("custom_model_pyro")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        example.main(example.parse_args(["--smoke", "--steps", "5"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
