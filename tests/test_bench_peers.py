"""benchmarks/bench_peers.py: its estimator against torch.distributions, and its --smoke run
with the two ppl_vae backends (the peers, given no paths, are reported as skipped). Nothing is
timed here: the benchmark prints speed, the test checks that it runs and what it reports."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.data import MNIST_FILES, _find_file

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_peers  # noqa: E402

MNIST = Path(__file__).parents[1].parent / "shared" / "data" / "mnist"


def mnist_missing() -> str | None:
    names = [n for split in ("train", "test") for n in MNIST_FILES[split]]
    if MNIST.is_dir() and all(_find_file(MNIST, n) for n in names):
        return None
    return f"needs the MNIST IDX files, train-* and t10k-*, at {MNIST}"


def random_weights(rng, kind: str) -> dict:
    shapes = {"enc.W1": (400, 784), "enc.b1": (400,), "enc.loc.W": (20, 400),
              "enc.loc.b": (20,), "enc.scale.W": (20, 400), "enc.scale.b": (20,),
              "dec.W1": (400, 20), "dec.b1": (400,), "dec.out.W": (784, 400),
              "dec.out.b": (784,)}
    weights = {k: rng.normal(0, 0.05, s) for k, s in shapes.items()}
    weights["scale_kind"] = np.array(kind)
    return weights


@pytest.mark.parametrize("kind", ["exp", "exp_half", "softplus"])
def test_estimator_against_torch_distributions(kind):
    torch = pytest.importorskip("torch")
    from torch.distributions import Bernoulli, Normal, kl_divergence

    rng = np.random.default_rng(0)
    w = random_weights(rng, kind)
    x = (rng.random((300, 784)) < 0.3).astype(np.float64)
    eps = rng.standard_normal((300, 20))
    got = bench_peers.elbo_per_example(w, x, eps, batch=128)  # batches of uneven size

    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in w.items() if k != "scale_kind"}
    xt = torch.tensor(x)
    h = torch.relu(xt @ t["enc.W1"].T + t["enc.b1"])
    raw = h @ t["enc.scale.W"].T + t["enc.scale.b"]
    scale = {"exp": raw.exp(), "exp_half": (raw / 2).exp(),
             "softplus": torch.nn.functional.softplus(raw) + 1e-4}[kind]
    q = Normal(h @ t["enc.loc.W"].T + t["enc.loc.b"], scale)
    z = q.loc + q.scale * torch.tensor(eps)
    logits = torch.relu(z @ t["dec.W1"].T + t["dec.b1"]) @ t["dec.out.W"].T + t["dec.out.b"]
    expected = (Bernoulli(logits=logits).log_prob(xt).sum(1)
                - kl_divergence(q, Normal(0.0, 1.0)).sum(1))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-10)


def test_a_missing_folder_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"),
                           "--smoke", "--mnist", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    assert "--mnist DIR" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_smoke_with_the_two_ppl_vae_backends(tmp_path):
    if mnist_missing():
        pytest.skip(mnist_missing())
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--smoke", "--mnist",
         str(MNIST), "--json", str(out), "--pythae-python", str(tmp_path / "no" / "python")],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["ppl_vae-numpyro", "ppl_vae-pyro", "pythae", "pyro-example",
                          "numpyro-example"]
    for name in ("ppl_vae-numpyro", "ppl_vae-pyro"):
        r = rows[name]
        assert r["status"] == "ran", r["note"]
        assert r["epochs"] == bench_peers.SMOKE_EPOCHS and r["steps_per_epoch"] == 50
        assert len(r["elbos"]) == bench_peers.SMOKE_EPOCHS
        # 150 steps take the ELBO from about -543 (784 ln 2) well up; the estimator's own
        # numbers, not the backend's
        assert -300 < r["elbos"][0] < r["elbos"][-1] < -100
        assert 0 < r["first_epoch_s"] and 0 < r["epoch_s"] and math.isfinite(r["cpu_per_wall"])
        assert report["done"][name]["library"].startswith("ppl_vae")
    assert rows["pythae"]["status"] == "skipped" and "no such file" in rows["pythae"]["note"]
    assert rows["pyro-example"]["note"] == "no --pyro-example given"
    assert "| ppl_vae-pyro | 50 |" in done.stdout and "skipped: no --numpyro-example" in done.stdout
