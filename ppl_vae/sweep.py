"""Sweeps: a grid of ordinary runs as one command, backend-free.

A sweep is the Cartesian product of dotted overrides (``--grid objective.beta=0.5,1,2``, any
number of them) and seeds (``--seeds 5``: train.seed = the spec's seed + 0 … 4), each point an
ordinary run folder ``OUT/<index>-<short name>/`` with its resolved spec, so any point can be
resumed, evaluated or plotted alone (``ppl-vae eval OUT/03-beta2-seed1``). ``OUT/sweep.json``
records the definition (the base spec, the grid, the seeds, the backend) and each point's status
(pending, running, done, failed with its one-line error, interrupted), written by the driver
alone, atomically. A spec file may carry the sweep in a ``[sweep]`` table (`load_sweep`), which
`ppl_vae.spec.load_spec` leaves out, so the same file trains alone with ``ppl-vae train``::

    [sweep]
    grid = { "objective.beta" = [0.25, 1, 4], "latent.dim" = [4, 8] }
    seeds = 3                  # or a list: [0, 7, 9]
    engine = "vmap"            # local | vmap | ray (the command line's flags win)

Where the points run (`run_sweep`):

* ``local``: a pool of processes, one per point (started fresh, ``spawn``, so a crash takes down
  one point), ``workers`` at a time (default: the cores), each on one thread (XLA and the BLAS
  libraries held to one, `THREAD_ENV`; Pyro's train.threads default is already one);
* ``vmap`` (NumPyro): the points that differ only in `VMAPPABLE_KEYS` train together in ONE
  process, vmapped (`ppl_vae.numpyro.sweep`); the rest go to the pool, and the plan says so;
* ``serial``: one point after another in this process (no pool, no isolation from a crash:
  for debugging, and the baseline of benchmarks/bench_sweep.py);
* ``ray``: each point a Ray task (``num_cpus=1``, ``num_gpus`` as asked, fractions allowed) on a
  local Ray or the cluster at ``address``, over the same folders on a shared file system.

Robustness: a point that fails or diverges is recorded as failed with its error and the others
go on; the same command again skips finished points, resumes interrupted ones from their
checkpoints (exactly, as ``train --resume``) and leaves failed ones alone unless
``--retry-failed``; Ctrl-C asks every running point to stop at the end of its window and save
(a ``.stop`` file in OUT, which each point polls, also across machines), then prints the command
that continues; a second Ctrl-C stops at once (the last checkpoints stay).

`sweep_report` evaluates every finished point (`ppl_vae.report.evaluate_run`, cached in its
report.json) and aggregates one row per grid setting: mean ± standard error over seeds.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ppl_vae import runs
from ppl_vae.spec import (
    SWEEP_TABLE,
    Spec,
    SpecError,
    load_spec,
    parse_override,
    resolve_spec_path,
    spec_from_dict,
)

SWEEP_FILE, STOP_FILE = "sweep.json", ".stop"
ENGINES = ("local", "vmap", "ray", "serial")
STATUSES = ("pending", "running", "done", "failed", "interrupted")
#: Keys a vmapped group's points may differ in: what the NumPyro window takes as traced inputs
#: (β and its schedule, the learning rate and its schedule: `ppl_vae.schedules.step_scalars`,
#: computed by the driver per step; λ; the seed: the parameters' initial values and the key) or
#: what only the driver reads (how long, how often it evaluates and saves). Everything else
#: (shapes, the optimiser's chain, the ELBO's settings, the data) must be equal, since the group
#: runs the first point's compiled window.
VMAPPABLE_KEYS = ("objective.beta", "objective.lam", "objective.beta_schedule.", "train.lr",
                  "train.lr_schedule.", "train.seed", "train.steps", "train.eval_every",
                  "train.checkpoint_every", "train.device", "train.threads")
#: One thread per process: XLA's CPU client and the BLAS/OpenMP pools (PyTorch's intra-op
#: threads follow train.threads, whose default is one).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
SWEEP_KEYS = ("grid", "seeds", "engine", "workers", "vmap_size")


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad grid, a folder of another sweep, …): one line."""


# ---- declaring ---------------------------------------------------------------------------------
def _split_values(raw: str) -> list[str]:
    """'0.5,1,[64, 64]' -> ['0.5', '1', '[64, 64]']: commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(text: str) -> tuple[str, tuple]:
    """'objective.beta=0.25,0.5,1' -> ('objective.beta', (0.25, 0.5, 1.0)): each value read as
    a TOML value, as --set reads one (a bare word is a string; lists in brackets)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    values = [v for v in _split_values(raw)] if sep else []
    if not key or not values or any(v == "" for v in values):
        raise SweepError(f"--grid {text!r}: expected KEY=V1,V2,… (e.g. --grid "
                         "objective.beta=0.5,1,2)")
    parsed = tuple(parse_override(f"{key}={v}")[1] for v in values)
    if len(set(map(repr, parsed))) != len(parsed):
        raise SweepError(f"--grid {text!r}: a value is given twice")
    return key, parsed


def parse_seeds(value, base_seed: int = 0) -> tuple[int, ...]:
    """A count N (train.seed = base … base + N − 1), or a list of seeds ('0,3,7' or [0, 3])."""
    if isinstance(value, str):
        value = value.strip()
        value = int(value) if re.fullmatch(r"\d+", value) else [
            int(v) for v in value.split(",") if v.strip().lstrip("-").isdigit()] or value
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        raise SweepError(f"--seeds {value!r}: give a count (--seeds 5) or a list of seeds "
                         "(--seeds 0,3,7)")
    if isinstance(value, int):
        if value < 1:
            raise SweepError(f"--seeds {value}: at least 1")
        return tuple(range(base_seed, base_seed + value))
    seeds = tuple(int(s) for s in value)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {value!r}: a list of distinct seeds")
    return seeds


def _short_value(value) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = "x".join(_short_value(v) for v in value) or "none"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key's shortest tail that no other key shares: objective.beta -> beta;
    encoder.hidden and decoder.hidden -> encoder_hidden, decoder_hidden."""
    out = {}
    for key in keys:
        parts = key.replace("[", ".").replace("]", "").split(".")
        for n in range(1, len(parts) + 1):
            tail = "_".join(parts[-n:])
            others = ["_".join(o.replace("[", ".").replace("]", "").split(".")[-n:])
                      for o in keys if o != key]
            if tail not in others:
                break
        out[key] = tail
    return out


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its place, folder name, grid setting, seed and resolved spec."""

    index: int
    name: str
    setting: tuple[tuple[str, Any], ...]  # (dotted key, value) of each grid axis, in order
    seed: int | None  # None when the sweep has no seed axis
    spec: Spec = field(repr=False)

    @property
    def label(self) -> str:
        """The grid setting as text, seeds left out: 'beta=0.5, dim=8'."""
        names = short_names([k for k, _ in self.setting])
        return ", ".join(f"{names[k]}={_short_value(v)}" for k, v in self.setting) or "base"


