"""Run folders: the resolved spec, metrics, parameters and checkpoints of one training run.

::

    RUN/
      spec.toml        the resolved spec (defaults filled in, overrides applied)
      run.json         backend, data shape, steps done, ppl_vae version
      metrics.jsonl    one JSON object per logged step: {"step", "split": "train"|"test", ...}
      params.npz       canonical parameters, the same names and layouts for both backends
      checkpoint.*     the backend's exact-resume state (optimizer, step, random state)
      report.json      written by `ppl-vae eval`

Every file is written atomically (a temporary file in the folder, then a rename), so an
interrupted write never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppl_vae.spec import Spec, load_spec, spec_to_dict, spec_to_toml

SPEC_FILE, INFO_FILE, METRICS_FILE, PARAMS_FILE = "spec.toml", "run.json", "metrics.jsonl", \
    "params.npz"


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (exists, missing, or from another spec)."""


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file next to `path`, then rename it onto `path`.

    `write` creates the file, so it gets the permissions the umask gives (a file made by
    `tempfile.mkstemp` would stay 0600)."""
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_params(path: Path, params: dict[str, np.ndarray]) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npz" to tmp
            np.savez(fh, **params)

    write_atomic(path, write)


def params_path(path) -> Path:
    """A params.npz file, or the params.npz of a run folder."""
    path = Path(path)
    path = path / PARAMS_FILE if path.is_dir() else path
    if not path.is_file():
        raise RunError(f"no parameters at {path} (train.init takes a params.npz or a run folder)")
    return path


def save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npy" to tmp
            np.save(fh, array)

    write_atomic(path, write)


def load_params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def read_info(run_dir: Path) -> dict:
    path = Path(run_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same_except_steps(a: Spec, b: Spec) -> bool:
    da, db = spec_to_dict(a), spec_to_dict(b)
    da["train"].pop("steps")
    db["train"].pop("steps")
    da["train"].pop("device")
    db["train"].pop("device")
    return da == db


def prepare_run_dir(path: Path, spec: Spec, *, resume: bool, overwrite: bool,
                    checkpoint_name: str) -> Path:
    """Create (or check, with `resume`) the run folder and write the resolved spec.

    An existing folder is refused unless `resume` (continue from its checkpoint; the spec may
    differ only in train.steps and train.device) or `overwrite` (delete it and start again).
    """
    path = Path(path)
    if resume and overwrite:
        raise RunError("choose one of --resume and --overwrite, not both")
    if path.exists() and any(path.iterdir()):
        if overwrite:
            shutil.rmtree(path)
        elif resume:
            if not (path / checkpoint_name).exists():
                raise RunError(f"cannot resume {path}: it has no {checkpoint_name} (was it trained "
                               "with the other backend? resume with the backend that wrote it)")
            old = load_spec(path / SPEC_FILE)
            if not _same_except_steps(old, spec):
                raise RunError(f"cannot resume {path}: its spec.toml differs from the spec given "
                               "in more than train.steps/train.device; use another --out or "
                               "--overwrite")
            done = read_info(path).get("step", 0)
            if spec.train.steps < done:  # checked before spec.toml is rewritten
                raise RunError(f"cannot resume {path}: it has trained {done} steps and "
                               f"train.steps = {spec.train.steps} asks for fewer; resume to "
                               f"train.steps >= {done}, or use --overwrite")
        else:
            raise RunError(f"run folder {path} already exists; pass --resume to continue it or "
                           "--overwrite to replace it (or choose another --out)")
    elif resume:
        raise RunError(f"cannot resume {path}: the folder does not exist")
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path / SPEC_FILE, spec_to_toml(spec))
    return path


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint a resumed run starts from)."""
    records = [r for r in read_metrics(path) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


@dataclass
class Run:
    """A run folder, loaded: `spec`, `info` (run.json), `metrics` (list of dicts), `params`."""

    path: Path
    spec: Spec
    info: dict
    metrics: list[dict] = field(repr=False)
    params: dict[str, np.ndarray] = field(repr=False)

    def records(self, split: str) -> list[dict]:
        return [r for r in self.metrics if r.get("split") == split]

    @property
    def final_test(self) -> dict:
        """The last test-split record (per-example metrics in nats)."""
        test = self.records("test")
        return test[-1] if test else {}

    def model(self, backend: str | None = None, device: str = "cpu"):
        """The backend's `Model` with this run's parameters (either backend reads params.npz)."""
        from ppl_vae.backends import backend_module

        mod = backend_module(backend or self.info["backend"], "hooks")
        shape = self.info.get("image_shape")
        return mod.Model(self.spec, self.info["data_dim"], tuple(shape) if shape else None,
                         device, params=self.params)


def load_run(path) -> Run:
    """Load a run folder written by `ppl_vae.fit` or `ppl-vae train`."""
    path = Path(path)
    for name in (SPEC_FILE, INFO_FILE, PARAMS_FILE):
        if not (path / name).exists():
            raise RunError(f"{path} is not a finished run folder: {name} is missing (train it "
                           "with `ppl-vae train SPEC --out DIR` first)")
    return Run(path, load_spec(path / SPEC_FILE), read_info(path),
               read_metrics(path / METRICS_FILE), load_params(path / PARAMS_FILE))
