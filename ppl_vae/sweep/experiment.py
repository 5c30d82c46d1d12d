"""An experiment script's runs as one sweep: its command-line flags, and run-then-report.

The scripts in examples/ that train a grid (rate_distortion.py, disentangle.py) call
`experiment_sweep`: their runs are one sweep into a folder of the script's output, re-used on a
second run (``--fresh`` retrains), then `ppl_vae.sweep.report.sweep_report`; the flags that
choose seeds and the engine come from `add_experiment_arguments`.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ppl_vae import runs
from ppl_vae.sweep.engines import ENGINES, run_sweep
from ppl_vae.sweep.grid import load_sweep
from ppl_vae.sweep.report import DISENTANGLEMENT_FILE, sweep_report


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