@dataclass(frozen=True)
class Sweep:
    """The base spec, the grid (key, values) axes, the seeds and the points they make."""

    base: Spec
    grid: tuple[tuple[str, tuple], ...]
    seeds: tuple[int, ...] | None
    points: tuple[Point, ...]
    options: dict = field(default_factory=dict)  # the [sweep] table's engine, workers, …

    def definition(self, backend: str) -> dict:
        """What must match for a second run of the sweep into the same folder to continue it."""
        return {"spec": runs.spec_table(self.base), "source": self.base.source,
                "grid": [[k, list(v)] for k, v in self.grid],
                "seeds": list(self.seeds) if self.seeds is not None else None,
                "backend": backend}


def expand(base: Spec, grid: Sequence[tuple[str, Sequence]], seeds: Sequence[int] | None = None
           ) -> tuple[Point, ...]:
    """The Cartesian product of the grid's axes (in order, the last varying fastest) and the
    seeds (fastest of all), each point's spec resolved and validated now: a bad value is a
    `SpecError` naming its ``--grid`` before anything trains."""
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key is swept twice: {', '.join(keys)}")
    if seeds is not None and "train.seed" in keys:
        raise SweepError("train.seed is both a --grid axis and --seeds: use one of them")
    names = short_names(keys + (["train.seed"] if seeds is not None else []))
    combos = list(itertools.product(*[v for _, v in grid]))
    seed_axis = list(seeds) if seeds is not None else [None]
    total = len(combos) * len(seed_axis)
    width = len(str(total - 1))
    points = []
    for values in combos:
        setting = tuple(zip(keys, values))
        for seed in seed_axis:
            index = len(points)
            overrides = [(k, v, f"--grid {k}={_short_value(v)}") for k, v in setting]
            if seed is not None:
                overrides.append(("train.seed", seed, f"--seeds (seed {seed})"))
            spec = load_spec(base, overrides)
            parts = [f"{names[k]}{_short_value(v)}" for k, v in setting]
            if seed is not None:
                parts.append(f"seed{seed}")
            name = f"{index:0{width}d}-" + ("-".join(parts) or "base")
            points.append(Point(index, name, setting, seed, spec))
    return tuple(points)


