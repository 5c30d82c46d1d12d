"""K sweep points three ways (NumPyro): one after another in one process, in the process pool,
and vmapped in one process; wall time and the ratios, in one run.

The points are a β sweep of a small MLP VAE on the 8x8 digits (`vae_digits` with one hidden
layer of 128 units each way), K values of objective.beta, one seed, a few hundred steps each;
every way runs the same `ppl_vae.sweep.run_sweep` into a fresh folder, so each wall time holds
what a user waits for: starting processes, importing JAX, compiling, training, evaluating at the
end and writing the run folders. "one point" is a one-point sweep, the unit of the ratios the
issue asks for on a GPU (8 vmapped MLP points in at most 1.5x the time of one).

Threads: every process (this one included) is held to one (`ppl_vae.sweep.THREAD_ENV`), as the
sweep's pool holds its workers, so the pool's gain is its cores' and vmap's is one process's.
On a machine shared with other work the numbers move with its load, printed beside them.

    python benchmarks/bench_sweep.py                         # K = 8, 300 steps (minutes)
    python benchmarks/bench_sweep.py --device cuda           # the GPU row (gpu_check.sh sweep)
    python benchmarks/bench_sweep.py --smoke                 # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppl_vae import sweep  # noqa: E402

sweep.set_thread_env()  # before JAX is imported (the serial way trains in this process)

NETWORK = ["encoder.hidden=[128]", "decoder.hidden=[128]", "train.batch_size=128",
           "train.eval_batch_size=2000"]


def overrides(steps: int) -> list[str]:
    every = min(100, steps)
    return [*NETWORK, f"train.steps={steps}", f"train.log_every={every}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]


def timed(points: int, steps: int, engine: str, workers: int | None, device: str | None,
          root: Path) -> float:
    betas = ",".join(f"{0.25 * 2 ** (4 * i / max(points - 1, 1)):.4g}" for i in range(points))
    s = sweep.load_sweep("vae_digits", [f"objective.beta={betas}"], overrides=overrides(steps))
    out = root / f"{engine}-{points}"
    t0 = time.perf_counter()
    record = sweep.run_sweep(s, out, backend="numpyro", engine=engine, workers=workers,
                             device=device, progress=False, log=lambda line: None)
    wall = time.perf_counter() - t0
    failed = [p for p in record["points"] if p["status"] != "done"]
    if failed:
        raise SystemExit(f"bench_sweep: {engine}: {failed[0]['name']}: {failed[0]['error']}")
    shutil.rmtree(out)
    return wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=8, help="K, the sweep's points (8)")
    parser.add_argument("--steps", type=int, default=300, help="steps per point (300)")
    parser.add_argument("--workers", type=int, default=None,
                        help="the pool's processes (default: the cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--smoke", action="store_true", help="K = 2, 20 steps")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    points, steps = (2, 20) if args.smoke else (args.points, args.steps)
    workers = args.workers or os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    load = os.getloadavg()
    try:
        rows = [("one point (a 1-point sweep, in this process)",
                 timed(1, steps, "serial", None, args.device, root)),
                (f"{points} points one after another (one process)",
                 timed(points, steps, "serial", None, args.device, root)),
                (f"{points} points in the pool ({workers} processes)",
                 timed(points, steps, "local", workers, args.device, root)),
                (f"{points} points vmapped (one process)",
                 timed(points, steps, "vmap", None, args.device, root))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    one, serial = rows[0][1], rows[1][1]
    print(f"bench_sweep: NumPyro, vae_digits MLP 64-128-8, {steps} steps per point, device "
          f"{args.device or 'auto'}, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} before / {os.getloadavg()[0]:.2f} after")
    print(f"{'way':<48} {'wall s':>8} {'x one point':>12} {'serial / this':>14}")
    for name, wall in rows:
        print(f"{name:<48} {wall:8.1f} {wall / one:12.2f} {serial / wall:14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"points": points, "steps": steps, "workers": workers,
                                         "device": args.device, "load": load,
                                         "rows": [{"way": n, "wall_s": w} for n, w in rows]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
