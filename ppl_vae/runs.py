"""Run folders: the resolved spec, metrics, parameters and checkpoints of one training run.

::

    RUN/
      spec.toml        the resolved spec (defaults filled in, overrides applied)
      run.json         backend, data shape, steps done, ppl_vae version; the spec as trained
                       ("spec") and a sha256 digest of spec.toml, params.npz and the
                       checkpoint ("digests"), which resume, eval, plot and sample check
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

A folder cannot lie about its own files: whenever spec.toml, params.npz or the checkpoint is
written, its digest goes into run.json (`write_recorded`), and a file that no longer matches
(edited, truncated, swapped for another run's) is refused with one line naming it
(`verified_bytes`). A resume compares the spec given with the spec recorded and names every
dotted key that differs (`spec_differences`). A folder written before digests were recorded
still loads, with a one-line note.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import sys
import tomllib
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ppl_vae.spec import (
    Spec,
    SpecError,
    load_spec,
    spec_from_dict,
    spec_to_toml,
)

SPEC_FILE, INFO_FILE, METRICS_FILE, PARAMS_FILE = "spec.toml", "run.json", "metrics.jsonl", \
    "params.npz"
LOCK_FILE = ".lock"
RETRAIN = "train the run again with --overwrite"
#: Spec keys a resume may change: how long it trains (upward only) and where it runs.
RESUMABLE_KEYS = ("train.steps", "train.device", "train.devices", "train.threads")


class RunError(RuntimeError):
    """A run folder that cannot be used as asked (exists, missing, or from another spec)."""


def _tmp_path(path: Path) -> str:
    return str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file next to `path`, then rename it onto `path`.

    `write` creates the file, so it gets the permissions the umask gives (a file made by
    `tempfile.mkstemp` would stay 0600)."""
    path = Path(path)
    tmp = _tmp_path(path)
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


def params_writer(params: dict[str, np.ndarray]) -> Callable[[str], None]:
    """``write(path)`` of a params.npz holding `params` (for `write_atomic`, `write_recorded`)."""
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npz" to tmp
            np.savez(fh, **params)

    return write


def save_params(path: Path, params: dict[str, np.ndarray]) -> None:
    write_atomic(path, params_writer(params))


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


def load_params(path: Path, data: bytes | None = None) -> dict[str, np.ndarray]:
    """The arrays of a params.npz (`data`: its bytes, already read)."""
    try:  # our own file object: np.load leaves its own open when the zip is damaged
        with (open(path, "rb") if data is None else io.BytesIO(data)) as fh, np.load(fh) as npz:
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