def _sweep_table(spec) -> tuple[dict, str | None]:
    """The [sweep] table of a spec file (empty for a Spec or a file without one)."""
    if isinstance(spec, Spec):
        return {}, None
    import tomllib

    path = resolve_spec_path(spec)
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh).get(SWEEP_TABLE, {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}, str(path)  # load_spec says what is wrong with the file
    if not isinstance(table, dict):
        raise SpecError(SWEEP_TABLE, table, "a table [sweep]", str(path))
    for key in table:
        if key not in SWEEP_KEYS:
            raise SpecError(f"{SWEEP_TABLE}.{key}", table[key], ", ".join(SWEEP_KEYS),
                            str(path))
    grid = table.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SpecError(f"{SWEEP_TABLE}.grid", grid, 'a table of dotted keys to non-empty lists '
                        '({ "objective.beta" = [0.5, 1, 2] })', str(path))
    return table, str(path)


def load_sweep(spec: str | Path | Spec, grid: Sequence[str] = (), seeds=None,
               overrides: Sequence = ()) -> Sweep:
    """The sweep of `spec` (a file, a bundled name or a `Spec`): its [sweep] table's grid and
    seeds, then `grid` ("KEY=V1,V2" strings; a key given here replaces the table's) and
    `seeds` (a count or a list; replaces the table's), `overrides` applied to every point."""
    table, _ = _sweep_table(spec)
    base = load_spec(spec, overrides)
    axes = {k: tuple(v) for k, v in table.get("grid", {}).items()}
    for text in grid:
        key, values = parse_grid(text)
        axes[key] = values
    seeds_value = seeds if seeds is not None else table.get("seeds")
    seed_axis = parse_seeds(seeds_value, base.train.seed) if seeds_value is not None else None
    if not axes and seed_axis is None:
        raise SweepError("nothing to sweep: give --grid KEY=V1,V2,… and/or --seeds N (or a "
                         "[sweep] table in the spec file)")
    options = {k: table[k] for k in ("engine", "workers", "vmap_size") if k in table}
    return Sweep(base, tuple(axes.items()), seed_axis, expand(base, list(axes.items()),
                                                             seed_axis), options)


# ---- the state of a point's folder -----------------------------------------------------------
def point_state(folder: Path, spec: Spec, backend: str) -> tuple[str, int]:
    """(state, step) of a point's run folder: "new" (nothing there), "done" (trained to
    train.steps), "resume" (a checkpoint before the end), "restart" (a start that saved no
    checkpoint: trained again from step 0). A folder holding another run (another spec or
    backend) is a `SweepError`: the sweep never overwrites what it did not write."""
    folder = Path(folder)
    if runs.is_empty(folder):
        return "new", 0
    try:
        info = runs.read_info(folder)
    except runs.RunError:
        return "restart", 0
    if not info:
        return "restart", 0
    if info.get("backend") and info["backend"] != backend:
        raise SweepError(f"{folder} holds a run trained with {info['backend']}, not {backend}: "
                         "run the sweep with the backend it was started with, or use another "
                         "--out")
    if "spec" in info:
        differences = runs.spec_differences(info["spec"], runs.spec_table(spec),
                                            ignore=runs.RESUMABLE_KEYS)
        if differences:
            raise SweepError(f"{folder} holds another run "
                             f"({runs.describe_differences(differences)}); move it away or "
                             "use another --out")
    step = int(info.get("step", 0))
    if step <= 0:
        return "restart", 0
    return ("done" if step >= spec.train.steps else "resume"), step


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()


# ---- one point (in a worker process, a thread of a vmapped group, or a Ray task) -------------
def set_thread_env(environ=os.environ) -> None:
    """One thread per process (`THREAD_ENV`), before JAX or PyTorch is imported; flags already
    in XLA_FLAGS (a device count) are kept, the caller's own thread flags win."""
    for key, value in THREAD_ENV.items():
        if key == "XLA_FLAGS":
            present = environ.get(key, "")
            extra = [f for f in value.split() if f.split("=")[0] not in present]
            environ[key] = " ".join([present, *extra]).strip()
        else:
            environ.setdefault(key, value)


def point_task(point: Point, out: Path, backend: str, device: str | None = None,
               track: dict | None = None, progress: bool = False) -> dict:
    """The plain, picklable description of one point's training (for a process or Ray)."""
    return {"index": point.index, "name": point.name, "folder": str(Path(out) / point.name),
            "spec": runs.spec_table(point.spec), "source": point.spec.source or None,
            "backend": backend, "device": device, "stop_file": str(Path(out) / STOP_FILE),
            "track": dict(track) if track else None, "progress": progress}


def run_point(task: dict, make_trainer=None, dataset=None, stop: Callable[[], bool] | None
              = None) -> dict:
    """Train one point (`point_task`) into its folder: new, resumed from its checkpoint, or
    restarted, as `point_state` finds it; returns {"index", "status", "error", "step",
    "seconds", "tracking"}. Never raises for the point's own failure (it is the result)."""
    from ppl_vae.training import TrainingInterrupted, fit

    t0 = time.perf_counter()
    folder = Path(task["folder"])
    result = {"index": task["index"], "status": "failed", "error": None, "step": 0,
              "tracking": None}
    tracker = None
    try:
        spec = spec_from_dict(task["spec"], task["source"])
        state, _ = point_state(folder, spec, task["backend"])
        if state == "done":
            return result | {"status": "done", "step": spec.train.steps, "seconds": 0.0}
        if task["track"]:
            from ppl_vae import tracking

            tracker = tracking.open_run(task["track"], task["name"],
                                        runs.flatten_spec(task["spec"]))
            result["tracking"] = tracker.ids
        stop_file = Path(task["stop_file"])

        def should_stop() -> bool:
            return (stop is not None and stop()) or stop_file.exists()

        run = fit(spec, task["backend"], device=task["device"], out_dir=folder,
                  resume=state == "resume", overwrite=state == "restart",
                  progress=task["progress"], dataset=dataset,
                  on_record=_safe_logger(tracker, task["name"], result) if tracker else None,
                  should_stop=should_stop, make_trainer=make_trainer)
        result |= {"status": "done", "step": int(run.info["step"])}
        if tracker is not None:
            for name in (runs.SPEC_FILE, runs.INFO_FILE, runs.METRICS_FILE):
                tracker.log_artifact(folder / name)
    except TrainingInterrupted as err:
        result |= {"status": "interrupted", "step": err.step}
    except KeyboardInterrupt:
        result |= {"status": "interrupted", "error": "stopped at once (its last checkpoint "
                   "stays)"}
    except Exception as err:  # noqa: BLE001 - a point's failure is its result, not the sweep's
        result |= {"status": "failed", "error": _one_line(err)}
    finally:
        if tracker is not None:
            try:
                tracker.end(result["status"])
            except Exception:  # noqa: BLE001 - tracking must not fail the point
                pass
    if result["status"] != "done":
        try:
            result["step"] = int(runs.read_info(folder).get("step", 0))
        except runs.RunError:
            pass
    return result | {"seconds": time.perf_counter() - t0}


def _safe_logger(tracker, name: str, result: dict) -> Callable[[dict], None]:
    """`tracker.log_record` that never fails the run: the first error is one line on stderr
    and in the point's result ("tracking_error"), and the point logs nothing more."""
    def log(record: dict) -> None:
        if "tracking_error" in result:
            return
        try:
            tracker.log_record(record)
        except Exception as err:  # noqa: BLE001 - the store's problem, not the run's
            result["tracking_error"] = _one_line(err)
            print(f"ppl-vae sweep: warning: {name}: tracking stopped ({result['tracking_error']})"
                  "; the run goes on", file=sys.stderr)

    return log


def run_group(tasks: list[dict], progress: bool = False) -> list[dict]:
    """Train NumPyro points together in this process, vmapped (`ppl_vae.numpyro.sweep`). The
    first Ctrl-C asks each point to stop at the end of its window (checkpoint saved)."""
    import signal
    import threading

    from ppl_vae.data import load_data

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    try:
        previous = signal.signal(signal.SIGINT, on_signal)
    except ValueError:  # not the main thread
        previous = None
    try:
        results, points = {}, []
        for task in tasks:
            try:
                spec = spec_from_dict(task["spec"], task["source"])
                points.append({"task": task, "spec": spec, "dataset": load_data(spec)})
            except Exception as err:  # noqa: BLE001 - that point fails, the group goes on
                results[task["index"]] = {"index": task["index"], "status": "failed",
                                          "error": _one_line(err), "step": 0, "seconds": 0.0,
                                          "tracking": None}
        if points:
            from ppl_vae.numpyro.sweep import train_group

            done = train_group(points, lambda p, make: run_point(p["task"], make, p["dataset"],
                                                                 stop.is_set),
                               progress=progress, desc=f"{len(points)} points, vmapped")
            for p, r in zip(points, done):
                results[p["task"]["index"]] = r | {"index": p["task"]["index"]}
        return [results[t["index"]] for t in tasks]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _child(kind: str, payload, conn, progress: bool = False) -> None:
    """A worker process: one point or one vmapped group (with a bar over its steps when
    `progress`); sends its results and exits."""
    set_thread_env()
    try:
        results = [run_point(payload)] if kind == "point" else run_group(payload,
                                                                         progress=progress)
    except BaseException as err:  # noqa: BLE001 - report whatever ended it
        tasks = [payload] if kind == "point" else payload
        results = [{"index": t["index"], "status": "interrupted" if isinstance(
            err, KeyboardInterrupt) else "failed", "error": _one_line(err), "step": 0,
            "seconds": 0.0, "tracking": None} for t in tasks]
    conn.send(results)
    conn.close()


def _ray_task(kind: str, payload) -> list[dict]:
    set_thread_env()
    return [run_point(payload)] if kind == "point" else run_group(payload)


# ---- planning ----------------------------------------------------------------------------------
def vmap_key(spec: Spec) -> str:
    """The spec without the keys a vmapped group may vary (`VMAPPABLE_KEYS`), as text: points
    with equal keys train together."""
    flat = runs.flatten_spec(runs.spec_table(spec))
    kept = {k: v for k, v in flat.items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in VMAPPABLE_KEYS)}
    return json.dumps(kept, sort_keys=True, default=str)


