"""Importing the backend-free layer loads neither torch nor jax (nor pyro, numpyro)."""

import subprocess
import sys

BACKEND_FREE = ["ppl_vae", "ppl_vae.spec", "ppl_vae.data", "ppl_vae.objective",
                "ppl_vae.diagnostics", "ppl_vae.runs", "ppl_vae.training", "ppl_vae.report",
                "ppl_vae.cli", "ppl_vae.backends", "ppl_vae.plots", "ppl_vae.autoregressive",
                "ppl_vae.populations", "ppl_vae.dsprites", "ppl_vae.disentanglement",
                "ppl_vae.experiments"]


def test_backend_free_modules_import_no_backend():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in BACKEND_FREE) +
            "print(' '.join(m for m in ('torch', 'jax', 'pyro', 'numpyro', 'flax') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"
