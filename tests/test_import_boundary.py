"""Importing the backend-free layer loads neither torch nor jax (nor pyro, numpyro)."""

import subprocess
import sys
from pathlib import Path

#: Every module of the package outside the two backends, found from the files (so a new
#: module is checked without being listed here).
_PACKAGE = Path(__file__).resolve().parents[1] / "ppl_vae"
BACKEND_FREE = sorted(
    ".".join(("ppl_vae", *p.relative_to(_PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for p in _PACKAGE.rglob("*.py")
    if p.relative_to(_PACKAGE).parts[0] not in ("pyro", "numpyro") and p.name != "__main__.py")


def test_backend_free_modules_import_no_backend():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in BACKEND_FREE) +
            "print(' '.join(m for m in ('torch', 'jax', 'pyro', 'numpyro', 'flax') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"