def vmap_refusal(spec: Spec) -> str | None:
    """Why a point cannot join a vmapped group (None when it can)."""
    if spec.train.devices != 1:
        return "train.devices > 1"
    if spec.data.stream == "on":
        return "data.stream = on"
    return None


@dataclass
class Task:
    """What one worker runs: one point ("point") or a vmapped group of points ("group")."""

    kind: str
    points: list[Point]


def plan(points: Sequence[Point], engine: str, backend: str, vmap_size: int = 0
         ) -> tuple[list[Task], list[str]]:
    """The tasks for `engine` and the lines that say where each point runs. vmap (NumPyro
    only): points with equal `vmap_key` form a group (split into groups of at most `vmap_size`
    when > 0); a point alone in its group, or refused (`vmap_refusal`), goes to the pool."""
    if engine != "vmap":
        where = {"ray": "Ray tasks", "serial": "this process, one after another"}.get(
            engine, "the process pool")
        return [Task("point", [p]) for p in points], [f"{len(points)} point(s) in {where}"]
    if backend != "numpyro":
        raise SweepError("--engine vmap trains NumPyro points together; with --backend pyro "
                         "use --engine local (see the README's Sweeps section: why not "
                         "torch.func)")
    groups: dict[str, list[Point]] = {}
    alone: list[tuple[Point, str]] = []
    for p in points:
        why = vmap_refusal(p.spec)
        if why:
            alone.append((p, why))
        else:
            groups.setdefault(vmap_key(p.spec), []).append(p)
    tasks, lines = [], []
    for members in groups.values():
        size = vmap_size if vmap_size > 0 else len(members)
        for i in range(0, len(members), size):
            chunk = members[i:i + size]
            if len(chunk) == 1:
                alone.append((chunk[0], "no other point of the same shapes"))
            else:
                tasks.append(Task("group", chunk))
                lines.append(f"vmap: {len(chunk)} points in one process "
                             f"({chunk[0].name} … {chunk[-1].name})")
    tasks += [Task("point", [p]) for p, _ in alone]
    if alone:
        lines.append(f"pool: {len(alone)} point(s) alone ("
                     + "; ".join(f"{p.name}: {why}" for p, why in alone[:4])
                     + ("; …" if len(alone) > 4 else "") + ")")
    return tasks, lines


