"""Every example and benchmark runs in its --smoke mode (NumPyro's test_examples.py, with tiny
arguments). Benchmarks are only run here, never timed: speed is measured by hand. The
experiments (the lecture's five and latent_graphs) also run with the NumPyro backend where that
is quick (not the conv one), and leave the table, results and figure that examples/README.md
shows.

The smoke runs are forked from a warm server (tests/forkserver.py: one per test process), which
has imported torch, Pyro, JAX, NumPyro and matplotlib once: a fresh interpreter spends 3 to 4 s
on those imports before a script does anything (posterior_collapse's Pyro smoke run: 5 s in a
fresh interpreter, 1 s forked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_vae.experiments import MNIST_ENV
from tests.conftest import mnist_missing
from tests.forkserver import ForkServer

ROOT = Path(__file__).parents[1]
#: A smoke run that takes this long has hung (the slowest, bench_sweep, takes under a minute on
#: one core; several times that under load).
SMOKE_TIMEOUT_S = 1800
#: Scripts that need the MNIST files (--mnist, $PPL_VAE_MNIST or ../shared/data/mnist).
NEEDS_MNIST = ("latent_graphs", "semi_supervised", "mnist_table", "bench_latent_graphs",
               "discrete_latents")
SCRIPTS = sorted([*(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
#: Scripts whose smoke run is a richer test elsewhere, not repeated here.
SMOKE_ELSEWHERE = {
    "bench_gradients": "tests/test_bounds.py::test_the_gradient_benchmark_smoke_run",
    # (it needs MNIST's 60 000 training images; that test skips without them)
    "bench_peers": "tests/test_bench_peers.py::test_smoke_with_the_two_ppl_vae_backends",
}
#: Scripts run in a fresh interpreter, not forked from the warm server, each with its reason:
#: one that must set, before its imports, what a library reads as it loads (JAX_ENABLE_X64, say;
#: tests/forkserver.py's docstring). None so far: the XLA_FLAGS that scripts set (bench_sweep,
#: bench_baselines) are read when JAX starts its backend, which is in the forked child.
FRESH_INTERPRETER: tuple[str, ...] = ()
#: experiment -> its figure
EXPERIMENTS = {"posterior_collapse": "collapse.png", "rate_distortion": "rate_distortion.png",
           "universality": "universality.png", "encoder_autonomy": "encoder_autonomy.png",
           "disentangle": "disentangle.png", "latent_graphs": "latent_graphs.png",
           "semi_supervised": "semi_supervised.png", "discrete_latents": "discrete_latents.png",
           "mnist_table": "mnist_table.png"}
NUMPYRO_TOO = ("posterior_collapse",)
CASES = [pytest.param(p, "pyro", id=p.stem) for p in SCRIPTS if p.stem not in SMOKE_ELSEWHERE] + [
    pytest.param(ROOT / "examples" / f"{name}.py", "numpyro", id=f"{name}-numpyro")
    for name in NUMPYRO_TOO]


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    """The warm server of this test process. A script forked from it runs as in a fresh
    interpreter: the server has started no thread and no JAX backend (JAX reads XLA_FLAGS, with
    conftest's -O0, when the child starts one), and sys.executable is the real interpreter for
    what a benchmark starts itself. Session-scoped, not module-scoped: pytest-xdist hands a
    worker this module's tests in several chunks, between which a module's server would be torn
    down and started again (about 10 s each time)."""
    server = ForkServer(tmp_path_factory.mktemp("examples-server"),
                        {**os.environ, "MPLBACKEND": "Agg"})
    yield server
    server.close()


def _smoke_run(path: Path, args: list[str], cwd: Path, request) -> tuple[int, str]:
    """(exit code, stdout and stderr) of ``python PATH ARGS`` in `cwd`: forked from the warm
    server (asked for here only, so that a run of the other tests starts none), or a fresh
    interpreter for the scripts in FRESH_INTERPRETER."""
    if path.stem in FRESH_INTERPRETER:
        done = subprocess.run([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=SMOKE_TIMEOUT_S,
                              cwd=cwd, env={**os.environ, "MPLBACKEND": "Agg"})
        return done.returncode, done.stdout
    server = request.getfixturevalue("fork_server")
    return server.run("script", [str(path), *args], cwd, timeout=SMOKE_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("path, backend", CASES)
def test_example_smoke(path, backend, tmp_path, request):
    if path.stem in NEEDS_MNIST:
        reason = mnist_missing()
        if reason:
            pytest.skip(reason)
    extra = ["--backend", backend, "--no-progress"] if path.stem in EXPERIMENTS else []
    code, output = _smoke_run(path, ["--smoke", *extra], tmp_path, request)
    (tmp_path / "output.txt").write_text(output)
    print(output)  # pytest shows it with a failure
    assert code == 0, (f"exit code {code}; the end of its output (all of it in "
                       f"{tmp_path / 'output.txt'}):\n{output[-4000:]}")
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
