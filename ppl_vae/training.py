"""`fit`: the backend-free training driver.

The driver owns everything that is the same for both backends: β per step from the schedule,
windows of `train.log_every` steps, metrics (per example, nats), evaluation on the test split,
atomic checkpoints, the progress bar, NaN/inf detection and Ctrl-C. A backend's `Trainer` runs
the steps of one window (`run_steps(scalars, lam)`: the per-step β, lr and capacity targets of
`ppl_vae.schedules.step_scalars`) and hands back one array per window, so the host waits for
the device once per window, not once per step.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np

from ppl_vae import graph, runs
from ppl_vae.backends import backend_module
from ppl_vae.data import Dataset, binarize, load_data
from ppl_vae.objective import site_betas, step_fields
from ppl_vae.schedules import step_scalars
from ppl_vae.spec import LABEL_SITE, Spec, load_spec
from ppl_vae.version import __version__


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last finite metrics."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved; `step` says where."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@contextmanager
def _interrupt_flag():
    """While active, the first Ctrl-C sets flag["stop"] (the driver stops at the end of the
    window and saves); a second Ctrl-C interrupts at once."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def evaluation_data(spec: Spec, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The test split as the model is scored on it: binarised once (seeded) when training
    binarises dynamically, so every evaluation sees the same binary images."""
    x = dataset.x_test
    if spec.data.binarize == "dynamic":
        x = binarize(x, np.random.default_rng(spec.train.seed + 1))
    return x, dataset.labels_test


def evaluate(model, spec: Spec, x: np.ndarray, labels: np.ndarray, beta: float,
             lam: float, num_particles: int | None = None) -> dict[str, float]:
    """Per-example test metrics in nats: elbo (β = λ = 1, nll), objective (as trained, `beta`
    the global β), rate, distortion (as trained), nll, aux; in a latent graph rate/<site> per
    site; and the rate of each dimension where a site's posterior and prior factorise
    (`graph.rate_dim_key`: rate/dim_<i> in a one-site spec, rate/<site>/dim_<i> in a graph).
    `num_particles` draws of z per example (default the spec's), in batches that hold
    train.eval_batch_size draws."""
    k = num_particles or spec.objective.num_particles
    sums = model.eval_terms(x, labels, site_betas(spec, beta), lam, seed=spec.train.seed,
                            batch_size=max(1, spec.train.eval_batch_size // k), num_particles=k)
    n = len(x)
    out = {}
    for key, value in sums.items():
        parts = key.split("/")
        if len(parts) == 3:  # rate/<site>/dim_<i>
            key = graph.rate_dim_key(spec, parts[1], int(parts[2][len("dim_"):]))
        elif len(parts) == 2 and not graph.is_graph(spec) and parts[1] != LABEL_SITE:
            continue  # rate/z of a one-site spec is the rate
        out[key] = value / n
    out["elbo"] = -(out["rate"] + out["nll"])
    return out


#: A window whose mean loss exceeds the best loss seen so far (a window's mean, or the first
#: step of a window, whose loss is computed before its update) by this many times the best's
#: size (nats per example, at least 1) has blown up, short of NaN: train.lr = 10 on the digits
#: goes from 45 at the first step to 2e8 within ten steps.
BLOW_UP_FACTOR = 100.0


def blew_up(objective: float, best: float) -> bool:
    """True when a window's mean loss is far above the best window's so far (`BLOW_UP_FACTOR`),
    which no healthy run does: the loss fell, then left the scale of the problem."""
    return bool(np.isfinite(best) and objective > best + BLOW_UP_FACTOR * max(abs(best), 1.0))


def resume_command(out: Path, backend: str) -> str:
    """The command that continues the run in `out`: its own spec.toml (the spec as resolved,
    overrides included) and backend."""
    return f"ppl-vae train {out / runs.SPEC_FILE} --backend {backend} --out {out} --resume"


def _windows(start: int, steps: int, every: int):
    """(first, last) completed-step counts of each logging window: ends at multiples of
    `every` and at `steps`, so a resumed run logs at the same steps as a straight one."""
    s = start
    while s < steps:
        e = min((s // every + 1) * every, steps)
        yield s, e
        s = e


def _fmt(record: dict) -> str:
    return ", ".join(f"{k}={record[k]:.4g}" for k in ("rate", "distortion", "elbo", "objective")
                     if k in record)


def _last_finite(record: dict, start: int) -> str:
    """The last logged metrics before a divergence, or why there are none."""
    if record:
        return f"last finite metrics (step {record['step']}): {_fmt(record)}"
    return ("it happened in the first window, before any metrics were logged" if start == 0
            else f"it happened in the first window after step {start}, where the run resumed")


def default_out_dir(spec: Spec) -> Path:
    return Path("runs") / f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"


def fit(spec: Spec | str | Path, backend: str = "pyro", device: str | None = None,
        out_dir: str | Path | None = None, *, overrides=(), resume: bool = False,
        overwrite: bool = False, progress: bool = True, dataset: Dataset | None = None,
        on_record=None, should_stop=None, make_trainer=None):
    """Train `spec` with `backend`; return the finished `Run` (its folder, metrics, params), or
    None in the other processes of a data-parallel run (train.devices; rank 0 returns the run).

    :param spec: a `Spec`, a TOML path or a bundled model name (see `ppl_vae.list_models()`).
    :param device: "auto" | "cpu" | "cuda"; overrides ``train.device``.
    :param out_dir: the run folder; default ``runs/<name>-<timestamp>``.
    :param resume: continue the run in `out_dir` from its checkpoint (to ``train.steps``).
    :param overwrite: replace an existing `out_dir`.
    :param dataset: use these arrays instead of loading ``spec.data`` (tests, notebooks).
    :param on_record: called with each record as it is appended to metrics.jsonl (tracking).
    :param should_stop: polled once per window: True stops as Ctrl-C does (a checkpoint, then
        `TrainingInterrupted`), for a run that receives no signal (a sweep's thread or task).
    :param make_trainer: ``make_trainer(spec, dataset, device)`` instead of the backend's
        `Trainer` (a sweep's vmapped points: `ppl_vae.numpyro.sweep`).
    """
    spec = load_spec(spec, overrides)
    if device is not None:
        spec = spec.replace(train=replace(spec.train, device=device))
    train_mod = backend_module(backend, "train")
    dataset = dataset if dataset is not None else load_data(spec)
    out = Path(out_dir) if out_dir is not None else default_out_dir(spec)
    ckpt_name = train_mod.Trainer.checkpoint_name
    metrics_path, ckpt_path = out / runs.METRICS_FILE, out / ckpt_name
    if train_mod.process_rank(spec) != 0:  # data-parallel (train.devices): rank 0 alone writes
        return _follow(spec, train_mod.Trainer(spec, dataset, spec.train.device), ckpt_path,
                       resume)
    with runs.run_lock(out):
        # Everything that can refuse the start comes before the first write: the folder's
        # state, the trainer (device, dtype, memory), the initial parameters, the checkpoint.
        runs.check_run_dir(out, spec, resume=resume, overwrite=overwrite,
                           checkpoint_name=ckpt_name)
        trainer = (make_trainer or train_mod.Trainer)(spec, dataset, spec.train.device)
        start = _start_from(trainer, spec, ckpt_path, resume)
        previous = runs.read_info(out) if resume else {}
        info = {"backend": backend, "data_dim": dataset.dim, "image_shape": dataset.image_shape,
                "data": dataset.name, "n_train": len(dataset.x_train),
                "n_test": len(dataset.x_test), "device": str(trainer.device),
                "matmul_precision": spec.train.matmul_precision, "step": start,
                "wall_seconds": previous.get("wall_seconds", 0.0), "version": __version__}
        info |= runs.start_run_dir(out, spec, resume=resume, step=start)  # spec, its digest
        try:
            _drive(spec, trainer, dataset, out, metrics_path, ckpt_path, start, info, progress,
                   on_record or (lambda record: None), should_stop or (lambda: False))
        except BaseException:
            # A new run that fails before its first window is logged (β = inf, out of memory
            # on the first step, a double Ctrl-C) leaves nothing that would block its --out.
            if not resume and not metrics_path.exists():
                runs.clear_run_dir(out)
            raise
        finally:
            trainer.close()  # a streamed run's prefetching thread
    return runs.load_run(out)


def _follow(spec: Spec, trainer, ckpt_path: Path, resume: bool) -> None:
    """A data-parallel run's other processes (rank > 0): the same windows as rank 0, hence the
    same collectives, writing nothing (rank 0 locks, logs, evaluates and saves). Returns None:
    the run folder is rank 0's."""
    try:
        start = _start_from(trainer, spec, ckpt_path, resume)
        for first, last in _windows(start, spec.train.steps, spec.train.log_every):
            trainer.run_steps(step_scalars(spec, np.arange(first, last), trainer.n_train),
                              spec.objective.lam)
    finally:
        trainer.close()


def _start_from(trainer, spec: Spec, ckpt_path: Path, resume: bool) -> int:
    """The step training starts at: the checkpoint's (resume), else 0, from train.init's
    parameters where it names some."""
    if resume:
        return _load_checkpoint(trainer, ckpt_path)
    if spec.train.init:
        trainer.model.import_params(runs.load_params(runs.params_path(spec.train.init)))
    return 0


def _load_checkpoint(trainer, path: Path) -> int:
    """`trainer.load_checkpoint`, with a damaged file a one-line `RunError` naming it."""
    try:
        return trainer.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - whatever the backend's reader raises
        raise runs.damaged(path, err, "this run cannot be resumed: train it again with "
                           "--overwrite, or start a new run from its parameters with "
                           f"--set train.init={path.parent}") from err


def _peak_memory_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _save(trainer, out: Path, ckpt_path: Path, info: dict) -> None:
    """params.npz, the checkpoint and run.json, their digests recorded (`runs.write_recorded`)."""
    written = runs.write_recorded(
        out, {runs.PARAMS_FILE: runs.params_writer(trainer.model.export_params()),
              ckpt_path.name: trainer.save_checkpoint},
        info | {"step": trainer.step, "step_mode": trainer.step_mode,
                "peak_memory_mb": _peak_memory_mb()})
    info["digests"] = written["digests"]


def _window_means(spec: Spec, values: np.ndarray) -> dict:
    """A window's (steps, F) trainer rows as metrics: the mean of each `step_fields` term
    over the steps, and `skipped` (where updates may be skipped) as the count of skipped
    updates."""
    fields = step_fields(spec)
    out = dict(zip(fields, values.mean(0).tolist()))
    if "skipped" in out:
        out["skipped"] = int(round(values[:, fields.index("skipped")].sum()))
    return out


def _drive(spec, trainer, dataset, out, metrics_path, ckpt_path, start, info, progress,
           on_record, should_stop):
    tr, obj = spec.train, spec.objective
    x_eval, labels_eval = evaluation_data(spec, dataset)
    nll_trained = obj.distortion == "nll"
    last_finite: dict = {}
    best_objective = np.inf
    last_ckpt = start if start else None
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tr.steps, initial=start, desc=f"{spec.name} [{info['backend']}]",
                   unit="step", dynamic_ncols=True)
    try:
        with _interrupt_flag() as flag:
            for first, last in _windows(start, tr.steps, tr.log_every):
                scalars = step_scalars(spec, np.arange(first, last), trainer.n_train)
                values = trainer.run_steps(scalars, obj.lam)
                bad = ~np.isfinite(values[:, 0])
                if np.isfinite(values[0, 0]):  # the first step's loss: before its update
                    best_objective = min(best_objective, float(values[0, 0]))
                if not bad.any() and blew_up(values[:, 0].mean(), best_objective):
                    where = (f"the last good checkpoint (step {last_ckpt}) is in {ckpt_path}, "
                             "not overwritten" if last_ckpt else "no checkpoint was written")
                    raise TrainingDiverged(
                        f"the loss blew up: {values[:, 0].mean():.4g} nats per example in the "
                        f"window ending at step {last}, against {best_objective:.4g} at best "
                        f"before (a window's mean or a window's first step); "
                        f"{_last_finite(last_finite, start)}; {where}. Try a smaller train.lr "
                        "or train.clip_norm > 0.")
                if bad.any():
                    step = first + int(np.argmax(bad)) + 1
                    where = (f"the last good checkpoint (step {last_ckpt}) is in {ckpt_path}"
                             if last_ckpt else "no checkpoint was written yet")
                    raise TrainingDiverged(
                        f"the loss became {values[np.argmax(bad), 0]} at step {step}; "
                        f"{_last_finite(last_finite, start)}; {where}. Try a smaller train.lr, "
                        "train.clip_norm > 0, or float64 (train.dtype).")
                # β, lr and each capacity target as at the window's last step
                record = {"step": last, "split": "train"}
                record |= {k: float(v[-1]) for k, v in scalars.items()} | {"lam": obj.lam}
                record |= _window_means(spec, values)
                if nll_trained:
                    record["elbo"] = -(record["rate"] + record["distortion"])
                record["seconds"] = time.perf_counter() - t0
                runs.append_metrics(metrics_path, record)
                on_record(record)
                last_finite = record
                best_objective = min(best_objective, record["objective"])
                if bar is not None:
                    bar.update(last - first)
                    bar.set_postfix(rate=f"{record['rate']:.3g}",
                                    distortion=f"{record['distortion']:.4g}")
                if last % tr.eval_every == 0 or last == tr.steps:
                    test = evaluate(trainer.model, spec, x_eval, labels_eval,
                                    float(scalars["beta"][-1]), obj.lam)
                    runs.append_metrics(metrics_path, {"step": last, "split": "test"} | test)
                    on_record({"step": last, "split": "test"} | test)
                    if bar is not None:
                        bar.write(f"step {last}: test {_fmt(test)}")
                info["wall_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                flag["stop"] = flag["stop"] or should_stop()
                if last % tr.checkpoint_every == 0 or last == tr.steps or flag["stop"]:
                    _save(trainer, out, ckpt_path, info)
                    last_ckpt = last
                if flag["stop"] and last < tr.steps:
                    raise TrainingInterrupted(
                        f"interrupted at step {last}: checkpoint saved in {out}; continue with "
                        f"`{resume_command(out, info['backend'])}`", last)
    finally:
        if bar is not None:
            bar.close()