# -- digests: a folder that cannot lie about its files ---------------------------------------
def digest(data: bytes) -> str:
    """"sha256:<hex>" of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def write_recorded(run_dir: Path, writes: dict[str, Callable[[str], None]],
                   info: dict) -> dict:
    """Write the files `writes` names ({file name: write(tmp_path)}) into `run_dir`, and
    run.json: `info` with their sha256 digests merged into ``info["digests"]``. Returns what
    run.json now holds.

    At every moment each file matches a digest run.json records: the new files are written to
    temporary names and hashed; run.json first records the new digests beside the old ones
    (``"previous"``: the step and digests the files on disk still have); then the files are
    renamed into place; then run.json is written without ``"previous"``. A crash anywhere leaves
    a folder whose files are either the old or the new ones, both recorded."""
    run_dir = Path(run_dir)
    info_path = run_dir / INFO_FILE
    tmps: dict[str, str] = {}
    try:
        for name, write in writes.items():
            tmps[name] = _tmp_path(run_dir / name)
            write(tmps[name])
        fresh = {name: file_digest(tmp) for name, tmp in tmps.items()}
        new = info | {"digests": info.get("digests", {}) | fresh}
        new.pop("previous", None)
        old = read_info(run_dir) if info_path.exists() else {}
        if old.get("digests"):
            write_json_atomic(info_path, new | {"previous": {"step": old.get("step", 0),
                                                             "digests": old["digests"]}})
        for name, tmp in tmps.items():
            os.replace(tmp, run_dir / name)
        tmps = {}
        write_json_atomic(info_path, new)
        return new
    finally:
        for tmp in tmps.values():
            Path(tmp).unlink(missing_ok=True)


def recorded_step(info: dict, name: str, found: str) -> int | None:
    """The step whose file `name` has the digest `found` (run.json's step, or the previous
    one's while a save is under way); None when run.json records neither."""
    if info.get("digests", {}).get(name) == found:
        return info.get("step", 0)
    previous = info.get("previous", {})
    if previous.get("digests", {}).get(name) == found:
        return previous.get("step", 0)
    return None


def has_digests(info: dict) -> bool:
    return bool(info.get("digests"))


def note_unverified(run_dir: Path) -> None:
    """The one-line note for a folder without digests (written before they were recorded)."""
    print(f"ppl-vae: note: {Path(run_dir) / INFO_FILE} records no digests (a run folder from "
          "an older ppl_vae): its files are used unchecked; a resume records them",
          file=sys.stderr)


def verified_bytes(path: Path, info: dict, fix: str, parse: Callable[[bytes], object] | None
                   = None) -> tuple[bytes, int | None]:
    """(bytes of `path`, the step they belong to) after checking them against the digest
    run.json records for the file; a `RunError` naming the file and `fix` where they differ.
    `parse` (bytes -> anything) is tried first on a mismatch, so that a damaged file is named
    as damaged (its own error) rather than only as changed. Without digests (an older folder):
    the bytes, unchecked, and step None."""
    path = Path(path)
    data = path.read_bytes()
    if not has_digests(info):
        return data, None
    expected = info["digests"].get(path.name)
    if expected is None:
        raise RunError(f"{path.parent / INFO_FILE} records no digest of {path.name} (the file "
                       f"was added after training wrote the folder?); {fix}")
    step = recorded_step(info, path.name, digest(data))
    if step is None:
        if parse is not None:
            parse(data)  # raises its own one-line error for a damaged file
        raise RunError(f"{path} is not the file training wrote (its sha256 differs from the one "
                       f"{INFO_FILE} records: changed, truncated or replaced since); {fix}")
    return data, step


def spec_table(spec: Spec) -> dict:
    """The plain data of `spec` as its spec.toml holds it (what run.json records as "spec")."""
    return tomllib.loads(spec_to_toml(spec))


def recorded_spec(run_dir: Path) -> Spec:
    """The spec a run folder was trained with, as run.json records it (spec.toml may have been
    changed since): ``ppl-vae train RUN --resume`` continues RUN with it."""
    info = read_info(run_dir)
    if "spec" not in info:
        what = "has no run.json" if not (Path(run_dir) / INFO_FILE).exists() else (
            f"records no spec in {INFO_FILE} (a run folder from an older ppl_vae)")
        raise RunError(f"{run_dir} {what}: give a spec file (its spec.toml) instead of the "
                       "folder")
    return spec_from_dict(info["spec"], str(Path(run_dir) / INFO_FILE))


def flatten_spec(table: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a spec's plain data (`spec_table`); a list of tables is keyed
    by index (``latents[0].dim``)."""
    out = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out |= flatten_spec(v, key)
        elif isinstance(v, list | tuple) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out |= flatten_spec(item, f"{key}[{i}]")
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def spec_differences(recorded: dict, given: dict, ignore=(), other: str = "given") -> list[str]:
    """'key: recorded X, given Y' (`other` names the second spec) for each dotted key whose
    value differs between two specs' plain data (`spec_table`), `ignore`d keys left out."""
    a, b = flatten_spec(recorded), flatten_spec(given)
    missing = object()

    def show(v) -> str:
        return "(absent)" if v is missing else repr(v)

    out = []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, missing), b.get(key, missing)
        if key not in ignore and va != vb:
            out.append(f"{key}: recorded {show(va)}, {other} {show(vb)}")
    return out


def describe_differences(differences: list[str], shown: int = 4) -> str:
    more = len(differences) - shown
    return "; ".join(differences[:shown]) + (f"; and {more} more key{'s' * (more > 1)}"
                                              if more > 0 else "")


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


def in_use(path: Path) -> dict | None:
    """{"pid", "host"} of the process training in the run folder `path` (its lock is held;
    {} when the lock names no owner yet), or None when no process holds it. Reads only: the
    flock is tried shared and let go at once."""
    lock = Path(path) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nothing trains here
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _lock_owner(lock) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        owner = _lock_owner(lock)  # unheld here; held elsewhere only if on another host
        return owner if owner and owner["host"] != socket.gethostname() else None
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
def check_run_dir(path: Path, spec: Spec, *, resume: bool, overwrite: bool,
                  checkpoint_name: str) -> None:
    """Refuse (`RunError`) a run folder that cannot be used as asked; writes nothing.

    An existing folder is refused unless `resume` (continue from its checkpoint; the spec may
    differ from the recorded one only in `RESUMABLE_KEYS`, train.steps upward) or `overwrite`
    (replace it: `start_run_dir`). A resume names every other key that differs, and refuses
    a checkpoint that is not the one training wrote (`verified_bytes`).
    Call it holding the folder's lock (`run_lock`).
    """
    path = Path(path)
    if resume and overwrite:
        raise RunError("choose one of --resume and --overwrite, not both")
    if is_empty(path):
        if resume:
            raise RunError(f"cannot resume {path}: the folder does not exist or is empty")
        return
    if not resume:
        if not overwrite:
            raise RunError(f"run folder {path} already exists; pass --resume to continue it "
                           "or --overwrite to replace it (or choose another --out)")
        return
    ckpt = path / checkpoint_name
    if not ckpt.exists():
        raise RunError(f"cannot resume {path}: it has no {checkpoint_name} (was it trained "
                       "with the other backend? resume with the backend that wrote it)")
    info = read_info(path)
    spec_file = path / SPEC_FILE
    changed = ""
    if has_digests(info) and "spec" in info:
        recorded = info["spec"]
        if (not spec_file.exists()
                or recorded_step(info, SPEC_FILE, file_digest(spec_file)) is None):
            changed = (f"{spec_file} was changed after training wrote it (its sha256 differs "
                       f"from {INFO_FILE}'s), and ")
    else:
        note_unverified(path)
        recorded = spec_table(load_spec(spec_file))
    differences = spec_differences(recorded, spec_table(spec), ignore=RESUMABLE_KEYS)
    if differences:
        raise RunError(
            f"cannot resume {path}: {changed}the spec given differs from the one it was trained "
            f"with: {describe_differences(differences)}; a resume may change only "
            f"{', '.join(RESUMABLE_KEYS)} (steps upward): resume with the spec it was "
            f"trained with (`ppl-vae train {path} --resume` reads it from {INFO_FILE}), or use "
            "another --out or --overwrite")
    if changed:
        print(f"ppl-vae: note: {spec_file} had changed since training wrote it; the spec given "
              "matches the recorded one and is written in its place", file=sys.stderr)
    done = info.get("step", 0)
    if spec.train.steps < done:  # checked before spec.toml is rewritten
        raise RunError(f"cannot resume {path}: it has trained {done} steps and "
                       f"train.steps = {spec.train.steps} asks for fewer; resume to "
                       f"train.steps >= {done}, or use --overwrite")
    if has_digests(info):
        verified_bytes(ckpt, info, "this run cannot be resumed: train it again with "
                       "--overwrite, or start a new run from its parameters with "
                       f"--set train.init={path}")


def start_run_dir(path: Path, spec: Spec, *, resume: bool, step: int = 0) -> dict:
    """Write the folder of a run that can start (checked by `check_run_dir`, its trainer built):
    a new run empties it (an --overwrite deletes the old run here, not before) and a resumed
    one drops the metrics after its checkpoint's `step`; then the resolved spec.toml, its digest
    recorded in run.json where there is one (a resume). Returns {"spec": the spec's plain
    data, "digests": {"spec.toml": digest}} for the run.json the trainer writes."""
    path = Path(path)
    text = spec_to_toml(spec)
    record = {"spec": tomllib.loads(text), "digests": {SPEC_FILE: digest(text.encode())}}
    if resume:
        truncate_metrics(path / METRICS_FILE, step)  # reads (and may refuse) before writing
        info = read_info(path)
        if has_digests(info):
            written = write_recorded(path, {SPEC_FILE: lambda tmp: Path(tmp).write_text(text)},
                                     info | {"spec": record["spec"]})
            return {"spec": record["spec"], "digests": written["digests"]}
    else:
        clear_run_dir(path)
    write_text_atomic(path / SPEC_FILE, text)
    return record


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
    """Load a run folder written by `ppl_vae.fit` or `ppl-vae train`, its spec.toml and
    params.npz checked against the digests run.json records (`verified_bytes`): a file that
    no longer matches is a `RunError` naming it. ``info["step"]`` is the step of the params
    loaded (a save under way in a folder in use may leave the previous step's)."""
    path = Path(path)
    for name in (SPEC_FILE, INFO_FILE, PARAMS_FILE):
        if not (path / name).exists():
            raise RunError(f"{path} is not a finished run folder: {name} is missing (train it "
                           "with `ppl-vae train SPEC --out DIR` first)")
    info = read_info(path)
    if not has_digests(info):
        note_unverified(path)
    spec_file = path / SPEC_FILE
    text, _ = verified_bytes(spec_file, info, _spec_fix(spec_file, info))
    params_file = path / PARAMS_FILE
    data, step = verified_bytes(params_file, info, RETRAIN,
                                parse=lambda b: load_params(params_file, b))
    if step is not None:
        info["step"] = step
    spec = _spec_from_text(spec_file, text)
    return Run(path, spec, info, read_metrics(path / METRICS_FILE),
               load_params(params_file, data))


def _spec_fix(spec_file: Path, info: dict) -> str:
    """What to do about a spec.toml that no longer matches: the keys that differ from the
    spec recorded in run.json, where the file still reads as a spec."""
    fix = (f"write back the spec it was trained with (`ppl-vae train {spec_file.parent} "
           f"--resume` takes it from {INFO_FILE}), or train the run again with --overwrite")
    if "spec" not in info:
        return fix
    try:
        differences = spec_differences(info["spec"], spec_table(load_spec(spec_file)),
                                       other="the file has")
    except (SpecError, OSError):
        return fix
    return (f"it differs from the spec training recorded in "
            f"{describe_differences(differences)}; {fix}") if differences else fix


def _spec_from_text(spec_file: Path, text: bytes) -> Spec:
    """The spec of spec.toml's bytes as read (and verified), named after the file."""
    import tomllib

    try:
        table = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise damaged(spec_file, err) from None
    return spec_from_dict(table, str(spec_file))
