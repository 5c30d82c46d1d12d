"""Run folders: the resolved spec, metrics, parameters and checkpoints of one training run.

::

    RUN/
      spec.toml        the resolved spec (defaults filled in, overrides applied)
      run.json         backend, data shape, steps done, ppl_vae version
      metrics.jsonl    one JSON object per logged step: {"step", "split": "train"|"test", ...}
      params.npz       canonical parameters, the same names and layouts for both backends
      checkpoint.*     the backend's exact-resume state (optimizer, step, random state)
      report.json      written by `ppl-vae eval`
      .lock            while a `train` (or `compare`) runs in it: the owner's PID and host

Every file but metrics.jsonl is written atomically (a temporary file in the folder, then a
rename), so an interrupted write never leaves a half-written checkpoint behind. metrics.jsonl is
appended a line per record: a crash mid-append can leave its last line torn, which
`read_metrics` skips with a warning (and a resume drops). A damaged file is a `RunError` naming
it and what to do.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppl_vae.spec import Spec, load_spec, spec_to_dict, spec_to_toml

SPEC_FILE, INFO_FILE, METRICS_FILE, PARAMS_FILE = "spec.toml", "run.json", "metrics.jsonl", \
    "params.npz"
LOCK_FILE = ".lock"
RETRAIN = "train the run again with --overwrite"


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


def damaged(path: Path, err: BaseException, fix: str = RETRAIN) -> RunError:
    """The one-line error for a file that cannot be read: the file, what went wrong, `fix`."""
    text = str(err).strip().splitlines()
    return RunError(f"{path} is damaged or truncated ({type(err).__name__}: "
                    f"{text[0] if text else ''}); {fix}")


def load_params(path: Path) -> dict[str, np.ndarray]:
    try:  # our own file object: np.load leaves its own open when the zip is damaged
        with open(path, "rb") as fh, np.load(fh) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        if not Path(path).exists():
            raise
        raise damaged(path, err) from None


def read_info(run_dir: Path) -> dict:
    path = Path(run_dir) / INFO_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as err:
        raise damaged(path, err) from None
    if not isinstance(info, dict):
        raise damaged(path, ValueError("not a JSON object"))
    return info


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order.

    The file is appended a line per record, so a crash mid-append leaves its last line torn:
    that line is skipped, with a warning on stderr naming the file. A bad line anywhere else is
    a `RunError` naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if i == last:
                print(f"ppl-vae: warning: the last line of {path} is incomplete (a write was "
                      "interrupted); it is skipped", file=sys.stderr)
                continue
            raise RunError(f"{path}, line {i + 1}: not a metrics record ({err}); the file is "
                           "damaged: delete that line, or train the run again") from None
        records.append(record)
    return records


# -- the lock -----------------------------------------------------------------------------------
def _lock_owner(lock: Path) -> dict | None:
    """{"pid", "host"} of a lock file; None if it names no owner (being written, or damaged)."""
    try:
        owner = json.loads(lock.read_text(errors="replace"))
        return owner if isinstance(owner.get("pid"), int) and "host" in owner else None
    except (OSError, ValueError, AttributeError):
        return None


def _in_use(lock: Path, owner: dict | None) -> RunError:
    who = f"process {owner['pid']}" if owner else "another process"
    if owner and owner["host"] != socket.gethostname():
        return RunError(f"run folder {lock.parent} is in use by {who} on host {owner['host']}; "
                        f"if that run has ended, delete {lock}")
    return RunError(f"run folder {lock.parent} is in use by {who} (a run is training in it); "
                    "wait for it to end or stop it, or choose another --out")


def _acquire(lock: Path) -> int:
    """An open descriptor of `lock` holding the kernel's exclusive `flock` on it, this process's
    PID and host written in it. The kernel drops a flock when its process ends, however it
    ends, so a held flock is a live owner and a lock file without one was left by a run that
    was killed: taken over with a note. Of two processes taking it over, one gets the flock.
    A lock naming another host is refused: a shared file system need not carry flocks."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(5):
        existed = lock.exists()  # (only for the note below)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        except OSError as err:
            raise RunError(f"cannot write {lock} ({err.strerror}); make {lock.parent} writable, "
                           "or choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _in_use(lock, _lock_owner(lock)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its owner removed it between our open and our flock: a new file
            os.close(fd)
            continue
        owner = _lock_owner(lock)
        if owner and owner["host"] != me["host"]:
            os.close(fd)
            raise _in_use(lock, owner)
        if existed:
            left = f"process {owner['pid']}" if owner else "a process"
            print(f"ppl-vae: note: {lock} was left by {left}, which is no longer running "
                  "(killed?); taking it over", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        return fd
    raise RunError(f"could not lock {lock.parent}: other processes keep taking {lock}")


def _release(lock: Path, fd: int) -> None:
    """Remove the lock file (still ours: we hold its flock), then let the flock go."""
    try:
        if os.fstat(fd).st_ino == os.stat(lock).st_ino:
            lock.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def run_lock(path: Path):
    """Hold the run folder `path` (created if missing) while the block runs.

    The lock is the file ``path/.lock`` under the kernel's exclusive `flock`, holding this
    process's PID and host: of two processes one gets it and the other a `RunError` naming the
    folder and the owner's PID, before it changes anything. It is removed on the way out (errors
    and Ctrl-C included); one left by a killed run is taken over with a note (`_acquire`).
    Folders this call created are removed again if they are left empty."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # the leaf first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create the run folder {path} ({err.strerror}); choose another "
                       "--out") from None
    lock = path / LOCK_FILE
    try:
        fd = _acquire(lock)
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        yield path
    finally:
        _release(lock, fd)
        _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): leave it and the folders above it
            return


def is_empty(path: Path) -> bool:
    """True for a missing folder or one with nothing in it but its lock."""
    path = Path(path)
    return not path.exists() or all(p.name == LOCK_FILE for p in path.iterdir())


def clear_run_dir(path: Path) -> None:
    """Delete everything in the folder but its lock (which the caller holds)."""
    for p in Path(path).iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# -- starting a run -----------------------------------------------------------------------------
def _same_except_steps(a: Spec, b: Spec) -> bool:
    da, db = spec_to_dict(a), spec_to_dict(b)
    da["train"].pop("steps")
    db["train"].pop("steps")
    for key in ("device", "devices", "threads"):  # where it runs, not what it computes
        da["train"].pop(key)
        db["train"].pop(key)
    return da == db


def check_run_dir(path: Path, spec: Spec, *, resume: bool, overwrite: bool,
                  checkpoint_name: str) -> None:
    """Refuse (`RunError`) a run folder that cannot be used as asked; writes nothing.

    An existing folder is refused unless `resume` (continue from its checkpoint; the spec may
    differ only in train.steps, .device, .devices and .threads) or `overwrite` (replace it:
    `start_run_dir`).
    Call it holding the folder's lock (`run_lock`).
    """
    path = Path(path)
    if resume and overwrite:
        raise RunError("choose one of --resume and --overwrite, not both")
    if is_empty(path):
        if resume:
            raise RunError(f"cannot resume {path}: the folder does not exist or is empty")
        return
    if resume:
        if not (path / checkpoint_name).exists():
            raise RunError(f"cannot resume {path}: it has no {checkpoint_name} (was it trained "
                           "with the other backend? resume with the backend that wrote it)")
        old = load_spec(path / SPEC_FILE)
        if not _same_except_steps(old, spec):
            raise RunError(f"cannot resume {path}: its spec.toml differs from the spec given "
                           "in more than train.steps/device/devices/threads; use another "
                           "--out or --overwrite")
        done = read_info(path).get("step", 0)
        if spec.train.steps < done:  # checked before spec.toml is rewritten
            raise RunError(f"cannot resume {path}: it has trained {done} steps and "
                           f"train.steps = {spec.train.steps} asks for fewer; resume to "
                           f"train.steps >= {done}, or use --overwrite")
    elif not overwrite:
        raise RunError(f"run folder {path} already exists; pass --resume to continue it or "
                       "--overwrite to replace it (or choose another --out)")


def start_run_dir(path: Path, spec: Spec, *, resume: bool, step: int = 0) -> None:
    """Write the folder of a run that can start (checked by `check_run_dir`, its trainer built):
    a new run empties it (an --overwrite deletes the old run here, not before) and a resumed
    one drops the metrics after its checkpoint's `step`; then the resolved spec.toml."""
    path = Path(path)
    if resume:
        truncate_metrics(path / METRICS_FILE, step)  # reads (and may refuse) before writing
    else:
        clear_run_dir(path)
    write_text_atomic(path / SPEC_FILE, spec_to_toml(spec))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written after the checkpoint a resumed run starts from), and
    a torn last line."""
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