# ---- sweep.json --------------------------------------------------------------------------------
def read_sweep(out: Path) -> dict:
    """OUT/sweep.json, or a `SweepError` saying OUT is no sweep folder."""
    path = Path(out) / SWEEP_FILE
    if not path.exists():
        raise SweepError(f"{out} is not a sweep folder: it has no {SWEEP_FILE} (run "
                         "`ppl-vae sweep SPEC --grid … --out DIR` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise runs.damaged(path, err, "run the sweep again with --overwrite") from None
    return data


def _check_definition(recorded: dict, given: dict, out: Path) -> None:
    """The same sweep (train.steps may grow, as a resume allows), or a `SweepError` naming the
    difference."""
    what = []
    for key in ("grid", "seeds", "backend"):
        if recorded.get(key) != given.get(key):
            what.append(f"{key}: recorded {recorded.get(key)!r}, given {given.get(key)!r}")
    what += runs.spec_differences(recorded.get("spec", {}), given["spec"],
                                  ignore=runs.RESUMABLE_KEYS)
    if what:
        raise SweepError(f"{out} holds another sweep ({runs.describe_differences(what)}); "
                         "run the same command as before, or use another --out (or --overwrite "
                         "to delete it)")


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ---- running -----------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, out: str | Path, *, backend: str = "pyro", engine: str = "local",
              workers: int | None = None, device: str | None = None, address: str | None = None,
              gpus_per_point: float = 0.0, vmap_size: int = 0, track: str | None = None,
              tracking_uri: str | None = None, retry_failed: bool = False,
              overwrite: bool = False, progress: bool = True, command: str | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run the points of `sweep` not yet done into `out` with `engine` (`ENGINES`); returns the
    sweep record (what sweep.json holds). Points already done are skipped, interrupted ones
    resumed, failed ones skipped unless `retry_failed`. `command` is what the closing lines tell
    the user to run to continue (default: this call again)."""
    if engine not in ENGINES:
        raise SweepError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise SweepError(f"--workers {workers}: at least 1")
    if track is not None:
        from ppl_vae import tracking

        tracking.check_available(track)
    out = Path(out).resolve()
    command = command or "the same run_sweep call"
    definition = sweep.definition(backend)
    with runs.run_lock(out):  # one driver per sweep folder
        path = out / SWEEP_FILE
        if overwrite:
            runs.clear_run_dir(out)  # all but the lock we hold
        record = read_sweep(out) if path.exists() else None
        if record is not None:
            _check_definition(record["definition"], definition, out)
        elif not runs.is_empty(out):
            raise SweepError(f"{out} exists and holds no {SWEEP_FILE}: choose another --out "
                             "(or --overwrite to delete what is there)")
        previous = {p["name"]: p for p in (record or {}).get("points", [])}
        record = {"format": 1, "definition": definition, "created": (record or {}).get(
            "created", _now()), "updated": _now(), "engine": engine,
            "tracking": (record or {}).get("tracking"), "points": []}
        for point in sweep.points:
            state, step = point_state(out / point.name, point.spec, backend)
            old = previous.get(point.name, {})
            status = {"done": "done", "resume": "interrupted"}.get(state, "pending")
            if old.get("status") == "failed" and state != "done":
                status = "failed"  # as recorded; --retry-failed runs it again
            record["points"].append({
                "index": point.index, "name": point.name, "folder": point.name,
                "setting": {k: v for k, v in point.setting}, "seed": point.seed,
                "status": status, "error": old.get("error") if status == "failed" else None,
                "step": step, "steps": point.spec.train.steps,
                "seconds": old.get("seconds", 0.0), "tracking": old.get("tracking")})
        todo = [p for p, r in zip(sweep.points, record["points"])
                if r["status"] in ("pending", "interrupted")
                or (retry_failed and r["status"] == "failed")]
        skipped_failed = [r for r in record["points"]
                          if r["status"] == "failed" and not retry_failed]
        done_before = sum(r["status"] == "done" for r in record["points"])
        stop_file = out / STOP_FILE
        stop_file.unlink(missing_ok=True)
        track_config = _open_tracking(track, tracking_uri, out, sweep, record, backend)
        runs.write_json_atomic(path, record)
        failed_note = (f", {len(skipped_failed)} failed left alone (--retry-failed runs them)"
                       if skipped_failed else "")
        log(f"sweep: {len(sweep.points)} points in {out} ({done_before} done before, "
            f"{len(todo)} to run{failed_note}); backend {backend}, engine {engine}")
        tasks, lines = plan(todo, engine, backend, vmap_size) if todo else ([], [])
        for line in lines:
            log(f"  {line}")
        by_index = {r["index"]: r for r in record["points"]}
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="sweep", unit="point", dynamic_ncols=True)

        def task_of(point: Point) -> dict:
            config = None
            if track_config:
                config = dict(track_config)
                config["run_id"] = (by_index[point.index].get("tracking") or {}).get("run_id")
            return point_task(point, out, backend, device, config)

        def started(indices: list[int]) -> None:
            for i in indices:
                by_index[i]["status"] = "running"
            runs.write_json_atomic(path, record)

        def finished(results: list[dict]) -> None:
            for r in results:
                entry = by_index[r["index"]]
                entry.update(status=r["status"], error=r.get("error"), step=r.get("step", 0),
                             seconds=entry.get("seconds", 0.0) + r.get("seconds", 0.0))
                if r.get("tracking"):
                    entry["tracking"] = r["tracking"]
                if bar is not None:
                    bar.update(1)
                    if r["status"] == "failed":
                        bar.write(f"{entry['name']}: failed: {r.get('error')}")
            record["updated"] = _now()
            runs.write_json_atomic(path, record)

        stopped = False
        try:
            payloads = [(t.kind, task_of(t.points[0]) if t.kind == "point"
                         else [task_of(p) for p in t.points], [p.index for p in t.points])
                        for t in tasks]
            if engine == "ray":
                stopped = _run_ray(payloads, address, gpus_per_point, started, finished,
                                   stop_file, log)
            elif engine == "serial":
                stopped = _run_serial(payloads, started, finished)
            else:
                stopped = _run_local(payloads, workers or os.cpu_count() or 1, started,
                                     finished, stop_file, log, progress)
        finally:
            if bar is not None:
                bar.close()
            for entry in record["points"]:  # a point still "running" here was cut off
                if entry["status"] == "running":
                    entry["status"] = "interrupted"
            record["updated"] = _now()
            runs.write_json_atomic(path, record)
            stop_file.unlink(missing_ok=True)
            _close_tracking(track_config, record)
        counts = {s: sum(r["status"] == s for r in record["points"]) for s in STATUSES}
        log("sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        for r in record["points"]:
            if r["status"] == "failed" and r.get("error"):
                log(f"  {r['name']}: failed: {r['error']}")
        if counts["interrupted"] or counts["pending"] or stopped:
            log(f"continue with: {command}")
        record["stopped"] = stopped
        return record


def _open_tracking(track, uri, out: Path, sweep: Sweep, record: dict, backend: str):
    """The sweep's tracking config for its points (MLflow: the parent run, created or
    continued; TensorBoard: the log folder)."""
    if track is None:
        return None
    from ppl_vae import tracking

    if track == "tensorboard":
        logdir = uri or tracking.default_uri("tensorboard", out)
        record["tracking"] = {"kind": "tensorboard", "logdir": logdir}
        return dict(record["tracking"])
    uri = uri or (record.get("tracking") or {}).get("uri") or tracking.default_uri("mlflow")
    previous = record.get("tracking") or {}
    same = previous.get("kind") == "mlflow" and previous.get("uri") == uri
    parent = tracking.MLflowTracker(uri, sweep.base.name, f"sweep {out.name}",
                                    run_id=previous.get("parent_run_id") if same else None,
                                    tags={"ppl_vae.sweep": str(out)})
    parent.log_params({"sweep.out": str(out), "sweep.backend": backend,
                       "sweep.seeds": json.dumps(list(sweep.seeds) if sweep.seeds else None),
                       **{f"sweep.grid.{k}": json.dumps(list(v)) for k, v in sweep.grid}})
    parent.log_artifact(out / SWEEP_FILE)
    record["tracking"] = {"kind": "mlflow", "uri": uri, "experiment": sweep.base.name,
                          "parent_run_id": parent.run_id}
    if not same:  # a new store: the points' runs there are new too
        for entry in record["points"]:
            entry["tracking"] = None
    return dict(record["tracking"])


def _close_tracking(config, record: dict) -> None:
    if not config or config["kind"] != "mlflow":
        return
    from ppl_vae import tracking

    parent = tracking.MLflowTracker(config["uri"], config["experiment"], "",
                                    run_id=config["parent_run_id"])
    counts = {s: sum(r["status"] == s for r in record["points"]) for s in STATUSES}
    parent.log_metrics({f"points_{s}": n for s, n in counts.items()})
    done = counts["done"] == len(record["points"])
    parent.end("done" if done else "interrupted")


def _run_local(payloads, workers: int, started, finished, stop_file: Path, log,
               progress: bool = False) -> bool:
    """Each payload in a fresh process (spawn), `workers` at a time. Returns True when Ctrl-C
    stopped the sweep."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    queue = list(payloads)
    running: dict = {}  # sentinel -> (process, receiving end, indices)
    stopping = False

    def collect(sentinel) -> None:
        process, conn, indices = running.pop(sentinel)
        results = None
        try:
            if conn.poll():
                results = conn.recv()
        except (EOFError, OSError):
            results = None
        process.join()
        conn.close()
        if results is None:
            code = process.exitcode
            why = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
            results = [{"index": i, "status": "interrupted" if stopping else "failed",
                        "error": f"its process ended without a result ({why}; out of "
                                 "memory?)", "step": 0, "seconds": 0.0} for i in indices]
        finished(results)

    while queue or running:
        while queue and len(running) < workers and not stopping:
            kind, payload, indices = queue.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_child, args=(kind, payload, send, progress),
                                  daemon=False)
            process.start()
            send.close()
            running[process.sentinel] = (process, receive, indices)
            started(indices)
        if not running:
            break
        try:
            ready = wait(list(running), timeout=1.0)
            for sentinel in ready:
                collect(sentinel)
        except KeyboardInterrupt:
            if stopping:  # the second Ctrl-C: at once
                log("\nsweep: stopping at once; the running points keep their last checkpoints")
                for process, _, _ in list(running.values()):
                    process.terminate()
                for sentinel in list(running):
                    collect(sentinel)
                return True
            stopping = True
            stop_file.touch()
            queue.clear()
            log("\nsweep: stopping: each running point saves a checkpoint at the end of its "
                "window (Ctrl-C again to stop at once)")
    return stopping


