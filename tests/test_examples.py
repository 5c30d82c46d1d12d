"""Every example and benchmark runs in its --smoke mode (NumPyro's test_examples.py, with tiny
arguments). Benchmarks are only run here, never timed: speed is measured by hand. The
experiments (the lecture's five and latent_graphs) also run with the NumPyro backend where that
is quick (not the conv one), and leave the table, results and figure that examples/README.md
shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted([*(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
#: experiment -> its figure
EXPERIMENTS = {"posterior_collapse": "collapse.png", "rate_distortion": "rate_distortion.png",
           "universality": "universality.png", "encoder_autonomy": "encoder_autonomy.png",
           "disentangle": "disentangle.png", "latent_graphs": "latent_graphs.png"}
NUMPYRO_TOO = ("posterior_collapse",)
CASES = [pytest.param(p, "pyro", id=p.stem) for p in SCRIPTS] + [
    pytest.param(ROOT / "examples" / f"{name}.py", "numpyro", id=f"{name}-numpyro")
    for name in NUMPYRO_TOO]


@pytest.mark.parametrize("path, backend", CASES)
def test_example_smoke(path, backend, tmp_path):
    extra = ["--backend", backend, "--no-progress"] if path.stem in EXPERIMENTS else []
    done = subprocess.run([sys.executable, str(path), "--smoke", *extra], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if path.stem in EXPERIMENTS:
        out = tmp_path / "runs" / f"{path.stem}-smoke"
        written = {p.name for p in out.iterdir()}
        assert {"results.json", "table.md", EXPERIMENTS[path.stem]} <= written
        results = json.loads((out / "results.json").read_text())
        assert results["backend"] == backend and results["smoke"] and results["rows"]


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
