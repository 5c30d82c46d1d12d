"""What a worker runs: one point's training into its folder, or a vmapped group of points.

A worker is a fresh process of the local pool (`process_main`), a Ray task (`ray_task`) or, for
the serial engine, the driver's own process. It receives a point as a plain, picklable task
(`point_task`) and trains it with `ppl_vae.training.fit`: new, resumed from its checkpoint, or
restarted, as `ppl_vae.sweep.record.point_state` finds its folder (`run_point`); NumPyro points
of the same shapes train together in one process under `jax.vmap` (`run_group`, over
`ppl_vae.numpyro.sweep`). A point's failure is its result, never the worker's exception. Each
worker holds XLA and the BLAS libraries to one thread (`THREAD_ENV`, `set_thread_env`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ppl_vae import runs
from ppl_vae.spec import spec_from_dict
from ppl_vae.sweep.grid import Point
from ppl_vae.sweep.record import STOP_FILE, one_line, point_state

#: One thread per process: XLA's CPU client and the BLAS/OpenMP pools (PyTorch's intra-op
#: threads follow train.threads, whose default is one).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


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
        result |= {"status": "failed", "error": one_line(err)}
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
            result["tracking_error"] = one_line(err)
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
                                          "error": one_line(err), "step": 0, "seconds": 0.0,
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


def process_main(kind: str, payload, conn, progress: bool = False) -> None:
    """A worker process: one point or one vmapped group (with a bar over its steps when
    `progress`); sends its results and exits."""
    set_thread_env()
    try:
        results = [run_point(payload)] if kind == "point" else run_group(payload,
                                                                         progress=progress)
    except BaseException as err:  # noqa: BLE001 - report whatever ended it
        tasks = [payload] if kind == "point" else payload
        results = [{"index": t["index"], "status": "interrupted" if isinstance(
            err, KeyboardInterrupt) else "failed", "error": one_line(err), "step": 0,
            "seconds": 0.0, "tracking": None} for t in tasks]
    conn.send(results)
    conn.close()


def ray_task(kind: str, payload) -> list[dict]:
    """A Ray task: one point or one vmapped group; returns its results."""
    set_thread_env()
    return [run_point(payload)] if kind == "point" else run_group(payload)