def _run_serial(payloads, started, finished) -> bool:
    """Each payload in this process, in turn; a point stopped by Ctrl-C (it saved its
    checkpoint) stops the sweep."""
    for kind, payload, indices in payloads:
        started(indices)
        results = [run_point(payload)] if kind == "point" else run_group(payload)
        finished(results)
        if any(r["status"] == "interrupted" for r in results):
            return True
    return False


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--engine ray needs Ray: pip install 'ppl_vae[ray]' (or pip install "
                          "ray)") from None
    return ray


def _run_ray(payloads, address, gpus_per_point: float, started, finished, stop_file: Path,
             log) -> bool:
    """Each payload a Ray task with one CPU (and `gpus_per_point` GPUs), on the running Ray, the
    cluster at `address`, or a local one started here (and shut down after)."""
    ray = _import_ray()
    own = not ray.is_initialized()
    if own:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(_ray_task).options(
            num_cpus=1, num_gpus=gpus_per_point, max_retries=0,
            runtime_env={"env_vars": dict(THREAD_ENV)})
        refs = {}
        for kind, payload, indices in payloads:
            refs[remote.remote(kind, payload)] = indices
            started(indices)
        stopping = False
        while refs:
            try:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            except KeyboardInterrupt:
                if stopping:
                    log("\nsweep: stopping at once; the running points keep their last "
                        "checkpoints")
                    for ref in refs:
                        ray.cancel(ref, force=True)
                    finished([{"index": i, "status": "interrupted", "error": "cancelled",
                               "step": 0, "seconds": 0.0} for ids in refs.values() for i in ids])
                    return True
                stopping = True
                stop_file.touch()
                log("\nsweep: stopping: each running point saves a checkpoint at the end of its "
                    "window (Ctrl-C again to stop at once)")
                continue
            for ref in done:
                indices = refs.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - the task's worker died
                    results = [{"index": i, "status": "failed", "error": _one_line(err),
                                "step": 0, "seconds": 0.0} for i in indices]
                finished(results)
        return stopping
    finally:
        if own:
            ray.shutdown()


def continue_command(argv: Sequence[str]) -> str:
    return "ppl-vae " + shlex.join(argv)


# ---- aggregation -------------------------------------------------------------------------------
#: The report's columns: (key in a point's row, header, digits).
REPORT_METRICS = (("elbo", "test ELBO", 3), ("rate", "rate", 3),
                  ("nll_distortion", "distortion", 3), ("log_likelihood", "IWAE ln p", 3),
                  ("active_units", "active units", 2), ("mutual_information", "I_q", 3),
                  ("mig", "MIG", 3), ("factor_vae", "FactorVAE", 3), ("beta_vae", "β-VAE", 3))
#: Sizes of the disentanglement scores (as examples/disentangle.py, disentanglement_lib's
#: defaults scaled down to about a minute of encoding per model on a CPU).
DISENTANGLEMENT_SIZES = {"mig_points": 10000, "train": 2000, "eval": 1000, "variance": 5000}
DISENTANGLEMENT_FILE = "disentanglement.json"


def _cached_report(folder: Path, info: dict, iwae_k: int, particles: int | None) -> dict | None:
    path = folder / "report.json"
    if not path.exists() or path.stat().st_mtime < (folder / runs.PARAMS_FILE).stat().st_mtime:
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    from ppl_vae.report import EVAL_PARTICLES

    if (report.get("step") != info.get("step") or report.get("iwae_k", 0) != iwae_k
            or report.get("particles") != (particles or EVAL_PARTICLES)):
        return None
    return report


def disentanglement_scores(folder: Path, sizes: dict | None = None, backend: str | None = None,
                           seed: int = 0) -> dict | None:
    """The disentanglement scores of a run whose data know their factors, cached in
    RUN/disentanglement.json (recomputed when the step or the sizes change); None for data
    without factors. dSprites (rendered on the fly): MIG, the FactorVAE and β-VAE metrics on
    fresh factor draws (`ppl_vae.disentanglement`, as examples/disentangle.py); other data with
    factors: MIG of the test split's posterior means."""
    from ppl_vae import disentanglement
    from ppl_vae.data import load_data

    sizes = dict(sizes or DISENTANGLEMENT_SIZES)
    run = runs.load_run(folder)
    cache = Path(folder) / DISENTANGLEMENT_FILE
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("step") == run.info.get("step") and cached.get("sizes") == sizes:
                return cached["scores"]
        except (json.JSONDecodeError, KeyError):
            pass
    if run.spec.data.source == "dsprites":
        import numpy as np

        from ppl_vae import dsprites

        model = run.model(backend)

        def represent(factors):
            return model.encode(dsprites.render(factors), batch_size=512)[0]

        rng = np.random.default_rng(seed)
        mig = disentanglement.mig_from_factors(represent, dsprites.FACTOR_SIZES, rng,
                                               num_points=sizes["mig_points"])
        factor_vae = disentanglement.factor_vae_score(
            represent, dsprites.FACTOR_SIZES, rng, num_train=sizes["train"],
            num_eval=sizes["eval"], num_variance_estimate=sizes["variance"])
        beta_vae = disentanglement.beta_vae_score(represent, dsprites.FACTOR_SIZES, rng,
                                                  num_train=sizes["train"],
                                                  num_eval=sizes["eval"])
        scores = {"mig": mig.score, "mig_per_factor": mig.gaps.tolist(),
                  "mutual_info": mig.mutual_info.tolist(),
                  "factor_entropy": mig.entropy.tolist(),
                  "factor_vae": factor_vae["eval_accuracy"],
                  "factor_vae_active_dims": factor_vae["num_active_dims"],
                  "beta_vae": beta_vae["eval_accuracy"]}
    else:
        dataset = load_data(run.spec)
        if dataset.factors_test is None:
            return None
        codes = run.model(backend).encode(dataset.x_test)[0]
        mig = disentanglement.mig(codes, dataset.factors_test)
        scores = {"mig": mig.score, "mig_per_factor": mig.gaps.tolist()}
    runs.write_json_atomic(cache, {"step": run.info.get("step"), "sizes": sizes,
                                   "scores": scores})
    return scores


def _mean_se(values: list[float]) -> tuple[float, float]:
    from ppl_vae.diagnostics import standard_error

    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return sum(finite) / len(finite), standard_error(finite)


