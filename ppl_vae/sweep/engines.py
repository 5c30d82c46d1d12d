"""Running a sweep: the plan of where each point trains, the engines, and the driver.

`run_sweep` is the driver: it opens the sweep folder's record (`ppl_vae.sweep.record`), plans
the points not yet done (`plan`) and hands them to an engine (`ENGINES`), which runs each task
in a worker (`ppl_vae.sweep.worker`) and reports back as points start and end:

* ``local``: a pool of processes, one per point (started fresh, ``spawn``, so a crash takes down
  one point), ``workers`` at a time (default: the cores), each on one thread (XLA and the BLAS
  libraries held to one, `ppl_vae.sweep.worker.THREAD_ENV`; Pyro's train.threads default is
  already one);
* ``vmap`` (NumPyro): the points that differ only in `VMAPPABLE_KEYS` train together in ONE
  process, vmapped (`ppl_vae.numpyro.sweep`); the rest go to the pool, and the plan says so;
* ``serial``: one point after another in this process (no pool, no isolation from a crash:
  for debugging, and the baseline of benchmarks/bench_sweep.py);
* ``ray``: each point a Ray task (``num_cpus=1``, ``num_gpus`` as asked, fractions allowed) on a
  local Ray or the cluster at ``address``, over the same folders on a shared file system.

Ctrl-C asks every running point to stop at the end of its window and save (the ``.stop`` file,
which each point polls, also across machines); a second Ctrl-C stops at once (the last
checkpoints stay).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ppl_vae import runs
from ppl_vae.spec import Spec
from ppl_vae.sweep.grid import Point, Sweep, SweepError
from ppl_vae.sweep.record import (
    STOP_FILE,
    SWEEP_FILE,
    RecordKeeper,
    close_tracking,
    log_end,
    log_start,
    one_line,
    open_tracking,
    start_record,
)
from ppl_vae.sweep.worker import (
    THREAD_ENV,
    point_task,
    process_main,
    ray_task,
    run_group,
    run_point,
)

ENGINES = ("local", "vmap", "ray", "serial")
#: Keys a vmapped group's points may differ in: what the NumPyro window takes as traced inputs
#: (β and its schedule, the learning rate and its schedule: `ppl_vae.schedules.step_scalars`,
#: computed by the driver per step; λ; the seed: the parameters' initial values and the key) or
#: what only the driver reads (how long, how often it evaluates and saves). Everything else
#: (shapes, the optimiser's chain, the ELBO's settings, the data) must be equal, since the group
#: runs the first point's compiled window.
VMAPPABLE_KEYS = ("objective.beta", "objective.lam", "objective.beta_schedule.", "train.lr",
                  "train.lr_schedule.", "train.seed", "train.steps", "train.eval_every",
                  "train.checkpoint_every", "train.device", "train.threads")


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
    _check_engine(engine, workers, track)
    out = Path(out).resolve()
    with runs.run_lock(out):  # one driver per sweep folder
        record = start_record(sweep, out, backend, engine, overwrite)
        todo = [p for p, r in zip(sweep.points, record["points"])
                if r["status"] in ("pending", "interrupted")
                or (retry_failed and r["status"] == "failed")]
        stop_file = out / STOP_FILE
        stop_file.unlink(missing_ok=True)
        track_config = open_tracking(track, tracking_uri, out, sweep, record, backend)
        runs.write_json_atomic(out / SWEEP_FILE, record)
        log_start(record, sweep, out, todo, retry_failed, backend, engine, log)
        tasks, lines = plan(todo, engine, backend, vmap_size) if todo else ([], [])
        for line in lines:
            log(f"  {line}")
        keeper = RecordKeeper(record, out / SWEEP_FILE, len(todo) if progress else 0)
        stopped = False
        try:
            payloads = _payloads(tasks, lambda p: point_task(
                p, out, backend, device, keeper.tracking(p.index, track_config)))
            if engine == "ray":
                stopped = _run_ray(payloads, address, gpus_per_point, keeper.started,
                                   keeper.finished, stop_file, log)
            elif engine == "serial":
                stopped = _run_serial(payloads, keeper.started, keeper.finished)
            else:
                stopped = _run_local(payloads, workers or os.cpu_count() or 1, keeper.started,
                                     keeper.finished, stop_file, log, progress)
        finally:
            keeper.close()
            stop_file.unlink(missing_ok=True)
            close_tracking(track_config, record)
        log_end(record, stopped, command or "the same run_sweep call", log)
        record["stopped"] = stopped
        return record


def _check_engine(engine: str, workers: int | None, track: str | None) -> None:
    """Refuse an unknown engine, a worker count below 1, a tracker that is not installed."""
    if engine not in ENGINES:
        raise SweepError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if workers is not None and workers < 1:
        raise SweepError(f"--workers {workers}: at least 1")
    if track is not None:
        from ppl_vae import tracking

        tracking.check_available(track)


def _payloads(tasks: Sequence[Task], task_of: Callable[[Point], dict]) -> list[tuple]:
    """(kind, payload, indices) of each task, as an engine sends it to a worker: a point's
    task (`task_of`), or the list of its points' tasks for a vmapped group."""
    return [(t.kind, task_of(t.points[0]) if t.kind == "point" else
             [task_of(p) for p in t.points], [p.index for p in t.points]) for t in tasks]


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
            process = ctx.Process(target=process_main, args=(kind, payload, send, progress),
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
        remote = ray.remote(ray_task).options(
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
                    results = [{"index": i, "status": "failed", "error": one_line(err),
                                "step": 0, "seconds": 0.0} for i in indices]
                finished(results)
        return stopping
    finally:
        if own:
            ray.shutdown()


def continue_command(argv: Sequence[str]) -> str:
    """The command line that runs the same sweep again (and so continues it): 'ppl-vae …'."""
    return "ppl-vae " + shlex.join(argv)
