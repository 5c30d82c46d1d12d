"""`ppl-vae compare`: one spec trained by both backends, side by side (backend-free).

Each backend trains in its own process, so peak memory and start-up are its own.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from ppl_vae import graph, runs
from ppl_vae.backends import BACKENDS
from ppl_vae.diagnostics import active_units, active_units_from_draws


def timing(run) -> dict:
    """Steps per second after the first window, and the first window's extra time (compilation
    and warm-up), from the per-window wall seconds in metrics.jsonl."""
    train = run.records("train")
    if len(train) < 2:
        return {"steps_per_second": float("nan"), "compile_seconds": float("nan")}
    steps = [b["step"] - a["step"] for a, b in zip(train[:-1], train[1:])]
    per_step = statistics.median(r["seconds"] / n for r, n in zip(train[1:], steps))
    first = train[0]["seconds"] - train[0]["step"] * per_step
    return {"steps_per_second": 1.0 / per_step, "compile_seconds": max(first, 0.0)}


def compare_backends(spec, overrides, out: Path, device=None, overwrite=False) -> list[dict]:
    """Train `spec` with each backend into ``out/<backend>`` (each in its own process) and
    return one row of test metrics and timings per backend. Runs already in `out` are refused
    unless `overwrite`."""
    out = Path(out)
    with runs.run_lock(out):  # one compare per folder; each `train` below locks its own run
        return _compare(spec, overrides, out, device, overwrite)


def _compare(spec, overrides, out: Path, device, overwrite) -> list[dict]:
    from ppl_vae.data import load_data
    from ppl_vae.evaluation import posterior_means
    from ppl_vae.training import evaluation_data

    held = [b for b in BACKENDS if not runs.is_empty(out / b)]
    if held and not overwrite:  # refused here: `train` would suggest --resume, which compare lacks
        raise runs.RunError(f"{out} already holds the {' and '.join(held)} run"
                            f"{'s' if len(held) > 1 else ''} of a comparison; pass --overwrite "
                            "to replace them, or choose another --out")
    rows = []
    for backend in BACKENDS:
        run_dir = out / backend
        cmd = [sys.executable, "-m", "ppl_vae.cli", "train", str(spec), "--backend", backend,
               "--out", str(run_dir), "--no-progress"]
        cmd += [a for o in overrides for a in ("--set", o)]
        cmd += ["--device", device] if device else []
        cmd += ["--overwrite"] if overwrite else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no message)"]
            reason = lines[-1].removeprefix("ppl-vae train: error: ")
            raise runs.RunError(f"training with {backend} into {run_dir} failed: {reason}")
        run = runs.load_run(run_dir)
        test = run.final_test
        x, labels = evaluation_data(run.spec, load_data(run.spec))
        means = posterior_means(run.model(backend), run.spec, x,
                                labels if run.spec.label.condition else None)
        n_active = sum(active_units(m)[0] if d is None else active_units_from_draws(d)[0]
                       for m, d in means.values())
        rows.append({"backend": backend, "elbo": test["elbo"], "rate": test["rate"],
                     "distortion": test["distortion"], "active_units": int(n_active),
                     "latent_dim": graph.total_dim(run.spec),
                     "peak_memory_mb": run.info.get("peak_memory_mb", float("nan")),
                     "wall_seconds": run.info.get("wall_seconds", float("nan")),
                     "device": run.info.get("device", "?"),
                     "matmul_precision": run.info.get("matmul_precision", "highest"),
                     "step_mode": run.info.get("step_mode", "?"),
                     **timing(run)})
    return rows


def format_comparison(rows: list[dict]) -> str:
    fields = [("test ELBO (nats)", "elbo", "{:.3f}"), ("rate (nats)", "rate", "{:.3f}"),
              ("distortion (nats)", "distortion", "{:.3f}"),
              ("active dimensions", "active_units", "{}"),
              ("compile/warm-up (s)", "compile_seconds", "{:.2f}"),
              ("steps per second", "steps_per_second", "{:.1f}"),
              ("training wall time (s)", "wall_seconds", "{:.1f}"),
              ("peak memory (MiB)", "peak_memory_mb", "{:.0f}"),
              ("device", "device", "{}"), ("matmul precision", "matmul_precision", "{}")]
    lines = [f"{'':<24}" + "".join(f"{r['backend']:>14}" for r in rows)]
    for label, key, fmt in fields:
        lines.append(f"{label:<24}" + "".join(f"{fmt.format(r[key]):>14}" for r in rows))
    # How steps ran is a phrase, not a number: one line per backend.
    lines += [f"steps ({r['backend']}): {r['step_mode']}" for r in rows]
    return "\n".join(lines)