def aggregate(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    """One row per grid setting (the rows' "label", in order): n, and for each of `keys` its
    mean and standard error over the setting's seeds (``<key>``, ``<key>_se``; s.e. NaN for one
    seed) where any row has it."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        row = {"label": label, "setting": group[0]["setting"], "n": len(group)}
        for key in keys:
            values = [r[key] for r in group if isinstance(r.get(key), int | float)]
            if values:
                row[key], row[f"{key}_se"] = _mean_se([float(v) for v in values])
        out.append(row)
    return out


def _fmt(mean: float, se: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def sweep_report(out: str | Path, *, iwae_k: int = 1000, particles: int | None = None,
                 device: str = "cpu", disentanglement: bool = True,
                 disentanglement_sizes: dict | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Evaluate every finished point of the sweep in `out` (each report.json re-used while its
    step, iwae_k and particles match) and write OUT/sweep_report.{md,csv,json} (one row per grid
    setting, mean ± s.e. over seeds of `REPORT_METRICS`) and the figures
    OUT/sweep_rate_distortion.png and OUT/sweep_scores.png. Returns {"points", "settings",
    "files"}."""
    from ppl_vae.report import evaluate_run

    out = Path(out)
    record = read_sweep(out)
    rows = []
    entries = record["points"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), desc="sweep-report", unit="point", dynamic_ncols=True)
    skipped = []
    try:
        for entry in entries:
            folder = out / entry["folder"]
            if bar is not None:
                bar.update(1)
            try:
                info = runs.read_info(folder)
                if int(info.get("step", 0)) < entry["steps"]:
                    skipped.append(f"{entry['name']} ({entry['status']})")
                    continue
                report = _cached_report(folder, info, iwae_k, particles) or evaluate_run(
                    folder, device=device, iwae_k=iwae_k, particles=particles, progress=False)
                scores = (disentanglement_scores(folder, disentanglement_sizes)
                          if disentanglement else None)
            except (runs.RunError, OSError) as err:
                skipped.append(f"{entry['name']} ({_one_line(err)})")
                continue
            setting = entry["setting"]
            names = short_names(list(setting))
            label = ", ".join(f"{names[k]}={_short_value(v)}" for k, v in setting.items()) \
                or "base"
            row = {"name": entry["name"], "label": label, "setting": setting,
                   "seed": entry["seed"], "entropy": report.get("entropy")}
            for key, _, _ in REPORT_METRICS:
                if key in report:
                    row[key] = report[key]
            if scores:
                row |= {k: scores[k] for k in ("mig", "factor_vae", "beta_vae") if k in scores}
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    if skipped:
        log(f"sweep-report: {len(skipped)} point(s) not finished, left out: "
            + ", ".join(skipped[:6]) + (", …" if len(skipped) > 6 else ""))
    if not rows:
        raise SweepError(f"no finished point in {out} to report on (run the sweep first)")
    keys = [k for k, _, _ in REPORT_METRICS if any(k in r for r in rows)]
    settings = aggregate(rows, keys)
    files = _write_report(out, record, rows, settings, keys)
    _track_report(record, out, rows, files)
    return {"points": rows, "settings": settings, "files": [str(f) for f in files]}


def _write_report(out: Path, record: dict, rows, settings, keys) -> list[Path]:
    headers = {k: h for k, h, _ in REPORT_METRICS}
    digits = {k: d for k, _, d in REPORT_METRICS}
    lines = ["| setting | seeds | " + " | ".join(headers[k] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for s in settings:
        cells = [_fmt(s.get(k, float("nan")), s.get(f"{k}_se", float("nan")), digits[k])
                 for k in keys]
        lines.append(f"| {s['label']} | {s['n']} | " + " | ".join(cells) + " |")
    entropy = next((r["entropy"] for r in rows if r.get("entropy") is not None), None)
    notes = ["", "Test split, nats per example; mean ± standard error over seeds "
             f"({len(rows)} finished point(s) of {len(record['points'])})."]
    if entropy is not None:
        notes.append(f"H(y) = {entropy:.3f} nats (exact): every point has rate + distortion ≥ "
                     "H(y).")
    md = out / "sweep_report.md"
    runs.write_text_atomic(md, "\n".join(lines + notes) + "\n")
    buffer = io.StringIO()
    grid_keys = [k for k, _ in record["definition"]["grid"]]
    writer = csv.writer(buffer)
    writer.writerow([*grid_keys, "seeds", *[c for k in keys for c in (k, f"{k}_se")]])
    for s in settings:
        writer.writerow([json.dumps(s["setting"].get(k)) for k in grid_keys] + [s["n"]]
                        + [s.get(c, "") for k in keys for c in (k, f"{k}_se")])
    csv_path = out / "sweep_report.csv"
    runs.write_text_atomic(csv_path, buffer.getvalue())
    json_path = out / "sweep_report.json"
    runs.write_json_atomic(json_path, json.loads(json.dumps(
        {"definition": record["definition"], "settings": settings, "points": rows},
        default=float)))
    figures = [rate_distortion_figure(rows, entropy, out / "sweep_rate_distortion.png")]
    swept = _swept_axis(record)
    if swept is not None:
        figures.append(scores_figure(rows, settings, swept, keys, out / "sweep_scores.png"))
    return [md, csv_path, json_path, *figures]


def _swept_axis(record: dict) -> str | None:
    """The grid key the score figure puts on its x axis: the first axis of numbers."""
    for key, values in record["definition"]["grid"]:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return key
    return None


def rate_distortion_figure(rows: list[dict], entropy: float | None, path: Path) -> Path:
    """One point per run in the (rate, distortion) plane, a colour per grid setting; the line
    R + D = H(y) where the data know H(y)."""
    from ppl_vae.plots import annotate_points, figure, pad_limits, save

    fig = figure((6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    rates = [r.get("rate", float("nan")) for r in rows]
    dists = [r.get("nll_distortion", float("nan")) for r in rows]
    for i, label in enumerate(labels):
        pts = [(r.get("rate"), r.get("nll_distortion")) for r in rows if r["label"] == label]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, color=f"C{i % 10}",
                alpha=0.8)
    extra = [] if entropy is None else [entropy]
    pad_limits(ax, rates + extra, dists + extra)
    centres = [(sum(r.get("rate", 0) for r in rows if r["label"] == lab)
                / sum(r["label"] == lab for r in rows),
                sum(r.get("nll_distortion", 0) for r in rows if r["label"] == lab)
                / sum(r["label"] == lab for r in rows)) for lab in labels]
    annotate_points(ax, [c[0] for c in centres], [c[1] for c in centres], labels)
    if entropy is not None:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [entropy - lo, entropy - hi], "k--", lw=1,
                label=f"R + D = H(y) = {entropy:.3f}")
        ax.legend(fontsize=7)
    ax.set_xlabel("rate R = Î(y, z), nats")
    ax.set_ylabel("distortion D = Ĥ(y|z), nats")
    ax.set_title(f"{len(rows)} runs in the rate–distortion plane (one dot each)", fontsize=10)
    return save(fig, path)


def scores_figure(rows: list[dict], settings: list[dict], swept: str, keys: Sequence[str],
                  path: Path) -> Path:
    """Each score against the swept value: the mean over seeds (a line per setting of the other
    axes), a band of ± 1 standard error, each seed a dot."""
    from ppl_vae.plots import figure, save

    keys = [k for k in keys if any(k in r for r in rows)]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = figure((4.2 * ncols, 3.2 * nrows))
    xs_all = sorted({float(r["setting"][swept]) for r in rows})
    log_x = xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8
    others = lambda s: tuple((k, json.dumps(v)) for k, v in s.items() if k != swept)  # noqa: E731
    series = list(dict.fromkeys(others(s["setting"]) for s in settings))
    headers = {k: h for k, h, _ in REPORT_METRICS}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, other in enumerate(series):
            group = sorted((s for s in settings if others(s["setting"]) == other and key in s),
                           key=lambda s: float(s["setting"][swept]))
            if not group:
                continue
            x = [float(s["setting"][swept]) for s in group]
            mean = [s[key] for s in group]
            se = [s.get(f"{key}_se", float("nan")) for s in group]
            se = [0.0 if not math.isfinite(e) else e for e in se]
            colour = f"C{j % 10}"
            name = ", ".join(f"{k.split('.')[-1]}={json.loads(v)}" for k, v in other) or None
            ax.plot(x, mean, "-", color=colour, lw=1.5, label=name)
            ax.fill_between(x, [m - e for m, e in zip(mean, se)],
                            [m + e for m, e in zip(mean, se)], color=colour, alpha=0.2)
            dots = [r for r in rows if others(r["setting"]) == other and key in r]
            ax.plot([float(r["setting"][swept]) for r in dots], [r[key] for r in dots], ".",
                    color=colour, alpha=0.6, ms=4)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all], fontsize=7)
            ax.set_xticks([], minor=True)
        ax.set_xlabel(swept)
        ax.set_title(headers.get(key, key), fontsize=9)
        if i == 0 and len(series) > 1:
            ax.legend(fontsize=6)
    fig.suptitle("mean over seeds ± 1 s.e. (band); each seed a dot", fontsize=9)
    return save(fig, path)


def _track_report(record: dict, out: Path, rows: list[dict], files: list[Path]) -> None:
    """The report into MLflow where the sweep was tracked there: each point's scores and
    report.json into its run, the tables and figures into the sweep's parent run."""
    config = record.get("tracking") or {}
    if config.get("kind") != "mlflow":
        return
    from ppl_vae import tracking

    by_name = {e["name"]: e for e in record["points"]}
    for row in rows:
        run_id = (by_name[row["name"]].get("tracking") or {}).get("run_id")
        if not run_id:
            continue
        run = tracking.MLflowTracker(config["uri"], config["experiment"], row["name"],
                                     run_id=run_id)
        run.log_metrics({f"report/{k}": row[k] for k, _, _ in REPORT_METRICS if k in row})
        for name in ("report.json", DISENTANGLEMENT_FILE):
            run.log_artifact(out / row["name"] / name)
        run.end("done")
    parent = tracking.MLflowTracker(config["uri"], config["experiment"], "",
                                    run_id=config["parent_run_id"])
    for f in files:
        parent.log_artifact(f)
    parent.end("done")


# ---- the examples' sweeps ----------------------------------------------------------------------
def add_experiment_arguments(parser) -> None:
    """--seeds, --engine, --workers for an experiment script whose runs are a sweep."""
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per setting (train.seed 0 .. N-1); tables give mean ± s.e.")
    parser.add_argument("--engine", choices=list(ENGINES), default=None,
                        help="where the runs train (default: vmap with numpyro, else local)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes at a time (default: the cores)")


def experiment_sweep(base: str, grid: Sequence[str], args, steps: int, out: Path,
                     overrides: Sequence[str] = (), iwae_k: int = 0,
                     disentanglement_sizes: dict | None = None) -> list[dict]:
    """An experiment's runs as a sweep of `base` over `grid` and ``args.seeds`` into `out`
    (re-run: finished points are re-used, ``--fresh`` retrains), then `sweep_report`; returns
    each finished point's report.json with its "name", "folder", "seed", "setting",
    "train_seconds" and, where `disentanglement_sizes` is given, its disentanglement scores."""
    from ppl_vae.experiments import SMOKE_OVERRIDES

    tail = list(SMOKE_OVERRIDES) if args.smoke else [f"train.steps={args.steps or steps}"]
    if getattr(args, "threads", None) is not None:
        tail.append(f"train.threads={args.threads}")
    s = load_sweep(base, grid, seeds=args.seeds if args.seeds > 1 else None,
                   overrides=[*overrides, *tail])
    engine = args.engine or ("vmap" if args.backend == "numpyro" else "local")
    device = None if args.device == "auto" else args.device
    run_sweep(s, out, backend=args.backend, engine=engine, workers=args.workers, device=device,
              overwrite=args.fresh, progress=not args.no_progress,
              command=shlex.join(["python", *sys.argv]))
    result = sweep_report(out, iwae_k=0 if args.smoke else iwae_k,
                          device="cpu" if args.device == "auto" else args.device,
                          disentanglement=disentanglement_sizes is not None,
                          disentanglement_sizes=disentanglement_sizes,
                          progress=not args.no_progress)
    reports = []
    for row in result["points"]:
        folder = Path(out) / row["name"]
        report = json.loads((folder / "report.json").read_text())
        cached = folder / DISENTANGLEMENT_FILE
        scores = json.loads(cached.read_text())["scores"] if (
            disentanglement_sizes is not None and cached.exists()) else {}
        reports.append(report | scores | {
            "name": row["name"], "folder": str(folder), "seed": row["seed"] or 0,
            "setting": row["setting"],
            "train_seconds": float(runs.read_info(folder).get("wall_seconds", float("nan")))})
    return reports
